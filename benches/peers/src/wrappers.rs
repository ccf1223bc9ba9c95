//! The one `Router` under test, and the five ways it is wrapped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::{StatusCode, header};

/// The wrappers, in the order of the table's columns.
pub const NAMES: [&str; 5] = [
    "bare",
    "ours",
    "cratestack-axum",
    "idempotent",
    "axum-idempotent",
];

pub const BARE: usize = 0;
pub const OURS: usize = 1;
pub const CRATESTACK: usize = 2;
pub const AXUM_IDEMPOTENT: usize = 4;

/// What `POST /orders` answers.
pub const CREATED: &str = r#"{"id":"4c1f0a52-6a55-4d39-9a3e-1d4f2b7c9e10","status":"created"}"#;

/// What `GET /orders` answers.
pub const LISTED: &str = "[]";

/// The session cookie axum-idempotent's session layer reads.
pub const SESSION_COOKIE: &str = "session";

/// Sessions axum-idempotent's store keeps: more than a run creates (a million prefilled
/// records, one session each, and the first requests timed after them).
const SESSIONS: u64 = 8_000_000;

/// The byte cap of our memory store: more than a run fills (its default, 64 MiB, holds
/// some 50,000 records; the grid keeps up to a million and more live).
const OUR_MAX_BYTES: usize = 16 << 30;

/// How many times each wrapper's `POST /orders` handler ran.
static HANDLER_RUNS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

pub fn handler_runs(wrapper: usize) -> u64 {
    HANDLER_RUNS[wrapper].load(Ordering::Relaxed)
}

/// The application: `POST /orders` creates (and counts), `GET /orders` lists.
fn orders(wrapper: usize) -> Router {
    Router::new().route(
        "/orders",
        post(move |body: Bytes| async move {
            HANDLER_RUNS[wrapper].fetch_add(1, Ordering::Relaxed);
            std::hint::black_box(body);
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                CREATED,
            )
        })
        .get(|| async { LISTED }),
    )
}

/// A `POST /orders` whose handler never answers: it holds its key for the 409 case.
fn never_ending() -> Router {
    Router::new().route(
        "/orders",
        post(|_body: Bytes| std::future::pending::<StatusCode>()),
    )
}

/// A freshly built wrapper: the router under test and, for a layer, a second router on
/// the same store whose handler never ends.
pub struct Built {
    pub router: Router,
    pub never_ending: Option<Router>,
}

/// Builds wrapper `wrapper` with a new, empty store. Must run inside the Tokio runtime
/// (idempotent's memory store spawns its task on the current one).
pub fn build(wrapper: usize) -> Built {
    match wrapper {
        BARE => Built {
            router: orders(BARE),
            never_ending: None,
        },
        OURS => {
            use tower_idempotency::{IdempotencyLayer, MemoryStore};
            let store = MemoryStore::builder().max_bytes(OUR_MAX_BYTES).build();
            let layer = |store| {
                IdempotencyLayer::new(store)
                    .share_keys_across_callers()
                    .for_axum()
            };
            Built {
                router: orders(OURS).layer(layer(store.clone())),
                never_ending: Some(never_ending().layer(layer(store))),
            }
        }
        CRATESTACK => {
            use cratestack_axum::idempotency::{IdempotencyLayer, IdempotencyStore};
            let store: Arc<dyn IdempotencyStore> =
                Arc::new(crate::cratestack_store::MemoryStore::default());
            // Without this, a request with neither `Authorization` nor `ConnectInfo` (a
            // `oneshot` call has neither) is refused with 412: one namespace for all, as
            // `share_keys_across_callers` does for ours.
            let layer = IdempotencyLayer::new(store, Duration::from_secs(24 * 60 * 60))
                .with_principal_fingerprint(|_| String::from("bench"));
            Built {
                router: orders(2).layer(layer.clone()),
                never_ending: Some(never_ending().layer(layer)),
            }
        }
        3 => {
            use idempotent::memory::MemoryStore;
            use idempotent::middleware::IdempotencyLayer;
            let store = MemoryStore::builder()
                .try_build()
                .expect("idempotent's memory store needs a runtime");
            Built {
                router: orders(3).layer(IdempotencyLayer::new(store.clone())),
                never_ending: Some(never_ending().layer(IdempotencyLayer::new(store))),
            }
        }
        AXUM_IDEMPOTENT => {
            use axum_idempotent::{IdempotentLayer, IdempotentOptions};
            use ruts::store::moka::MokaStore;
            use ruts::{CookieOptions, SessionLayer};
            use tower_cookies::CookieManagerLayer;
            // Its default capacity (10,000 sessions) is exceeded by the first-key cases,
            // one session each, and then the replay cases' session gets evicted.
            let store = Arc::new(MokaStore::builder().max_capacity(SESSIONS).build());
            // The key is the header's value itself (no hash of the request); a request
            // without one passes through.
            let options = IdempotentOptions::default()
                .use_idempotency_key_header(Some("idempotency-key"), false);
            let wrap =
                |router: Router| {
                    router
                        .layer(IdempotentLayer::<MokaStore>::new(options.clone()))
                        .layer(SessionLayer::new(store.clone()).with_cookie_options(
                            CookieOptions::build().name(SESSION_COOKIE).path("/"),
                        ))
                        .layer(CookieManagerLayer::new())
                };
            Built {
                router: wrap(orders(4)),
                never_ending: Some(wrap(never_ending())),
            }
        }
        _ => unreachable!("five wrappers"),
    }
}

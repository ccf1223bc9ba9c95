//! What one request costs, counted rather than timed: heap allocations per call (a counting
//! global allocator) and, under callgrind, instructions per call. Both are exact and do not
//! depend on the load of the machine, so they tell small changes apart where wall-clock
//! medians cannot.
//!
//! Every case is an axum `Router` with one `POST /orders` route (the handler reads its body
//! and answers `201` with a small JSON body) and a `GET /orders` route, called through
//! `Router::clone().oneshot(req)` with the response body collected, on a current-thread
//! runtime. `bare` has no layer; `noop` has a `Router::layer` that does nothing (what any
//! layer costs); `layer` has `IdempotencyLayer::new(MemoryStore::new())`.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench costs            # allocations
//! bash scripts/instructions.sh                                              # instructions
//! ```
//!
//! `cargo bench --bench costs -- scaling` measures instead how throughput on distinct keys
//! grows from one worker thread to two (each a thread with its own current-thread runtime,
//! sharing one router and store), for the bare router and the layer, in alternating rounds.
//!
//! With arguments `<case> <calls>` the binary only makes `calls` calls of one case (what
//! `scripts/instructions.sh` runs under callgrind, counting inside `measured` alone);
//! `hash-64k <calls>` makes `calls` passes of XXH3-128 over 64 KiB instead, the reference
//! of the 64 KiB target. The allocation table ends with that hash's throughput.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Method, Request, StatusCode, header::CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, MemoryStore, REPLAYED_HEADER};

/// Counts allocations (and reallocations, which allocate) made by the whole process.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Off for the scaling runs: one counter written by every thread would be what they measure.
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn count() {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RESPONSE: &[u8] = br#"{"id":"4c1f0a52-6a55-4d39-9a3e-1d4f2b7c9e10","status":"created"}"#;

async fn create(body: Bytes) -> impl IntoResponse {
    black_box(&body);
    (
        StatusCode::CREATED,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        RESPONSE,
    )
}

/// The same, declaring its commit point first when the layer gave it a claim.
async fn create_committed(
    claim: Option<axum::Extension<IdempotencyClaim>>,
    body: Bytes,
) -> impl IntoResponse {
    if let Some(axum::Extension(claim)) = claim {
        claim.commit().await.expect("the commit point is declared");
    }
    create(body).await
}

async fn list() -> &'static str {
    "[]"
}

fn routes() -> Router {
    Router::new()
        .route("/orders", post(create).get(list))
        .route("/committed", post(create_committed))
}

/// How a case's router is built.
#[derive(Clone, Copy)]
enum Stack {
    Bare,
    Noop,
    /// The layer as axum users add it: answering in axum's `Body` (`for_axum`).
    Layer,
    /// The layer answering in its own `IdempotencyBody`, which axum boxes again.
    Plain,
}

fn router(stack: Stack, store: &MemoryStore) -> Router {
    match stack {
        Stack::Bare => routes(),
        Stack::Noop => routes().layer(tower::layer::layer_fn(|s| s)),
        Stack::Layer => routes().layer(
            IdempotencyLayer::new(store.clone())
                .share_keys_across_callers()
                .for_axum(),
        ),
        Stack::Plain => {
            routes().layer(IdempotencyLayer::new(store.clone()).share_keys_across_callers())
        }
    }
}

/// What a case sends.
#[derive(Clone, Copy)]
enum Send {
    /// `GET /orders`, which the layer does not cover.
    Get,
    /// A `POST` with a fresh key each call, and a body of this size.
    First(usize),
    /// A `POST` with a fresh key each call and a 1 KiB body, to a handler that declares
    /// its commit point.
    Committed,
    /// The same `POST` each call, answered once before the count.
    Replay(usize),
    /// A `POST` whose key is held by a claim that never ends.
    InFlight,
}

struct Case {
    name: &'static str,
    stack: Stack,
    send: Send,
}

const CASES: &[Case] = &[
    Case {
        name: "get/bare",
        stack: Stack::Bare,
        send: Send::Get,
    },
    Case {
        name: "get/noop",
        stack: Stack::Noop,
        send: Send::Get,
    },
    Case {
        name: "get/layer",
        stack: Stack::Layer,
        send: Send::Get,
    },
    Case {
        name: "get/plain",
        stack: Stack::Plain,
        send: Send::Get,
    },
    Case {
        name: "first-0/bare",
        stack: Stack::Bare,
        send: Send::First(0),
    },
    Case {
        name: "first-0/layer",
        stack: Stack::Layer,
        send: Send::First(0),
    },
    Case {
        name: "first-0/plain",
        stack: Stack::Plain,
        send: Send::First(0),
    },
    Case {
        name: "first-1k/bare",
        stack: Stack::Bare,
        send: Send::First(1024),
    },
    Case {
        name: "first-1k/layer",
        stack: Stack::Layer,
        send: Send::First(1024),
    },
    Case {
        name: "commit-1k/bare",
        stack: Stack::Bare,
        send: Send::Committed,
    },
    Case {
        name: "commit-1k/layer",
        stack: Stack::Layer,
        send: Send::Committed,
    },
    Case {
        name: "first-64k/bare",
        stack: Stack::Bare,
        send: Send::First(65536),
    },
    Case {
        name: "first-64k/layer",
        stack: Stack::Layer,
        send: Send::First(65536),
    },
    Case {
        name: "first-1k/plain",
        stack: Stack::Plain,
        send: Send::First(1024),
    },
    Case {
        name: "replay-1k/bare",
        stack: Stack::Bare,
        send: Send::Replay(1024),
    },
    Case {
        name: "replay-1k/layer",
        stack: Stack::Layer,
        send: Send::Replay(1024),
    },
    Case {
        name: "replay-64k/bare",
        stack: Stack::Bare,
        send: Send::Replay(65536),
    },
    Case {
        name: "replay-64k/layer",
        stack: Stack::Layer,
        send: Send::Replay(65536),
    },
    Case {
        name: "409-1k/bare",
        stack: Stack::Bare,
        send: Send::InFlight,
    },
    Case {
        name: "409-1k/layer",
        stack: Stack::Layer,
        send: Send::InFlight,
    },
];

fn body_of(size: usize) -> Bytes {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Keys are built before the calls (and the same length every time), so that what is
/// counted is the call alone.
fn request(method: Method, path: &str, key: Option<&str>, body: &Bytes) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::from(body.clone())).expect("a request")
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, bool, Bytes) {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let status = res.status();
    let replayed = res.headers().contains_key(REPLAYED_HEADER);
    let body = res.into_body().collect().await.expect("a body").to_bytes();
    (status, replayed, body)
}

/// Makes `calls` calls of `case` and returns the allocations they made.
fn run(case: &Case, calls: usize) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (app, requests) = rt.block_on(async {
        let store = MemoryStore::new();
        let app = router(case.stack, &store);
        let layered = matches!(case.stack, Stack::Layer | Stack::Plain);
        let (method, size) = match case.send {
            Send::Get => (Method::GET, 0),
            Send::First(n) | Send::Replay(n) => (Method::POST, n),
            Send::InFlight | Send::Committed => (Method::POST, 1024),
        };
        let body = body_of(size);
        let path = match case.send {
            Send::Committed => "/committed",
            _ => "/orders",
        };
        let keys: Vec<String> = match case.send {
            Send::Get => vec![],
            Send::First(_) | Send::Committed => {
                (0..calls + 1).map(|i| format!("costs-{i:012}")).collect()
            }
            Send::Replay(_) | Send::InFlight => vec!["costs-000000000000".to_owned()],
        };
        let key_of = |i: usize| match case.send {
            Send::Get => None,
            Send::First(_) | Send::Committed => Some(keys[i].as_str()),
            _ => Some(keys[0].as_str()),
        };
        // The expected answer, once, before counting (it also warms up the runtime).
        match case.send {
            Send::InFlight if layered => {
                // A first request that never ends holds the key.
                let held = request(Method::POST, path, key_of(0), &body);
                let hold = Router::new()
                    .route(
                        "/orders",
                        post(|| async { std::future::pending::<StatusCode>().await }),
                    )
                    .layer(IdempotencyLayer::new(store.clone()).share_keys_across_callers());
                tokio::spawn(async move { hold.oneshot(held).await });
                tokio::task::yield_now().await;
                let (status, _, _) =
                    call(&app, request(method.clone(), path, key_of(0), &body)).await;
                assert_eq!(status, StatusCode::CONFLICT);
            }
            _ => {
                let (status, _, _) =
                    call(&app, request(method.clone(), path, key_of(calls), &body)).await;
                assert!(status.is_success(), "{status}");
                if let (Send::Replay(_), true) = (case.send, layered) {
                    let (_, replayed, body) =
                        call(&app, request(method.clone(), path, key_of(0), &body)).await;
                    assert!(replayed);
                    assert_eq!(body, RESPONSE);
                }
            }
        }
        let requests: Vec<Request<Body>> = (0..calls)
            .map(|i| request(method.clone(), path, key_of(i), &body))
            .collect();
        (app, requests)
    });
    measured(&rt, &app, requests)
}

/// The calls alone: `scripts/instructions.sh` counts instructions inside this function
/// only (callgrind's `--toggle-collect`).
#[inline(never)]
fn measured(rt: &tokio::runtime::Runtime, app: &Router, requests: Vec<Request<Body>>) -> u64 {
    rt.block_on(async {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for req in requests {
            black_box(call(app, req).await);
        }
        ALLOCATIONS.load(Ordering::Relaxed) - before
    })
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("scaling") {
        scaling();
        return;
    }
    if let [hash, calls] = args.as_slice()
        && hash == "hash-64k"
    {
        black_box(measured_hash(
            &body_of(65536),
            calls.parse().expect("a number"),
        ));
        return;
    }
    if let [name, calls] = args.as_slice() {
        let case = CASES
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name}"));
        let calls = calls.parse().expect("a number of calls");
        black_box(run(case, calls));
        return;
    }
    const CALLS: usize = 2000;
    println!("| case | allocations per call |");
    println!("|---|---:|");
    for case in CASES {
        let allocations = run(case, CALLS);
        println!(
            "| {} | {:.1} |",
            case.name,
            allocations as f64 / CALLS as f64
        );
    }
    println!();
    println!(
        "XXH3-128 over 64 KiB (the fingerprint's hash): {:.2} GB/s",
        hash_throughput()
    );
}

/// One pass of XXH3-128 (what the layer fingerprints with) over `body`, `calls` times:
/// `scripts/instructions.sh` counts it beside the 64 KiB cases, the reference of the
/// target for large bodies (bare plus one pass of the hash).
#[inline(never)]
fn measured_hash(body: &[u8], calls: usize) -> u128 {
    let mut acc = 0u128;
    for _ in 0..calls {
        acc ^= xxhash_rust::xxh3::xxh3_128(black_box(body));
    }
    acc
}

/// The hash's own throughput over 64 KiB, in GB/s (wall clock, best of five runs).
fn hash_throughput() -> f64 {
    let body = body_of(65536);
    let passes = 4000;
    (0..5)
        .map(|_| {
            let started = std::time::Instant::now();
            black_box(measured_hash(&body, passes));
            (body.len() * passes) as f64 / started.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// First requests per second on distinct keys, one worker thread against two, bare and
/// layer. Each worker is a thread with a current-thread runtime of its own and 16 tasks
/// (thread per core, as a server pins its workers), all sharing one router and one store:
/// what is measured is what the layer and its store share between threads.
fn scaling() {
    COUNTING.store(false, Ordering::Relaxed);
    const TASKS: usize = 16;
    const PER_TASK: usize = 2500;
    const ROUNDS: usize = 7;
    let throughput = |stack: Stack, workers: usize| -> f64 {
        let store = MemoryStore::builder().max_bytes(1 << 34).build();
        let app = router(stack, &store);
        let body = body_of(1024);
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            for w in 0..workers {
                let (app, body) = (app.clone(), body.clone());
                s.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime");
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, async {
                        let tasks: Vec<_> = (0..TASKS)
                            .map(|t| {
                                let (app, body) = (app.clone(), body.clone());
                                tokio::task::spawn_local(async move {
                                    for i in 0..PER_TASK / workers {
                                        let key = format!("scale-{w:02}-{t:04}-{i:08}");
                                        let req =
                                            request(Method::POST, "/orders", Some(&key), &body);
                                        let (status, _, _) = call(&app, req).await;
                                        assert_eq!(status, StatusCode::CREATED);
                                    }
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("a task");
                        }
                    });
                });
            }
        });
        (TASKS * (PER_TASK / workers) * workers) as f64 / started.elapsed().as_secs_f64()
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("| stack | 1 worker (req/s) | 2 workers (req/s) | 2 ÷ 1 |");
    println!("|---|---:|---:|---:|");
    for (name, stack) in [("bare", Stack::Bare), ("layer", Stack::Layer)] {
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            one.push(throughput(stack, 1));
            two.push(throughput(stack, 2));
        }
        let (one, two) = (median(one), median(two));
        println!("| {name} | {one:.0} | {two:.0} | {:.2} |", two / one);
    }
}

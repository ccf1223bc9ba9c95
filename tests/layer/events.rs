//! Faults are visible: lost claims, orphan releases, store failures and takeovers are `warn`
//! events that name the client's key, and never the caller's scope (a hash of a credential).

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FaultStore, Runs, call, eventually};
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// One captured event: its level and every field, as text.
#[derive(Debug, Clone)]
struct Event {
    level: tracing::Level,
    fields: Vec<(String, String)>,
}

impl Event {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn message(&self) -> &str {
        self.field("message").unwrap_or("")
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Event>>>);

impl Capture {
    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    fn warnings_about(&self, key: &str, needle: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.level == tracing::Level::WARN)
            .filter(|e| e.field("key") == Some(key) && e.message().contains(needle))
            .collect()
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Event {
            level: *event.metadata().level(),
            fields,
        });
    }
}

fn request(key: &str) -> http::Request<axum::body::Body> {
    http::Request::post("/orders")
        .header("content-type", "application/json")
        .header("authorization", "Basic c2VjcmV0OnNlY3JldA==")
        .header("idempotency-key", key)
        .body(axum::body::Body::from("{}"))
        .unwrap()
}

/// The fleet's secret for credential scopes.
const SECRET: &str = "a secret shared by the whole fleet";

/// Everything below runs on one thread, inside the capturing subscriber.
#[tokio::test(flavor = "current_thread")]
async fn faults_are_warn_events_with_the_key_and_never_the_scope() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let store = FaultStore::new(MemoryStore::new());
    let runs = Runs::default();

    // A lost claim reply: a store failure, then the release of the orphan claim.
    store.faults.claim_lost_replies.store(1, Ordering::SeqCst);
    let svc = IdempotencyLayer::new(store.clone())
        .scope_by_credential(http::header::AUTHORIZATION, SECRET)
        .layer(runs.handler(Duration::ZERO));
    let refused = call(&svc, request("lost-1")).await;
    assert_eq!(refused.status, 503);
    assert_eq!(capture.warnings_about("lost-1", "store failed").len(), 1);
    eventually("the orphan release is logged", || {
        !capture.warnings_about("lost-1", "released").is_empty()
    })
    .await;

    // A store call that overruns its bound.
    store
        .faults
        .claim_reply_delay_ms
        .store(300, Ordering::SeqCst);
    let slow = IdempotencyLayer::new(store.clone())
        .scope_by_credential(http::header::AUTHORIZATION, SECRET)
        .store_timeout(Duration::from_millis(50))
        .layer(runs.handler(Duration::ZERO));
    assert_eq!(call(&slow, request("slow-1")).await.status, 503);
    let timeouts = capture.warnings_about("slow-1", "store failed");
    assert!(
        timeouts[0]
            .field("error")
            .unwrap()
            .contains("did not answer"),
        "{timeouts:?}"
    );
    store.faults.claim_reply_delay_ms.store(0, Ordering::SeqCst);

    // A takeover: the first owner's heartbeat fails, its lease lapses, a retry takes the key
    // over; the first owner's outcome is dropped, and says so.
    store
        .faults
        .extend_failures
        .store(usize::MAX, Ordering::SeqCst);
    let lapsing = IdempotencyLayer::new(store.clone())
        .scope_by_credential(http::header::AUTHORIZATION, SECRET)
        .lease(Duration::from_millis(100))
        .layer(runs.handler(Duration::from_millis(400)));
    let owner = tokio::spawn({
        let svc = lapsing.clone();
        async move { call(&svc, request("taken-1")).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fast = IdempotencyLayer::new(store.clone())
        .scope_by_credential(http::header::AUTHORIZATION, SECRET)
        .lease(Duration::from_millis(100))
        .layer(runs.handler(Duration::ZERO));
    // The first retry after the lapse contests the lease, the next one takes it over.
    assert_eq!(call(&fast, request("taken-1")).await.status, 409);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(call(&fast, request("taken-1")).await.status, 201);
    assert_eq!(owner.await.unwrap().status, 201);
    assert_eq!(
        capture
            .warnings_about("taken-1", "this outcome is stored if")
            .len(),
        1
    );
    assert!(!capture.warnings_about("taken-1", "extending").is_empty());

    // The scope derived from the credential appears in no event.
    let scope = Scope::keyed(SECRET.as_bytes(), b"Basic c2VjcmV0OnNlY3JldA==");
    for event in capture.events() {
        for (_, value) in &event.fields {
            assert!(!value.contains(scope.as_str()), "{event:?}");
        }
    }
}

/// A layer with no caller scope says so once, as an `error` that names the choices, and
/// refuses every covered request.
#[tokio::test(flavor = "current_thread")]
async fn a_layer_without_a_caller_scope_says_so_once() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(MemoryStore::new()).layer(runs.handler(Duration::ZERO));
    for key in ["a", "b", "c"] {
        assert_eq!(call(&svc, request(key)).await.status, 403);
    }
    let errors: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.level == tracing::Level::ERROR)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    for choice in ["scope_by_principal", "share_keys_across_callers"] {
        assert!(errors[0].message().contains(choice), "{errors:?}");
    }
    assert_eq!(runs.started(), 0);
}

/// A span: its id, its name, and its fields in the order they were recorded.
type SpanFields = (tracing::span::Id, String, Vec<(String, String)>);

/// Every span's fields as they were recorded.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanFields>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _ctx: Context<'_, S>,
    ) {
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        let name = attrs.metadata().name().to_owned();
        self.0.lock().unwrap().push((id.clone(), name, fields));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _ctx: Context<'_, S>,
    ) {
        let mut spans = self.0.lock().unwrap();
        if let Some((_, _, fields)) = spans.iter_mut().rev().find(|(i, _, _)| i == id) {
            values.record(&mut Fields(fields));
        }
    }
}

/// The `idempotency` span carries OpenTelemetry's HTTP attributes and the documented
/// `idempotency.*` ones (never the raw key or scope); replays and 409s are `info` events,
/// 422s and unknown outcomes `warn`.
#[tokio::test(flavor = "current_thread")]
async fn spans_carry_http_attributes_and_answers_are_events() {
    let capture = Capture::default();
    let spans = Spans::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry()
            .with(capture.clone())
            .with(spans.clone()),
    );
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(runs.handler(Duration::ZERO));
    assert_eq!(call(&svc, request("order-7f3a")).await.status, 201);
    assert!(call(&svc, request("order-7f3a")).await.replayed());
    let mut other = request("order-7f3a");
    *other.body_mut() = axum::body::Body::from("{\"other\":1}");
    assert_eq!(call(&svc, other).await.status, 422);

    let spans = spans.0.lock().unwrap().clone();
    let ours: Vec<_> = spans
        .iter()
        .filter(|(_, n, _)| n == "idempotency")
        .collect();
    assert_eq!(ours.len(), 3);
    let field = |fields: &Vec<(String, String)>, name: &str| {
        fields
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    for (expected, (_, _, fields)) in [("executed", 201), ("replayed", 201), ("mismatch", 422)]
        .iter()
        .zip(&ours)
    {
        assert_eq!(
            field(fields, "http.request.method").as_deref(),
            Some("POST")
        );
        assert_eq!(field(fields, "url.path").as_deref(), Some("/orders"));
        assert_eq!(
            field(fields, "idempotency.outcome").as_deref(),
            Some(expected.0)
        );
        assert_eq!(
            field(fields, "idempotency.replayed").as_deref(),
            Some(if expected.0 == "replayed" {
                "true"
            } else {
                "false"
            })
        );
        assert_eq!(
            field(fields, "idempotency.store").as_deref(),
            Some("memory")
        );
        let hash = field(fields, "idempotency.key_hash").expect("a key hash");
        assert!(
            hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{hash}"
        );
        assert!(field(fields, "idempotency.store.claim_ms").is_some());
        // Never the client's key, nor its scope.
        for (name, value) in fields.iter() {
            assert!(
                !value.contains("order-7f3a") && !value.contains("anon"),
                "{name} = {value}"
            );
        }
        assert_eq!(
            field(fields, "http.response.status_code"),
            Some(expected.1.to_string())
        );
    }
    let events = capture.events();
    assert!(
        events.iter().any(|e| e.level == tracing::Level::INFO
            && e.message().contains("replayed the stored answer"))
    );
    assert!(
        events
            .iter()
            .any(|e| e.level == tracing::Level::WARN && e.message().contains("another payload"))
    );
}

/// A heartbeat that lands just after the completion stored the record finds the key no
/// longer in flight. That is not a takeover: nothing else claimed the key. It logged
/// "taken over by another request" for a request that was alone.
#[tokio::test(flavor = "current_thread")]
async fn a_heartbeat_racing_the_completion_is_not_a_takeover() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let store = FaultStore::new(MemoryStore::new());
    // The record is stored at once; its reply takes longer than a heartbeat period.
    store
        .faults
        .complete_reply_delay_ms
        .store(300, Ordering::SeqCst);
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(150))
        .layer(runs.handler(Duration::ZERO));
    assert_eq!(call(&svc, request("alone-1")).await.status, 201);
    assert!(
        store.faults.extends.load(Ordering::SeqCst) >= 1,
        "a heartbeat ran while the completion's reply was on its way"
    );
    let taken = capture.warnings_about("alone-1", "taken over");
    assert!(taken.is_empty(), "a spurious takeover warning: {taken:?}");
    let replay = call(&svc, request("alone-1")).await;
    assert_eq!(replay.status, 201);
    assert_eq!(runs.started(), 1);
}

/// A request whose lease was taken over before its outcome was stored says so on its span.
#[tokio::test(flavor = "current_thread")]
async fn a_lost_lease_is_an_attribute_of_the_requests_span() {
    let spans = Spans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let store = FaultStore::new(MemoryStore::new());
    // The owner cannot renew: its lease lapses while it runs.
    store.faults.extend_failures.store(1_000, Ordering::SeqCst);
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(100))
        .layer(runs.handler(Duration::from_millis(600)));
    let first = {
        let svc = svc.clone();
        tokio::spawn(async move { call(&svc, request("lapsed")).await })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    call(&svc, request("lapsed")).await; // contests the lapsed lease
    tokio::time::sleep(Duration::from_millis(100)).await;
    call(&svc, request("lapsed")).await; // takes the key over
    first.await.unwrap();
    eventually("the first request's span says its lease was lost", || {
        spans.0.lock().unwrap().iter().any(|(_, name, fields)| {
            name == "idempotency"
                && fields
                    .iter()
                    .any(|(n, v)| n == "idempotency.lease_lost" && v == "true")
        })
    })
    .await;
}

/// An event's message, and the name of the span it was emitted in.
type EventInSpan = (String, Option<String>);

/// Every event, with the span it was emitted in.
#[derive(Clone, Default)]
struct EventSpans(Arc<Mutex<Vec<EventInSpan>>>);

impl<S> tracing_subscriber::Layer<S> for EventSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        let message = fields
            .into_iter()
            .find(|(n, _)| n == "message")
            .map(|(_, v)| v)
            .unwrap_or_default();
        let span = ctx.event_span(event).map(|s| s.name().to_owned());
        self.0.lock().unwrap().push((message, span));
    }
}

/// What the wrapped service logs while it runs belongs to the request's `idempotency`
/// span, on the first run (the operation the response future polls) as everywhere else:
/// a user's traces keep their handler's events under the request that caused them.
#[tokio::test(flavor = "current_thread")]
async fn the_services_events_belong_to_the_requests_span() {
    let events = EventSpans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(events.clone()));
    let handler = tower::service_fn(|_req: http::Request<axum::body::Body>| async {
        tracing::info!("the handler ran");
        // Pending once: the rest of its run is a later poll of the operation.
        tokio::task::yield_now().await;
        tracing::info!("the handler answers");
        Ok::<_, std::convert::Infallible>(
            http::Response::builder()
                .status(201)
                .body(axum::body::Body::from("{\"id\":1}"))
                .unwrap(),
        )
    });
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(handler);
    assert_eq!(call(&svc, request("spanned-1")).await.status, 201);
    assert!(call(&svc, request("spanned-1")).await.replayed());

    let events = events.0.lock().unwrap().clone();
    for message in ["the handler ran", "the handler answers"] {
        let found: Vec<_> = events.iter().filter(|(m, _)| m == message).collect();
        assert_eq!(
            found.len(),
            1,
            "{message:?} once (the replay runs nothing): {events:?}"
        );
        assert_eq!(
            found[0].1.as_deref(),
            Some("idempotency"),
            "{message:?} outside the request's span: {events:?}"
        );
    }
}

//! The client side (feature `client`): one key per logical call, and retries that keep it.
//!
//! A client that timed out cannot know whether its operation ran. It must send the same
//! request again **with the same key**, so that the server replays the first answer instead
//! of running the operation twice. Two pieces do that for any Tower HTTP client (hyper-util's
//! client, a tonic `Channel`, any `Service<http::Request<B>>`):
//!
//! - [`IdempotencyKeyLayer`] gives each call a fresh key (a UUID v4) unless the caller set one,
//!   and puts it in the request's extensions as an [`IdempotencyKey`](crate::IdempotencyKey), so the caller can log
//!   it or look the operation up later. The header carries it as the draft's RFC 9651
//!   sf-string (`Idempotency-Key: "8e03978e-…"`), which the server accepts whether it parses
//!   keys strictly or leniently ([`KeyParsing`](crate::KeyParsing)); a key the caller set
//!   bare is sent quoted, `"` and `\` escaped, and one no sf-string can carry (not printable
//!   ASCII, empty, repeated) fails the call with a [`KeyError`](crate::KeyError) before anything is sent;
//! - [`RetryPolicy`], a [`tower::retry::Policy`], sends the call again when its outcome is not
//!   known (a transport error, a timeout), when the key is still in use (`409` with
//!   `Retry-After`; gRPC `ABORTED`) and when the service is unavailable (`503`; gRPC
//!   `UNAVAILABLE`). It honours `Retry-After` (capped), backs off exponentially with jitter,
//!   spends from a shared budget, and stops on every other answer: `422` (the key was used with
//!   another payload), `410`, other `4xx` and `5xx`, gRPC `FAILED_PRECONDITION` and the other
//!   codes, and any replayed answer.
//!
//! The key layer goes **outside** the retry layer, so that every attempt carries the key the
//! call was given; a timeout goes inside, so that each attempt has its own:
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower::retry::RetryLayer;
//! use tower::timeout::TimeoutLayer;
//! use tower_idempotency::client::{IdempotencyKeyLayer, RetryPolicy};
//!
//! # fn wrap<S>(http_client: S) -> impl Sized
//! # where S: tower::Service<http::Request<http_body_util::Full<bytes::Bytes>>> + Clone {
//! let client = ServiceBuilder::new()
//!     .layer(IdempotencyKeyLayer::new())
//!     .layer(RetryLayer::new(RetryPolicy::new()))
//!     .layer(TimeoutLayer::new(Duration::from_secs(2)))
//!     .service(http_client);
//! # client }
//! ```
//!
//! With tower's `RetryLayer`, only requests whose body can be sent again are retried
//! ([`CloneBody`]: `Full<Bytes>`, `Empty<Bytes>`, `Bytes`, `String`, `Vec<u8>`). Any other is
//! sent once, never retried with a body that is gone. Nor is a `POST` or `PATCH` (any method
//! HTTP does not define as idempotent) that carries no key: a second attempt could run it
//! twice.
//!
//! For a streaming body (a tonic client's; any [`WrapBody`]), [`BufferedRetryLayer`] takes
//! the place of `RetryLayer`: it sends the body as it comes, never waiting for its end, so
//! client-streaming and bidirectional gRPC calls start at once, and keeps a copy of up to
//! `max_body` bytes (1 MiB) for retries. A call whose body grows past that is sent once,
//! without retries (see [`BufferedRetryLayer`]).

mod buffered;
mod key;
mod policy;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;

pub use buffered::*;
pub use key::*;
pub use policy::*;

#[cfg(test)]
mod tests {
    /// `Retry-After` as an HTTP-date (RFC 9110 §10.2.3, as proxies and other servers send
    /// it) counts as well as seconds: a `409` carrying one is the key in use, retried, and a
    /// `503` waits for the date. (Found by review: the date was not read, so such a `409`
    /// was final and a `503` retried after the bare backoff.)
    #[test]
    fn a_retry_after_given_as_a_date_is_honoured() {
        use std::time::SystemTime;
        let answer = |status: u16, retry_after: &str| {
            Response::builder()
                .status(status)
                .header("retry-after", retry_after)
                .body(())
                .unwrap()
        };
        let in_3s = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
        assert!(
            matches!(verdict(&answer(409, &in_3s)), Verdict::Retry(Some(_))),
            "409 with Retry-After: {in_3s}"
        );
        let in_20s = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(20));
        let v = verdict(&answer(503, &in_20s));
        assert!(
            matches!(v, Verdict::Retry(Some(d)) if d >= Duration::from_secs(15)),
            "503 with Retry-After: {in_20s} gave {v:?}"
        );
        // A date past: at once. Garbage: not read (a 409 with it stays final).
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(
            verdict(&answer(503, &past)),
            Verdict::Retry(Some(Duration::ZERO))
        );
        assert_eq!(verdict(&answer(409, "soon")), Verdict::Stop);
    }

    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderValue, Method, Request, Response};
    use tower::retry::budget::TpsBudget;
    use tower_layer::Layer;
    use tower_service::Service;

    use crate::key::{IdempotencyKey, KeyError};
    use crate::outcome::REPLAYED_HEADER;

    use super::*;
    use tower::ServiceExt as _;

    fn answer(status: u16, headers: &[(&str, &str)]) -> Response<()> {
        let mut res = Response::builder().status(status);
        for (name, value) in headers {
            res = res.header(*name, *value);
        }
        res.body(()).unwrap()
    }

    #[test]
    fn verdicts() {
        let retry_in = |s| Verdict::Retry(Some(Duration::from_secs(s)));
        assert_eq!(verdict(&answer(409, &[("retry-after", "2")])), retry_in(2));
        assert_eq!(
            verdict(&answer(409, &[])),
            Verdict::Stop,
            "an app's own conflict"
        );
        assert_eq!(verdict(&answer(503, &[])), Verdict::Retry(None));
        assert_eq!(verdict(&answer(503, &[("retry-after", "7")])), retry_in(7));
        for status in [200, 201, 400, 404, 410, 413, 422, 429, 500, 502] {
            assert_eq!(verdict(&answer(status, &[])), Verdict::Stop, "{status}");
        }
        let replayed = answer(503, &[(REPLAYED_HEADER.as_str(), "true")]);
        assert_eq!(
            verdict(&replayed),
            Verdict::Stop,
            "a replayed answer is final"
        );
        let grpc = |code: &str| {
            answer(
                200,
                &[("content-type", "application/grpc"), ("grpc-status", code)],
            )
        };
        assert_eq!(verdict(&grpc("10")), Verdict::Retry(None), "ABORTED");
        assert_eq!(verdict(&grpc("14")), Verdict::Retry(None), "UNAVAILABLE");
        for code in ["0", "2", "3", "9", "13"] {
            assert_eq!(verdict(&grpc(code)), Verdict::Stop, "{code}");
        }
        // gRPC's pushback (gRFC A6) comes before Retry-After; negative or unreadable: stop.
        let pushed = |ms: &str| {
            answer(
                200,
                &[
                    ("content-type", "application/grpc"),
                    ("grpc-status", "10"),
                    ("retry-after", "9"),
                    ("grpc-retry-pushback-ms", ms),
                ],
            )
        };
        assert_eq!(
            verdict(&pushed("250")),
            Verdict::Retry(Some(Duration::from_millis(250)))
        );
        assert_eq!(verdict(&pushed("-1")), Verdict::Stop);
        assert_eq!(verdict(&pushed("soon")), Verdict::Stop);
        let streamed = answer(200, &[("content-type", "application/grpc")]);
        assert_eq!(verdict(&streamed), Verdict::Stop);
        assert_eq!(
            verdict(&answer(409, &[("retry-after", "soon")])),
            Verdict::Stop
        );
    }

    #[test]
    fn pauses_grow_are_capped_and_run_out() {
        let mut policy = RetryPolicy::new()
            .max_retries(4)
            .backoff(Duration::from_millis(100), Duration::from_millis(300))
            .max_retry_after(Duration::from_secs(1));
        let steps = [100, 200, 300];
        for step in steps {
            let pause = policy.next_pause(None).unwrap();
            let step = Duration::from_millis(step);
            assert!(pause >= step / 2 && pause <= step, "{pause:?} for {step:?}");
        }
        assert_eq!(
            policy.next_pause(Some(Duration::from_secs(60))),
            Some(Duration::from_secs(1)),
            "Retry-After is capped"
        );
        assert_eq!(policy.next_pause(None), None, "four retries at most");
    }

    #[test]
    fn requests_without_a_key_are_retried_only_when_idempotent() {
        let mut policy = RetryPolicy::new();
        let req = |method: Method, key: bool| {
            let mut b = Request::builder().method(method).uri("/orders");
            if key {
                b = b.header("idempotency-key", "k");
            }
            b.body(Bytes::new()).unwrap()
        };
        type P =
            dyn tower::retry::Policy<Request<Bytes>, Response<()>, (), Future = tokio::time::Sleep>;
        let policy: &mut P = &mut policy;
        assert!(policy.clone_request(&req(Method::POST, false)).is_none());
        assert!(policy.clone_request(&req(Method::PATCH, false)).is_none());
        assert!(policy.clone_request(&req(Method::POST, true)).is_some());
        for method in [Method::GET, Method::PUT, Method::DELETE, Method::HEAD] {
            assert!(policy.clone_request(&req(method, false)).is_some());
        }
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let mut policy = RetryPolicy::new();
        let mut pauses = Vec::new();
        while let Some(pause) = policy.next_pause(None) {
            pauses.push(pause);
        }
        assert_eq!(pauses.len(), 5, "five retries");
        assert!(pauses[0] >= Duration::from_millis(50) && pauses[0] <= Duration::from_millis(100));
        assert!(pauses[4] <= Duration::from_secs(5));
        let mut policy = RetryPolicy::new();
        assert_eq!(
            policy.next_pause(Some(Duration::from_secs(120))),
            Some(Duration::from_secs(30)),
            "Retry-After is honoured up to 30 s"
        );
    }

    #[test]
    fn an_empty_budget_stops_retries() {
        let mut policy = RetryPolicy::new().budget(TpsBudget::new(Duration::from_secs(1), 0, 0.0));
        assert_eq!(policy.next_pause(None), None);
    }

    #[test]
    fn keys_go_as_sf_strings_every_parsing_mode_reads_back() {
        use crate::key::{KeyParsing, parse_key};
        for (set, key, sent) in [
            ("k1", "k1", r#""k1""#),
            (r#""k1""#, "k1", r#""k1""#),
            (r#"say "hi""#, r#"say "hi""#, r#""say \"hi\"""#),
            (r"a\b", r"a\b", r#""a\\b""#),
            (r#""a\"b""#, r#"a"b"#, r#""a\"b""#),
            ("two words", "two words", r#""two words""#),
        ] {
            let (parsed, value) = key_header_value(&HeaderValue::from_static(set)).unwrap();
            assert_eq!(
                (parsed.as_str(), value.to_str().unwrap()),
                (key, sent),
                "{set}"
            );
            for parsing in [KeyParsing::Strict, KeyParsing::Lenient] {
                assert_eq!(parse_key(&value, parsing, 255).unwrap().as_str(), key);
            }
        }
        for (set, why) in [
            (&b""[..], KeyError::Empty),
            (b"tab\there", KeyError::NotPrintable),
            ("clé".as_bytes(), KeyError::NotPrintable),
            (br#""unclosed"#, KeyError::NotSfString),
            (br#""""#, KeyError::Empty),
        ] {
            let value = HeaderValue::from_bytes(set).unwrap();
            assert_eq!(key_header_value(&value).unwrap_err(), why, "{value:?}");
        }
        let layer = IdempotencyKeyLayer::new();
        let mut headers = http::HeaderMap::new();
        headers.append("idempotency-key", HeaderValue::from_static("a"));
        headers.append("idempotency-key", HeaderValue::from_static("b"));
        let refused = layer.assign(&Method::POST, &mut headers, &mut http::Extensions::new());
        assert_eq!(refused, Err(KeyError::Repeated));
        let mut headers = http::HeaderMap::new();
        let mut extensions = http::Extensions::new();
        assert_eq!(
            layer.assign(&Method::POST, &mut headers, &mut extensions),
            Ok(true)
        );
        let made = extensions.get::<IdempotencyKey>().unwrap();
        assert_eq!(headers["idempotency-key"], format!("\"{made}\""));
    }

    /// A request body fed by a channel: it ends when the sender goes.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl http_body::Body for Fed {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|data| Ok(http_body::Frame::data(data))))
        }
    }

    type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

    /// What one attempt of the scripted service does: read `frames` frames of the body (all
    /// of it if `None`), then answer `status`, or fail if it is `None`.
    #[derive(Clone, Copy)]
    struct Step {
        frames: Option<usize>,
        status: Option<u16>,
    }

    /// What each attempt of a [`scripted`] service read.
    type Reads = Arc<std::sync::Mutex<Vec<Vec<Bytes>>>>;

    /// A service that follows `steps`, one per attempt, and records what each attempt read.
    fn scripted(
        steps: &[Step],
    ) -> (
        impl Service<Request<Body>, Response = Response<()>, Error = BoxError, Future: Send>
        + Clone
        + Send
        + 'static,
        Reads,
    ) {
        use http_body_util::BodyExt;
        let steps = Arc::new(std::sync::Mutex::new(steps.to_vec()));
        let read = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&read);
        let service = tower::service_fn(move |req: Request<Body>| {
            let step = steps.lock().unwrap().remove(0);
            let read = Arc::clone(&read);
            async move {
                let mut body = req.into_body();
                let mut got = Vec::new();
                while step.frames.is_none_or(|n| got.len() < n) {
                    match body.frame().await {
                        Some(frame) => got.push(frame.unwrap().into_data().unwrap()),
                        None => break,
                    }
                }
                read.lock().unwrap().push(got);
                match step.status {
                    Some(status) => Ok(Response::builder().status(status).body(()).unwrap()),
                    None => Err(BoxError::from("connection reset")),
                }
            }
        });
        (service, seen)
    }

    fn quick() -> RetryPolicy {
        RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(1))
    }

    fn keyed(body: Body) -> Request<Body> {
        Request::post("/up")
            .header("idempotency-key", "\"k\"")
            .body(body)
            .unwrap()
    }

    const FAIL: Step = Step {
        frames: None,
        status: None,
    };
    const OK: Step = Step {
        frames: None,
        status: Some(200),
    };

    #[tokio::test]
    async fn a_body_that_ended_within_the_bound_is_sent_again() {
        use http_body_util::BodyExt;
        let (inner, read) = scripted(&[FAIL, OK]);
        let body = http_body_util::Full::new(Bytes::from_static(b"abc"))
            .map_err(BoxError::from)
            .boxed_unsync();
        let res = BufferedRetryLayer::new(quick())
            .layer(inner)
            .oneshot(keyed(body))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(*read.lock().unwrap(), vec![vec![Bytes::from("abc")]; 2]);
    }

    #[tokio::test]
    async fn an_attempt_that_failed_before_reading_the_body_is_retried_with_all_of_it() {
        let untouched = Step {
            frames: Some(0),
            status: None,
        };
        let (inner, read) = scripted(&[untouched, OK]);
        let (feed, rx) = tokio::sync::mpsc::unbounded_channel();
        feed.send(Bytes::from("a")).unwrap();
        let call = tokio::spawn(
            BufferedRetryLayer::new(quick())
                .layer(inner)
                .oneshot(keyed(Body::new(Fed(rx)))),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        feed.send(Bytes::from("b")).unwrap();
        drop(feed);
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
        let read = read.lock().unwrap();
        assert_eq!(*read, [vec![], vec![Bytes::from("a"), Bytes::from("b")]]);
    }

    #[tokio::test]
    async fn an_open_stream_is_sent_at_once_and_resent_from_its_copy() {
        // The first attempt reads one frame and fails while the stream is open; the retry
        // sends that frame again, then the rest as it comes.
        let first_frame = Step {
            frames: Some(1),
            status: None,
        };
        let (inner, read) = scripted(&[first_frame, OK]);
        let (feed, rx) = tokio::sync::mpsc::unbounded_channel();
        feed.send(Bytes::from("a")).unwrap();
        let call = tokio::spawn(
            BufferedRetryLayer::new(quick())
                .layer(inner)
                .oneshot(keyed(Body::new(Fed(rx)))),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read.lock().unwrap().len(), 1, "the first attempt ran");
        feed.send(Bytes::from("b")).unwrap();
        drop(feed);
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
        let read = read.lock().unwrap();
        assert_eq!(
            *read,
            [
                vec![Bytes::from("a")],
                vec![Bytes::from("a"), Bytes::from("b")]
            ]
        );
    }

    #[tokio::test]
    async fn a_body_past_the_bound_is_sent_once() {
        use http_body_util::BodyExt;
        // Retryable answers, but the body outgrew the copy: the first answer is the call's.
        for first in [
            FAIL,
            Step {
                frames: None,
                status: Some(503),
            },
        ] {
            let (inner, read) = scripted(&[first, OK]);
            let (feed, rx) = tokio::sync::mpsc::unbounded_channel();
            for chunk in ["abc", "def"] {
                feed.send(Bytes::from(chunk)).unwrap();
            }
            drop(feed);
            let result = BufferedRetryLayer::new(quick())
                .max_body(4)
                .layer(inner)
                .oneshot(keyed(Fed(rx).boxed_unsync()))
                .await;
            match first.status {
                Some(status) => assert_eq!(result.unwrap().status(), status),
                None => assert!(result.is_err()),
            }
            assert_eq!(read.lock().unwrap().len(), 1, "one attempt");
        }
    }

    #[test]
    fn the_copy_goes_with_the_final_answer() {
        use http_body::Body as _;
        let tee_ = Arc::new(std::sync::Mutex::new(Tee::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            10,
        )));
        let mut body = Tee::next_attempt(&tee_);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert_eq!(body.size_hint().exact(), Some(3));
        let frame = std::pin::Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(frame, Poll::Ready(Some(Ok(_)))));
        assert!(body.is_end_stream(), "Full tells it ended");
        assert_eq!(lock(&tee_).kept_bytes, 3);
        // A retry resends the copy, exactly.
        let mut again = Tee::next_attempt(&tee_);
        let Poll::Ready(Some(Err(err))) = std::pin::Pin::new(&mut body).poll_frame(&mut cx) else {
            panic!("given up: fails")
        };
        assert!(err.downcast_ref::<AttemptGivenUp>().is_some(), "{err}");
        assert_eq!(again.size_hint().exact(), Some(3));
        let frame = std::pin::Pin::new(&mut again).poll_frame(&mut cx);
        let Poll::Ready(Some(Ok(frame))) = frame else {
            panic!("the copy")
        };
        assert_eq!(frame.into_data().unwrap(), "abc");
        lock(&tee_).finish();
        assert_eq!(lock(&tee_).kept_bytes, 0, "the copy is freed");
        assert!(again.is_end_stream());
    }

    #[test]
    fn requests_are_copied_whole_or_not_at_all() {
        let req = Request::post("/orders")
            .header("idempotency-key", "k1")
            .body(http_body_util::Full::new(Bytes::from("{}")))
            .unwrap();
        let copy = clone_request(&req).unwrap();
        assert_eq!(copy.method(), Method::POST);
        assert_eq!(copy.uri(), "/orders");
        assert_eq!(copy.headers()["idempotency-key"], "k1");

        struct Stream;
        impl CloneBody for Stream {
            fn clone_body(&self) -> Option<Self> {
                None
            }
        }
        assert!(clone_request(&Request::new(Stream)).is_none());
    }
}

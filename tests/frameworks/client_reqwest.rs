//! The client side with reqwest, through reqwest-middleware: a call that times out is
//! retried with its key and ends with the first answer, replayed; the operation runs once.
#![cfg(feature = "reqwest")]

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Seen, counting_server};
use http::StatusCode;
use tower_idempotency::client::RetryPolicy;
use tower_idempotency::client::reqwest::IdempotencyMiddleware;

fn client(timeout: Duration) -> reqwest_middleware::ClientWithMiddleware {
    let http = reqwest::Client::builder().timeout(timeout).build().unwrap();
    reqwest_middleware::ClientBuilder::new(http)
        .with(IdempotencyMiddleware::new(
            RetryPolicy::new()
                .max_retries(20)
                .backoff(Duration::from_millis(20), Duration::from_millis(100))
                .max_retry_after(Duration::from_millis(150)),
        ))
        .build()
}

#[tokio::test]
async fn a_reqwest_call_that_times_out_is_retried_with_its_key_and_replayed() {
    let seen = Seen::default();
    let addr = counting_server(seen.clone(), Duration::from_millis(400)).await;
    let res = client(Duration::from_millis(150))
        .post(format!("http://{addr}/orders"))
        .body("{\"sku\":1}")
        .send()
        .await
        .expect("the call ends with an answer");
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.text().await.unwrap(), "order 0 for {\"sku\":1}");
    assert_eq!(
        seen.runs.load(Ordering::SeqCst),
        1,
        "the operation ran once"
    );
    let keys = seen.keys.lock().unwrap().clone();
    assert!(keys.len() >= 2, "{keys:?}");
    let first = keys[0].clone().expect("a key was sent");
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(first.as_str())),
        "{keys:?}"
    );
}

#[tokio::test]
async fn final_answers_and_other_methods_are_sent_once() {
    let seen = Seen::default();
    let addr = counting_server(seen.clone(), Duration::ZERO).await;
    let client = client(Duration::from_secs(5));
    let first = client
        .post(format!("http://{addr}/orders"))
        .header("idempotency-key", "mine")
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let reused = client
        .post(format!("http://{addr}/orders"))
        .header("idempotency-key", "mine")
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // A GET gets no key and is not retried (405 here).
    let get = client
        .get(format!("http://{addr}/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    let keys = seen.keys.lock().unwrap().clone();
    assert_eq!(
        keys,
        [
            Some("\"mine\"".to_owned()),
            Some("\"mine\"".to_owned()),
            None
        ],
        "one attempt each, the key as an sf-string"
    );
}

#[tokio::test]
async fn reqwest_keys_are_accepted_by_every_parsing_mode_of_the_server() {
    use axum::routing::post;
    use tower_idempotency::{IdempotencyKey, KeyParsing};
    for parsing in [KeyParsing::Strict, KeyParsing::Lenient] {
        // Answers with the key the layer read.
        let app = axum::Router::new()
            .route(
                "/orders",
                post(|req: axum::extract::Request| async move {
                    let key = req.extensions().get::<IdempotencyKey>().unwrap();
                    (StatusCode::CREATED, key.as_str().to_owned())
                }),
            )
            .layer(
                tower_idempotency::IdempotencyLayer::new(tower_idempotency::MemoryStore::new())
                    .share_keys_across_callers()
                    .key_parsing(parsing),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = client(Duration::from_secs(5));

        let made = client
            .post(format!("http://{addr}/orders"))
            .send()
            .await
            .unwrap();
        assert_eq!(made.status(), StatusCode::CREATED, "{parsing:?}");
        assert_eq!(made.text().await.unwrap().len(), 36, "{parsing:?}: a UUID");
        for (sent, read) in [("mine", "mine"), ("say \"hi\" \\o/", "say \"hi\" \\o/")] {
            let res = client
                .post(format!("http://{addr}/orders"))
                .header("idempotency-key", sent)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::CREATED, "{parsing:?}: {sent}");
            assert_eq!(res.text().await.unwrap(), read, "{parsing:?}");
        }
    }
}

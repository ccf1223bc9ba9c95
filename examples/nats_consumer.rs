//! An idempotent NATS JetStream consumer, next to a plain one.
//!
//! ```text
//! cargo run --release --example nats_consumer --features nats
//! ```
//!
//! Publishes `MESSAGES` messages (default 20000) to a stream of its own, each key twice (a
//! producer that retried), and consumes them twice: with a plain consumer (every copy runs
//! the handler) and with [`JetStreamConsumer`] over the memory store (each key runs once; the
//! copy is acknowledged from the stored record). Prints the handler runs and the messages
//! per second of each, then deletes its stream. `NATS_URL` (default
//! `nats://127.0.0.1:4222`) names the server; `CONCURRENCY` (default 32) how many messages
//! are handled at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tower_idempotency::async_nats::{self, HeaderMap, jetstream};
use tower_idempotency::consumer::nats::JetStreamConsumer;
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, InFlight, MemoryStore, StoreError};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let messages = env("MESSAGES", 20_000).max(2) / 2 * 2;
    let concurrency = env("CONCURRENCY", 32).max(1);
    let client = async_nats::connect(&url)
        .await
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))?;
    let js = jetstream::new(client);
    let name = format!("DEMO_ORDERS_{}", std::process::id());
    let subject = format!("{name}.new");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;

    // Each order published twice, as a producer whose first publish timed out would.
    // Acknowledgements awaited in batches: the client bounds how many may be pending.
    let mut acks = Vec::with_capacity(128);
    for n in 0..messages {
        let mut headers = HeaderMap::new();
        let key = format!("order-{}", n / 2);
        headers.insert("Idempotency-Key", key.as_str());
        acks.push(
            js.publish_with_headers(subject.clone(), headers, Bytes::from(key))
                .await?,
        );
        if acks.len() == 128 || n + 1 == messages {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    println!(
        "published {messages} messages ({} orders, each twice) to {name}",
        messages / 2
    );

    // A plain consumer: handles and acknowledges every copy.
    let runs = Arc::new(AtomicUsize::new(0));
    let plain = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("plain".into()),
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    plain
        .messages()
        .await?
        .take(messages)
        .for_each_concurrent(concurrency, |msg| {
            let runs = Arc::clone(&runs);
            async move {
                let msg = msg.expect("a message");
                runs.fetch_add(1, Ordering::Relaxed);
                msg.ack().await.expect("acked");
            }
        })
        .await;
    let plain_time = started.elapsed();
    let plain_runs = runs.swap(0, Ordering::Relaxed);

    // The idempotent consumer: each order once, the copies acknowledged from the record.
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("idempotent".into()),
            ..Default::default()
        })
        .await?;
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .on_in_flight(InFlight::Wait(Duration::from_secs(10)));
    let worker = {
        let runs = Arc::clone(&runs);
        JetStreamConsumer::new(&layer, move |_msg, _claim: IdempotencyClaim| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::Relaxed);
                Ok::<_, StoreError>(())
            }
        })
        .key_from_header("Idempotency-Key")
        .concurrency(concurrency)
    };
    let started = Instant::now();
    let settled = worker.run(consumer.messages().await?.take(messages)).await;
    let idempotent_time = started.elapsed();
    settled?;
    let idempotent_runs = runs.load(Ordering::Relaxed);

    let rate = |t: Duration| messages as f64 / t.as_secs_f64();
    println!(
        "plain consumer:      {plain_runs:>6} handler runs, {:>8.0} messages/s",
        rate(plain_time)
    );
    println!(
        "idempotent consumer: {idempotent_runs:>6} handler runs, {:>8.0} messages/s ({:.0}% of plain)",
        rate(idempotent_time),
        100.0 * plain_time.as_secs_f64() / idempotent_time.as_secs_f64()
    );
    js.delete_stream(&name).await?;
    if idempotent_runs != messages / 2 {
        return Err(format!("expected {} runs, saw {idempotent_runs}", messages / 2).into());
    }
    Ok(())
}

//! An idempotent RabbitMQ consumer, next to a plain one.
//!
//! ```text
//! cargo run --release --example rabbitmq_consumer --features amqp
//! ```
//!
//! Publishes `MESSAGES` messages (default 20000) to a queue of its own, each `message_id`
//! twice (a producer that retried), and consumes them twice: with a plain consumer (every
//! copy runs the handler) and with [`AmqpConsumer`] over the memory store (each id runs once;
//! the copy is acknowledged from the stored record). Prints the handler runs and the
//! messages per second of each, then deletes its queue. `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672`) names the broker; `CONCURRENCY` (default 32) how
//! many messages are handled at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tower_idempotency::consumer::amqp::AmqpConsumer;
use tower_idempotency::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use tower_idempotency::lapin::types::FieldTable;
use tower_idempotency::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, InFlight, MemoryStore, StoreError};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn fill(channel: &Channel, queue: &str, messages: usize) -> Result<(), Error> {
    let mut confirms = Vec::with_capacity(messages);
    for n in 0..messages {
        let id = format!("order-{}", n / 2);
        let props = BasicProperties::default().with_message_id(id.as_str().into());
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    id.as_bytes(),
                    props,
                )
                .await?,
        );
    }
    for confirm in confirms {
        confirm.await?;
    }
    Ok(())
}

async fn consume(
    channel: &Channel,
    queue: &str,
    concurrency: usize,
) -> Result<tower_idempotency::lapin::Consumer, Error> {
    channel
        .basic_qos(
            u16::try_from(concurrency * 2).unwrap_or(u16::MAX),
            BasicQosOptions::default(),
        )
        .await?;
    Ok(channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url =
        std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
    let messages = env("MESSAGES", 20_000).max(2) / 2 * 2;
    let concurrency = env("CONCURRENCY", 32).max(1);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("cannot connect to RabbitMQ at {url}: {e}"))?;
    let channel = conn.create_channel().await?;
    let queue = format!("demo-orders-{}", std::process::id());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // A plain consumer: handles and acknowledges every copy.
    fill(&channel, &queue, messages).await?;
    println!(
        "published {messages} messages ({} orders, each twice) to {queue}",
        messages / 2
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let plain_channel = conn.create_channel().await?;
    let started = Instant::now();
    consume(&plain_channel, &queue, concurrency)
        .await?
        .take(messages)
        .for_each_concurrent(concurrency, |delivery| {
            let runs = Arc::clone(&runs);
            async move {
                let delivery = delivery.expect("a delivery");
                runs.fetch_add(1, Ordering::Relaxed);
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("acked");
            }
        })
        .await;
    let plain_time = started.elapsed();
    let plain_runs = runs.swap(0, Ordering::Relaxed);
    plain_channel.close(200, "done".into()).await?;

    // The idempotent consumer: each order once, the copies acknowledged from the record.
    fill(&channel, &queue, messages).await?;
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .on_in_flight(InFlight::Wait(Duration::from_secs(10)));
    let worker = {
        let runs = Arc::clone(&runs);
        AmqpConsumer::new(&layer, move |_payload: Bytes, _claim: IdempotencyClaim| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::Relaxed);
                Ok::<_, StoreError>(())
            }
        })
        .concurrency(concurrency)
    };
    let idempotent_channel = conn.create_channel().await?;
    let started = Instant::now();
    let deliveries = consume(&idempotent_channel, &queue, concurrency).await?;
    worker.run(deliveries.take(messages)).await?;
    let idempotent_time = started.elapsed();
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
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    if idempotent_runs != messages / 2 {
        return Err(format!("expected {} runs, saw {idempotent_runs}", messages / 2).into());
    }
    Ok(())
}

//! The RabbitMQ consumer against the broker on `AMQP_URL`, on quorum queues (which count
//! deliveries): duplicates published on purpose, two consumers of one queue, a consumer
//! killed between its effect and its ack (and a plain consumer as the control), a crash past
//! the commit point, messages without a key or with a changed payload.
#![cfg(feature = "amqp")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tower_idempotency::consumer::amqp::AmqpConsumer;
use tower_idempotency::consumer::{ConsumerSettings, DeadLetter, DeadReason, Settle};
use tower_idempotency::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use tower_idempotency::lapin::types::{AMQPValue, FieldTable};
use tower_idempotency::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, MemoryStore, StoreError};

fn amqp_url() -> Option<String> {
    let url = std::env::var("AMQP_URL").ok();
    if url.is_none() {
        println!("skipped: AMQP_URL not set");
    }
    url
}

/// A quorum queue of its own, deleted at the end.
struct Bench {
    url: String,
    queue: String,
    channel: Channel,
    _conn: Connection,
}

impl Bench {
    async fn new() -> Option<Self> {
        let url = amqp_url()?;
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ answers");
        let channel = conn.create_channel().await.unwrap();
        let queue = format!("test-{}", uuid::Uuid::new_v4().simple());
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("queue declared");
        Some(Self {
            url,
            queue,
            channel,
            _conn: conn,
        })
    }

    async fn publish(&self, id: Option<&str>, payload: &str) {
        let mut props = BasicProperties::default();
        if let Some(id) = id {
            props = props.with_message_id(id.into());
        }
        self.channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                payload.as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes `count` messages keyed `{prefix}0`, `{prefix}1`…, each with its key as
    /// its payload.
    async fn publish_keyed(&self, prefix: &str, count: usize) {
        for n in 0..count {
            let key = format!("{prefix}{n}");
            self.publish(Some(&key), &key).await;
        }
    }

    /// A consumer of the queue on a connection of its own (as another instance would have).
    async fn deliveries(&self) -> (Connection, tower_idempotency::lapin::Consumer) {
        let (conn, _channel, consumer) = self.deliveries_at(&self.url).await;
        (conn, consumer)
    }

    /// A consumer of the queue on a connection of its own to `url` (a fault proxy, say),
    /// with its channel (to cancel the consumer on).
    async fn deliveries_at(
        &self,
        url: &str,
    ) -> (Connection, Channel, tower_idempotency::lapin::Consumer) {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .basic_qos(16, BasicQosOptions::default())
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                format!("c-{}", uuid::Uuid::new_v4().simple()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (conn, channel, consumer)
    }

    /// A fault proxy in front of the broker, and this bench's URL through it.
    async fn proxied(&self) -> (crate::common::FaultProxy, String) {
        let authority = self
            .url
            .rsplit('@')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        let upstream: std::net::SocketAddr =
            authority.parse().expect("AMQP_URL is amqp://…@host:port");
        let proxy = crate::common::FaultProxy::start(upstream).await;
        let url = self
            .url
            .replace(&authority, &format!("127.0.0.1:{}", proxy.port));
        (proxy, url)
    }

    /// Ready messages (unacknowledged ones come back when their connection closes).
    async fn ready(&self) -> u32 {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

type Effects = Arc<Mutex<HashMap<String, usize>>>;

fn effect(effects: &Effects, payload: &Bytes) -> usize {
    let mut effects = effects.lock().unwrap();
    let n = effects
        .entry(String::from_utf8_lossy(payload).into_owned())
        .or_default();
    *n += 1;
    *n
}

/// Every one of `keys` keys made its effect, and none twice.
fn each_ran_once(effects: &Effects, keys: usize) {
    let effects = effects.lock().unwrap();
    assert_eq!(effects.len(), keys, "every key ran: {effects:?}");
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
}

/// Waits until `done` holds, for at most `within`.
async fn until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

type Handled = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

fn counting_consumer(
    store: &MemoryStore,
    effects: &Effects,
) -> AmqpConsumer<impl Fn(Bytes, IdempotencyClaim) -> Handled + Send + Sync + 'static> {
    let effects = Arc::clone(effects);
    AmqpConsumer::new(
        &IdempotencyLayer::new(store.clone()),
        move |payload: Bytes, _claim: IdempotencyClaim| {
            let effects = Arc::clone(&effects);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                effect(&effects, &payload);
                Ok(())
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        },
    )
    .settings(
        ConsumerSettings::default()
            .retry_delay(Duration::from_millis(50))
            .max_deliveries(4),
    )
    .concurrency(8)
}

/// Handles `deliveries` as `run` does (eight at once, as `counting_consumer` sets), and
/// counts the deliveries settled for good (acknowledged or dead-lettered, not requeued), so
/// that a test waits for that count rather than for time to pass.
async fn settling<H, Fut, E>(
    worker: Arc<AmqpConsumer<H>>,
    deliveries: tower_idempotency::lapin::Consumer,
    settled: Arc<std::sync::atomic::AtomicUsize>,
) where
    H: Fn(Bytes, IdempotencyClaim) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let worker = &worker;
    deliveries
        .for_each_concurrent(8, |delivery| {
            let settled = &settled;
            async move {
                if let Ok(delivery) = delivery
                    && !matches!(worker.handle(delivery).await, Settle::Retry(_))
                {
                    settled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .await;
}

#[tokio::test]
async fn duplicates_published_on_purpose_run_their_handler_once() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    for _ in 0..3 {
        bench.publish_keyed("o", 20).await;
    }
    let effects: Effects = Arc::default();
    let settled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = counting_consumer(&MemoryStore::new(), &effects);
    let (conn, deliveries) = bench.deliveries().await;
    let task = tokio::spawn(settling(Arc::new(worker), deliveries, Arc::clone(&settled)));
    assert!(
        until(Duration::from_secs(20), || settled
            .load(std::sync::atomic::Ordering::SeqCst)
            == 60)
        .await
    );
    // Every delivery settled: none comes back once the consumer is gone.
    task.abort();
    conn.close(200, "done".into()).await.unwrap();
    assert_eq!(bench.ready().await, 0);
    each_ran_once(&effects, 20);
    bench.delete().await;
}

#[tokio::test]
async fn two_consumers_of_one_queue_sharing_a_store_run_each_key_once() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    for _ in 0..4 {
        bench.publish_keyed("k", 25).await;
    }
    let (store, effects): (MemoryStore, Effects) = (MemoryStore::new(), Arc::default());
    let settled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut running = Vec::new();
    for _ in 0..2 {
        let worker = counting_consumer(&store, &effects);
        let (conn, deliveries) = bench.deliveries().await;
        running.push((
            conn,
            tokio::spawn(settling(Arc::new(worker), deliveries, Arc::clone(&settled))),
        ));
    }
    assert!(
        until(Duration::from_secs(30), || settled
            .load(std::sync::atomic::Ordering::SeqCst)
            == 100)
        .await
    );
    for (conn, task) in running {
        task.abort();
        conn.close(200, "done".into()).await.unwrap();
    }
    assert_eq!(bench.ready().await, 0);
    each_ran_once(&effects, 25);
    bench.delete().await;
}

/// Runs `consume` over the queue until it made one effect, then kills it (its connection
/// closes with the delivery unacknowledged), and runs `consume` again on a new connection.
async fn kill_after_the_effect<F, Fut>(bench: &Bench, effects: &Effects, consume: F)
where
    F: Fn(tower_idempotency::lapin::Consumer, bool) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (conn, deliveries) = bench.deliveries().await;
    let killed = tokio::spawn(consume(deliveries, true));
    assert!(
        until(Duration::from_secs(10), || !effects
            .lock()
            .unwrap()
            .is_empty())
        .await
    );
    killed.abort();
    conn.close(320, "killed".into()).await.unwrap();
    let (conn, deliveries) = bench.deliveries().await;
    let task = tokio::spawn(consume(deliveries, false));
    tokio::time::sleep(Duration::from_millis(800)).await;
    task.abort();
    conn.close(200, "done".into()).await.unwrap();
    assert_eq!(bench.ready().await, 0, "the redelivery was settled");
}

#[tokio::test]
async fn a_consumer_killed_between_its_effect_and_its_ack_does_not_run_it_again() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    bench.publish(Some("pay-1"), "pay-1").await;
    let (store, effects): (MemoryStore, Effects) = (MemoryStore::new(), Arc::default());
    kill_after_the_effect(&bench, &effects, |deliveries, slow| {
        let effects = Arc::clone(&effects);
        // The redelivery waits for the killed consumer's operation, which its instance
        // finishes (Disconnect::Finish), instead of being requeued for a second.
        let layer = IdempotencyLayer::new(store.clone())
            .on_in_flight(tower_idempotency::InFlight::Wait(Duration::from_secs(5)));
        let worker = AmqpConsumer::new(&layer, move |payload: Bytes, _claim: IdempotencyClaim| {
            let effects = Arc::clone(&effects);
            async move {
                effect(&effects, &payload);
                if slow {
                    // Killed here, after the effect and before the ack.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok::<_, StoreError>(())
            }
        });
        async move {
            let _ = worker.run(deliveries).await;
        }
    })
    .await;
    assert_eq!(effects.lock().unwrap()["pay-1"], 1);
    bench.delete().await;
}

/// The control for the test above: the same kill with a consumer that acks after its effect
/// and keeps no record runs the effect twice.
#[tokio::test]
async fn a_plain_consumer_killed_between_its_effect_and_its_ack_runs_it_twice() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    bench.publish(Some("pay-1"), "pay-1").await;
    let effects: Effects = Arc::default();
    kill_after_the_effect(&bench, &effects, |mut deliveries, slow| {
        let effects = Arc::clone(&effects);
        async move {
            while let Some(Ok(delivery)) = deliveries.next().await {
                effect(&effects, &Bytes::from(delivery.data.clone()));
                if slow {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .unwrap();
            }
        }
    })
    .await;
    assert_eq!(effects.lock().unwrap()["pay-1"], 2);
    bench.delete().await;
}

#[tokio::test]
async fn a_crash_past_the_commit_point_is_dead_lettered_never_run_again() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    bench.publish(Some("charge-1"), "charge-1").await;
    let effects: Effects = Arc::default();
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).lease(Duration::from_millis(100));
    let worker = {
        let (effects, dead) = (Arc::clone(&effects), Arc::clone(&dead));
        Arc::new(
            AmqpConsumer::new(&layer, move |payload: Bytes, claim: IdempotencyClaim| {
                let effects = Arc::clone(&effects);
                async move {
                    claim.commit().await?;
                    if effect(&effects, &payload) == 1 {
                        panic!("crashed after charging");
                    }
                    Ok::<_, StoreError>(())
                }
            })
            .settings(
                ConsumerSettings::default()
                    .retry_delay(Duration::from_millis(50))
                    .max_deliveries(3)
                    .on_dead_letter(move |letter| {
                        let dead = Arc::clone(&dead);
                        async move { dead.lock().unwrap().push(letter) }
                    }),
            ),
        )
    };
    // Each instance runs until it crashes (its connection then closes and the delivery
    // comes back); a new one takes over.
    for _ in 0..6 {
        if !dead.lock().unwrap().is_empty() {
            break;
        }
        let (conn, deliveries) = bench.deliveries().await;
        let w = Arc::clone(&worker);
        let task = tokio::spawn(async move { w.run(deliveries).await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        task.abort();
        let _ = conn.close(320, "instance gone".into()).await;
    }
    assert_eq!(effects.lock().unwrap()["charge-1"], 1, "charged once");
    {
        let dead = dead.lock().unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].reason, DeadReason::OutcomeUnknown);
        assert_eq!(dead[0].deliveries, Some(3));
    }
    assert_eq!(bench.ready().await, 0, "rejected, not requeued");
    bench.delete().await;
}

#[tokio::test]
async fn messages_without_a_key_or_with_a_changed_payload_are_dead_lettered_at_once() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    bench.publish(None, "anonymous").await;
    bench.publish(Some("k"), "first").await;
    bench.publish(Some("k"), "changed").await;
    let effects: Effects = Arc::default();
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let worker = {
        let dead = Arc::clone(&dead);
        counting_consumer(&MemoryStore::new(), &effects)
            .concurrency(1)
            .settings(ConsumerSettings::default().on_dead_letter(move |letter| {
                let dead = Arc::clone(&dead);
                async move { dead.lock().unwrap().push(letter) }
            }))
    };
    let (conn, deliveries) = bench.deliveries().await;
    let task = tokio::spawn(async move { worker.run(deliveries).await });
    assert!(until(Duration::from_secs(10), || dead.lock().unwrap().len() == 2).await);
    task.abort();
    conn.close(200, "done".into()).await.unwrap();
    let reasons: Vec<_> = dead
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.reason.clone())
        .collect();
    assert_eq!(reasons, [DeadReason::NoKey, DeadReason::PayloadChanged]);
    assert_eq!(bench.ready().await, 0, "rejected, not requeued");
    {
        let effects = effects.lock().unwrap();
        assert_eq!(effects.get("first"), Some(&1));
        assert_eq!(effects.len(), 1);
    }
    bench.delete().await;
}

/// The consumer's connection is cut (every connection dropped, new ones refused) while it
/// handles a queue of duplicated messages, then restored: the broker requeues what was not
/// acknowledged, every message is settled, and no key runs twice.
#[tokio::test]
async fn a_connection_cut_mid_stream_loses_no_message_and_runs_none_twice() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    for _ in 0..2 {
        bench.publish_keyed("c", 40).await;
    }
    let (proxy, via_proxy) = bench.proxied().await;
    let effects: Effects = Arc::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .on_in_flight(tower_idempotency::InFlight::Wait(Duration::from_secs(5)));
    let worker = {
        let effects = Arc::clone(&effects);
        Arc::new(
            AmqpConsumer::new(&layer, move |payload: Bytes, _claim: IdempotencyClaim| {
                let effects = Arc::clone(&effects);
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    effect(&effects, &payload);
                    Ok::<_, StoreError>(())
                }
            })
            .settings(
                ConsumerSettings::default()
                    .retry_delay(Duration::from_millis(50))
                    .settle_timeout(Duration::from_millis(300)),
            )
            .concurrency(4),
        )
    };
    // A supervisor: the consumer connects again whenever `run` returns. It does not watch
    // the connection: `run` must notice the cut itself. Before acknowledgements were
    // bounded by the settle timeout, it sometimes did not (every handler slot waiting on an
    // acknowledgement that never completed; 5 failures in 57 runs with both cores busy).
    let supervisor = {
        let worker = Arc::clone(&worker);
        let queue = bench.queue.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(conn) =
                    Connection::connect(&via_proxy, ConnectionProperties::default()).await
                    && let Ok(channel) = conn.create_channel().await
                    && channel
                        .basic_qos(8, BasicQosOptions::default())
                        .await
                        .is_ok()
                    && let Ok(deliveries) = channel
                        .basic_consume(
                            queue.as_str().into(),
                            "".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                {
                    let _ = worker.run(deliveries).await;
                    let _ = conn.close(200, "reconnecting".into()).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    assert!(
        until(Duration::from_secs(10), || effects.lock().unwrap().len()
            >= 10)
        .await
    );
    proxy.drop_all();
    let before_the_cut = effects.lock().unwrap().len();
    assert!(before_the_cut < 40, "the cut falls mid-stream");
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.pass();
    assert!(
        until(Duration::from_secs(30), || effects.lock().unwrap().len()
            == 40)
        .await
    );
    // Let the last duplicates settle, then stop: nothing may be left.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    supervisor.abort();
    proxy.drop_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bench.ready().await, 0, "every delivery settled");
    each_ran_once(&effects, 40);
    bench.delete().await;
}

/// Every handler slot is busy when the consumer's connection is cut, so each settles its
/// delivery over a dead connection: `run` still returns (a settle is bounded by the
/// settings' settle timeout), so that a supervisor that only waits for `run` connects again.
/// Then a consumer on a live connection settles every message, and no key runs twice.
#[tokio::test]
async fn run_returns_when_its_connection_is_cut_while_every_slot_settles() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    bench.publish_keyed("s", 8).await;
    let (proxy, via_proxy) = bench.proxied().await;
    let effects: Effects = Arc::default();
    let gate = crate::common::Gate::new();
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let worker = {
        let (effects, gate) = (Arc::clone(&effects), Arc::clone(&gate));
        Arc::new(
            AmqpConsumer::new(&layer, move |payload: Bytes, _claim: IdempotencyClaim| {
                let (effects, gate) = (Arc::clone(&effects), Arc::clone(&gate));
                async move {
                    gate.pass().await;
                    effect(&effects, &payload);
                    Ok::<_, StoreError>(())
                }
            })
            .settings(ConsumerSettings::default().settle_timeout(Duration::from_millis(300)))
            .concurrency(4),
        )
    };
    let (conn, _channel, deliveries) = bench.deliveries_at(&via_proxy).await;
    let run = {
        let worker = Arc::clone(&worker);
        tokio::spawn(async move { worker.run(deliveries).await.is_err() })
    };
    assert!(
        until(Duration::from_secs(10), || gate.arrived() == 4).await,
        "four handlers run at once"
    );
    // The four handlers finish as the connection is cut, and settle over it.
    gate.open();
    proxy.drop_all();
    let ended = tokio::time::timeout(Duration::from_secs(10), run).await;
    let failed = ended
        .expect("run returns once its connection is cut")
        .unwrap();
    assert!(failed, "run answers the connection's failure");
    assert!(!conn.status().connected());

    // Another instance on a live connection: every message is settled, each key ran once.
    let (conn, channel, deliveries) = bench.deliveries_at(&bench.url).await;
    let tag = deliveries.tag();
    let again = tokio::spawn({
        let worker = Arc::clone(&worker);
        async move { worker.run(deliveries).await }
    });
    assert!(
        until(Duration::from_secs(20), || effects.lock().unwrap().len()
            == 8)
        .await,
        "every message handled: {:?}",
        effects.lock().unwrap()
    );
    // Stop consuming: the stream ends, and `run` returns once the deliveries it holds are
    // settled. What was not acknowledged would be ready again after the close.
    channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), again)
        .await
        .expect("run ends after the cancel")
        .unwrap()
        .unwrap();
    conn.close(200, "done".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bench.ready().await, 0, "every delivery settled");
    each_ran_once(&effects, 8);
    bench.delete().await;
}

/// A consumer with nothing to do when its connection fails: cut (the broker's connections
/// dropped) or silent (traffic blackholed, as a paused broker or a dead network path would
/// leave it; noticed by AMQP heartbeats, one second here). `run` returns either way.
#[tokio::test]
async fn run_returns_when_an_idle_consumers_connection_is_cut_or_goes_silent() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    for silent in [false, true] {
        let (proxy, via_proxy) = bench.proxied().await;
        let via_proxy = if via_proxy.contains('?') {
            format!("{via_proxy}&heartbeat=1")
        } else {
            format!("{via_proxy}?heartbeat=1")
        };
        let effects: Effects = Arc::default();
        let worker = counting_consumer(&MemoryStore::new(), &effects);
        let (_conn, _channel, deliveries) = bench.deliveries_at(&via_proxy).await;
        let run = tokio::spawn(async move { worker.run(deliveries).await.is_err() });
        tokio::time::sleep(Duration::from_millis(200)).await;
        if silent {
            proxy.blackhole();
        } else {
            proxy.drop_all();
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), run).await;
        let failed = ended
            .unwrap_or_else(|_| panic!("run returns (silent: {silent})"))
            .unwrap();
        assert!(
            failed,
            "run answers the connection's failure (silent: {silent})"
        );
        proxy.drop_all();
    }
    bench.delete().await;
}

/// Handlers past their commit point when the consumer's connection is cut: `run` takes no
/// more deliveries but lets them finish (their records are stored; the store is not the
/// broker) before it answers the cut. The redeliveries are then acknowledged from the
/// records: nothing runs twice, nothing is dead-lettered as of unknown outcome.
#[tokio::test]
async fn handlers_in_hand_when_the_connection_is_cut_finish_and_their_records_answer() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    bench.publish_keyed("h", 4).await;
    let (proxy, via_proxy) = bench.proxied().await;
    let effects: Effects = Arc::default();
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let gate = crate::common::Gate::new();
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let worker = {
        let (effects, gate, dead) = (Arc::clone(&effects), Arc::clone(&gate), Arc::clone(&dead));
        Arc::new(
            AmqpConsumer::new(&layer, move |payload: Bytes, claim: IdempotencyClaim| {
                let (effects, gate) = (Arc::clone(&effects), Arc::clone(&gate));
                async move {
                    claim.commit().await?;
                    gate.pass().await;
                    effect(&effects, &payload);
                    Ok::<_, StoreError>(())
                }
            })
            .settings(
                ConsumerSettings::default()
                    .max_deliveries(2)
                    .settle_timeout(Duration::from_millis(300))
                    .on_dead_letter(move |letter| {
                        let dead = Arc::clone(&dead);
                        async move { dead.lock().unwrap().push(letter) }
                    }),
            )
            // More slots than messages: the stream is read while the handlers run.
            .concurrency(8),
        )
    };
    let (conn, _channel, deliveries) = bench.deliveries_at(&via_proxy).await;
    let run = {
        let worker = Arc::clone(&worker);
        tokio::spawn(async move { worker.run(deliveries).await.is_err() })
    };
    assert!(
        until(Duration::from_secs(10), || gate.arrived() == 4).await,
        "four handlers past their commit point"
    );
    proxy.drop_all();
    assert!(
        until(Duration::from_secs(10), || !conn.status().connected()).await,
        "the client sees its connection cut"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !run.is_finished(),
        "run waits for the handlers in hand instead of cancelling them"
    );
    gate.open();
    let failed = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("run returns once its handlers are done")
        .unwrap();
    assert!(failed, "run answers the connection's failure");
    assert_eq!(effects.lock().unwrap().len(), 4);

    // Another instance: the redeliveries are answered from the records.
    let settled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (conn, deliveries) = bench.deliveries().await;
    let again = tokio::spawn(settling(
        Arc::clone(&worker),
        deliveries,
        Arc::clone(&settled),
    ));
    assert!(
        until(Duration::from_secs(20), || settled
            .load(std::sync::atomic::Ordering::SeqCst)
            == 4)
        .await
    );
    again.abort();
    conn.close(200, "done".into()).await.unwrap();
    assert_eq!(bench.ready().await, 0, "every delivery settled");
    assert!(dead.lock().unwrap().is_empty(), "nothing dead-lettered");
    each_ran_once(&effects, 4);
    bench.delete().await;
}

/// Handlers that failed before their commit point wait out a long retry delay before the
/// message is requeued (AMQP has no delayed requeue). When the connection is cut meanwhile,
/// the wait ends with it: nothing could be sent, and the broker requeues the messages
/// itself, so `run` returns at once rather than after the whole delay.
#[tokio::test]
async fn a_retry_delay_in_progress_ends_when_the_connection_is_cut() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    bench.publish_keyed("r", 2).await;
    let (proxy, via_proxy) = bench.proxied().await;
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let worker = {
        let failures = Arc::clone(&failures);
        AmqpConsumer::new(&layer, move |_payload: Bytes, _claim: IdempotencyClaim| {
            let failures = Arc::clone(&failures);
            async move {
                failures.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err::<(), _>("not yet")
            }
        })
        .settings(ConsumerSettings::default().retry_delay(Duration::from_secs(60)))
        .concurrency(4)
    };
    let (_conn, _channel, deliveries) = bench.deliveries_at(&via_proxy).await;
    let run = tokio::spawn(async move { worker.run(deliveries).await.is_err() });
    assert!(
        until(Duration::from_secs(10), || failures
            .load(std::sync::atomic::Ordering::SeqCst)
            == 2)
        .await
    );
    proxy.drop_all();
    let failed = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("run returns long before the 60 s retry delay")
        .unwrap();
    assert!(failed, "run answers the connection's failure");
    // The broker requeued both, each still to be handled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bench.ready().await != 2 {
        assert!(tokio::time::Instant::now() < deadline, "both requeued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bench.delete().await;
}

/// Two messages whose header keys are different byte strings that are not UTF-8 are never
/// taken for one: neither runs, each is dead-lettered as a bad key, and the handler never
/// runs for either. (Before, both keys were made text with replacement characters, became
/// one key, and the second message was acknowledged as a replay of the first: its work was
/// lost.)
#[tokio::test]
async fn header_keys_that_are_not_utf8_are_refused_never_merged() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    for key in [vec![0xffu8, b'A'], vec![0xfeu8, b'A']] {
        let mut headers = FieldTable::default();
        headers.insert("Idempotency-Key".into(), AMQPValue::LongString(key.into()));
        bench
            .channel
            .basic_publish(
                "".into(),
                bench.queue.as_str().into(),
                BasicPublishOptions::default(),
                b"credit 10",
                BasicProperties::default().with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let effects: Effects = Arc::default();
    let dead: Arc<Mutex<Vec<DeadReason>>> = Arc::default();
    let worker = {
        let dead = Arc::clone(&dead);
        Arc::new(
            counting_consumer(&MemoryStore::new(), &effects)
                .key_from_header("Idempotency-Key")
                .settings(ConsumerSettings::default().on_dead_letter(move |letter| {
                    let dead = Arc::clone(&dead);
                    async move { dead.lock().unwrap().push(letter.reason) }
                })),
        )
    };
    let (_conn, deliveries) = bench.deliveries().await;
    let settled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let task = tokio::spawn(settling(worker, deliveries, Arc::clone(&settled)));
    assert!(
        until(Duration::from_secs(10), || {
            settled.load(std::sync::atomic::Ordering::SeqCst) == 2
        })
        .await
    );
    task.abort();
    assert!(effects.lock().unwrap().is_empty(), "neither ran");
    let dead = dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead.iter()
            .all(|r| matches!(r, DeadReason::BadKey(why) if why.contains("UTF-8"))),
        "{dead:?}"
    );
    bench.delete().await;
}

/// A RabbitMQ message of 2 MiB with a good key, over the layer's `max_request_body`
/// (1 MiB): dead-lettered at once as too large, saying so, and its handler never runs.
/// (Before, it was dead-lettered as a bad key.)
#[tokio::test]
async fn a_message_over_the_body_bound_is_dead_lettered_as_too_large_not_as_a_bad_key() {
    let Some(bench) = Bench::new().await else {
        return;
    };
    let big = "x".repeat(2 << 20);
    bench.publish(Some("big-1"), &big).await;
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = {
        let (dead, ran) = (Arc::clone(&dead), Arc::clone(&ran));
        Arc::new(
            AmqpConsumer::new(
                &IdempotencyLayer::new(MemoryStore::new()),
                move |_payload: Bytes, _claim: IdempotencyClaim| {
                    let ran = Arc::clone(&ran);
                    async move {
                        ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, StoreError>(())
                    }
                },
            )
            .settings(ConsumerSettings::default().on_dead_letter(move |letter| {
                let dead = Arc::clone(&dead);
                async move { dead.lock().unwrap().push(letter) }
            })),
        )
    };
    let (_conn, mut deliveries) = bench.deliveries().await;
    let delivery = deliveries.next().await.unwrap().unwrap();
    let settle = worker.handle(delivery).await;
    let reasons: Vec<_> = dead
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.reason.clone())
        .collect();
    assert!(
        matches!(&settle, Settle::DeadLetter(DeadReason::TooLarge(why)) if why.contains("1048576")),
        "{settle:?}"
    );
    assert!(
        matches!(reasons[..], [DeadReason::TooLarge(_)]),
        "{reasons:?}"
    );
    assert_eq!(
        ran.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing ran"
    );
    bench.delete().await;
}

//! The JetStream consumer against the NATS server on `NATS_URL`: duplicates published on
//! purpose, two consumers of one durable consumer, a consumer killed between its effect and
//! its ack, a handler that fails then succeeds, a crash past the commit point, messages
//! without a key or with a changed payload.
#![cfg(feature = "nats")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::async_nats::{self, HeaderMap, jetstream};
use tower_idempotency::consumer::nats::JetStreamConsumer;
use tower_idempotency::consumer::{ConsumerSettings, DeadLetter, DeadReason};
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, MemoryStore, StoreError};

fn nats_url() -> Option<String> {
    let url = std::env::var("NATS_URL").ok();
    if url.is_none() {
        println!("skipped: NATS_URL not set");
    }
    url
}

/// A stream and a durable pull consumer of its own, deleted when dropped.
struct Bench {
    js: jetstream::Context,
    name: String,
    subject: String,
    url: String,
}

impl Bench {
    async fn new(ack_wait: Duration) -> Option<Self> {
        let url = nats_url()?;
        let client = async_nats::connect(&url).await.expect("NATS answers");
        let js = jetstream::new(client);
        let name = format!("T{}", uuid::Uuid::new_v4().simple());
        let subject = format!("{name}.orders");
        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .expect("stream created");
        let bench = Self {
            js,
            name,
            subject,
            url,
        };
        bench
            .js
            .get_stream(&bench.name)
            .await
            .unwrap()
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("workers".into()),
                ack_wait,
                ..Default::default()
            })
            .await
            .expect("consumer created");
        Some(bench)
    }

    /// The durable consumer, on a connection of its own (as another instance would have).
    async fn consumer(&self) -> (async_nats::Client, jetstream::consumer::PullConsumer) {
        self.consumer_at(&self.url).await
    }

    /// The durable consumer, connected through `url` (a fault proxy).
    async fn consumer_at(
        &self,
        url: &str,
    ) -> (async_nats::Client, jetstream::consumer::PullConsumer) {
        let client = async_nats::connect(url).await.unwrap();
        let js = jetstream::new(client.clone());
        let consumer = js
            .get_stream(&self.name)
            .await
            .unwrap()
            .get_consumer("workers")
            .await
            .unwrap();
        (client, consumer)
    }

    async fn publish(&self, key: Option<&str>, payload: &str) {
        let mut headers = HeaderMap::new();
        if let Some(key) = key {
            headers.insert("Idempotency-Key", key);
        }
        self.js
            .publish_with_headers(
                self.subject.clone(),
                headers,
                Bytes::from(payload.to_owned()),
            )
            .await
            .unwrap()
            .await
            .expect("published");
    }

    /// Publishes `count` messages keyed `{prefix}0`, `{prefix}1`…, each with its key as
    /// its payload.
    async fn publish_keyed(&self, prefix: &str, count: usize) {
        for n in 0..count {
            let key = format!("{prefix}{n}");
            self.publish(Some(&key), &key).await;
        }
    }

    /// A fault proxy in front of the server, and its URL.
    async fn proxied(&self) -> (crate::common::FaultProxy, String) {
        let upstream: std::net::SocketAddr = self
            .url
            .trim_start_matches("nats://")
            .parse()
            .expect("NATS_URL is nats://host:port");
        let proxy = crate::common::FaultProxy::start(upstream).await;
        let url = format!("nats://127.0.0.1:{}", proxy.port);
        (proxy, url)
    }

    /// Waits until every message was acknowledged or terminated.
    async fn drained(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let info = self
                .js
                .get_stream(&self.name)
                .await
                .unwrap()
                .get_consumer::<jetstream::consumer::pull::Config>("workers")
                .await
                .unwrap()
                .get_info()
                .await
                .unwrap();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let (js, name) = (self.js.clone(), self.name.clone());
        // Best effort: a stream left behind is in memory and named for this test alone.
        tokio::spawn(async move {
            let _ = js.delete_stream(&name).await;
        });
    }
}

type Effects = Arc<Mutex<HashMap<String, usize>>>;

fn effect(effects: &Effects, payload: &Bytes) {
    *effects
        .lock()
        .unwrap()
        .entry(String::from_utf8_lossy(payload).into_owned())
        .or_default() += 1;
}

/// `settings` with a dead-letter hook that keeps every letter in `dead`.
fn keeping_dead_letters(
    settings: ConsumerSettings,
    dead: &Arc<Mutex<Vec<DeadLetter>>>,
) -> ConsumerSettings {
    let dead = Arc::clone(dead);
    settings.on_dead_letter(move |letter| {
        let dead = Arc::clone(&dead);
        async move { dead.lock().unwrap().push(letter) }
    })
}

fn settings() -> ConsumerSettings {
    ConsumerSettings::default()
        .retry_delay(Duration::from_millis(50))
        .max_deliveries(4)
}

#[tokio::test]
async fn duplicates_published_on_purpose_run_their_handler_once() {
    let Some(bench) = Bench::new(Duration::from_secs(5)).await else {
        return;
    };
    for round in 0..3 {
        for n in 0..20 {
            let _ = round;
            bench
                .publish(Some(&format!("order-{n}")), &format!("order-{n}"))
                .await;
        }
    }
    let effects: Effects = Arc::default();
    let worker = {
        let effects = Arc::clone(&effects);
        JetStreamConsumer::new(
            &IdempotencyLayer::new(MemoryStore::new()),
            move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                let effects = Arc::clone(&effects);
                async move {
                    effect(&effects, &msg.payload);
                    Ok::<_, StoreError>(())
                }
            },
        )
        .key_from_header("Idempotency-Key")
        .settings(settings())
        .concurrency(8)
    };
    let (_client, consumer) = bench.consumer().await;
    let messages = consumer.messages().await.unwrap();
    let task = tokio::spawn(async move { worker.run(messages).await });
    assert!(
        bench.drained(Duration::from_secs(20)).await,
        "all 60 settled"
    );
    task.abort();
    let effects = effects.lock().unwrap();
    assert_eq!(effects.len(), 20);
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
}

#[tokio::test]
async fn two_consumers_of_one_durable_consumer_sharing_a_store_run_each_key_once() {
    let Some(bench) = Bench::new(Duration::from_secs(5)).await else {
        return;
    };
    for _ in 0..4 {
        bench.publish_keyed("k", 25).await;
    }
    let store = MemoryStore::new();
    let effects: Effects = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let effects = Arc::clone(&effects);
        let worker = JetStreamConsumer::new(
            &IdempotencyLayer::new(store.clone()),
            move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                let effects = Arc::clone(&effects);
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    effect(&effects, &msg.payload);
                    Ok::<_, StoreError>(())
                }
            },
        )
        .key_from_header("Idempotency-Key")
        .settings(settings())
        .concurrency(4);
        let (client, consumer) = bench.consumer().await;
        let messages = consumer.messages().await.unwrap();
        tasks.push((
            client,
            tokio::spawn(async move { worker.run(messages).await }),
        ));
    }
    assert!(
        bench.drained(Duration::from_secs(30)).await,
        "all 100 settled"
    );
    for (_, task) in tasks {
        task.abort();
    }
    let effects = effects.lock().unwrap();
    assert_eq!(effects.len(), 25);
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
}

/// The same kill with a plain consumer runs the effect twice; with this one, once: the
/// record is stored before the ack, and the redelivery is answered from it.
#[tokio::test]
async fn a_consumer_killed_between_its_effect_and_its_ack_does_not_run_it_again() {
    let Some(bench) = Bench::new(Duration::from_millis(500)).await else {
        return;
    };
    bench.publish(Some("pay-1"), "pay-1").await;
    let store = MemoryStore::new();
    let effects: Effects = Arc::default();
    let (effected_tx, mut effected) = tokio::sync::mpsc::unbounded_channel::<()>();
    let make = |slow: bool| {
        let effects = Arc::clone(&effects);
        let effected_tx = effected_tx.clone();
        JetStreamConsumer::new(
            &IdempotencyLayer::new(store.clone()),
            move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                let (effects, effected_tx) = (Arc::clone(&effects), effected_tx.clone());
                async move {
                    effect(&effects, &msg.payload);
                    let _ = effected_tx.send(());
                    if slow {
                        // Killed here, after the effect and before the ack.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok::<_, StoreError>(())
                }
            },
        )
        .key_from_header("Idempotency-Key")
        .settings(settings())
    };
    let (first_client, consumer) = bench.consumer().await;
    let messages = consumer.messages().await.unwrap();
    let first = make(true);
    let killed = tokio::spawn(async move { first.run(messages).await });
    effected.recv().await.unwrap();
    killed.abort();
    drop(first_client);
    // Another instance gets the redelivery once the ack wait ran out.
    let (_client, consumer) = bench.consumer().await;
    let messages = consumer.messages().await.unwrap();
    let second = make(false);
    let task = tokio::spawn(async move { second.run(messages).await });
    assert!(bench.drained(Duration::from_secs(10)).await);
    task.abort();
    assert_eq!(effects.lock().unwrap()["pay-1"], 1);
}

/// The control for the test above: the same kill, with a consumer that acks after its
/// effect and keeps no record, runs the effect twice.
#[tokio::test]
async fn a_plain_consumer_killed_between_its_effect_and_its_ack_runs_it_twice() {
    use futures_util::StreamExt;
    let Some(bench) = Bench::new(Duration::from_millis(500)).await else {
        return;
    };
    bench.publish(Some("pay-1"), "pay-1").await;
    let effects: Effects = Arc::default();
    let (effected_tx, mut effected) = tokio::sync::mpsc::unbounded_channel::<()>();
    let plain = |slow: bool, consumer: jetstream::consumer::PullConsumer| {
        let (effects, effected_tx) = (Arc::clone(&effects), effected_tx.clone());
        async move {
            let mut messages = consumer.messages().await.unwrap();
            while let Some(Ok(msg)) = messages.next().await {
                effect(&effects, &msg.payload);
                let _ = effected_tx.send(());
                if slow {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                msg.ack().await.unwrap();
            }
        }
    };
    let (first_client, consumer) = bench.consumer().await;
    let killed = tokio::spawn(plain(true, consumer));
    effected.recv().await.unwrap();
    killed.abort();
    drop(first_client);
    let (_client, consumer) = bench.consumer().await;
    let task = tokio::spawn(plain(false, consumer));
    assert!(bench.drained(Duration::from_secs(10)).await);
    task.abort();
    assert_eq!(effects.lock().unwrap()["pay-1"], 2);
}

#[tokio::test]
async fn a_handler_that_fails_before_its_commit_point_is_redelivered_and_runs() {
    let Some(bench) = Bench::new(Duration::from_secs(5)).await else {
        return;
    };
    bench.publish(Some("flaky"), "flaky").await;
    let effects: Effects = Arc::default();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(2));
    let worker = {
        let (effects, failures) = (Arc::clone(&effects), Arc::clone(&failures));
        JetStreamConsumer::new(
            &IdempotencyLayer::new(MemoryStore::new()),
            move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                let (effects, failures) = (Arc::clone(&effects), Arc::clone(&failures));
                async move {
                    if failures
                        .fetch_update(
                            std::sync::atomic::Ordering::SeqCst,
                            std::sync::atomic::Ordering::SeqCst,
                            |n| n.checked_sub(1),
                        )
                        .is_ok()
                    {
                        return Err("the mail server is down");
                    }
                    effect(&effects, &msg.payload);
                    Ok(())
                }
            },
        )
        .key_from_header("Idempotency-Key")
        .settings(settings())
    };
    let (_client, consumer) = bench.consumer().await;
    let messages = consumer.messages().await.unwrap();
    let task = tokio::spawn(async move { worker.run(messages).await });
    assert!(bench.drained(Duration::from_secs(10)).await);
    task.abort();
    assert_eq!(effects.lock().unwrap()["flaky"], 1);
    assert_eq!(failures.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// A handler that crashes after its commit point is never run again: its redeliveries find
/// the outcome unknown, and after `max_deliveries` the message goes to the dead-letter hook.
#[tokio::test]
async fn a_crash_past_the_commit_point_is_dead_lettered_never_run_again() {
    let Some(bench) = Bench::new(Duration::from_millis(500)).await else {
        return;
    };
    bench.publish(Some("charge-1"), "charge-1").await;
    let effects: Effects = Arc::default();
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).lease(Duration::from_millis(100));
    let worker = {
        let effects = Arc::clone(&effects);
        JetStreamConsumer::new(
            &layer,
            move |msg: async_nats::Message, claim: IdempotencyClaim| {
                let effects = Arc::clone(&effects);
                async move {
                    claim.commit().await?;
                    effect(&effects, &msg.payload);
                    // The instance dies here: a panic in the handler's task.
                    if effects.lock().unwrap()["charge-1"] == 1 {
                        panic!("crashed after charging");
                    }
                    Ok::<_, StoreError>(())
                }
            },
        )
        .key_from_header("Idempotency-Key")
        .settings(keeping_dead_letters(settings().max_deliveries(3), &dead))
    };
    let worker = Arc::new(worker);
    // Each instance handles messages until it crashes; a new one takes over.
    for _ in 0..8 {
        let (_client, consumer) = bench.consumer().await;
        let messages = consumer.messages().await.unwrap();
        let w = Arc::clone(&worker);
        let task = tokio::spawn(async move { w.run(messages).await });
        if bench.drained(Duration::from_secs(3)).await {
            task.abort();
            break;
        }
        task.abort();
    }
    assert!(bench.drained(Duration::from_secs(1)).await, "settled");
    assert_eq!(effects.lock().unwrap()["charge-1"], 1, "charged once");
    let dead = dead.lock().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, DeadReason::OutcomeUnknown);
    assert_eq!(dead[0].key.as_deref(), Some("charge-1"));
}

#[tokio::test]
async fn messages_without_a_key_or_with_a_changed_payload_are_dead_lettered_at_once() {
    let Some(bench) = Bench::new(Duration::from_secs(5)).await else {
        return;
    };
    bench.publish(None, "anonymous").await;
    bench.publish(Some("k"), "first").await;
    bench.publish(Some("k"), "changed").await;
    let effects: Effects = Arc::default();
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let worker = {
        let effects = Arc::clone(&effects);
        JetStreamConsumer::new(
            &IdempotencyLayer::new(MemoryStore::new()),
            move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                let effects = Arc::clone(&effects);
                async move {
                    effect(&effects, &msg.payload);
                    Ok::<_, StoreError>(())
                }
            },
        )
        .key_from_header("Idempotency-Key")
        .settings(keeping_dead_letters(settings(), &dead))
    };
    let (_client, consumer) = bench.consumer().await;
    let messages = consumer.messages().await.unwrap();
    let task = tokio::spawn(async move { worker.run(messages).await });
    assert!(bench.drained(Duration::from_secs(10)).await);
    task.abort();
    let reasons: Vec<_> = dead
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.reason.clone())
        .collect();
    assert_eq!(reasons, [DeadReason::NoKey, DeadReason::PayloadChanged]);
    let effects = effects.lock().unwrap();
    assert_eq!(effects.get("first"), Some(&1));
    assert_eq!(effects.get("anonymous"), None);
    assert_eq!(effects.get("changed"), None);
}

/// The consumer's connection is cut (every connection dropped, new ones refused) while it
/// handles a stream of duplicated messages, then restored: every message is settled, and
/// no key runs twice.
#[tokio::test]
async fn a_connection_cut_mid_stream_loses_no_message_and_runs_none_twice() {
    let Some(bench) = Bench::new(Duration::from_millis(800)).await else {
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
            JetStreamConsumer::new(
                &layer,
                move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                    let effects = Arc::clone(&effects);
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        effect(&effects, &msg.payload);
                        Ok::<_, StoreError>(())
                    }
                },
            )
            .key_from_header("Idempotency-Key")
            .settings(settings())
            .concurrency(4),
        )
    };
    // A supervisor: the consumer runs again whenever its stream ends or fails.
    let supervisor = {
        let (worker, via_proxy) = (Arc::clone(&worker), via_proxy.clone());
        let stream = bench.name.clone();
        let js_url = via_proxy.clone();
        tokio::spawn(async move {
            loop {
                let Ok(client) = async_nats::connect(&js_url).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let js = jetstream::new(client);
                let consumer: Result<jetstream::consumer::PullConsumer, _> =
                    async { js.get_stream(&stream).await?.get_consumer("workers").await }
                        .await
                        .map_err(|e: Box<dyn std::error::Error + Send + Sync>| e);
                if let Ok(consumer) = consumer
                    && let Ok(messages) = consumer.messages().await
                {
                    let _ = worker.run(messages).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    assert!(until_effects(&effects, 10, Duration::from_secs(10)).await);
    proxy.drop_all();
    let before_the_cut = effects.lock().unwrap().len();
    assert!(before_the_cut < 40, "the cut falls mid-stream");
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.pass();
    assert!(
        bench.drained(Duration::from_secs(30)).await,
        "every message settled"
    );
    supervisor.abort();
    let effects = effects.lock().unwrap();
    assert_eq!(effects.len(), 40, "{effects:?}");
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
}

async fn until_effects(effects: &Effects, at_least: usize, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while effects.lock().unwrap().len() < at_least {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Every handler slot is busy when the consumer's connection is cut, so each settles its
/// message while the client is disconnected. The client keeps reconnecting (through the
/// proxy, refused meanwhile); once the server answers again, every message is settled
/// (acknowledged, or redelivered after the acknowledgement wait and answered from its
/// record) and no key runs twice, with no supervisor at all: the same `run` goes on.
#[tokio::test]
async fn a_cut_while_every_slot_settles_loses_no_message_and_runs_none_twice() {
    let Some(bench) = Bench::new(Duration::from_millis(800)).await else {
        return;
    };
    bench.publish_keyed("s", 8).await;
    let (proxy, via_proxy) = bench.proxied().await;
    let effects: Effects = Arc::default();
    let gate = crate::common::Gate::new();
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let worker = {
        let (effects, gate) = (Arc::clone(&effects), Arc::clone(&gate));
        JetStreamConsumer::new(
            &layer,
            move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                let (effects, gate) = (Arc::clone(&effects), Arc::clone(&gate));
                async move {
                    gate.pass().await;
                    effect(&effects, &msg.payload);
                    Ok::<_, StoreError>(())
                }
            },
        )
        .key_from_header("Idempotency-Key")
        .settings(settings().settle_timeout(Duration::from_millis(300)))
        .concurrency(4)
    };
    let (_client, consumer) = bench.consumer_at(&via_proxy).await;
    let messages = consumer.messages().await.unwrap();
    let run = tokio::spawn(async move { worker.run(messages).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gate.arrived() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "four handlers run at once"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.drop_all();
    gate.open();
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.pass();
    assert!(
        bench.drained(Duration::from_secs(30)).await,
        "every message settled: {:?}",
        effects.lock().unwrap()
    );
    run.abort();
    let effects = effects.lock().unwrap();
    assert_eq!(effects.len(), 8, "{effects:?}");
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
}

/// A handler that fails after its commit point has its error stored: its message is
/// acknowledged on that delivery, never redelivered nor dead-lettered. (Before, such an
/// error was taken for one before the commit point: redelivered, then dead-lettered as
/// `TooManyDeliveries` although it was handled.)
#[tokio::test]
async fn an_error_after_the_commit_point_is_acknowledged_on_its_first_delivery() {
    use futures_util::StreamExt;
    let Some(bench) = Bench::new(Duration::from_secs(5)).await else {
        return;
    };
    bench.publish(Some("refund-1"), "refund-1").await;
    let worker = JetStreamConsumer::new(
        &IdempotencyLayer::new(MemoryStore::new()),
        |_msg: async_nats::Message, claim: IdempotencyClaim| async move {
            claim.commit().await.map_err(|e| e.to_string())?;
            Err::<(), String>("declined after the charge was recorded".into())
        },
    )
    .key_from_header("Idempotency-Key")
    .settings(settings().max_deliveries(1));
    let (_client, consumer) = bench.consumer().await;
    let mut messages = consumer.messages().await.unwrap();
    let msg = messages.next().await.unwrap().unwrap();
    let settle = worker.handle(msg).await;
    assert_eq!(
        settle,
        tower_idempotency::consumer::Settle::Ack,
        "its error is stored: it should be acknowledged"
    );
}

/// A handler slower than the ack wait: JetStream redelivers the message while the first
/// delivery still runs. Those redeliveries find the key in flight; they do not use up
/// `max_deliveries`, so the message is not dead-lettered (`TERM`) while its first delivery
/// runs, and when that delivery fails before its commit point the message runs again.
/// (Before, the redeliveries counted: the message was dead-lettered and never handled.)
#[tokio::test]
async fn redeliveries_while_the_first_delivery_runs_never_dead_letter_it() {
    let Some(bench) = Bench::new(Duration::from_millis(500)).await else {
        return;
    };
    bench.publish(Some("slow-1"), "slow-1").await;
    let effects: Effects = Arc::default();
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = {
        let (effects, attempts) = (Arc::clone(&effects), Arc::clone(&attempts));
        JetStreamConsumer::new(
            &IdempotencyLayer::new(MemoryStore::new()),
            move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                let (effects, attempts) = (Arc::clone(&effects), Arc::clone(&attempts));
                async move {
                    if attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        return Err("the mail server timed out");
                    }
                    effect(&effects, &msg.payload);
                    Ok(())
                }
            },
        )
        .key_from_header("Idempotency-Key")
        .concurrency(4)
        .settings(keeping_dead_letters(settings().max_deliveries(3), &dead))
    };
    let (_client, consumer) = bench.consumer().await;
    let messages = consumer.messages().await.unwrap();
    let task = tokio::spawn(async move { worker.run(messages).await });
    let _ = until_effects(&effects, 1, Duration::from_secs(10)).await;
    task.abort();
    let dead: Vec<_> = dead
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.reason.clone())
        .collect();
    assert_eq!(
        effects.lock().unwrap().get("slow-1").copied(),
        Some(1),
        "the message was never handled: dead-lettered {dead:?} while its first delivery ran"
    );
}

/// A poison message whose handler panics before its commit point, every time, is taken for
/// one whose handler fails: delivered again, then handed to the dead-letter hook after
/// `max_deliveries`, and `run` goes on. (Before, the panic went through `run`, which ended
/// with it, dropping the other handlers in hand; each restart met the message again and
/// ended the same way, and it never reached the hook.) A supervisor restarts `run` here
/// each time it ends, as one would in production.
#[tokio::test]
async fn a_handler_that_always_panics_is_dead_lettered_after_max_deliveries() {
    let Some(bench) = Bench::new(Duration::from_millis(300)).await else {
        return;
    };
    bench.publish(Some("poison"), "poison").await;
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = {
        let runs = Arc::clone(&runs);
        Arc::new(
            JetStreamConsumer::new(
                &IdempotencyLayer::new(MemoryStore::new()),
                move |_msg: async_nats::Message, _claim: IdempotencyClaim| {
                    let runs = Arc::clone(&runs);
                    async move {
                        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if true {
                            panic!("bug: cannot parse this payload");
                        }
                        Ok::<_, StoreError>(())
                    }
                },
            )
            .key_from_header("Idempotency-Key")
            .settings(keeping_dead_letters(settings().max_deliveries(2), &dead)),
        )
    };
    for _ in 0..6 {
        let (_client, consumer) = bench.consumer().await;
        let messages = consumer.messages().await.unwrap();
        let w = Arc::clone(&worker);
        let task = tokio::spawn(async move { w.run(messages).await });
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while !task.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        task.abort();
        if !dead.lock().unwrap().is_empty() {
            break;
        }
    }
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one run per delivery allowed"
    );
    assert_eq!(
        dead.lock().unwrap().len(),
        1,
        "a poison message should reach the dead-letter hook after 2 deliveries"
    );
}

/// A handler slower than the consumer's ack wait (2 s against 500 ms): with
/// `in_progress_every` shorter than the ack wait, JetStream is told the message is in
/// progress and delivers it once; with it off, it delivers it again every ack wait while
/// the handler runs (each redelivery finds the key in flight; none runs the handler). The
/// handler runs once either way. Counted on the stream of messages itself.
#[tokio::test]
async fn a_handler_slower_than_the_ack_wait_is_kept_in_progress_not_delivered_again() {
    use futures_util::StreamExt;
    // The default, as the README says: every 10 s.
    let default = JetStreamConsumer::new(
        &IdempotencyLayer::new(MemoryStore::new()),
        |_msg: async_nats::Message, _claim: IdempotencyClaim| async { Ok::<_, StoreError>(()) },
    );
    assert!(
        format!("{default:?}").contains("progress_every: Some(10s)"),
        "{default:?}"
    );
    for (every, redelivered) in [(Duration::from_millis(150), false), (Duration::ZERO, true)] {
        let Some(bench) = Bench::new(Duration::from_millis(500)).await else {
            return;
        };
        bench.publish(Some("slow-report"), "slow-report").await;
        let effects: Effects = Arc::default();
        let worker = {
            let effects = Arc::clone(&effects);
            JetStreamConsumer::new(
                &IdempotencyLayer::new(MemoryStore::new()),
                move |msg: async_nats::Message, _claim: IdempotencyClaim| {
                    let effects = Arc::clone(&effects);
                    async move {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        effect(&effects, &msg.payload);
                        Ok::<_, StoreError>(())
                    }
                },
            )
            .key_from_header("Idempotency-Key")
            .concurrency(4)
            .in_progress_every(every)
            .settings(settings())
        };
        let (_client, consumer) = bench.consumer().await;
        let delivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let messages = {
            let delivered = Arc::clone(&delivered);
            consumer.messages().await.unwrap().inspect(move |_| {
                delivered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let task = tokio::spawn(async move { worker.run(messages).await });
        assert!(until_effects(&effects, 1, Duration::from_secs(10)).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        task.abort();
        let delivered = delivered.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(effects.lock().unwrap()["slow-report"], 1, "ran once");
        if redelivered {
            assert!(delivered > 1, "without it, delivered again: {delivered}");
        } else {
            assert_eq!(delivered, 1, "kept in progress, delivered once");
        }
    }
}

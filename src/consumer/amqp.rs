//! An idempotent RabbitMQ consumer (feature `amqp`, with `lapin`).
//!
//! Each delivery's key is its `message_id` property by default, or a header, or anything a
//! closure reads from the delivery; its payload is the fingerprinted input. The handler runs
//! once per key; the delivery is acknowledged after the record is stored, and settled
//! otherwise as [the module above](super) says: `nack` with requeue to redeliver (after the
//! retry delay, which this consumer waits out before requeueing), `reject` without requeue
//! after the dead-letter hook to give up (the queue's dead-letter exchange, if it has one,
//! gets it). The number of deliveries is the `x-delivery-count` header of quorum queues;
//! on classic queues, which do not count, a message whose outcome stays unknown is
//! redelivered until settled (give the queue a delivery limit, or use a quorum queue).
//!
//! ```no_run
//! use tower_idempotency::consumer::amqp::AmqpConsumer;
//! use tower_idempotency::lapin::{options::BasicConsumeOptions, types::FieldTable};
//! use tower_idempotency::lapin::{Connection, ConnectionProperties};
//! use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, MemoryStore};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let conn = Connection::connect("amqp://guest:guest@127.0.0.1:5672", ConnectionProperties::default()).await?;
//! let channel = conn.create_channel().await?;
//! let deliveries = channel
//!     .basic_consume("orders".into(), "billing".into(), BasicConsumeOptions::default(), FieldTable::default())
//!     .await?;
//! let billing = AmqpConsumer::new(
//!     &IdempotencyLayer::new(MemoryStore::new()),
//!     |payload: bytes::Bytes, claim: IdempotencyClaim| async move {
//!         claim.commit().await?; // past this point it never runs twice
//!         println!("charging for {payload:?}");
//!         Ok::<_, tower_idempotency::StoreError>(())
//!     },
//! );
//! billing.run(deliveries).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::AMQPValue;

use super::{ConsumerSettings, DeadLetter, DeadReason, Settle, decide};
use crate::function::{CallError, Idempotent, Output};
use crate::handle::IdempotencyClaim;
use crate::key::Scope;

/// A delivery's key, or why it has none that can be used.
type KeyFn = dyn Fn(&Delivery) -> Result<String, DeadReason> + Send + Sync;

/// Consumes RabbitMQ deliveries, running `handler` once per message key.
pub struct AmqpConsumer<H> {
    calls: Idempotent,
    handler: Arc<H>,
    key: Arc<KeyFn>,
    scope: Option<Scope>,
    settings: ConsumerSettings,
    concurrency: usize,
}

impl<H> fmt::Debug for AmqpConsumer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("scope", &self.scope)
            .field("settings", &self.settings)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<H, Fut, E> AmqpConsumer<H>
where
    H: Fn(Bytes, IdempotencyClaim) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    /// A consumer over `layer`'s store and settings (its lease, TTL, in-flight and failure
    /// policies, recovery hook), keyed by `message_id`, handling one delivery at a time.
    /// The handler gets the payload.
    pub fn new(layer: &crate::IdempotencyLayer, handler: H) -> Self {
        Self {
            calls: Idempotent::new(layer),
            handler: Arc::new(handler),
            key: Arc::new(|d: &Delivery| {
                d.properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .filter(|id| !id.is_empty())
                    .ok_or(DeadReason::NoKey)
            }),
            scope: None,
            settings: ConsumerSettings::default(),
            concurrency: 1,
        }
    }

    /// Keys messages by this header (a string, or an integer) instead of `message_id`. A
    /// string that is not UTF-8 text is refused (the message is dead-lettered with
    /// [`DeadReason::BadKey`]): made text, two different byte strings could become one key,
    /// and the second message be taken for a retry of the first.
    pub fn key_from_header(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.key = Arc::new(move |msg| header(msg, &name));
        self
    }

    /// Keys messages by what `f` reads from them (a field of the payload, say); `None`
    /// dead-letters the message.
    pub fn key_with(
        mut self,
        f: impl Fn(&Delivery) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Arc::new(move |d| f(d).ok_or(DeadReason::NoKey));
        self
    }

    /// The scope of this consumer's keys (keys of different scopes never meet). Default:
    /// the one shared scope, so that every consumer of a stream on one store sees the same
    /// keys.
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// How messages are settled: deliveries before giving up, retry delay, how long settling
    /// may take, dead-letter hook.
    pub fn settings(mut self, settings: ConsumerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// How many messages are handled at once by [`run`](Self::run). Default: 1. Messages
    /// with the same key stay safe at any concurrency: the key is the lock.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Handles deliveries until the consumer ends (or fails: its error is returned).
    ///
    /// When the connection is cut, `run` takes no more deliveries, lets the handlers in hand
    /// finish (their records are stored: the store is not the broker), and answers the
    /// stream's error, so a supervisor that connects again needs only wait for it.
    ///
    /// It returns once those handlers return: a handler that may wait for good on the lost
    /// connection (a publish to it, say) should bound that wait itself, or `run` be wrapped
    /// in a timeout, which drops the handlers still running. Settling each delivery is
    /// bounded by the settings' [settle timeout](ConsumerSettings::settle_timeout): lapin
    /// was seen never to answer an acknowledgement sent as the connection was cut, and with
    /// every handler slot waiting on one, nothing read the stream. The broker delivers
    /// again what was not acknowledged, and a handled delivery is answered from its record
    /// then.
    pub async fn run<S, SE>(&self, messages: S) -> Result<(), SE>
    where
        S: Stream<Item = Result<Delivery, SE>>,
    {
        super::run_each(messages, self.concurrency, |msg| async move {
            self.handle(msg).await;
        })
        .await
    }

    /// Handles one delivery: runs the handler once for its key, then acknowledges it (after
    /// its record is stored), requeues it (after the retry delay), or dead-letters it.
    /// Answers what was done.
    pub async fn handle(&self, delivery: Delivery) -> Settle {
        let deliveries = delivery_count(&delivery);
        let key = (self.key)(&delivery);
        let payload = Bytes::from(delivery.data.clone());
        let settle = match &key {
            Err(reason) => Settle::DeadLetter(reason.clone()),
            Ok(key) => {
                let result = super::unwinding(self.call(key, payload.clone())).await;
                decide(&result, deliveries, &self.settings)
            }
        };
        if let Settle::Retry(delay) = &settle {
            // AMQP has no delayed requeue: wait it out, holding the delivery, unless its
            // channel closes meanwhile (the broker requeues it then, and nothing could be
            // sent), so that a cut connection does not hold `run` for the whole delay.
            let until = crate::time::deadline_after(*delay);
            while delivery.acker.usable() {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left.min(Duration::from_millis(100))).await;
            }
        }
        let settling = async {
            let sent = match &settle {
                Settle::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
                Settle::Retry(_) => {
                    delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await
                }
                Settle::DeadLetter(_) => {
                    delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                }
            };
            // lapin answers `false` when the channel is closed (or the delivery was settled
            // already) and it sent nothing.
            match sent {
                Ok(true) => Ok(()),
                Ok(false) => Err(
                    "nothing was sent: the channel is closed or the delivery was settled already"
                        .to_owned(),
                ),
                Err(err) => Err(err.to_string()),
            }
        };
        if let Settle::DeadLetter(reason) = &settle {
            self.settings
                .dead_letter(DeadLetter {
                    key: key.ok(),
                    source: format!("{}/{}", delivery.exchange, delivery.routing_key),
                    payload,
                    deliveries,
                    reason: reason.clone(),
                })
                .await;
        }
        self.settings.settle("RabbitMQ", settling).await;
        settle
    }

    async fn call(&self, key: &str, payload: Bytes) -> Result<Output<Bytes>, CallError<Bytes>> {
        let handler = Arc::clone(&self.handler);
        let owned = payload.clone();
        let mut call = self.calls.key(key).input(payload);
        // The messages of one stream or queue share a scope unless told otherwise.
        call = call.scope(self.scope.clone().unwrap_or_else(Scope::anonymous));
        call.run(move |claim| async move {
            handler(owned, claim)
                .await
                .map(|()| Bytes::new())
                .map_err(|e| Bytes::from(e.to_string()))
        })
        .await
    }
}

fn header(delivery: &Delivery, name: &str) -> Result<String, DeadReason> {
    let value = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(name))
        .ok_or(DeadReason::NoKey)?;
    let text = match value {
        // Never made text with replacement characters: two keys would become one.
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec())
            .map_err(|_| DeadReason::BadKey(format!("the {name} header is not UTF-8 text")))?,
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        _ => return Err(DeadReason::NoKey),
    };
    Some(text)
        .filter(|t| !t.is_empty())
        .ok_or(DeadReason::NoKey)
}

/// The `x-delivery-count` quorum queues set (0 on the first delivery), as a count of
/// deliveries.
fn delivery_count(delivery: &Delivery) -> Option<u64> {
    let value = delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-delivery-count")?;
    let redeliveries = match value {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok()?,
        AMQPValue::LongInt(n) => u64::try_from(*n).ok()?,
        AMQPValue::LongUInt(n) => u64::from(*n),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    Some(redeliveries + 1)
}

//! An idempotent NATS JetStream consumer (feature `nats`, with `async-nats`).
//!
//! Each message's key is its `Nats-Msg-Id` header by default (the id JetStream already
//! deduplicates publishes by, within the stream's duplicate window; this consumer keeps the
//! guarantee past that window, across redeliveries and republishes), another header, or
//! anything a closure reads from the message. Its payload is the fingerprinted input. The
//! handler runs once per key; the message is acknowledged after the record is stored, and
//! settled otherwise as [the module above](super) says: `NAK` with a delay to redeliver,
//! `TERM` after the dead-letter hook to give up.
//!
//! ```no_run
//! use tower_idempotency::consumer::nats::JetStreamConsumer;
//! use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, MemoryStore};
//! use tower_idempotency::async_nats::jetstream::{self, consumer::pull};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = tower_idempotency::async_nats::connect("nats://127.0.0.1:4222").await?;
//! let js = jetstream::new(client);
//! let stream = js.get_or_create_stream(jetstream::stream::Config {
//!     name: "ORDERS".into(),
//!     subjects: vec!["orders.>".into()],
//!     ..Default::default()
//! }).await?;
//! let consumer = stream.get_or_create_consumer("billing", pull::Config {
//!     durable_name: Some("billing".into()),
//!     ..Default::default()
//! }).await?;
//!
//! let billing = JetStreamConsumer::new(
//!     &IdempotencyLayer::new(MemoryStore::new()),
//!     |msg: tower_idempotency::async_nats::Message, claim: IdempotencyClaim| async move {
//!         claim.commit().await?; // past this point it never runs twice
//!         println!("charging for {:?}", msg.payload);
//!         Ok::<_, tower_idempotency::StoreError>(())
//!     },
//! );
//! billing.run(consumer.messages().await?).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures_util::Stream;

use super::{ConsumerSettings, DeadLetter, DeadReason, Settle, decide};
use crate::function::{CallError, Idempotent, Output};
use crate::handle::IdempotencyClaim;
use crate::key::Scope;

/// The header JetStream deduplicates publishes by.
pub const MSG_ID: &str = "Nats-Msg-Id";

type KeyFn = dyn Fn(&async_nats::Message) -> Option<String> + Send + Sync;

/// Consumes JetStream messages, running `handler` once per message key.
pub struct JetStreamConsumer<H> {
    calls: Idempotent,
    handler: Arc<H>,
    key: Arc<KeyFn>,
    scope: Option<Scope>,
    settings: ConsumerSettings,
    concurrency: usize,
    /// How often a message whose handler still runs is told to JetStream to be in
    /// progress; `None`: never.
    progress_every: Option<std::time::Duration>,
}

/// The default of [`JetStreamConsumer::in_progress_every`]: a third of JetStream's default
/// ack wait (30 s).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl<H> fmt::Debug for JetStreamConsumer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamConsumer")
            .field("scope", &self.scope)
            .field("settings", &self.settings)
            .field("concurrency", &self.concurrency)
            .field("progress_every", &self.progress_every)
            .finish_non_exhaustive()
    }
}

impl<H, Fut, E> JetStreamConsumer<H>
where
    H: Fn(async_nats::Message, IdempotencyClaim) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    /// A consumer over `layer`'s store and settings (its lease, TTL, in-flight and failure
    /// policies, recovery hook), keyed by `Nats-Msg-Id`, handling one message at a time.
    pub fn new(layer: &crate::IdempotencyLayer, handler: H) -> Self {
        Self {
            calls: Idempotent::new(layer),
            handler: Arc::new(handler),
            key: Arc::new(|msg| header(msg, MSG_ID)),
            scope: None,
            settings: ConsumerSettings::default(),
            concurrency: 1,
            progress_every: Some(PROGRESS_EVERY),
        }
    }

    /// Keys messages by this header instead of `Nats-Msg-Id`.
    pub fn key_from_header(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.key = Arc::new(move |msg| header(msg, &name));
        self
    }

    /// Keys messages by what `f` reads from them (a field of the payload, say); `None`
    /// dead-letters the message.
    pub fn key_with(
        mut self,
        f: impl Fn(&async_nats::Message) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Arc::new(f);
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

    /// While a message's handler runs, tell JetStream every `every` that the message is in
    /// progress (`+WPI`), so that it is not delivered again when the consumer's ack wait
    /// runs out: keep `every` shorter than the ack wait (30 s by default). Default: 10 s;
    /// zero turns it off. A message delivered again while its handler runs finds its key
    /// in flight and is delivered later; it never runs twice, but each such delivery is a
    /// round trip for nothing.
    ///
    /// ```no_run
    /// # use tower_idempotency::consumer::nats::JetStreamConsumer;
    /// # use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, MemoryStore};
    /// use std::time::Duration;
    /// let reports = JetStreamConsumer::new(
    ///     &IdempotencyLayer::new(MemoryStore::new()),
    ///     |_msg: tower_idempotency::async_nats::Message, _claim: IdempotencyClaim| async move {
    ///         Ok::<_, tower_idempotency::StoreError>(())
    ///     },
    /// )
    /// .in_progress_every(Duration::from_secs(5)); // for an ack wait of 15 s
    /// ```
    pub fn in_progress_every(mut self, every: std::time::Duration) -> Self {
        self.progress_every = (!every.is_zero()).then(|| crate::time::clamp_duration(every));
        self
    }

    /// Handles messages until the stream ends (or fails: its error is returned). On a
    /// failure it takes no more messages, and lets the handlers in hand finish before it
    /// answers the error.
    pub async fn run<S, SE>(&self, messages: S) -> Result<(), SE>
    where
        S: Stream<Item = Result<jetstream::Message, SE>>,
    {
        super::run_each(messages, self.concurrency, |msg| async move {
            self.handle(msg).await;
        })
        .await
    }

    /// Handles one message: runs the handler once for its key, then acknowledges it (after
    /// its record is stored), asks for its redelivery, or dead-letters it. Answers what was
    /// done.
    pub async fn handle(&self, msg: jetstream::Message) -> Settle {
        let deliveries = msg
            .info()
            .ok()
            .and_then(|info| u64::try_from(info.delivered).ok());
        let settle = match (self.key)(&msg.message) {
            None => Settle::DeadLetter(DeadReason::NoKey),
            Some(key) => {
                let work = std::pin::pin!(super::unwinding(self.call(&key, &msg.message)));
                let result = match self.progress_every {
                    None => work.await,
                    Some(every) => {
                        let progress = std::pin::pin!(self.keep_in_progress(&msg, every));
                        match futures_util::future::select(work, progress).await {
                            futures_util::future::Either::Left((result, _)) => result,
                            futures_util::future::Either::Right((never, _)) => match never {},
                        }
                    }
                };
                decide(&result, deliveries, &self.settings)
            }
        };
        let kind = match &settle {
            Settle::Ack => AckKind::Ack,
            Settle::Retry(delay) => AckKind::Nak(Some(*delay)),
            Settle::DeadLetter(reason) => {
                self.settings
                    .dead_letter(DeadLetter {
                        key: (self.key)(&msg.message),
                        source: msg.message.subject.to_string(),
                        payload: msg.message.payload.clone(),
                        deliveries,
                        reason: reason.clone(),
                    })
                    .await;
                AckKind::Term
            }
        };
        self.settings.settle("JetStream", msg.ack_with(kind)).await;
        settle
    }

    /// Tells JetStream every `every` that `msg` is in progress, for as long as it is polled
    /// (its handler runs); each telling is bounded as settling is.
    async fn keep_in_progress(
        &self,
        msg: &jetstream::Message,
        every: std::time::Duration,
    ) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(every).await;
            self.settings
                .settle("JetStream", msg.ack_with(AckKind::Progress))
                .await;
        }
    }

    async fn call(
        &self,
        key: &str,
        msg: &async_nats::Message,
    ) -> Result<Output<Bytes>, CallError<Bytes>> {
        let handler = Arc::clone(&self.handler);
        let owned = msg.clone();
        let mut call = self.calls.key(key).input(msg.payload.clone());
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

fn header(msg: &async_nats::Message, name: &str) -> Option<String> {
    msg.headers
        .as_ref()?
        .get(name)
        .map(|v| v.as_str().to_owned())
        .filter(|v| !v.is_empty())
}

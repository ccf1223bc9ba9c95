//! Idempotent message consumers: a redelivered or republished message runs its handler
//! once, over [`function::Idempotent`](crate::function::Idempotent) and so over the layer's
//! own machinery.
//!
//! What every broker adapter does with a message, once its handler's call is over
//! ([`Settle`], decided by [`decide`]):
//!
//! | The call | The message |
//! |---|---|
//! | ran and its record is stored, or was replayed | acknowledged: **after** the record is stored |
//! | the handler failed before its commit point (the key was freed) | redelivered (after the retry delay): it runs again |
//! | the handler panicked | as a failure: redelivered, then dead-lettered after [`ConsumerSettings::max_deliveries`]; the consumer goes on |
//! | the handler failed after its commit point (its error is stored) | acknowledged: it never runs again |
//! | another consumer holds the key | redelivered after the lease's `Retry-After`, not counted against [`ConsumerSettings::max_deliveries`] |
//! | the store is unavailable | redelivered after the retry delay: nothing ran |
//! | passed its commit point and crashed (outcome unknown) | redelivered until [`ConsumerSettings::max_deliveries`], then dead-lettered; never run again |
//! | no key, a bad key, or a changed payload under a seen key | dead-lettered at once: no redelivery could help |
//! | a payload over the layer's [`max_request_body`](crate::IdempotencyLayer::max_request_body) (1 MiB by default) | dead-lettered at once as [`DeadReason::TooLarge`]: nothing ran; raise the bound to take such messages |
//! | ran before but its record cannot be read | acknowledged, logged: it never runs again |
//!
//! Dead-lettering calls the consumer's dead-letter hook with the message and the reason,
//! then tells the broker to stop redelivering (JetStream `TERM`; AMQP `reject` without
//! requeue, which routes to the queue's dead-letter exchange if it has one).
//!
//! Telling the broker any of these is waited for at most
//! [`ConsumerSettings::settle_timeout`]. A message whose settling failed (its connection was
//! cut, say) is delivered again, and a handled one is answered from its record then,
//! without running the handler again. When the stream of messages fails, a consumer's `run`
//! takes no more messages, lets the handlers in hand finish, and answers the error.
//!
//! Brokers: NATS JetStream ([`nats`], feature `nats`) and RabbitMQ ([`amqp`], feature
//! `amqp`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::function::{CallError, Output};

#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub mod amqp;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;

/// What becomes of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settle {
    /// Acknowledge it: handled (now or before).
    Ack,
    /// Have it delivered again after this delay.
    Retry(Duration),
    /// Stop its delivery, after the dead-letter hook saw it.
    DeadLetter(DeadReason),
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadReason {
    /// It carries no key where the consumer looks for one.
    NoKey,
    /// Its key is not a valid key (empty, too long, control characters).
    BadKey(String),
    /// Its key was seen with another payload.
    PayloadChanged,
    /// Its handler passed its commit point and its outcome is unknown, after this many
    /// deliveries; it is never run again. Settle it (`IdempotencyStore::settle`) once its
    /// outcome is known.
    OutcomeUnknown,
    /// It kept being redelivered (its handler kept failing, or the store kept failing) for
    /// this many deliveries.
    TooManyDeliveries,
    /// Its payload is larger than the layer's
    /// [`max_request_body`](crate::IdempotencyLayer::max_request_body) (1 MiB by default),
    /// which bounds what is read to fingerprint it: nothing ran. Raise it on the layer the
    /// consumer is built over to take such messages.
    TooLarge(String),
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoKey => f.write_str("the message carries no idempotency key"),
            Self::BadKey(why) => write!(f, "the message's idempotency key is refused: {why}"),
            Self::PayloadChanged => {
                f.write_str("the message's key was seen before with another payload")
            }
            Self::OutcomeUnknown => f.write_str(
                "the handler passed its commit point and its outcome is unknown; it does not \
                 run again",
            ),
            Self::TooManyDeliveries => f.write_str("the message was delivered too many times"),
            Self::TooLarge(why) => write!(f, "the message is too large: {why}"),
        }
    }
}

/// A message the consumer gave up on, as its dead-letter hook sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its key, if it had one.
    pub key: Option<String>,
    /// Where it came from (a subject, a queue).
    pub source: String,
    /// Its payload.
    pub payload: Bytes,
    /// How many times it was delivered, if the broker says.
    pub deliveries: Option<u64>,
    /// Why.
    pub reason: DeadReason,
}

type DeadLetterFn = dyn Fn(DeadLetter) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

/// How a consumer settles messages: shared by every broker adapter.
#[derive(Clone)]
pub struct ConsumerSettings {
    pub(crate) max_deliveries: u64,
    pub(crate) retry_delay: Duration,
    pub(crate) settle_timeout: Duration,
    pub(crate) dead_letter: Option<Arc<DeadLetterFn>>,
}

impl fmt::Debug for ConsumerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerSettings")
            .field("max_deliveries", &self.max_deliveries)
            .field("retry_delay", &self.retry_delay)
            .field("settle_timeout", &self.settle_timeout)
            .field("dead_letter", &self.dead_letter.is_some())
            .finish()
    }
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            max_deliveries: 10,
            retry_delay: Duration::from_secs(1),
            settle_timeout: Duration::from_secs(5),
            dead_letter: None,
        }
    }
}

impl ConsumerSettings {
    /// After this many deliveries, a message that still cannot be settled (its outcome is
    /// unknown, or its handler or the store keep failing) is dead-lettered. Default: 10.
    /// At least 1.
    pub fn max_deliveries(mut self, n: u64) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// How long before a failed message is delivered again. Default: one second.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = crate::time::clamp_duration(delay);
        self
    }

    /// How long telling the broker what became of a message (acknowledge, redeliver, give
    /// up) may take before the consumer stops waiting and moves on. Default: five seconds.
    /// At least one millisecond.
    ///
    /// The consumer stops waiting, not the broker's client: what it was sending may still
    /// reach the broker. Either the message is settled then, or the broker delivers it again
    /// (RabbitMQ when the channel closes, JetStream after the acknowledgement wait), and it
    /// is settled then as it would have been: a handled one is answered from its record
    /// without running the handler, one given up on goes to the dead-letter hook again. No
    /// value makes a handler run twice.
    ///
    /// The bound is what lets a consumer notice a cut connection: RabbitMQ's client was seen
    /// never to answer an acknowledgement sent as its connection was cut, and with every
    /// handler slot waiting on one, nothing read the stream's error. NATS's client queues
    /// acknowledgements, so there the bound is rarely reached.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::consumer::ConsumerSettings;
    ///
    /// let settings = ConsumerSettings::default().settle_timeout(Duration::from_secs(2));
    /// # let _ = settings;
    /// ```
    pub fn settle_timeout(mut self, timeout: Duration) -> Self {
        self.settle_timeout = crate::time::clamp_duration(timeout).max(Duration::from_millis(1));
        self
    }

    /// Waits at most the settle timeout for `settling` (a broker's acknowledgement, sent
    /// to `broker`); a failure or a timeout is logged (the message is then settled late or
    /// delivered again).
    pub(crate) async fn settle<T, E>(
        &self,
        broker: &'static str,
        settling: impl Future<Output = Result<T, E>>,
    ) where
        E: fmt::Display,
    {
        match tokio::time::timeout(self.settle_timeout, settling).await {
            Ok(Ok(_)) => {}
            // The message comes back; its record (if any) answers it then.
            Ok(Err(err)) => tracing::warn!(error = %err, broker, "settling a message failed"),
            Err(_) => tracing::warn!(
                timeout = ?self.settle_timeout,
                broker,
                "settling a message timed out; it is settled late or delivered again"
            ),
        }
    }

    /// Called with every message the consumer gives up on, before the broker is told to
    /// stop delivering it (keep it somewhere, alert someone). Without one, such messages are
    /// logged at `error`.
    ///
    /// The hook is awaited without a bound, since what it does may rightly take a while:
    /// one that never returns holds its message and a handler slot for good, so bound its
    /// own calls (a write to a store that hangs, say).
    pub fn on_dead_letter<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(DeadLetter) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.dead_letter = Some(Arc::new(move |letter| Box::pin(f(letter))));
        self
    }

    /// Hands a message over to the dead-letter hook (or the log).
    pub(crate) async fn dead_letter(&self, letter: DeadLetter) {
        tracing::error!(
            key = letter.key.as_deref().unwrap_or(""),
            source = %letter.source,
            deliveries = letter.deliveries,
            reason = %letter.reason,
            "dead-lettered a message"
        );
        if let Some(hook) = &self.dead_letter {
            hook(letter).await;
        }
    }
}

/// Handles `messages`, up to `concurrency` at once, with `handle`, until the stream ends or
/// fails. On a failure no more messages are taken, and the ones in hand are handled to their
/// end (their records stored, then settled as usual) before the stream's error is answered:
/// a broker connection that fails does not cancel a handler halfway, past its commit point
/// perhaps, when its store is still there to keep its outcome.
pub(crate) async fn run_each<S, M, SE, F, Fut>(
    messages: S,
    concurrency: usize,
    handle: F,
) -> Result<(), SE>
where
    S: futures_util::Stream<Item = Result<M, SE>>,
    F: FnMut(M) -> Fut,
    Fut: Future<Output = ()>,
{
    use futures_util::StreamExt;
    let mut failed = None;
    let until_failed = messages.scan((), |(), message| {
        std::future::ready(match message {
            Ok(message) => Some(message),
            Err(err) => {
                failed = Some(err);
                None
            }
        })
    });
    until_failed.for_each_concurrent(concurrency, handle).await;
    failed.map_or(Ok(()), Err)
}

/// Runs a handler's call, a panic in it taken for the handler's failure before its commit
/// point (logged at `error`): the message is delivered again, and dead-lettered after
/// [`ConsumerSettings::max_deliveries`], while the consumer goes on with its other
/// messages. (The key was freed as the panic unwound, or, past a commit point, kept: a
/// later delivery then finds the outcome unknown.)
pub(crate) async fn unwinding<F>(call: F) -> Result<Output<Bytes>, CallError<Bytes>>
where
    F: Future<Output = Result<Output<Bytes>, CallError<Bytes>>>,
{
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(call).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            tracing::error!(
                panic = %what,
                "a message's handler panicked; the message is delivered again"
            );
            Err(CallError::Operation {
                error: Bytes::from(format!("the handler panicked: {what}")),
                replayed: false,
                committed: false,
            })
        }
    }
}

/// What becomes of a message whose handler's call ended with `result`, on its
/// `deliveries`-th delivery (`None` when the broker does not count).
pub fn decide<T, E>(
    result: &Result<Output<T>, CallError<E>>,
    deliveries: Option<u64>,
    settings: &ConsumerSettings,
) -> Settle {
    let exhausted = deliveries.is_some_and(|n| n >= settings.max_deliveries);
    let retry = |delay: Duration| {
        if exhausted {
            Settle::DeadLetter(DeadReason::TooManyDeliveries)
        } else {
            Settle::Retry(delay)
        }
    };
    match result {
        Ok(_) => Settle::Ack,
        // Its error is stored: it passed its commit point, and never runs again.
        Err(CallError::Operation { replayed: true, .. })
        | Err(CallError::Operation {
            committed: true, ..
        }) => Settle::Ack,
        Err(CallError::Operation { .. }) => retry(settings.retry_delay),
        // Another delivery of this message (or another message with its key) runs: this
        // one must not use up the deliveries, or a message still running could be
        // dead-lettered, and lost if that run then fails before its commit point.
        Err(CallError::InFlight { retry_after }) => Settle::Retry(*retry_after),
        Err(CallError::StoreUnavailable { retry_after }) => {
            retry((*retry_after).max(settings.retry_delay))
        }
        Err(CallError::OutcomeUnknown) if exhausted => {
            Settle::DeadLetter(DeadReason::OutcomeUnknown)
        }
        // The recovery hook may answer on a later delivery, or an operator settle the key.
        Err(CallError::OutcomeUnknown) => Settle::Retry(settings.retry_delay),
        Err(CallError::Mismatch) => Settle::DeadLetter(DeadReason::PayloadChanged),
        Err(CallError::Rejected(why)) => Settle::DeadLetter(DeadReason::BadKey(why.clone())),
        Err(CallError::TooLarge(why)) => Settle::DeadLetter(DeadReason::TooLarge(why.clone())),
        // It ran before; what it answered is lost or unreadable, but it must not run again.
        Err(CallError::NotStored | CallError::RecordUnreadable | CallError::Codec(_)) => {
            Settle::Ack
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ended = Result<Output<()>, CallError<()>>;

    /// A broker's acknowledgement that never answers holds the consumer for the settle
    /// timeout, not for good; a zero timeout is raised to a millisecond.
    #[tokio::test(start_paused = true)]
    async fn a_settle_that_never_answers_ends_at_the_settle_timeout() {
        let settings = ConsumerSettings::default();
        assert_eq!(settings.settle_timeout, Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        settings
            .settle("test", std::future::pending::<Result<(), std::io::Error>>())
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let zero = ConsumerSettings::default().settle_timeout(Duration::ZERO);
        assert_eq!(zero.settle_timeout, Duration::from_millis(1));
        let huge = ConsumerSettings::default().settle_timeout(Duration::MAX);
        assert_eq!(huge.settle_timeout, crate::time::MAX_DURATION);
        // An answer, failed or not, ends it at once.
        let started = tokio::time::Instant::now();
        zero.settle("test", async {
            Err::<(), _>(std::io::Error::other("gone"))
        })
        .await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A stream that fails while messages are being handled: the ones in hand are handled to
    /// their end before the error is answered, and none after the failure is taken.
    #[tokio::test(start_paused = true)]
    async fn a_failing_stream_lets_the_messages_in_hand_finish() {
        use std::sync::Mutex;
        let done = Mutex::new(Vec::new());
        let messages = futures_util::stream::iter([Ok(1), Ok(2), Err("cut"), Ok(3)]);
        let started = tokio::time::Instant::now();
        let answer = run_each(messages, 4, |n: u32| {
            let done = &done;
            async move {
                tokio::time::sleep(Duration::from_secs(u64::from(n))).await;
                done.lock().unwrap().push(n);
            }
        })
        .await;
        assert_eq!(answer, Err("cut"));
        assert_eq!(
            *done.lock().unwrap(),
            [1, 2],
            "both finished, the third never taken"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let all = futures_util::stream::iter([Ok::<u32, &str>(1), Ok(2)]);
        assert_eq!(run_each(all, 1, |_| async {}).await, Ok(()));
    }

    fn ok() -> Ended {
        Ok(Output {
            value: (),
            replayed: false,
        })
    }

    #[test]
    fn every_call_result_settles_its_message() {
        let s = ConsumerSettings::default().max_deliveries(3);
        let d = Duration::from_secs(1);
        let cases: Vec<(Ended, Option<u64>, Settle)> = vec![
            (ok(), Some(1), Settle::Ack),
            (ok(), Some(99), Settle::Ack),
            (
                Err(CallError::Operation {
                    error: (),
                    replayed: false,
                    committed: false,
                }),
                Some(1),
                Settle::Retry(d),
            ),
            (
                Err(CallError::Operation {
                    error: (),
                    replayed: false,
                    committed: false,
                }),
                Some(3),
                Settle::DeadLetter(DeadReason::TooManyDeliveries),
            ),
            (
                Err(CallError::Operation {
                    error: (),
                    replayed: true,
                    committed: true,
                }),
                Some(1),
                Settle::Ack,
            ),
            // Failed after its commit point: its error is stored, on any delivery.
            (
                Err(CallError::Operation {
                    error: (),
                    replayed: false,
                    committed: true,
                }),
                Some(1),
                Settle::Ack,
            ),
            (
                Err(CallError::Operation {
                    error: (),
                    replayed: false,
                    committed: true,
                }),
                Some(3),
                Settle::Ack,
            ),
            (
                Err(CallError::InFlight {
                    retry_after: Duration::from_secs(5),
                }),
                None,
                Settle::Retry(Duration::from_secs(5)),
            ),
            // Another delivery of it still runs: redelivered, whatever the count (it is
            // that delivery's to succeed or fail).
            (
                Err(CallError::InFlight {
                    retry_after: Duration::from_secs(5),
                }),
                Some(3),
                Settle::Retry(Duration::from_secs(5)),
            ),
            (Err(CallError::OutcomeUnknown), Some(2), Settle::Retry(d)),
            (
                Err(CallError::OutcomeUnknown),
                Some(3),
                Settle::DeadLetter(DeadReason::OutcomeUnknown),
            ),
            (
                Err(CallError::Mismatch),
                Some(1),
                Settle::DeadLetter(DeadReason::PayloadChanged),
            ),
            (Err(CallError::RecordUnreadable), Some(1), Settle::Ack),
            (
                Err(CallError::StoreUnavailable {
                    retry_after: Duration::from_millis(10),
                }),
                Some(1),
                Settle::Retry(d),
            ),
        ];
        for (result, deliveries, expected) in cases {
            assert_eq!(
                decide(&result, deliveries, &s),
                expected,
                "{result:?} at delivery {deliveries:?}"
            );
        }
    }
}

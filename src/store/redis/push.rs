//! Waiters woken by Redis pub/sub: the scripts that end an in-flight key (`complete`,
//! `release`, `revoke`, `settle`, and `purge`) publish an empty message on a channel named
//! after the Redis key, and a waiter subscribes to that channel, on one pub/sub connection
//! per store, before it looks at the key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::future::Either;
use tokio::sync::{mpsc, oneshot};

use crate::store::wakeup::{Push, Subscription, Wakeups};

/// How long a waiter waits for its subscription to be confirmed before it polls instead.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);

enum Event {
    Message(Option<redis::Msg>),
    Command(Option<Control>),
}

enum Control {
    Subscribe(Box<str>, oneshot::Sender<bool>),
    Unsubscribe(Box<str>),
}

/// The listener of one store (shared by its clones).
pub(super) struct RedisPush {
    /// Where the pub/sub connection goes; `None` for a store on a connection of the user's
    /// (there is no client to open another, unless given one) and on a cluster (its
    /// pub/sub would broadcast every completion to every node): their waiters poll, and
    /// are still woken by the completions of their own process.
    client: Option<redis::Client>,
    pub(super) wakeups: Arc<Wakeups>,
    /// The running listener: its control channel, and whether its connection is alive.
    listener: Mutex<Option<(mpsc::UnboundedSender<Control>, Arc<AtomicBool>)>>,
}

impl RedisPush {
    pub(super) fn new(client: Option<redis::Client>) -> Self {
        Self {
            client,
            wakeups: Arc::default(),
            listener: Mutex::new(None),
        }
    }

    /// Whether this store's waiters can subscribe.
    pub(super) fn listens(&self) -> bool {
        self.client.is_some()
    }

    /// The running listener, started if there is none (or its connection was lost).
    fn listener(
        &self,
        client: &redis::Client,
    ) -> (mpsc::UnboundedSender<Control>, Arc<AtomicBool>) {
        let mut listener = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((control, alive)) = &*listener
            && !control.is_closed()
        {
            return (control.clone(), Arc::clone(alive));
        }
        let (control, commands) = mpsc::unbounded_channel();
        let alive = Arc::new(AtomicBool::new(false));
        tokio::spawn(listen(
            client.clone(),
            commands,
            Arc::clone(&self.wakeups),
            Arc::clone(&alive),
        ));
        *listener = Some((control.clone(), Arc::clone(&alive)));
        (control, alive)
    }
}

#[async_trait]
impl Push for RedisPush {
    async fn subscribe(&self, name: &str) -> Option<Subscription> {
        let client = self.client.as_ref()?;
        let (control, alive) = self.listener(client);
        let (confirm, confirmed) = oneshot::channel();
        control
            .send(Control::Subscribe(name.into(), confirm))
            .ok()?;
        // From here the listener counts this subscription: it is taken back exactly once,
        // whatever becomes of this call (refused, timed out, or dropped while it waits for
        // the confirmation, when a wait is cancelled).
        let taken_back = Unsubscribe {
            control,
            name: Some(name.into()),
        };
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, confirmed).await {
            Ok(Ok(true)) => Some(Subscription::new(
                alive,
                Some(Box::new(move || drop(taken_back))),
            )),
            _ => None,
        }
    }
}

/// Sends the listener the `UNSUBSCRIBE` of one subscription it counted, when dropped.
struct Unsubscribe {
    control: mpsc::UnboundedSender<Control>,
    name: Option<Box<str>>,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let _ = self.control.send(Control::Unsubscribe(name));
        }
    }
}

/// The listener: one pub/sub connection, subscribed to the channels that waiters of this
/// process wait on (counted, so that one `SUBSCRIBE` serves every waiter of a key). Ends
/// when its connection fails (after waking every waiter, which look again and subscribe
/// anew, starting another) or when the store and every subscription are gone.
async fn listen(
    client: redis::Client,
    mut commands: mpsc::UnboundedReceiver<Control>,
    wakeups: Arc<Wakeups>,
    alive: Arc<AtomicBool>,
) {
    let Ok(Ok(pubsub)) = tokio::time::timeout(SUBSCRIBE_TIMEOUT, client.get_async_pubsub()).await
    else {
        tracing::debug!("the Redis pub/sub connection failed; waiters poll");
        return;
    };
    let (mut sink, mut messages) = pubsub.split();
    alive.store(true, Ordering::SeqCst);
    let mut channels: HashMap<Box<str>, usize> = HashMap::new();
    loop {
        let event = {
            let message = std::pin::pin!(messages.next());
            let command = std::pin::pin!(commands.recv());
            match futures_util::future::select(message, command).await {
                Either::Left((message, _)) => Event::Message(message),
                Either::Right((command, _)) => Event::Command(command),
            }
        };
        match event {
            Event::Message(Some(message)) => wakeups.wake(message.get_channel_name()),
            Event::Message(None) => break,
            Event::Command(Some(Control::Subscribe(name, confirm))) => {
                let count = channels.get(&name).copied().unwrap_or(0);
                if count == 0 {
                    // The channel is the Redis key: a name of this store's own.
                    let subscribed =
                        tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(&*name)).await;
                    if !matches!(subscribed, Ok(Ok(()))) {
                        let _ = confirm.send(false);
                        break;
                    }
                }
                // Counted whether or not the waiter still hears it: its `Unsubscribe`
                // comes back in either case.
                channels.insert(name, count + 1);
                let _ = confirm.send(true);
            }
            Event::Command(Some(Control::Unsubscribe(name))) => {
                if let Some(count) = channels.get_mut(&name) {
                    *count -= 1;
                    if *count == 0 {
                        channels.remove(&name);
                        let unsubscribed =
                            tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.unsubscribe(&*name)).await;
                        if !matches!(unsubscribed, Ok(Ok(()))) {
                            break;
                        }
                    }
                }
            }
            // The store and every subscription are gone.
            Event::Command(None) => {
                alive.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
    alive.store(false, Ordering::SeqCst);
    // Whatever was published while the connection failed is lost: every waiter looks.
    commands.close();
    wakeups.wake_all();
}

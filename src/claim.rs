//! Owning a claim: the guard that completes or releases it exactly once, and the guard that
//! releases a claim whose reply never arrived.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use crate::fingerprint::Fingerprint;
use crate::handle::{IdempotencyClaim, Shared};
use crate::key::StoreKey;
use crate::lease::Registration;
use crate::record::Record;
use crate::runtime::Runtime;
use crate::store::{Claim, ErrorChain, LeaseToken, StoreError};
use crate::time::FIRST_PAUSE;

/// How long the layer keeps trying to store an outcome while the store fails: ten minutes.
/// The key stays claimed (and its lease extended whenever the store answers) meanwhile, so
/// no retry runs the operation again; past this, the layer gives up and logs an `error`.
pub(crate) const COMPLETION_RETRY_WINDOW: Duration = Duration::from_secs(600);
/// The longest pause between two attempts of a failed store call ([`crate::time::retry`]
/// doubles its pause from [`FIRST_PAUSE`] up to this).
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// A claim sent to the store whose answer is not in yet. If the answer never comes (the
/// call failed or overran, or the request was dropped meanwhile), the claim may still have
/// landed: it is released by its token, on a tracked task, so that no key stays blocked
/// for a lease with nothing running.
pub(crate) struct PendingClaim<'a> {
    config: &'a Arc<Runtime>,
    key: StoreKey,
    token: LeaseToken,
    /// The lease the claim asks for (the request's).
    lease: Duration,
    /// The key's hash in the embedded memory store ([`Runtime::key_hash`]).
    hash: u64,
    armed: bool,
}

impl<'a> PendingClaim<'a> {
    pub(crate) fn new(config: &'a Arc<Runtime>, key: StoreKey, lease: Duration) -> Self {
        Self {
            config,
            hash: config.key_hash(&key),
            key,
            token: LeaseToken::new(),
            lease,
            armed: true,
        }
    }

    /// The lease the claim asks for.
    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    pub(crate) fn key(&self) -> &StoreKey {
        &self.key
    }

    /// The key's hash in the embedded memory store ([`Runtime::key_hash`]).
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    pub(crate) fn token(&self) -> LeaseToken {
        self.token
    }

    /// The store answered that the key is someone else's (in flight or completed): nothing
    /// of ours was left behind.
    pub(crate) fn not_ours(mut self) {
        self.armed = false;
    }

    /// Whether a claim of ours may be on the wire: dropped while it is, this claim releases
    /// the key in the background until a lease has passed. Between claims (a wait that
    /// cannot claim behind the caller's back, the recovery hook) nothing of ours is out,
    /// and a caller that leaves leaves nothing to release.
    pub(crate) fn set_on_the_wire(&mut self, on_the_wire: bool) {
        self.armed = on_the_wire;
    }

    /// The store answered that this claim owns the key. `traced`: the request's span is
    /// enabled (a lost lease is recorded on it; nothing is, otherwise, as for every other
    /// attribute).
    pub(crate) fn acquired(
        mut self,
        fingerprint: Fingerprint,
        ttl: Duration,
        traced: bool,
    ) -> Claimed {
        self.armed = false;
        let key = self.key.take();
        Claimed::new(
            Arc::clone(self.config),
            key,
            self.token,
            fingerprint,
            (ttl, self.lease, self.hash),
            traced,
        )
    }

    /// The claim failed or overran: release whatever it may have left.
    pub(crate) fn failed(mut self) {
        self.armed = false;
        self.release_orphan("its reply was lost");
    }

    fn release_orphan(&self, why: &'static str) {
        let config = Arc::clone(self.config);
        let key = self.key.clone();
        let token = self.token;
        let timeout = config.store_timeout;
        // Past a lease and its contest from now, a claim that landed is free for the taking
        // anyway.
        let lease = self.lease;
        let until =
            crate::time::deadline_after(lease.saturating_add(crate::store::takeover_grace(lease)));
        self.config.work.spawn("orphan release", async move {
            crate::time::retry(until, MAX_PAUSE.max(timeout), || async {
                match config.release(&key, token).await {
                    Ok(()) => {
                        crate::metrics::orphan_release();
                        tracing::warn!(
                            key = key.client_key(),
                            "released an idempotency claim whose request was not answered \
                             by the store ({why}); a retry can run now"
                        );
                        ControlFlow::Break(())
                    }
                    // Not (or not yet) landed, or not ours; a claim stuck on the wire may
                    // still land, so look again until a lease has passed.
                    Err(StoreError::LeaseLost) => ControlFlow::Continue(()),
                    // Only the request's own handler can commit, and it never ran.
                    Err(StoreError::Committed) => ControlFlow::Break(()),
                    Err(err) => {
                        tracing::warn!(
                            key = key.client_key(),
                            error = %ErrorChain(&err),
                            "releasing an unanswered idempotency claim failed; retrying"
                        );
                        ControlFlow::Continue(())
                    }
                }
            })
            .await;
        });
    }
}

impl Drop for PendingClaim<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            self.release_orphan("the request was abandoned while its claim was on the wire");
        }
    }
}

/// Ownership of a claim: completes or releases it exactly once, and releases it if dropped
/// unsettled (a panic, a cancelled operation). Its lease is kept alive until then.
pub(crate) struct Claimed {
    /// The key, its token and the configuration, shared with the handler's
    /// [`IdempotencyClaim`] (which also records whether it declared a commit point): one
    /// allocation per claim, and one reference to the layer's configuration.
    shared: Arc<Shared>,
    fingerprint: Fingerprint,
    registration: Option<Registration>,
    settled: bool,
    /// The request's span (`idempotency.lease_lost` is recorded on it).
    span: tracing::Span,
}

impl Claimed {
    fn new(
        config: Arc<Runtime>,
        key: StoreKey,
        token: LeaseToken,
        fingerprint: Fingerprint,
        (ttl, lease, hash): (Duration, Duration, u64),
        traced: bool,
    ) -> Self {
        // The request's span, kept to record a lost lease found after the response left.
        let span = if traced {
            tracing::Span::current()
        } else {
            tracing::Span::none()
        };
        let registration = config
            .keeper
            .register(&key, token, lease, || config.renewal());
        Self {
            shared: Shared::new(config, key, token, ttl, hash),
            fingerprint,
            registration: Some(registration),
            settled: false,
            span,
        }
    }

    /// A claim found committed when its release was attempted: it is completed with the
    /// outcome in hand, without renewing its lease (nobody can take a committed key over).
    fn resumed(
        config: Arc<Runtime>,
        key: StoreKey,
        token: LeaseToken,
        record: &Record,
        ttl: Duration,
    ) -> Self {
        let hash = config.key_hash(&key);
        Self {
            shared: Shared::new(config, key, token, ttl, hash),
            fingerprint: *record.fingerprint(),
            registration: None,
            settled: false,
            span: tracing::Span::none(),
        }
    }

    pub(crate) fn config(&self) -> &Arc<Runtime> {
        &self.shared.config
    }

    /// The handle the operation gets in its request's extensions.
    pub(crate) fn handle(&self) -> IdempotencyClaim {
        IdempotencyClaim::new(Arc::clone(&self.shared))
    }

    pub(crate) fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// How long this claim's record is kept.
    pub(crate) fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    fn settle(&mut self) {
        self.settled = true;
        // The request's span closes once its claim is settled, not when a retried
        // completion finally gives up.
        self.span = tracing::Span::none();
        if let Some(registration) = self.registration.take() {
            self.shared.config.keeper.unregister(registration);
        }
    }

    /// Frees the key so that a retry runs the operation. Waits for the first attempt (within
    /// the store-call bound); further attempts, if it failed, go on in the background.
    ///
    /// A key past its commit point is not freed (the store refuses): then `fallback`, the
    /// answer the operation gave, is stored instead, since running it again is no longer
    /// safe; without one, the key is left with its outcome unknown.
    ///
    /// Only a commit point the store confirmed binds the key to `fallback`. One the
    /// operation was told failed (it may land yet) is withdrawn first, holding the key
    /// meanwhile, so that a retry runs ([`withdraw`]). One written inside the application's
    /// transaction may or may not hold (its `COMMIT`'s reply may have been lost): the key
    /// is let go without `fallback`, so that if it holds, retries get the recovery hook's
    /// answer or `outcome-unknown`, never an error answer that may be false.
    pub(crate) async fn release(mut self, fallback: Option<Record>) {
        if self.shared.confirmed()
            && let Some(record) = fallback
        {
            return self.complete(record).await;
        }
        if self.shared.in_doubt() {
            return self.withdraw().await;
        }
        let config = Arc::clone(&self.shared.config);
        let (key, token) = (self.shared.key.clone(), self.shared.token);
        self.settle();
        let fallback = fallback.filter(|_| !self.shared.in_transaction());
        let ttl = self.shared.ttl;
        release(config, key, token, fallback, false, ttl).await;
    }

    /// Withdraws a commit point in doubt, holding the key meanwhile, then frees it
    /// ([`withdraw`]).
    async fn withdraw(mut self) {
        let config = Arc::clone(&self.shared.config);
        let (key, token) = (self.shared.key.clone(), self.shared.token);
        let registration = self.registration.take();
        self.settled = true;
        let beat = Heartbeat {
            config: Arc::clone(&config),
            registration,
        };
        withdraw(config, key, token, beat, false).await;
    }

    /// Stores the outcome at once if the store answers at once (the embedded memory store)
    /// and takes it; otherwise hands the record back for [`complete`](Self::complete).
    // The record handed back is the point: no copy is kept for the attempt.
    #[allow(clippy::result_large_err)]
    pub(crate) fn complete_now(&mut self, record: Record) -> Result<(), Record> {
        // A commit point in doubt is withdrawn, never bound to an answer ([`complete`]).
        if self.shared.in_doubt() {
            return Err(record);
        }
        let timer = crate::metrics::Timer::start();
        match self.shared.config.complete_direct(
            &self.shared.key,
            self.shared.hash,
            self.shared.token,
            record,
            self.shared.ttl,
        ) {
            Ok(Ok(())) => {
                timer.store_call_ended(&*self.shared.config.store, "complete", true);
                self.stored(0);
                Ok(())
            }
            // Taken over (or refused): the full path deals with it.
            Ok(Err((_, record))) | Err(record) => Err(record),
        }
    }

    /// Stores the outcome. Tries for up to the store-call bound in all (a transient failure
    /// is retried at once, with jittered backoff, and the response end waits for it); if
    /// the store still fails, the claim moves to a tracked task that goes on retrying for
    /// [`COMPLETION_RETRY_WINDOW`], keeping the lease alive, so that the response is not
    /// held for a whole outage and the key never runs twice meanwhile.
    pub(crate) async fn complete(mut self, record: Record) {
        // The operation was told its commit point failed (it may land yet), so it made no
        // effects, whatever it answered (a `200` saying "not charged", a `503`): the commit
        // is withdrawn and the key freed, so that a retry runs the operation, and the answer
        // is never stored ([`IdempotencyClaim::commit`](crate::IdempotencyClaim::commit)).
        if self.shared.in_doubt() {
            return Box::pin(self.withdraw()).await;
        }
        // The embedded memory store: one direct call, which hands the record back if it
        // refuses, so that no copy of it is made for the attempt.
        let timer = crate::metrics::Timer::start();
        let record = match self.shared.config.complete_direct(
            &self.shared.key,
            self.shared.hash,
            self.shared.token,
            record,
            self.shared.ttl,
        ) {
            Ok(result) => {
                timer.store_call_ended(&*self.shared.config.store, "complete", result.is_ok());
                match result {
                    Ok(()) => return self.stored(0),
                    Err((StoreError::LeaseLost, record)) => {
                        // Boxed: a rare path, kept out of the size of every completion.
                        return Box::pin(self.taken_over(false, record)).await;
                    }
                    Err((_, record)) => record,
                }
            }
            Err(record) => record,
        };
        if let Some(registration) = self.registration {
            self.shared.config.keeper.settling(registration);
        }
        let mut failures = 0;
        let inline_until = crate::time::deadline_after(self.shared.config.store_timeout);
        match self
            .complete_until(&record, inline_until, &mut failures)
            .await
        {
            Ok(()) => {
                self.shared
                    .config
                    .cache_stored(&self.shared.key, record, self.shared.ttl);
                self.stored(failures)
            }
            Err(StoreError::LeaseLost) => Box::pin(self.taken_over(failures > 0, record)).await,
            Err(err) => {
                tracing::warn!(
                    key = self.shared.key.client_key(),
                    error = %ErrorChain(&err),
                    failures,
                    "storing the idempotency record failed; retrying in the background, \
                     the key stays claimed meanwhile"
                );
                let work = self.shared.config.work.clone();
                work.spawn("completion", self.complete_retrying(record, failures));
            }
        }
    }

    async fn complete_retrying(mut self, record: Record, mut failures: u32) {
        let give_up = crate::time::deadline_after(COMPLETION_RETRY_WINDOW);
        match self.complete_until(&record, give_up, &mut failures).await {
            Ok(()) => {
                self.shared
                    .config
                    .cache_stored(&self.shared.key, record, self.shared.ttl);
                self.stored(failures)
            }
            Err(StoreError::LeaseLost) => self.taken_over(true, record).await,
            Err(err) => {
                self.settle();
                tracing::error!(
                    key = self.shared.key.client_key(),
                    error = %ErrorChain(&err),
                    failures,
                    "gave up storing the idempotency record; once its lease ends, a \
                     retry with this key runs the operation again"
                );
            }
        }
    }

    /// Tries to store `record` until it is stored or the key is no longer this claim's
    /// (`LeaseLost`), retrying other failures with jittered backoff until `until`; then
    /// answers the last failure. Each attempt is bounded by the store-call bound.
    async fn complete_until(
        &self,
        record: &Record,
        until: tokio::time::Instant,
        failures: &mut u32,
    ) -> Result<(), StoreError> {
        let s = &self.shared;
        let mut first = true;
        retry_until(&s.config, "complete", &s.key, until, failures, || {
            if !std::mem::take(&mut first) {
                crate::metrics::completion_retry();
            }
            s.config
                .store
                .complete(&s.key, s.token, record.clone(), s.ttl)
        })
        .await
    }

    fn stored(&mut self, failures: u32) {
        self.settle();
        if failures > 0 {
            tracing::info!(
                key = self.shared.key.client_key(),
                failures,
                "idempotency record stored after failed attempts"
            );
        }
    }

    /// The token no longer owns the key: another claim took it over after the lease lapsed
    /// (or an earlier attempt whose reply was lost stored the record). The operation ran and
    /// its outcome is in hand, so it is not thrown away: if the key is free again (the other
    /// claim was released: its request gave up, or its outcome was not storable), it is
    /// claimed anew and this outcome stored; if a record exists, it is kept. The first look
    /// is made before the response ends, so a retry cannot slip in ahead of it; while the
    /// key is held by another, a tracked task looks again.
    async fn taken_over(&mut self, after_failures: bool, record: Record) {
        self.span.record("idempotency.lease_lost", true);
        self.settle();
        crate::metrics::lost_lease();
        tracing::warn!(
            key = self.shared.key.client_key(),
            after_failures,
            "the idempotency key was taken over by another request after this one's lease \
             lapsed; this outcome is stored if the key is freed again, otherwise the other \
             request's outcome is kept"
        );
        let ttl = self.shared.ttl;
        if store_if_free(
            &self.shared.config,
            &self.shared.key,
            self.fingerprint,
            &record,
            ttl,
        )
        .await
        {
            return;
        }
        let config = Arc::clone(&self.shared.config);
        let (key, fingerprint) = (self.shared.key.clone(), self.fingerprint);
        let work = config.work.clone();
        work.spawn("store after takeover", async move {
            let give_up = crate::time::deadline_after(COMPLETION_RETRY_WINDOW);
            // The first look was just made.
            tokio::time::sleep(crate::time::jittered(FIRST_PAUSE)).await;
            crate::time::retry(give_up, MAX_PAUSE / 2, || async {
                if store_if_free(&config, &key, fingerprint, &record, ttl).await {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .await;
        });
    }
}

/// Claims `key` if it is free and stores `record` under it. True when done: stored, or a
/// record exists (another's, or an earlier attempt's); false while another holds the key or
/// the store fails.
async fn store_if_free(
    config: &Runtime,
    key: &StoreKey,
    fingerprint: Fingerprint,
    record: &Record,
    ttl: Duration,
) -> bool {
    let token = LeaseToken::new();
    match config
        .claim(key, config.key_hash(key), &fingerprint, token, config.lease)
        .await
    {
        Ok(Claim::Acquired(_)) => {
            let stored = config.complete(key, token, record.clone(), ttl).await;
            if stored.is_ok() {
                tracing::warn!(
                    key = key.client_key(),
                    "the key was free again: this request's outcome is stored"
                );
                return true;
            }
            let _ = config.release(key, token).await;
            false
        }
        Ok(Claim::Completed(_)) => true,
        // Another request committed and left no outcome: this outcome settles it.
        Ok(Claim::OutcomeUnknown { .. }) => {
            let _ = config.settle(key, record.clone(), ttl).await;
            true
        }
        Ok(Claim::InFlight { .. }) => false,
        Err(_) => {
            let _ = config.release(key, token).await;
            false
        }
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if !self.settled {
            self.let_go();
        }
    }
}

impl Claimed {
    /// Dropped unsettled: withdraws the commit it may have made, or releases the key, on a
    /// tracked task.
    ///
    /// Out of line and cold: the futures it spawns are built on the stack, and inlined
    /// into `drop`, which every first request runs, their kilobytes would push what runs
    /// after it onto cache lines nothing else touches.
    #[cold]
    #[inline(never)]
    fn let_go(&mut self) {
        let config = Arc::clone(&self.shared.config);
        let (key, token) = (self.shared.key.clone(), self.shared.token);
        let work = config.work.clone();
        if self.shared.in_doubt() {
            let registration = self.registration.take();
            self.settled = true;
            work.spawn(
                "withdraw commit",
                withdraw(
                    Arc::clone(&config),
                    key,
                    token,
                    Heartbeat {
                        config,
                        registration,
                    },
                    true,
                ),
            );
            return;
        }
        self.settle();
        let ttl = self.shared.ttl;
        work.spawn("release", release(config, key, token, None, true, ttl));
    }
}

/// Withdraws a commit the operation was told failed but that may land yet (it timed out,
/// or its connection broke after sending it), then lets the key go: `revoke`, fenced by
/// the token, tried for up to the store-call bound inline and then on a tracked task for
/// [`COMPLETION_RETRY_WINDOW`], like a completion. The lease is kept alive until then
/// (`registration`), so the key is held, never answered from a commit that was withdrawn.
///
/// A late commit that lands after the revocation finds no claim of its token and changes
/// nothing; one that lands before is undone by it. Either way the key ends free.
async fn withdraw(
    config: Arc<Runtime>,
    key: StoreKey,
    token: LeaseToken,
    beat: Heartbeat,
    detached: bool,
) {
    if let Some(registration) = beat.registration {
        config.keeper.settling(registration);
    }
    // Awaited inline, this may be dropped before it ends (the operation's future dropped:
    // a client gone under `Disconnect::Release`): the withdrawal then goes on on a tracked
    // task, which takes the heartbeat along, so that the key ends free and its lease stops
    // being renewed. Detached, a withdrawal dropped before its end (its runtime shut
    // down) stops the heartbeat as it goes: the lease then runs out, never renewed for a
    // claim nobody settles.
    let (mut unfinished, mut beat) = if detached {
        (None, beat)
    } else {
        let unfinished = Unfinished {
            key: key.clone(),
            token,
            beat: Some(beat),
            done: false,
        };
        let idle = Heartbeat {
            config: Arc::clone(&config),
            registration: None,
        };
        (Some(unfinished), idle)
    };
    let mut failures = 0;
    let inline = if detached {
        COMPLETION_RETRY_WINDOW
    } else {
        config.store_timeout
    };
    let result = revoke_until(&config, &key, token, inline, &mut failures).await;
    if let Some(unfinished) = &mut unfinished {
        unfinished.done = true;
        if let Some(taken) = unfinished.beat.take() {
            beat = taken;
        }
    }
    if detached || !matches!(&result, Err(e) if !matches!(e, StoreError::LeaseLost)) {
        return withdrawn(&config, &key, beat.take(), failures, &result);
    }
    tracing::warn!(
        key = key.client_key(),
        failures,
        "withdrawing an unconfirmed commit point failed; retrying in the background, the \
         key stays claimed meanwhile"
    );
    let work = config.work.clone();
    work.spawn("withdraw commit", async move {
        let mut beat = beat;
        let result =
            revoke_until(&config, &key, token, COMPLETION_RETRY_WINDOW, &mut failures).await;
        withdrawn(&config, &key, beat.take(), failures, &result);
    });
}

/// The lease keeper's registration of a claim being withdrawn: stopped when dropped, so
/// that a withdrawal dropped before its end (its runtime shut down, or no runtime took the
/// task) leaves no heartbeat renewing a claim nobody will settle.
struct Heartbeat {
    config: Arc<Runtime>,
    registration: Option<Registration>,
}

impl Heartbeat {
    /// The registration, which the caller now stops itself.
    fn take(&mut self) -> Option<Registration> {
        self.registration.take()
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(registration) = self.registration.take() {
            self.config.keeper.unregister(registration);
        }
    }
}

/// A withdrawal awaited inline that has not got its answer: dropped, it goes on on a
/// tracked task, with the heartbeat.
struct Unfinished {
    key: StoreKey,
    token: LeaseToken,
    beat: Option<Heartbeat>,
    /// The withdrawal got its answer: nothing to go on with.
    done: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(beat) = self.beat.take() else {
            return;
        };
        if self.done {
            return;
        }
        let config = Arc::clone(&beat.config);
        let work = config.work.clone();
        // The heartbeat goes into the task: if no runtime takes it, it stops with it.
        work.spawn(
            "withdraw commit",
            withdraw(config, self.key.clone(), self.token, beat, true),
        );
    }
}

async fn revoke_until(
    config: &Runtime,
    key: &StoreKey,
    token: LeaseToken,
    window: Duration,
    failures: &mut u32,
) -> Result<(), StoreError> {
    let until = crate::time::deadline_after(window);
    retry_until(config, "revoke", key, until, failures, || {
        config.store.revoke(key, token)
    })
    .await
}

/// The end of [`withdraw`]: the lease is no longer kept alive, and the result is logged.
fn withdrawn(
    config: &Runtime,
    key: &StoreKey,
    registration: Option<Registration>,
    failures: u32,
    result: &Result<(), StoreError>,
) {
    if let Some(registration) = registration {
        config.keeper.unregister(registration);
    }
    match result {
        Ok(()) => tracing::info!(
            key = key.client_key(),
            failures,
            "withdrew a commit point whose confirmation was lost; a retry can run"
        ),
        Err(StoreError::LeaseLost) => {}
        Err(err) => tracing::error!(
            key = key.client_key(),
            error = %ErrorChain(err),
            "gave up withdrawing a commit point that was not confirmed; if it landed, \
             retries get outcome-unknown until the key is settled"
        ),
    }
}

/// Calls `call` (one store call, bounded by the store-call bound) until it succeeds or the
/// key is no longer the caller's (`LeaseLost`, answered at once), retrying other failures
/// with jittered backoff until `until`; then answers the last failure.
async fn retry_until<F, Fut>(
    config: &Runtime,
    what: &'static str,
    key: &StoreKey,
    until: tokio::time::Instant,
    failures: &mut u32,
    mut call: F,
) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let timeout = config.store_timeout;
    // Shared by the attempts (one at a time; the future is sent between threads).
    let count = std::sync::atomic::AtomicU32::new(*failures);
    let last = std::sync::Mutex::new(None);
    let done = crate::time::retry(until, MAX_PAUSE, || {
        let (call, count, last) = (call(), &count, &last);
        async move {
            let bound = until.min(crate::time::deadline_after(timeout));
            let timer = crate::metrics::Timer::start();
            let result = match tokio::time::timeout_at(bound, call).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Timeout(timeout)),
            };
            timer.store_call(&*config.store, what, &result);
            match result {
                Ok(()) => ControlFlow::Break(Ok(())),
                Err(StoreError::LeaseLost) => ControlFlow::Break(Err(StoreError::LeaseLost)),
                Err(err) => {
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(
                            key = key.client_key(),
                            error = %ErrorChain(&err),
                            failures = n,
                            "idempotency store call ({what}) failed; retrying"
                        );
                    }
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                    ControlFlow::Continue(())
                }
            }
        }
    })
    .await;
    *failures = count.into_inner();
    let last = last.into_inner().unwrap_or_else(|p| p.into_inner());
    done.unwrap_or_else(|| Err(last.unwrap_or(StoreError::Timeout(timeout))))
}

/// Releases a claim: one bounded attempt, then (if that failed) retries on a tracked task
/// until the lease would have ended anyway. A committed key is not released: `fallback` is
/// stored under it if there is one (see [`Claimed::release`]).
async fn release(
    config: Arc<Runtime>,
    key: StoreKey,
    token: LeaseToken,
    fallback: Option<Record>,
    detached: bool,
    ttl: Duration,
) {
    let result = config.release(&key, token).await;
    match result {
        Ok(()) | Err(StoreError::LeaseLost) => return,
        Err(StoreError::Committed) => return committed(config, key, token, fallback, ttl).await,
        Err(err) => tracing::warn!(
            key = key.client_key(),
            error = %ErrorChain(&err),
            "releasing the idempotency key failed; retrying"
        ),
    }
    // Retried as long as a completion would be: after an outage longer than the lease, the
    // key is freed as soon as the store answers again, instead of being held by a lapsed
    // lease (and contested) while retries are told it still runs.
    let until = crate::time::deadline_after(COMPLETION_RETRY_WINDOW);
    let retry = {
        let config = Arc::clone(&config);
        async move {
            // The first attempt was just made.
            tokio::time::sleep(crate::time::jittered(FIRST_PAUSE)).await;
            let released = crate::time::retry(until, MAX_PAUSE, || async {
                match config.release(&key, token).await {
                    Ok(()) | Err(StoreError::LeaseLost) => ControlFlow::Break(false),
                    Err(StoreError::Committed) => ControlFlow::Break(true),
                    Err(_) => ControlFlow::Continue(()),
                }
            })
            .await;
            match released {
                Some(false) => {}
                Some(true) => committed(config, key, token, fallback, ttl).await,
                None => tracing::warn!(
                    key = key.client_key(),
                    "gave up releasing the idempotency key; it is free once its lease ends \
                     and is contested"
                ),
            }
        }
    };
    if detached {
        retry.await;
    } else {
        config.work.clone().spawn("release", retry);
    }
}

/// The release of a claim was refused because it passed its commit point: store the answer
/// the operation gave, or, with none, leave the key with its outcome unknown.
async fn committed(
    config: Arc<Runtime>,
    key: StoreKey,
    token: LeaseToken,
    fallback: Option<Record>,
    ttl: Duration,
) {
    match fallback {
        Some(record) => {
            tracing::info!(
                key = key.client_key(),
                status = record.status().as_u16(),
                "the operation passed its commit point and answered an error: storing that \
                 answer, since running it again is no longer safe"
            );
            Claimed::resumed(config, key, token, &record, ttl)
                .complete(record)
                .await;
        }
        None => {
            crate::metrics::unknown_outcome();
            tracing::warn!(
                key = key.client_key(),
                "the operation passed its commit point and ended without an answer to store; \
                 retries with this key get outcome-unknown until the key is settled"
            );
        }
    }
}

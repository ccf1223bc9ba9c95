//! Duplicates in wait mode hear of the end of the key they wait on from the store's push
//! channel (Redis pub/sub here; PostgreSQL `LISTEN`/`NOTIFY` in `postgres.rs`), not by
//! polling, and lose nothing when that channel fails.
//!
//! Time is not measured here (BENCHMARKS.md has the latency, `cargo bench --bench wakeup`);
//! what these tests count is the claims a waiter makes. Polling from 5 ms doubling to
//! 250 ms makes 13 claims while a key is held for two seconds; a waiter woken by push makes
//! its first claim, a recheck per 500 ms of the holder's remaining lease, and one claim
//! when woken.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower_idempotency::store::{Claim, LeaseToken, StoreKey};
use tower_idempotency::{IdempotencyStore, RedisStore};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::store::Record;
use tower_idempotency::{Fingerprint, Scope};

use crate::common::PrivateRedis;

fn key(k: &str) -> StoreKey {
    StoreKey::new(&Scope::anonymous(), k)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn record(body: &'static [u8]) -> Record {
    Record::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::from_static(body),
        None,
    )
}

const HOLD: Duration = Duration::from_secs(2);
const LONG: Duration = Duration::from_secs(30);

fn redis_here() -> bool {
    if std::env::var("REDIS_URL").is_ok_and(|u| !u.is_empty()) {
        true
    } else {
        eprintln!("skipped: REDIS_URL not set");
        false
    }
}

async fn admin(server: &PrivateRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("a url")
        .get_multiplexed_async_connection()
        .await
        .expect("an admin connection")
}

/// The claims (script calls) since the last reset, and resets.
async fn claims_since(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("INFO commandstats");
    let calls = info
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"));
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(admin)
        .await
        .expect("CONFIG RESETSTAT");
    calls
}

/// The subscribers of `channel` on the server.
async fn subscribers(admin: &mut redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(admin)
        .await
        .expect("PUBSUB NUMSUB");
    n
}

/// Claims the free key `k` on `store`, which must acquire it.
async fn acquire(store: &RedisStore, k: &StoreKey) -> LeaseToken {
    match store
        .claim(k, &fp(1), LeaseToken::new(), LONG)
        .await
        .unwrap()
    {
        Claim::Acquired(token) => token,
        other => panic!("the first claim acquires, got {other:?}"),
    }
}

/// Waits (up to 3 s) until nobody is subscribed to the channel of `k`.
async fn no_subscription_left(
    admin: &mut redis::aio::MultiplexedConnection,
    k: &StoreKey,
    what: &str,
) {
    let channel = format!("idempotency:{k}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while subscribers(admin, &channel).await > 0 {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn waiter(store: &RedisStore, k: &StoreKey) -> tokio::task::JoinHandle<Claim> {
    let (store, k) = (store.clone(), k.clone());
    tokio::spawn(async move {
        store
            .wait(&k, &fp(1), LeaseToken::new(), LONG, Duration::from_secs(10))
            .await
            .expect("wait")
    })
}

/// Two instances on one Redis: the waiter on the second is woken by the first's
/// completion, with a handful of claims where polling makes thirteen, and its subscription
/// ends with its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_instance_is_woken_by_the_completion_not_by_polling() {
    if !redis_here() {
        return;
    }
    let server = PrivateRedis::start();
    let mut admin = admin(&server).await;
    let first = RedisStore::connect(&server.url()).await.expect("connect");
    let second = RedisStore::connect(&server.url()).await.expect("connect");
    let k = key("woken-by-completion");
    let token = acquire(&first, &k).await;
    claims_since(&mut admin).await;
    let waiting = waiter(&second, &k);
    tokio::time::sleep(HOLD).await;
    assert_eq!(
        subscribers(&mut admin, &format!("idempotency:{k}")).await,
        1,
        "the waiter listens on its key's channel"
    );
    first
        .complete(&k, token, record(b"done"), LONG)
        .await
        .expect("complete");
    let Claim::Completed(stored) = waiting.await.unwrap() else {
        panic!("the waiter gets the stored answer");
    };
    assert_eq!(stored.body(), &b"done"[..]);
    let claims = claims_since(&mut admin).await - 1;
    assert!(
        claims <= 7,
        "a woken waiter claims at first, per 500 ms recheck and once woken: {claims} claims"
    );
    no_subscription_left(&mut admin, &k, "the subscription outlived the wait").await;
}

/// A release on one instance wakes the waiter on another, which then owns the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiter_on_another_instance_which_takes_the_key() {
    if !redis_here() {
        return;
    }
    let server = PrivateRedis::start();
    let mut admin = admin(&server).await;
    let first = RedisStore::connect(&server.url()).await.expect("connect");
    let second = RedisStore::connect(&server.url()).await.expect("connect");
    let k = key("woken-by-release");
    let token = acquire(&first, &k).await;
    claims_since(&mut admin).await;
    let waiting = waiter(&second, &k);
    tokio::time::sleep(HOLD).await;
    first.release(&k, token).await.expect("release");
    let Claim::Acquired(owner) = waiting.await.unwrap() else {
        panic!("the waiter takes the released key");
    };
    let claims = claims_since(&mut admin).await - 1;
    assert!(claims <= 7, "woken, not polling: {claims} claims");
    second
        .complete(&k, owner, record(b"second"), LONG)
        .await
        .expect("the waiter owns the key");
}

/// The pub/sub connection killed mid-wait: the waiter looks again, subscribes anew, and
/// still gets the answer, as the next waiter does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_push_connection_loses_no_waiter() {
    if !redis_here() {
        return;
    }
    let server = PrivateRedis::start();
    let mut admin = admin(&server).await;
    let first = RedisStore::connect(&server.url()).await.expect("connect");
    let second = RedisStore::connect(&server.url()).await.expect("connect");
    let k = key("push-killed");
    let token = acquire(&first, &k).await;
    let waiting = waiter(&second, &k);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .expect("CLIENT KILL TYPE pubsub");
    assert_eq!(killed, 1, "the store's one pub/sub connection");
    tokio::time::sleep(Duration::from_millis(700)).await;
    first
        .complete(&k, token, record(b"after the kill"), LONG)
        .await
        .expect("complete");
    let Claim::Completed(stored) = waiting.await.unwrap() else {
        panic!("the waiter still gets the answer");
    };
    assert_eq!(stored.body(), &b"after the kill"[..]);

    // The channel works again for the next waiter.
    let k = key("push-after-kill");
    let token = acquire(&first, &k).await;
    claims_since(&mut admin).await;
    let waiting = waiter(&second, &k);
    tokio::time::sleep(HOLD).await;
    first
        .complete(&k, token, record(b"again"), LONG)
        .await
        .expect("complete");
    assert!(matches!(waiting.await.unwrap(), Claim::Completed(_)));
    let claims = claims_since(&mut admin).await - 1;
    assert!(claims <= 7, "pushed again after the kill: {claims} claims");
}

/// Sixteen waiters on each of two instances, one key: every one gets the one answer, and
/// no subscription is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_on_two_instances_all_get_the_one_answer() {
    if !redis_here() {
        return;
    }
    let server = PrivateRedis::start();
    let mut admin = admin(&server).await;
    let first = RedisStore::connect(&server.url()).await.expect("connect");
    let second = RedisStore::connect(&server.url()).await.expect("connect");
    let k = key("many-waiters");
    let token = acquire(&first, &k).await;
    let waiters: Vec<_> = (0..32)
        .map(|i| waiter(if i % 2 == 0 { &first } else { &second }, &k))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    first
        .complete(&k, token, record(b"one answer"), LONG)
        .await
        .expect("complete");
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    for waiting in waiters {
        match waiting.await.unwrap() {
            Claim::Completed(stored) => answers.lock().unwrap().push(stored.body().clone()),
            other => panic!("every waiter gets the answer, got {other:?}"),
        }
    }
    assert!(
        answers
            .lock()
            .unwrap()
            .iter()
            .all(|b| b == &b"one answer"[..])
    );
    no_subscription_left(&mut admin, &k, "subscriptions outlived the waits").await;
}

/// A store built on a connection of the user's wakes its waiters by push once given a
/// client for its pub/sub connection, and polls without one; either way, its completions
/// wake the waiters of other instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_the_users_connection_is_pushed_once_given_a_client() {
    if !redis_here() {
        return;
    }
    let server = PrivateRedis::start();
    let mut admin = admin(&server).await;
    let first = RedisStore::connect(&server.url()).await.expect("connect");
    let client = redis::Client::open(server.url()).expect("a url");
    let manager = redis::aio::ConnectionManager::new(client.clone())
        .await
        .expect("a connection");
    let plain = RedisStore::new(manager.clone());
    for (pushed, first, second) in [
        (false, first.clone(), plain.clone()),
        (true, first.clone(), RedisStore::new(manager).pubsub(client)),
        (true, plain, first),
    ] {
        let k = key(&uuid::Uuid::new_v4().to_string());
        let token = acquire(&first, &k).await;
        claims_since(&mut admin).await;
        let waiting = waiter(&second, &k);
        tokio::time::sleep(HOLD).await;
        first
            .complete(&k, token, record(b"done"), LONG)
            .await
            .expect("complete");
        assert!(matches!(waiting.await.unwrap(), Claim::Completed(_)));
        let claims = claims_since(&mut admin).await - 1;
        if pushed {
            assert!(claims <= 7, "pushed: {claims} claims");
        } else {
            assert!(claims >= 10, "without a client it polls: {claims} claims");
        }
    }
}

/// Waits cancelled at every moment (the layer bounds each wait, and a client may go away),
/// some while their subscription is being confirmed: no channel stays subscribed after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waits_leave_no_subscription_behind() {
    if !redis_here() {
        return;
    }
    let server = PrivateRedis::start();
    let mut admin = admin(&server).await;
    let first = RedisStore::connect(&server.url()).await.expect("connect");
    let second = RedisStore::connect(&server.url()).await.expect("connect");
    let k = key("cancelled-waits");
    let token = acquire(&first, &k).await;
    let mut cancelled = 0;
    let fingerprint = fp(1);
    for micros in (0..400).step_by(5) {
        let wait = second.wait(
            &k,
            &fingerprint,
            LeaseToken::new(),
            LONG,
            Duration::from_secs(10),
        );
        if tokio::time::timeout(Duration::from_micros(micros), wait)
            .await
            .is_err()
        {
            cancelled += 1;
        }
    }
    assert!(cancelled > 0, "the waits were cut off");
    no_subscription_left(
        &mut admin,
        &k,
        "a cancelled wait left its channel subscribed",
    )
    .await;
    // And the next waiter is still woken.
    claims_since(&mut admin).await;
    let waiting = waiter(&second, &k);
    tokio::time::sleep(HOLD).await;
    first
        .complete(&k, token, record(b"done"), LONG)
        .await
        .expect("complete");
    assert!(matches!(waiting.await.unwrap(), Claim::Completed(_)));
    let claims = claims_since(&mut admin).await - 1;
    assert!(
        claims <= 7,
        "pushed after the cancellations: {claims} claims"
    );
}

/// A least-privilege ACL user that may write keys but not publish (Redis 7 gives new users
/// no channels): every call that ends a key answers as it did its work (before, the
/// script's refused `PUBLISH` turned a done completion, release, commit withdrawal,
/// settlement or purge into an error after the write), and a waiter still gets the answer,
/// by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_refused_publish_still_ends_keys_and_is_answered_truthfully() {
    if !redis_here() {
        return;
    }
    let server = PrivateRedis::start();
    let mut admin = admin(&server).await;
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "app",
                "on",
                ">pw",
                "~*",
                "+@all",
                "resetchannels",
            ][..],
        )
        .query_async(&mut admin)
        .await
        .expect("a user without channels");
    let url = format!("redis://app:pw@127.0.0.1:{}", server.port);
    let store = RedisStore::connect(&url).await.expect("connect as app");

    // Completed: answered Ok, and stored.
    let k = key("acl-complete");
    let token = acquire(&store, &k).await;
    store
        .complete(&k, token, record(b"done"), LONG)
        .await
        .expect("a done completion answers Ok");
    let Claim::Completed(stored) = store
        .claim(&k, &fp(1), LeaseToken::new(), LONG)
        .await
        .unwrap()
    else {
        panic!("the record is stored")
    };
    assert_eq!(stored.body(), &b"done"[..]);

    // Released: answered Ok, and the key is free.
    let k = key("acl-release");
    let token = acquire(&store, &k).await;
    store
        .release(&k, token)
        .await
        .expect("a done release answers Ok");
    assert!(matches!(
        store
            .claim(&k, &fp(1), LeaseToken::new(), LONG)
            .await
            .unwrap(),
        Claim::Acquired(_)
    ));

    // Purged: answered true.
    assert!(store.purge(&key("acl-complete")).await.expect("purge"));

    // A waiter on another instance is answered without a wake-up.
    let other = RedisStore::connect(&url).await.expect("connect as app");
    let k = key("acl-wait");
    let token = acquire(&store, &k).await;
    let waiting = waiter(&other, &k);
    tokio::time::sleep(Duration::from_millis(300)).await;
    store
        .complete(&k, token, record(b"late"), LONG)
        .await
        .expect("complete");
    let Claim::Completed(stored) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter is answered")
        .unwrap()
    else {
        panic!("the waiter gets the stored answer");
    };
    assert_eq!(stored.body(), &b"late"[..]);
}

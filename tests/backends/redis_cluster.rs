//! `RedisStore` on a real Redis Cluster of three primaries, started by the test on loopback
//! ports: the conformance suite, the layer end to end, and keys spread over the nodes
//! whatever braces clients put in them.
//!
//! Needs `REDIS_URL` (as a sign that Redis is installed here: `redis-server` and `redis-cli`
//! on PATH) and says it was skipped without it.
#![cfg(all(feature = "redis", feature = "conformance"))]

use crate::common;

#[allow(dead_code, unreachable_pub)]
#[path = "../../tools/gateway/src/gateway.rs"]
mod gateway;

use std::time::Duration;

use common::{PrivateCluster, call, post};
use http::StatusCode;
use tower::Layer;
use tower_idempotency::conformance as check;
use tower_idempotency::store::{Claim, LeaseToken, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyLayer, IdempotencyStore, RedisStore, Scope};

fn redis_here() -> bool {
    let here = std::env::var("REDIS_URL").is_ok_and(|u| !u.is_empty());
    if !here {
        println!("skipped: REDIS_URL not set");
    }
    here
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_works_across_a_cluster() {
    if !redis_here() {
        return;
    }
    let cluster = PrivateCluster::start();
    let store = RedisStore::connect_cluster(cluster.urls())
        .await
        .expect("connect to the cluster");

    // The conformance suite, every check (the list of `store_conformance_tests!`).
    check::claim_then_in_flight(&store).await;
    check::atomic_claim(&store).await;
    check::distinct_keys(&store).await;
    check::round_trip(&store).await;
    check::empty_and_large_records(&store).await;
    check::fencing(&store).await;
    check::release_frees_key(&store).await;
    check::lease_expiry(&store).await;
    check::extend_ends_a_contest(&store).await;
    check::lapsed_owner_still_completes(&store).await;
    check::release_by_callers_token(&store).await;
    check::extend_keeps_claim(&store).await;
    check::extreme_durations(&store).await;
    check::ttl_expiry(&store).await;
    check::wait_sees_completion(&store).await;
    check::wait_acquires_after_release(&store).await;
    check::wait_times_out(&store).await;
    check::commit_point(&store).await;
    check::committed_never_taken_over(&store).await;
    check::commit_fencing(&store).await;
    check::commit_expires(&store).await;
    check::settle_unknown(&store).await;
    check::settle_keeps_retention(&store).await;
    check::revoke_withdraws_a_commit(&store).await;
    check::inspect_states(&store).await;
    check::purge_any_state(&store).await;

    // Keys spread over every node, even when clients put a hash tag of their own in them.
    let before = cluster.keys_per_node().iter().sum::<u64>();
    for i in 0..90 {
        let key = StoreKey::new(&Scope::anonymous(), &format!("{{pinned}}-{i}"));
        let claim = store
            .claim(
                &key,
                &Fingerprint::from_bytes([1; 32]),
                LeaseToken::new(),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Acquired(_)));
    }
    let per_node = cluster.keys_per_node();
    assert_eq!(per_node.iter().sum::<u64>(), before + 90);
    assert!(
        per_node.iter().all(|&n| n >= 10),
        "keys with a client's hash tag must still spread over the nodes: {per_node:?}"
    );

    // A durability wait goes to the primary that holds the key just written.
    let waiting =
        store
            .clone()
            .durability(tower_idempotency::store::redis::Durability::Replicated {
                replicas: 0,
                timeout: Duration::from_millis(100),
            });
    for i in 0..10 {
        let key = StoreKey::new(&Scope::anonymous(), &format!("durable-{i}"));
        let token = LeaseToken::new();
        let fp = Fingerprint::from_bytes([2; 32]);
        waiting
            .claim(&key, &fp, token, Duration::from_secs(30))
            .await
            .unwrap();
        let record = tower_idempotency::store::Record::new(
            StatusCode::CREATED,
            http::HeaderMap::new(),
            bytes::Bytes::from_static(b"kept"),
            None,
        )
        .with_fingerprint(fp);
        waiting
            .complete(&key, token, record, Duration::from_secs(60))
            .await
            .expect("WAIT reaches the key's primary");
    }

    // The layer on the cluster: one run per key, retries replayed.
    let runs = common::Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(runs.handler(Duration::ZERO));
    for i in 0..20 {
        let key = format!("order-{i}");
        let first = call(&svc, post(Some(&key), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let again = call(&svc, post(Some(&key), "{}")).await;
        assert!(again.replayed(), "{}", again.text());
        assert_eq!(again.body, first.body);
    }
    assert_eq!(runs.started(), 20);

    // One round trip per operation on the cluster too: the script goes straight to the key's
    // primary (no MOVED redirection), once.
    let stats = |cmd: &str| cluster.info_sum("commandstats", &format!("cmdstat_{cmd}:calls="));
    let errors = || cluster.info_sum("stats", "total_error_replies:");
    let (calls, errs) = (stats("evalsha"), errors());
    for i in 0..10 {
        let replay = call(&svc, post(Some(&format!("order-{i}")), "{}")).await;
        assert!(replay.replayed());
    }
    assert_eq!(stats("evalsha") - calls, 10, "one script call per replay");
    assert_eq!(errors() - errs, 0, "no redirection or other error reply");

    // The demo's and the gateway's `redis-cluster://host:port,…` settings reach the cluster.
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let opened = gateway::open_store(&format!("redis-cluster://{}", nodes.join(",")))
        .await
        .expect("the gateway opens the cluster");
    let key = StoreKey::new(&Scope::anonymous(), "through-the-gateway");
    let claim = opened
        .claim(
            &key,
            &Fingerprint::from_bytes([3; 32]),
            LeaseToken::new(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
}

/// A committed operation whose instance is cut off from the cluster before its answer is
/// stored never runs again: retries get `outcome-unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_point_holds_across_a_cluster() {
    if !redis_here() {
        return;
    }
    let cluster = PrivateCluster::start();
    let store = RedisStore::connect_cluster(cluster.urls())
        .await
        .expect("connect to the cluster");
    common::commit_then_cut_off(store).await;
}

/// A durability wait counts the replicas of the primary that holds the key just written:
/// with a replica on one primary only, `complete` with `Replicated { replicas: 1 }` succeeds
/// exactly for the keys that land on that primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_waits_go_to_the_keys_primary() {
    if !redis_here() {
        return;
    }
    let cluster = PrivateCluster::start();
    let first = &cluster.nodes[0];
    let replica = common::PrivateRedis::start_with(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ]);
    let redis_cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(args)
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let first_id = redis_cli(&["-p", &first.port.to_string(), "cluster", "myid"]);
    redis_cli(&[
        "--cluster",
        "add-node",
        &format!("127.0.0.1:{}", replica.port),
        &format!("127.0.0.1:{}", first.port),
        "--cluster-slave",
        "--cluster-master-id",
        &first_id,
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !redis_cli(&["-p", &replica.port.to_string(), "info", "replication"])
        .contains("master_link_status:up")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = RedisStore::connect_cluster(cluster.urls())
        .await
        .expect("connect to the cluster")
        .durability(tower_idempotency::store::redis::Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_millis(200),
        });
    let (mut on_first, mut elsewhere) = (0, 0);
    for i in 0..24 {
        let key = StoreKey::new(&Scope::anonymous(), &format!("replicated-{i}"));
        let token = LeaseToken::new();
        let fp = Fingerprint::from_bytes([4; 32]);
        let before = cluster.keys_per_node()[0];
        store
            .claim(&key, &fp, token, Duration::from_secs(30))
            .await
            .unwrap();
        let lands_on_first = cluster.keys_per_node()[0] > before;
        let record = tower_idempotency::store::Record::new(
            StatusCode::CREATED,
            http::HeaderMap::new(),
            bytes::Bytes::from_static(b"kept"),
            None,
        )
        .with_fingerprint(fp);
        let stored = store
            .complete(&key, token, record, Duration::from_secs(60))
            .await;
        assert_eq!(
            stored.is_ok(),
            lands_on_first,
            "key {i}: {stored:?} (on the primary with the replica: {lands_on_first})"
        );
        if lands_on_first {
            on_first += 1;
        } else {
            elsewhere += 1;
        }
    }
    assert!(on_first > 0 && elsewhere > 0, "{on_first} / {elsewhere}");
}

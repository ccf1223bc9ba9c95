//! What `function::Idempotent` costs next to calling the operation directly, in one run:
//! a first call (a new key: claim, run, store) and a replay (the stored result), on the
//! memory store (2 GiB, a one-second replay window so that millions of first calls fit),
//! with a 64-byte input and a 64-byte result, on a current-thread runtime.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench function
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use tower_idempotency::function::Idempotent;
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, MemoryStore};

const INPUT: &[u8] = &[7; 64];
const RESULT: &[u8] = &[9; 64];

async fn operation(_claim: Option<IdempotencyClaim>, input: Bytes) -> Result<Bytes, Bytes> {
    black_box(input);
    Ok(Bytes::from_static(RESULT))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Millions of first calls: records older than a second make room for new ones.
    let store = MemoryStore::builder()
        .max_bytes(2 << 30)
        .min_retention(std::time::Duration::from_secs(1))
        .build();
    let calls = Idempotent::new(&IdempotencyLayer::new(store).share_keys_across_callers());
    let mut group = c.benchmark_group("function");
    group.bench_function("bare", |b| {
        b.to_async(&rt)
            .iter(|| operation(None, Bytes::from_static(INPUT)))
    });
    let n = AtomicU64::new(0);
    group.bench_function("first call", |b| {
        b.to_async(&rt).iter(|| {
            let key = format!("k{}", n.fetch_add(1, Ordering::Relaxed));
            let calls = &calls;
            async move {
                calls
                    .key(key)
                    .input(Bytes::from_static(INPUT))
                    .run(|claim| operation(Some(claim), Bytes::from_static(INPUT)))
                    .await
                    .unwrap()
            }
        })
    });
    rt.block_on(
        calls
            .key("replayed")
            .input(Bytes::from_static(INPUT))
            .run(|claim| operation(Some(claim), Bytes::from_static(INPUT))),
    )
    .unwrap();
    group.bench_function("replay", |b| {
        b.to_async(&rt).iter(|| async {
            let out = calls
                .key("replayed")
                .input(Bytes::from_static(INPUT))
                .run(|claim| operation(Some(claim), Bytes::from_static(INPUT)))
                .await
                .unwrap();
            assert!(out.replayed);
            out
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

#![allow(clippy::cast_possible_truncation)] // Sizes here are small constants.
//! What ordering overlapping writes costs writes that do not overlap: the range lock alone
//! (lock and release with other ranges held), and 4 KiB writes to distinct blocks, 32 in
//! flight at once, on mirror and raid10 volumes over in-memory devices, where the lock is
//! the largest share of the work it can be. To see the lock's share within one run, where
//! the noise of a busy machine hits both alike, the mirror is also measured with a second
//! range lock taken around each write: the difference is what one lock adds.
//!
//! Run: `cargo bench -p strata-testkit --bench write_order` (see docs/benchmarks.md).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strata_block::{BlockIo, Durability, MemDevice};
use strata_pool::{Pool, PoolOptions};
use strata_testkit::request;
use strata_volume::{Layout, RangeLock};

const VOLUME: u64 = 64 << 20;
const BLOCK: u64 = 4096;
const IN_FLIGHT: usize = 32;

fn volume(rt: &tokio::runtime::Runtime, layout: Layout) -> Arc<dyn BlockIo> {
    rt.block_on(async {
        let pool = Pool::create(PoolOptions { extent_size: 4 << 20, ..PoolOptions::default() }).unwrap();
        for i in 0..4 {
            pool.claim(&format!("m{i}"), MemDevice::new(format!("m{i}"), 256 << 20, 4096), None)
                .await
                .unwrap();
        }
        let volume = pool.create_volume("bench", request(layout, VOLUME, 2, 64 * 1024)).await.unwrap();
        volume.io()
    })
}

/// Lock and release one block while `held` other blocks are held.
fn range_lock(c: &mut Criterion) {
    let mut group = c.benchmark_group("range-lock");
    for held in [0u64, 32] {
        let lock = RangeLock::new();
        let guards: Vec<_> = (0..held)
            .map(|i| futures::executor::block_on(lock.lock((i + 1) * BLOCK..(i + 2) * BLOCK)))
            .collect();
        group.bench_function(BenchmarkId::new("lock-release", format!("{held}-held")), |b| {
            b.iter(|| drop(futures::executor::block_on(lock.lock(0..BLOCK))));
        });
        drop(guards);
    }
    group.finish();
}

/// `IN_FLIGHT` 4 KiB writes to distinct random blocks, all started at once.
fn writes_in_flight(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("4k-randwrite-32-in-flight");
    group.throughput(Throughput::Bytes(BLOCK * IN_FLIGHT as u64));
    let cases =
        [(Layout::Linear, false), (Layout::Mirror, false), (Layout::Mirror, true), (Layout::Raid10, false)];
    for (layout, extra_lock) in cases {
        let io = volume(rt, layout);
        let data = Bytes::from(vec![0x3cu8; BLOCK as usize]);
        let mut rng = SmallRng::seed_from_u64(7);
        let extra = Arc::new(RangeLock::new());
        let name = if extra_lock { format!("{layout}+lock") } else { layout.to_string() };
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(rt).iter(|| {
                // Distinct blocks: one per slot of the volume, in random order.
                let slot = VOLUME / BLOCK / IN_FLIGHT as u64;
                let offsets: Vec<u64> =
                    (0..IN_FLIGHT as u64).map(|i| (i * slot + rng.random_range(0..slot)) * BLOCK).collect();
                let (io, data, extra) = (io.clone(), data.clone(), extra.clone());
                async move {
                    let writes = offsets.iter().map(|&at| {
                        let (io, data, extra) = (&io, data.clone(), &extra);
                        async move {
                            let _held =
                                if extra_lock { Some(extra.lock(at..at + BLOCK).await) } else { None };
                            io.write(at, data, Durability::Cached).await
                        }
                    });
                    for result in join_all(writes).await {
                        result.unwrap();
                    }
                }
            });
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    range_lock(&mut c);
    writes_in_flight(&mut c, &rt);
    c.final_summary();
}

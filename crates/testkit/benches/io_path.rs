#![allow(clippy::cast_possible_truncation)] // Sizes here are small constants.
//! The IO path through every layout over in-memory devices, no network: 4 KiB random and
//! 1 MiB sequential reads and writes, one request at a time. After criterion's own report
//! (kept for comparing changes over time), prints MB/s per layout and the ratio of each
//! layout to linear from a second pass that interleaves the layouts round by round, so a
//! busy or throttled machine slows them all alike and the ratios stay fair.
//!
//! Run: `cargo bench -p strata-testkit --bench io_path` (see docs/benchmarks.md).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strata_block::{BlockIo, Durability, MemDevice};
use strata_pool::{Pool, PoolOptions};
use strata_testkit::request;
use strata_volume::Layout;

const DEVICES: usize = 4;
const VOLUME: u64 = 96 << 20;
const SMALL: u64 = 4096;
const LARGE: u64 = 1 << 20;
const WORKLOADS: [&str; 4] = ["4k-randread", "4k-randwrite", "1m-seqread", "1m-seqwrite"];

fn volume(rt: &tokio::runtime::Runtime, layout: Layout) -> Arc<dyn BlockIo> {
    rt.block_on(async {
        let pool = Pool::create(PoolOptions { extent_size: 4 << 20, ..PoolOptions::default() }).unwrap();
        for i in 0..DEVICES {
            pool.claim(&format!("m{i}"), MemDevice::new(format!("m{i}"), 256 << 20, 4096), None)
                .await
                .unwrap();
        }
        let width = match layout {
            Layout::Raid10 => 2,
            _ => DEVICES as u32,
        };
        let volume = pool.create_volume("bench", request(layout, VOLUME, width, 64 * 1024)).await.unwrap();
        let io: Arc<dyn BlockIo> = volume.io();
        // Write every block once so reads are of real data.
        let chunk = Bytes::from(vec![0xa5u8; LARGE as usize]);
        for at in (0..VOLUME).step_by(LARGE as usize) {
            io.write(at, chunk.clone(), Durability::Cached).await.unwrap();
        }
        io
    })
}

/// Offsets of the next `n` requests of a workload.
fn offsets(workload: &str, size: u64, n: usize, rng: &mut SmallRng, next_seq: &mut u64) -> Vec<u64> {
    (0..n)
        .map(|_| {
            if workload.contains("rand") {
                rng.random_range(0..VOLUME / size) * size
            } else {
                *next_seq = (*next_seq + size) % VOLUME;
                *next_seq
            }
        })
        .collect()
}

/// One request. Reads fill a buffer the caller keeps, as a frontend does with its
/// per-connection buffers, so what is measured is the IO path and not the allocator.
async fn run_one(
    io: &Arc<dyn BlockIo>,
    workload: &str,
    offset: u64,
    buf: BytesMut,
    data: &Bytes,
) -> BytesMut {
    if workload.contains("write") {
        io.write(offset, data.clone(), Durability::Cached).await.unwrap();
        buf
    } else {
        std::hint::black_box(io.read_into(offset, buf).await.unwrap())
    }
}

fn size_of(workload: &str) -> u64 {
    if workload.starts_with("4k") { SMALL } else { LARGE }
}

fn bench(c: &mut Criterion, rt: &tokio::runtime::Runtime, volumes: &[(Layout, Arc<dyn BlockIo>)]) {
    for workload in WORKLOADS {
        let mut group = c.benchmark_group(workload);
        let size = size_of(workload);
        group.throughput(Throughput::Bytes(size));
        for (layout, io) in volumes {
            let mut rng = SmallRng::seed_from_u64(7);
            let mut next_seq = 0u64;
            let data = Bytes::from(vec![0x3cu8; size as usize]);
            let buf = std::cell::RefCell::new(BytesMut::zeroed(size as usize));
            group.bench_function(BenchmarkId::from_parameter(layout), |b| {
                b.to_async(rt).iter(|| {
                    let offset = offsets(workload, size, 1, &mut rng, &mut next_seq)[0];
                    let (io, data, buf) = (io.clone(), data.clone(), &buf);
                    async move {
                        let taken = buf.take();
                        *buf.borrow_mut() = run_one(&io, workload, offset, taken, &data).await;
                    }
                });
            });
        }
        group.finish();
    }
}

/// MB/s of every layout for every workload: the median over rounds in which each layout
/// runs the same requests in turn.
fn interleaved(rt: &tokio::runtime::Runtime, volumes: &[(Layout, Arc<dyn BlockIo>)]) {
    const ROUNDS: usize = 15;
    println!("\nMB/s per layout over {DEVICES} in-memory devices, one request at a time");
    println!("(median of {ROUNDS} interleaved rounds; ratio to linear in brackets):\n");
    print!("| layout |");
    WORKLOADS.iter().for_each(|w| print!(" {w} |"));
    println!("\n| --- |{}", " --- |".repeat(WORKLOADS.len()));
    let mut table = vec![vec![0f64; WORKLOADS.len()]; volumes.len()];
    for (w, workload) in WORKLOADS.iter().enumerate() {
        let size = size_of(workload);
        let per_round = if size == SMALL { 20_000 } else { 300 };
        let data = Bytes::from(vec![0x3cu8; size as usize]);
        let mut rng = SmallRng::seed_from_u64(11);
        let mut next_seq = 0;
        let mut samples = vec![Vec::new(); volumes.len()];
        for _ in 0..ROUNDS {
            let round = offsets(workload, size, per_round, &mut rng, &mut next_seq);
            for (v, (_, io)) in volumes.iter().enumerate() {
                let start = std::time::Instant::now();
                rt.block_on(async {
                    let mut buf = BytesMut::zeroed(size as usize);
                    for &offset in &round {
                        buf = run_one(io, workload, offset, buf, &data).await;
                    }
                });
                let bytes = (size * per_round as u64) as f64;
                samples[v].push(bytes / start.elapsed().as_secs_f64() / 1e6);
            }
        }
        for (v, mut s) in samples.into_iter().enumerate() {
            s.sort_by(f64::total_cmp);
            table[v][w] = s[ROUNDS / 2];
        }
    }
    for (v, (layout, _)) in volumes.iter().enumerate() {
        print!("| {layout} |");
        for (mb, linear) in table[v].iter().zip(&table[0]) {
            print!(" {mb:.0} ({:.2}×) |", mb / linear);
        }
        println!();
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let volumes: Vec<(Layout, Arc<dyn BlockIo>)> = Layout::ALL.iter().map(|&l| (l, volume(&rt, l))).collect();
    bench(&mut c, &rt, &volumes);
    c.final_summary();
    interleaved(&rt, &volumes);
}

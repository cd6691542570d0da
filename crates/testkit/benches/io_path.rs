#![allow(clippy::cast_possible_truncation)] // Sizes here are small constants.
//! The IO path through every layout over in-memory devices, no network: 4 KiB random and
//! 1 MiB sequential reads and writes. After criterion's own report, prints MB/s per layout
//! and the ratio of each layout to linear, read back from criterion's estimates.
//!
//! Run: `cargo bench -p strata-testkit --bench io_path` (see docs/benchmarks.md).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
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

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for workload in WORKLOADS {
        let mut group = c.benchmark_group(workload);
        let size = if workload.starts_with("4k") { SMALL } else { LARGE };
        group.throughput(Throughput::Bytes(size));
        for layout in Layout::ALL {
            let io = volume(&rt, layout);
            let mut rng = SmallRng::seed_from_u64(7);
            let data = Bytes::from(vec![0x3cu8; size as usize]);
            let mut next_seq = 0u64;
            group.bench_function(BenchmarkId::from_parameter(layout), |b| {
                b.to_async(&rt).iter(|| {
                    let offset = if workload.contains("rand") {
                        rng.random_range(0..VOLUME / size) * size
                    } else {
                        next_seq = (next_seq + size) % VOLUME;
                        next_seq
                    };
                    let io = io.clone();
                    let data = data.clone();
                    let write = workload.contains("write");
                    async move {
                        if write {
                            io.write(offset, data, Durability::Cached).await.unwrap();
                        } else {
                            std::hint::black_box(io.read(offset, size).await.unwrap());
                        }
                    }
                });
            });
        }
        group.finish();
    }
}

/// Mean time per operation in nanoseconds, from criterion's saved estimates.
fn mean_ns(workload: &str, layout: Layout) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| format!("{}/../../target", env!("CARGO_MANIFEST_DIR")));
    let path = format!("{dir}/criterion/{workload}/{layout}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn summary() {
    println!("\nMB/s per layout over {DEVICES} in-memory devices (ratio to linear):\n");
    print!("| layout |");
    WORKLOADS.iter().for_each(|w| print!(" {w} |"));
    println!("\n| --- |{}", " --- |".repeat(WORKLOADS.len()));
    for layout in Layout::ALL {
        print!("| {layout} |");
        for workload in WORKLOADS {
            let size = if workload.starts_with("4k") { SMALL } else { LARGE } as f64;
            match (mean_ns(workload, layout), mean_ns(workload, Layout::Linear)) {
                (Some(ns), Some(linear)) => print!(" {:.0} ({:.2}×) |", size / ns * 1e3, linear / ns),
                _ => print!(" n/a |"),
            }
        }
        println!();
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary();
}

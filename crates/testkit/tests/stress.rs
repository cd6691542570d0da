//! Concurrent writers and flushes on a multi-threaded runtime, then a crash: the
//! write-intent bitmaps must cover every region whose copies or parity may disagree, even
//! when bits are set and cleared while other writes and flushes are in flight.
//!
//! Four tasks write single blocks, each task owning every fourth block, so they share
//! parity rows and bitmap regions but never a block. Device flushes are slowed down so that
//! writes complete while a flush runs. A flush makes durable exactly the
//! writes that completed before it was issued; the model below keeps, for every block, the
//! versions a crash may leave.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strata_block::{BlockIo, Durability};
use strata_testkit::{PoolShape, TestPool, check_redundancy, pattern, request};
use strata_volume::Layout;

const BLOCK: u64 = 4096;
const BLOCK_BYTES: usize = 4096;
const VOLUME: u64 = 1 << 20;
const TASKS: u64 = 4;

/// What each block may hold after a crash: versions `(completed at, content)`, the first
/// being durable.
#[derive(Default)]
struct Model {
    blocks: BTreeMap<u64, Vec<(u64, Vec<u8>)>>,
}

impl Model {
    fn wrote(&mut self, block: u64, completed: u64, data: Vec<u8>, fua: bool) {
        let versions = self.blocks.entry(block).or_insert_with(|| vec![(0, vec![0; BLOCK_BYTES])]);
        if fua {
            versions.clear();
        }
        versions.push((completed, data));
    }

    /// A flush issued at `issued` has completed: for each block, the newest version that
    /// completed before `issued` is durable, and older ones can no longer come back.
    fn flushed(&mut self, issued: u64) {
        for versions in self.blocks.values_mut() {
            if let Some(base) = versions.iter().rposition(|(at, _)| *at < issued) {
                versions.drain(..base);
            }
        }
    }

    fn check(&self, image: &[u8]) -> Result<(), String> {
        for (block, versions) in &self.blocks {
            let start = usize::try_from(block * BLOCK).unwrap();
            let got = &image[start..start + BLOCK_BYTES];
            if !versions.iter().any(|(_, v)| v == got) {
                return Err(format!("block {block} holds something no write left there"));
            }
        }
        Ok(())
    }
}

async fn run(layout: Layout, seed: u64) {
    let shape = PoolShape { devices: 4, device_size: 8 << 20, block_size: 4096, extent_size: 1 << 20 };
    let pool = TestPool::new(shape).await;
    let width = if layout == Layout::Raid10 { 2 } else { 4 };
    let volume = pool.pool.create_volume("v", request(layout, VOLUME, width, 16384)).await.unwrap();
    // Flushes take a while, so writes complete while they run (and are not covered by them).
    pool.memory.iter().for_each(|m| m.set_flush_delay(std::time::Duration::from_micros(200)));
    let io: Arc<dyn BlockIo> = volume.io();
    let clock = Arc::new(AtomicU64::new(1));
    let model = Arc::new(Mutex::new(Model::default()));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (io, clock, model) = (io.clone(), clock.clone(), model.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed * 31 + t);
            for _ in 0..150 {
                if rng.random_bool(0.1) {
                    let issued = clock.fetch_add(1, Ordering::SeqCst);
                    io.flush().await.unwrap();
                    model.lock().flushed(issued);
                    continue;
                }
                let block = rng.random_range(0..VOLUME / BLOCK / TASKS) * TASKS + t;
                let data = pattern(rng.random(), block * BLOCK, BLOCK_BYTES);
                let fua = rng.random_bool(0.2);
                let durability = if fua { Durability::Fua } else { Durability::Cached };
                io.write(block * BLOCK, Bytes::from(data.clone()), durability).await.unwrap();
                let completed = clock.fetch_add(1, Ordering::SeqCst);
                model.lock().wrote(block, completed, data, fua);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    drop((io, volume));
    let pool = pool.crash_and_reopen(seed).await;
    let io = pool.pool.volume("v").unwrap().io();
    let image = io.read(0, VOLUME).await.unwrap();
    model.lock().check(&image).unwrap_or_else(|e| panic!("{layout} seed {seed}: {e}"));
    let spec = pool.pool.volume_spec("v").await.unwrap();
    check_redundancy(&spec, &pool.device_map()).await.unwrap_or_else(|e| panic!("{layout} seed {seed}: {e}"));
}

#[test]
fn concurrent_writers_and_flushes_then_a_crash() {
    let rounds = strata_testkit::cases(6);
    for layout in [Layout::Mirror, Layout::Raid10, Layout::Raid5, Layout::Raid6] {
        for seed in 0..u64::from(rounds) {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(run(layout, seed));
        }
    }
}

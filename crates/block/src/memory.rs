//! An in-memory device for tests and benchmarks, with an optional model of a volatile
//! write cache so that tests can crash it and see exactly what a real disk may keep.
//!
//! With the cache model on, every write that is not yet durable is remembered in an undo
//! log (the old contents of its range). A flush drops the entries of the writes that had
//! completed when it was issued (with [`MemDevice::set_flush_delay`], writes that complete
//! while it runs stay volatile, as the contract allows); a FUA write removes its range from
//! older entries, since those blocks are now durable with the new contents.
//! [`MemDevice::crash`] rolls the log back the way a disk losing power may: each block of
//! each unflushed write lands or not, independently, so writes are torn and reordered.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::{BlockIo, Durability, Geometry, IoError, IoOp};

/// How much of the unflushed data survives a simulated crash.
#[derive(Clone, Copy, Debug)]
pub enum CrashPlan {
    /// Every write that was not flushed or FUA is lost.
    LoseAll,
    /// Each block of each unflushed write survives with even odds, whatever happened to
    /// the other blocks and writes. The seed makes the outcome repeatable.
    Random {
        /// RNG seed.
        seed: u64,
    },
}

/// A block device held in memory.
pub struct MemDevice {
    name: String,
    geometry: Geometry,
    state: RwLock<State>,
    flush_delay: parking_lot::Mutex<std::time::Duration>,
}

struct State {
    data: Vec<u8>,
    /// Unflushed writes, oldest first, or `None` when writes are durable at once.
    undo: Option<Vec<Undo>>,
    /// Sequence number of the next write.
    next_seq: u64,
}

/// The old contents of a range overwritten by a write that is not durable yet.
struct Undo {
    seq: u64,
    offset: u64,
    old: Vec<u8>,
}

impl MemDevice {
    /// A zeroed device whose writes are durable at once.
    pub fn new(name: impl Into<String>, size_bytes: u64, block_size: u32) -> Arc<Self> {
        Self::build(name.into(), size_bytes, block_size, false)
    }

    /// A zeroed device with a volatile write cache: writes are lost by [`MemDevice::crash`]
    /// unless flushed or written with FUA.
    pub fn with_volatile_cache(name: impl Into<String>, size_bytes: u64, block_size: u32) -> Arc<Self> {
        Self::build(name.into(), size_bytes, block_size, true)
    }

    fn build(name: String, size_bytes: u64, block_size: u32, cache: bool) -> Arc<Self> {
        assert!(block_size.is_power_of_two() && block_size >= 512, "block size {block_size}");
        assert_eq!(size_bytes % u64::from(block_size), 0, "size is a multiple of the block size");
        let len = usize::try_from(size_bytes).expect("in-memory device fits in memory");
        Arc::new(Self {
            name,
            geometry: Geometry { block_size, size_bytes },
            state: RwLock::new(State { data: vec![0; len], undo: cache.then(Vec::new), next_seq: 0 }),
            flush_delay: parking_lot::Mutex::new(std::time::Duration::ZERO),
        })
    }

    /// The device's name, as given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many writes are not durable yet.
    pub fn unflushed_writes(&self) -> usize {
        self.state.read().undo.as_ref().map_or(0, Vec::len)
    }

    /// Makes every flush take `delay` between being issued and taking effect, so writes
    /// can complete while a flush is running (they are not covered by it).
    pub fn set_flush_delay(&self, delay: std::time::Duration) {
        *self.flush_delay.lock() = delay;
    }

    /// Simulates power loss: keeps what a disk with a volatile cache may keep under `plan`.
    /// The device stays usable afterwards, as if it had been powered on again.
    pub fn crash(&self, plan: CrashPlan) {
        let mut state = self.state.write();
        let State { data, undo, .. } = &mut *state;
        let Some(log) = undo else { return };
        let entries = std::mem::take(log);
        let mut rng = match plan {
            CrashPlan::LoseAll => None,
            CrashPlan::Random { seed } => Some(SmallRng::seed_from_u64(seed)),
        };
        let bs = usize::try_from(self.geometry.block_size).expect("block size fits usize");
        // Newest first: `data` holds, for each block not yet decided, what the entry at hand
        // wrote there (newer entries are already rolled back). A surviving block keeps it;
        // otherwise it goes back to what was there before the entry.
        let mut decided = vec![false; data.len() / bs];
        for entry in entries.iter().rev() {
            let start = usize::try_from(entry.offset).expect("offset fits usize");
            for (k, old) in entry.old.chunks(bs).enumerate() {
                let block = start / bs + k;
                if decided[block] {
                    continue;
                }
                if rng.as_mut().is_some_and(|r| r.random_bool(0.5)) {
                    decided[block] = true;
                } else {
                    data[block * bs..block * bs + old.len()].copy_from_slice(old);
                }
            }
        }
    }

    fn apply(&self, offset: u64, bytes: Option<&[u8]>, len: u64, durability: Durability) {
        let start = usize::try_from(offset).expect("offset fits usize");
        let len = usize::try_from(len).expect("length fits usize");
        let mut state = self.state.write();
        let State { data, undo, next_seq } = &mut *state;
        if let Some(log) = undo {
            if durability.is_fua() {
                forget_range(log, offset, len as u64);
            } else if len > 0 {
                log.push(Undo { seq: *next_seq, offset, old: data[start..start + len].to_vec() });
            }
        }
        *next_seq += 1;
        match bytes {
            Some(bytes) => data[start..start + len].copy_from_slice(bytes),
            None => data[start..start + len].fill(0),
        }
    }
}

/// Removes `[offset, offset + len)` from every undo entry: those blocks are durable now.
fn forget_range(log: &mut Vec<Undo>, offset: u64, len: u64) {
    let end = offset + len;
    let mut kept = Vec::with_capacity(log.len());
    for entry in log.drain(..) {
        let e_end = entry.offset + entry.old.len() as u64;
        if e_end <= offset || entry.offset >= end {
            kept.push(entry);
            continue;
        }
        if entry.offset < offset {
            let n = usize::try_from(offset - entry.offset).expect("fits usize");
            kept.push(Undo { seq: entry.seq, offset: entry.offset, old: entry.old[..n].to_vec() });
        }
        if e_end > end {
            let n = usize::try_from(end - entry.offset).expect("fits usize");
            kept.push(Undo { seq: entry.seq, offset: end, old: entry.old[n..].to_vec() });
        }
    }
    *log = kept;
}

#[async_trait]
impl BlockIo for MemDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        let start = usize::try_from(offset).expect("offset fits usize");
        let len = usize::try_from(len).expect("length fits usize");
        Ok(Bytes::copy_from_slice(&self.state.read().data[start..start + len]))
    }

    async fn read_into(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut, IoError> {
        self.geometry.check(IoOp::Read, offset, buf.len() as u64)?;
        let start = usize::try_from(offset).expect("offset fits usize");
        let end = start + buf.len();
        buf.copy_from_slice(&self.state.read().data[start..end]);
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        self.geometry.check(IoOp::Write, offset, data.len() as u64)?;
        self.apply(offset, Some(&data), data.len() as u64, durability);
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        let issued = self.state.read().next_seq;
        let delay = *self.flush_delay.lock();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(log) = &mut self.state.write().undo {
            log.retain(|entry| entry.seq >= issued);
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::Discard, offset, len)?;
        self.apply(offset, None, len, Durability::Cached);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::WriteZeroes, offset, len)?;
        self.apply(offset, None, len, Durability::Cached);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(b: u8) -> Bytes {
        Bytes::from(vec![b; 512])
    }

    #[tokio::test]
    async fn crash_loses_unflushed_and_keeps_flushed_and_fua() {
        let dev = MemDevice::with_volatile_cache("m", 4096, 512);
        dev.write(0, block(1), Durability::Cached).await.unwrap();
        dev.flush().await.unwrap();
        dev.write(0, block(2), Durability::Cached).await.unwrap();
        dev.write(512, block(3), Durability::Cached).await.unwrap();
        dev.write(512, block(4), Durability::Fua).await.unwrap();
        dev.write(1024, block(5), Durability::Cached).await.unwrap();
        dev.crash(CrashPlan::LoseAll);
        assert_eq!(dev.read(0, 512).await.unwrap(), block(1));
        assert_eq!(dev.read(512, 512).await.unwrap(), block(4));
        assert_eq!(dev.read(1024, 512).await.unwrap(), block(0));
    }

    #[tokio::test]
    async fn a_random_crash_leaves_each_block_with_one_of_its_versions() {
        let mut reordered = false;
        for seed in 0..64 {
            let dev = MemDevice::with_volatile_cache("m", 8192, 512);
            // Write k covers blocks k..k+8 with value k + 1.
            for k in 0..8u8 {
                let data = Bytes::from(vec![k + 1; 4096]);
                dev.write(u64::from(k) * 512, data, Durability::Cached).await.unwrap();
            }
            dev.crash(CrashPlan::Random { seed });
            let image = dev.read(0, 8192).await.unwrap();
            for (b, block) in image.chunks(512).enumerate() {
                let v = block[0];
                assert!(block.iter().all(|&x| x == v), "seed {seed}: block {b} is torn inside");
                let possible = v == 0 || (usize::from(v) <= b + 1 && usize::from(v) + 7 > b);
                assert!(possible, "seed {seed}: block {b} holds {v}, never written there");
            }
            // An older write survives where a newer one over it was lost.
            reordered |= image
                .chunks(512)
                .take(8)
                .enumerate()
                .any(|(b, block)| usize::from(block[0]) < b + 1 && block[0] != 0);
        }
        assert!(reordered, "the crash model never reorders writes");
    }

    #[tokio::test]
    async fn a_flush_covers_only_writes_completed_before_it_was_issued() {
        let dev = MemDevice::with_volatile_cache("m", 4096, 512);
        dev.set_flush_delay(std::time::Duration::from_millis(20));
        dev.write(0, block(1), Durability::Cached).await.unwrap();
        let flush = dev.flush();
        let late = async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            dev.write(512, block(2), Durability::Cached).await.unwrap();
        };
        let (flushed, ()) = tokio::join!(flush, late);
        flushed.unwrap();
        dev.crash(CrashPlan::LoseAll);
        assert_eq!(dev.read(0, 512).await.unwrap(), block(1));
        assert_eq!(dev.read(512, 512).await.unwrap(), block(0), "a write during the flush became durable");
    }
}

//! An in-memory device for tests and benchmarks, with an optional model of a volatile
//! write cache so that tests can crash it and see exactly what a real disk may keep.
//!
//! With the cache model on, every write that is not yet durable is remembered in an undo
//! log (the old contents of its range). `flush` empties the log; a FUA write removes its
//! range from older entries, since those blocks are now durable with the new contents.
//! [`MemDevice::crash`] rolls the log back the way a disk losing power may: the oldest
//! unflushed writes survive in order, the next one is torn at a block boundary, and the
//! rest are lost.

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
    /// A random number of the oldest unflushed writes survive, the next one is torn at a
    /// random block, the rest are lost. The seed makes the outcome repeatable.
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
}

struct State {
    data: Vec<u8>,
    /// Unflushed writes, oldest first, or `None` when writes are durable at once.
    undo: Option<Vec<Undo>>,
}

/// The old contents of a range overwritten by a write that is not durable yet.
struct Undo {
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
            state: RwLock::new(State { data: vec![0; len], undo: cache.then(Vec::new) }),
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

    /// Simulates power loss: keeps what a disk with a volatile cache may keep under `plan`.
    /// The device stays usable afterwards, as if it had been powered on again.
    pub fn crash(&self, plan: CrashPlan) {
        let mut state = self.state.write();
        let State { data, undo } = &mut *state;
        let Some(log) = undo else { return };
        let entries = std::mem::take(log);
        let bs = usize::try_from(self.geometry.block_size).expect("block size fits usize");
        let (survivors, torn_blocks) = match plan {
            CrashPlan::LoseAll => (0, 0),
            CrashPlan::Random { seed } => {
                let mut rng = SmallRng::seed_from_u64(seed);
                let survivors = rng.random_range(0..=entries.len());
                let torn = entries.get(survivors).map_or(0, |e| rng.random_range(0..e.old.len() / bs));
                (survivors, torn)
            }
        };
        for (i, entry) in entries.iter().enumerate().rev() {
            if i < survivors {
                break;
            }
            let keep = if i == survivors { torn_blocks * bs } else { 0 };
            let start = usize::try_from(entry.offset).expect("offset fits usize") + keep;
            data[start..start + entry.old.len() - keep].copy_from_slice(&entry.old[keep..]);
        }
    }

    fn apply(&self, offset: u64, bytes: Option<&[u8]>, len: u64, durability: Durability) {
        let start = usize::try_from(offset).expect("offset fits usize");
        let len = usize::try_from(len).expect("length fits usize");
        let mut state = self.state.write();
        let State { data, undo } = &mut *state;
        if let Some(log) = undo {
            if durability.is_fua() {
                forget_range(log, offset, len as u64);
            } else {
                log.push(Undo { offset, old: data[start..start + len].to_vec() });
            }
        }
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
            kept.push(Undo { offset: entry.offset, old: entry.old[..n].to_vec() });
        }
        if e_end > end {
            let n = usize::try_from(end - entry.offset).expect("fits usize");
            kept.push(Undo { offset: end, old: entry.old[n..].to_vec() });
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
        if let Some(log) = &mut self.state.write().undo {
            log.clear();
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
    async fn random_crash_keeps_an_ordered_prefix_with_one_torn_write() {
        for seed in 0..64 {
            let dev = MemDevice::with_volatile_cache("m", 8192, 512);
            for i in 0..4u8 {
                let data = Bytes::from(vec![i + 1; 2048]);
                dev.write(u64::from(i) * 2048, data, Durability::Cached).await.unwrap();
            }
            dev.crash(CrashPlan::Random { seed });
            let image = dev.read(0, 8192).await.unwrap();
            // Blocks that hold new data form a prefix of the write sequence.
            let new: Vec<bool> = image.chunks(512).map(|b| b[0] != 0).collect();
            let first_old = new.iter().position(|n| !n).unwrap_or(new.len());
            assert!(new[first_old..].iter().all(|n| !n), "seed {seed}: {new:?}");
        }
    }
}

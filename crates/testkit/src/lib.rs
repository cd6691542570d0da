//! Shared test machinery for Strata: a flat reference image that says what every block of
//! a volume must hold (and, across a crash, what it may hold), random IO sequences, pools
//! of fault-injecting memory devices, and a checker that mirrors and parity agree.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use strata_block::{BlockIo, CrashPlan, Durability, FaultPlan, FaultyDevice, MemDevice};
use strata_pool::{Pool, PoolOptions};
use strata_volume::{Layout, NodeSpec, ParityLevel, VolumeRequest};
use uuid::Uuid;

/// One request against a volume, in blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `blocks` blocks at `block`.
    Read {
        /// First block.
        block: u64,
        /// Block count.
        blocks: u64,
    },
    /// Write a pattern derived from `seed`.
    Write {
        /// First block.
        block: u64,
        /// Block count.
        blocks: u64,
        /// Pattern seed.
        seed: u8,
        /// With FUA.
        fua: bool,
    },
    /// Discard.
    Discard {
        /// First block.
        block: u64,
        /// Block count.
        blocks: u64,
    },
    /// Write zeroes.
    WriteZeroes {
        /// First block.
        block: u64,
        /// Block count.
        blocks: u64,
    },
    /// Flush.
    Flush,
}

/// Random operations on a volume of `volume_blocks` blocks; requests are mostly small,
/// sometimes up to `max_blocks`.
pub fn ops(volume_blocks: u64, max_blocks: u64, count: usize) -> impl Strategy<Value = Vec<Op>> {
    let range = move || {
        (0..volume_blocks, prop_oneof![3 => 1..=8u64, 1 => 1..=max_blocks.max(1)]).prop_map(
            move |(block, blocks)| {
                (block.min(volume_blocks - 1), blocks.min(volume_blocks - block.min(volume_blocks - 1)))
            },
        )
    };
    let op = prop_oneof![
        4 => range().prop_map(|(block, blocks)| Op::Read { block, blocks }),
        6 => (range(), any::<u8>(), any::<bool>())
            .prop_map(|((block, blocks), seed, fua)| Op::Write { block, blocks, seed, fua }),
        1 => range().prop_map(|(block, blocks)| Op::Discard { block, blocks }),
        1 => range().prop_map(|(block, blocks)| Op::WriteZeroes { block, blocks }),
        1 => Just(Op::Flush),
    ];
    proptest::collection::vec(op, 1..count)
}

/// The bytes a write with `seed` puts at byte `offset` of the volume: distinct per seed
/// and per position, so a block written to the wrong place is caught.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ u64::from(seed).wrapping_mul(0xD6E8_FEB8_6659_FD93);
            ((x >> 29) ^ x).to_le_bytes()[0]
        })
        .collect()
}

fn block_hash(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// A flat image of what the volume must read back, and for each block which contents a
/// crash may leave there.
pub struct Reference {
    block_size: usize,
    image: Vec<u8>,
    /// For blocks written since their last durable point: every content the block may hold
    /// after a crash (hashes), including the durable one.
    unsure: BTreeMap<u64, Vec<u64>>,
}

impl Reference {
    /// A zeroed image.
    pub fn new(size: u64, block_size: u32) -> Self {
        Self {
            block_size: block_size as usize,
            image: vec![0; usize::try_from(size).expect("fits")],
            unsure: BTreeMap::new(),
        }
    }

    /// Bytes of `[offset, offset + len)`.
    pub fn read(&self, offset: u64, len: u64) -> &[u8] {
        let start = usize::try_from(offset).expect("fits");
        &self.image[start..start + usize::try_from(len).expect("fits")]
    }

    fn block(&self, b: u64) -> &[u8] {
        self.read(b * self.block_size as u64, self.block_size as u64)
    }

    /// Applies a write (or zeroing, when `data` is `None`).
    pub fn write(&mut self, offset: u64, len: u64, data: Option<&[u8]>, durability: Durability) {
        let bs = self.block_size as u64;
        for b in offset / bs..(offset + len) / bs {
            if durability.is_fua() {
                self.unsure.remove(&b);
            } else {
                let before = block_hash(self.block(b));
                self.unsure.entry(b).or_insert_with(|| vec![before]);
            }
        }
        let start = usize::try_from(offset).expect("fits");
        let end = start + usize::try_from(len).expect("fits");
        match data {
            Some(d) => self.image[start..end].copy_from_slice(d),
            None => self.image[start..end].fill(0),
        }
        if !durability.is_fua() {
            for b in offset / bs..(offset + len) / bs {
                let now = block_hash(self.block(b));
                self.unsure.get_mut(&b).expect("inserted").push(now);
            }
        }
    }

    /// Everything written so far is durable.
    pub fn flush(&mut self) {
        self.unsure.clear();
    }

    /// Checks an image read back after a crash: durable blocks must be exact, the others
    /// must hold one of the contents they had since their last durable point. After the
    /// check the reference adopts `actual`, which is now durable.
    pub fn check_after_crash(&mut self, actual: &[u8]) -> Result<(), String> {
        let bs = self.block_size;
        for (b, (want, got)) in self.image.chunks(bs).zip(actual.chunks(bs)).enumerate() {
            let b = b as u64;
            match self.unsure.get(&b) {
                None if want != got => {
                    return Err(format!("durable block {b} changed across the crash"));
                }
                Some(options) if !options.contains(&block_hash(got)) => {
                    return Err(format!("block {b} holds contents that were never written there"));
                }
                _ => {}
            }
        }
        self.image.copy_from_slice(actual);
        self.unsure.clear();
        Ok(())
    }
}

/// Runs `op` against `volume` and the reference; reads are compared.
pub async fn apply(volume: &dyn BlockIo, reference: &mut Reference, op: &Op) -> Result<(), String> {
    let read = issue(volume, op).await?;
    record(reference, op, read.as_ref(), u64::from(volume.geometry().block_size))
}

/// Issues `op` to the volume; returns what a read read.
pub async fn issue(volume: &dyn BlockIo, op: &Op) -> Result<Option<Bytes>, String> {
    let bs = u64::from(volume.geometry().block_size);
    let fail = |e: strata_block::IoError| format!("{op:?}: {e}");
    match *op {
        Op::Read { block, blocks } => {
            return volume.read(block * bs, blocks * bs).await.map(Some).map_err(fail);
        }
        Op::Write { block, blocks, seed, fua } => {
            let data = pattern(seed, block * bs, usize::try_from(blocks * bs).expect("fits"));
            let durability = if fua { Durability::Fua } else { Durability::Cached };
            volume.write(block * bs, Bytes::from(data), durability).await.map_err(fail)?;
        }
        Op::Discard { block, blocks } => volume.discard(block * bs, blocks * bs).await.map_err(fail)?,
        Op::WriteZeroes { block, blocks } => {
            volume.write_zeroes(block * bs, blocks * bs).await.map_err(fail)?
        }
        Op::Flush => volume.flush().await.map_err(fail)?,
    }
    Ok(None)
}

/// Applies a completed `op` to the reference, checking what a read returned.
pub fn record(reference: &mut Reference, op: &Op, read: Option<&Bytes>, bs: u64) -> Result<(), String> {
    match *op {
        Op::Read { block, blocks } => {
            let got = read.ok_or("a read returned nothing")?;
            let want = reference.read(block * bs, blocks * bs);
            if got.as_ref() != want {
                let first = got.iter().zip(want).position(|(a, b)| a != b);
                return Err(format!("{op:?}: data differs from the reference at byte {first:?}"));
            }
        }
        Op::Write { block, blocks, seed, fua } => {
            let data = pattern(seed, block * bs, usize::try_from(blocks * bs).expect("fits"));
            let durability = if fua { Durability::Fua } else { Durability::Cached };
            reference.write(block * bs, blocks * bs, Some(&data), durability);
        }
        Op::Discard { block, blocks } | Op::WriteZeroes { block, blocks } => {
            reference.write(block * bs, blocks * bs, None, Durability::Cached);
        }
        Op::Flush => reference.flush(),
    }
    Ok(())
}

/// A pool of memory devices with volatile caches, each behind a fault injector.
pub struct TestPool {
    /// The pool.
    pub pool: Pool,
    /// Memory devices, by name.
    pub memory: Vec<Arc<MemDevice>>,
    /// The fault injectors in front of them, same order.
    pub faulty: Vec<Arc<FaultyDevice>>,
    /// Device id of each, same order.
    pub ids: Vec<Uuid>,
}

/// Geometry of a test pool.
#[derive(Clone, Copy, Debug)]
pub struct PoolShape {
    /// Number of devices.
    pub devices: usize,
    /// Size of each.
    pub device_size: u64,
    /// Their block size.
    pub block_size: u32,
    /// Pool extent size.
    pub extent_size: u64,
}

impl TestPool {
    /// Claims `shape.devices` fresh memory devices into a new pool.
    pub async fn new(shape: PoolShape) -> Self {
        let pool = Pool::create(PoolOptions {
            name: "test".into(),
            extent_size: shape.extent_size,
            slot_size: 64 * 1024,
        })
        .expect("valid options");
        let mut memory = Vec::new();
        let mut faulty = Vec::new();
        let mut ids = Vec::new();
        for i in 0..shape.devices {
            let mem = MemDevice::with_volatile_cache(format!("mem{i}"), shape.device_size, shape.block_size);
            let dev = FaultyDevice::new(format!("dev{i}"), mem.clone(), FaultPlan::default());
            let info = pool.claim(&format!("dev{i}"), dev.clone(), None).await.expect("claim");
            memory.push(mem);
            faulty.push(dev);
            ids.push(info.id);
        }
        Self { pool, memory, faulty, ids }
    }

    /// Simulates power loss on every device and rebuilds the pool from them.
    pub async fn crash_and_reopen(self, seed: u64) -> Self {
        let TestPool { pool, memory, faulty, ids } = self;
        drop(pool);
        for (i, mem) in memory.iter().enumerate() {
            mem.crash(CrashPlan::Random { seed: seed.wrapping_add(i as u64) });
        }
        let candidates = faulty
            .iter()
            .enumerate()
            .map(|(i, f)| (format!("dev{i}"), f.clone() as Arc<dyn BlockIo>))
            .collect();
        let (pool, report) = Pool::open(candidates).await.expect("reopen");
        assert!(report.failed_volumes.is_empty(), "{report:?}");
        Self { pool: pool.expect("pool found"), memory, faulty, ids }
    }

    /// The memory devices by id, for reading what is on them directly.
    pub fn device_map(&self) -> BTreeMap<Uuid, Arc<dyn BlockIo>> {
        self.ids.iter().zip(&self.memory).map(|(id, m)| (*id, m.clone() as Arc<dyn BlockIo>)).collect()
    }

    /// The index of a device id.
    pub fn index_of(&self, id: Uuid) -> usize {
        self.ids.iter().position(|i| *i == id).expect("known device")
    }
}

/// A volume request for `layout` with the given parameters and the layout's own defaults.
pub fn request(layout: Layout, size: u64, width: u32, chunk: u64) -> VolumeRequest {
    let mut r = VolumeRequest::new(size, layout);
    if !matches!(layout, Layout::Linear | Layout::Mirror) {
        r.width = Some(width);
        r.chunk = Some(chunk);
    }
    r
}

/// Devices whose simultaneous loss the volume must survive: one for a mirror or RAID 5,
/// two for RAID 6, one per mirror set for RAID 10 (when the sets use disjoint devices).
/// `None` for layouts without redundancy.
pub fn survivable_failures(spec: &NodeSpec) -> Option<Vec<Uuid>> {
    let first_device = |leg: &NodeSpec| leg.devices()[0];
    match spec {
        NodeSpec::Mirror { children, .. } => Some(vec![first_device(&children[0])]),
        NodeSpec::Parity { level, children, .. } => {
            Some(children.iter().take(level.parity_members()).map(first_device).collect())
        }
        NodeSpec::Stripe { children, .. }
            if children.iter().all(|c| matches!(c, NodeSpec::Mirror { .. })) =>
        {
            let sets: Vec<&Vec<NodeSpec>> = children
                .iter()
                .filter_map(|c| if let NodeSpec::Mirror { children, .. } = c { Some(children) } else { None })
                .collect();
            let chosen: Vec<Uuid> = sets.iter().map(|legs| first_device(&legs[0])).collect();
            let survives = sets.iter().all(|legs| legs.iter().any(|l| !chosen.contains(&first_device(l))));
            assert!(survives, "mirror sets share devices; choose a geometry with disjoint sets");
            Some(chosen)
        }
        _ => None,
    }
}

/// Reads the bytes of an extent or a concat of extents straight from the devices.
async fn read_leg(spec: &NodeSpec, devices: &BTreeMap<Uuid, Arc<dyn BlockIo>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (device, offset, length) in spec.extents() {
        out.extend_from_slice(&devices[&device].read(offset, length).await.expect("leg readable"));
    }
    out
}

/// Checks that every mirror's legs are identical and every parity row's P (and Q) match
/// its data, reading the devices directly.
pub async fn check_redundancy(
    spec: &NodeSpec,
    devices: &BTreeMap<Uuid, Arc<dyn BlockIo>>,
) -> Result<(), String> {
    match spec {
        NodeSpec::Extent { .. } | NodeSpec::Concat { .. } => Ok(()),
        NodeSpec::Stripe { children, .. } => {
            for c in children {
                Box::pin(check_redundancy(c, devices)).await?;
            }
            Ok(())
        }
        NodeSpec::Mirror { children, .. } => {
            let first = read_leg(&children[0], devices).await;
            for (i, leg) in children.iter().enumerate().skip(1) {
                if read_leg(leg, devices).await != first {
                    return Err(format!("mirror leg {i} differs from leg 0"));
                }
            }
            Ok(())
        }
        NodeSpec::Parity { level, chunk, children, .. } => {
            let members: Vec<Vec<u8>> = read_members(children, devices).await;
            let n = members.len();
            let parity = level.parity_members();
            let chunk = usize::try_from(*chunk).expect("fits");
            let rows = members[0].len() / chunk;
            // Q's coefficient for data chunk k is 2^k: one product table per chunk index.
            let times: Vec<Vec<u8>> =
                (0..n - parity).map(|k| (0..=255u8).map(|x| gf_mul(x, gf_pow2(k))).collect()).collect();
            for row in 0..rows {
                let p = n - 1 - row % n;
                let data: Vec<Vec<u8>> = (0..n - parity)
                    .map(|k| members[(p + parity + k) % n][row * chunk..(row + 1) * chunk].to_vec())
                    .collect();
                let mut want_p = vec![0u8; chunk];
                let mut want_q = vec![0u8; chunk];
                for (k, d) in data.iter().enumerate() {
                    for i in 0..chunk {
                        want_p[i] ^= d[i];
                        want_q[i] ^= times[k][usize::from(d[i])];
                    }
                }
                if members[p][row * chunk..(row + 1) * chunk] != want_p[..] {
                    return Err(format!("row {row}: P does not match the data"));
                }
                if *level == ParityLevel::Double
                    && members[(p + 1) % n][row * chunk..(row + 1) * chunk] != want_q[..]
                {
                    return Err(format!("row {row}: Q does not match the data"));
                }
            }
            Ok(())
        }
    }
}

/// Reads every member of a node straight from the devices, in member order.
async fn read_members(children: &[NodeSpec], devices: &BTreeMap<Uuid, Arc<dyn BlockIo>>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for c in children {
        out.push(read_leg(c, devices).await);
    }
    out
}

/// GF(2^8) multiply (polynomial 0x11d), written independently of the code under test.
fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            product ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= 0x1d;
        }
        b >>= 1;
    }
    product
}

fn gf_pow2(k: usize) -> u8 {
    (0..k).fold(1u8, |x, _| gf_mul(x, 2))
}

/// Cases per property: `STRATA_PROPTEST_CASES`, or `default` for the inner loop.
pub fn cases(default: u32) -> u32 {
    std::env::var("STRATA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A current-thread runtime for one property case.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

//! 512e: 512-byte logical blocks over a device of 4096-byte blocks, checked against a flat
//! model of the LU, through the device requests it makes, and under concurrent writers.

use std::time::Duration;

use strata_block::{Durability, Geometry, IoError, Span};

use super::*;

/// Logical blocks of the LUs here (eight device blocks).
const BLOCKS: u64 = 64;

/// A device request as [`Recorder`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Req {
    Read(u64, u64),
    Write(u64, u64),
    Discard(u64, u64),
    Zeroes(u64, u64),
}

/// A memory device that records every request and keeps the buffer of the last read, so a
/// test can see what the LU asked of the device and whether it copied what it got.
struct Recorder {
    mem: Arc<MemDevice>,
    log: Mutex<Vec<Req>>,
    last_read: Mutex<Bytes>,
}

impl Recorder {
    fn new(mem: Arc<MemDevice>) -> Arc<Self> {
        Arc::new(Self { mem, log: Mutex::default(), last_read: Mutex::default() })
    }

    fn take(&self) -> Vec<Req> {
        std::mem::take(&mut *self.log.lock())
    }
}

#[async_trait]
impl BlockIo for Recorder {
    fn geometry(&self) -> Geometry {
        self.mem.geometry()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        self.log.lock().push(Req::Read(offset, len));
        let data = self.mem.read(offset, len).await?;
        *self.last_read.lock() = data.clone();
        Ok(data)
    }
    async fn write(&self, offset: u64, data: Bytes, d: Durability) -> Result<(), IoError> {
        self.log.lock().push(Req::Write(offset, data.len() as u64));
        self.mem.write(offset, data, d).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.mem.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.log.lock().push(Req::Discard(offset, len));
        self.mem.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.log.lock().push(Req::Zeroes(offset, len));
        self.mem.write_zeroes(offset, len).await
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        self.mem.allocation(offset, len).await
    }
}

fn lu_over(device: Arc<dyn BlockIo>, logical: u32) -> Arc<LogicalUnit> {
    let store = Arc::new(FakeStore::default());
    let lu = LogicalUnit::new(device, identity(9), None, store, Arc::new(Directory::new())).unwrap();
    Arc::new(lu.with_logical_block_size(logical).unwrap())
}

/// A 512e LU of [`BLOCKS`] logical blocks, its memory device and a recorder in between.
fn emulated() -> (Arc<LogicalUnit>, Arc<MemDevice>, Arc<Recorder>) {
    let mem = MemDevice::new("e", BLOCKS * 512, 4096);
    let recorder = Recorder::new(mem.clone());
    (lu_over(recorder.clone(), 512), mem, recorder)
}

/// `n` blocks of bytes that differ from block to block and from `seed` to `seed`.
fn pattern(seed: u8, n: u64) -> Vec<u8> {
    (0..n * 512).map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap())).collect()
}

async fn read(lu: &LogicalUnit, lba: u64, n: u32) -> Bytes {
    good(&run(lu, &nexus(1), &cdb16(op::READ_16, lba, n), &[]).await).clone()
}

async fn write(lu: &LogicalUnit, lba: u64, data: &[u8]) {
    let n = u32::try_from(data.len() / 512).unwrap();
    good(&run(lu, &nexus(1), &cdb16(op::WRITE_16, lba, n), data).await);
}

fn range(lba: u64, n: u64) -> std::ops::Range<usize> {
    usize::try_from(lba * 512).unwrap()..usize::try_from((lba + n) * 512).unwrap()
}

#[test]
fn logical_block_sizes_are_checked() {
    let dev4k: Arc<dyn BlockIo> = MemDevice::new("a", 1 << 20, 4096);
    let store = Arc::new(FakeStore::default());
    let new = |d: &Arc<dyn BlockIo>| {
        LogicalUnit::new(d.clone(), identity(1), None, store.clone(), Arc::new(Directory::new())).unwrap()
    };
    for ok in [512, 1024, 2048, 4096] {
        let lu = new(&dev4k).with_logical_block_size(ok).unwrap();
        assert_eq!((lu.block_size(), lu.blocks), (ok, (1 << 20) / u64::from(ok)));
    }
    for bad in [0, 256, 768, 3072, 8192] {
        let err = new(&dev4k).with_logical_block_size(bad).unwrap_err();
        assert!(
            matches!(err, crate::ScsiError::LogicalBlockSize { size, device_block_size: 4096 } if size == bad)
        );
    }
    let dev512: Arc<dyn BlockIo> = MemDevice::new("b", 1 << 20, 512);
    assert_eq!(new(&dev512).with_logical_block_size(512).unwrap().block_size(), 512);
    assert!(new(&dev512).with_logical_block_size(1024).is_err());
    // The default is the device's block.
    assert_eq!(new(&dev4k).block_size(), 4096);
}

#[tokio::test]
async fn capacity_and_block_limits_report_eight_blocks_per_physical_block() {
    let (lu, _, _) = emulated();
    let n = nexus(1);
    let mut rc16 = cdb16(op::SERVICE_ACTION_IN_16, 0, 32);
    rc16[1] = 0x10;
    let cap = good(&run(&lu, &n, &rc16, &[]).await).clone();
    assert_eq!(u64::from_be_bytes(cap[0..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(u32::from_be_bytes(cap[8..12].try_into().unwrap()), 512);
    // LBPPBE=3; LBPME, LBPRZ; LOWEST ALIGNED LBA 0.
    assert_eq!((cap[12], cap[13], cap[14], cap[15]), (0, 3, 0xC0, 0));
    let rc10 = good(&run(&lu, &n, &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await).clone();
    assert_eq!(&rc10[..], &[0, 0, 0, 63, 0, 0, 2, 0]);
    let b0 = good(&run(&lu, &n, &[op::INQUIRY, 1, 0xB0, 0, 255, 0], &[]).await).clone();
    assert_eq!(u16::from_be_bytes([b0[6], b0[7]]), 8, "optimal transfer length granularity");
    assert_eq!(u32::from_be_bytes(b0[28..32].try_into().unwrap()), 8, "unmap granularity");
    assert_eq!(u32::from_be_bytes(b0[32..36].try_into().unwrap()), 0x8000_0000, "UGAVALID, alignment 0");
    assert_eq!(u32::from_be_bytes(b0[8..12].try_into().unwrap()), 16384, "8 MiB in 512-byte blocks");
    // Below 65536 blocks, in whole physical blocks (see `max_write_same_blocks`).
    assert_eq!(u64::from_be_bytes(b0[36..44].try_into().unwrap()), 65528, "maximum write same length");
    assert_eq!(lu.data_out_length(&cdb16(op::WRITE_16, 0, 3)), 1536);
    // A native 4 KiB LU: one logical block per physical block.
    let native = lu_over(MemDevice::new("n", 1 << 20, 4096), 4096);
    let cap = good(&run(&native, &n, &rc16, &[]).await).clone();
    assert_eq!((u32::from_be_bytes(cap[8..12].try_into().unwrap()), cap[13]), (4096, 0));
    let b0 = good(&run(&native, &n, &[op::INQUIRY, 1, 0xB0, 0, 255, 0], &[]).await).clone();
    assert_eq!((u16::from_be_bytes([b0[6], b0[7]]), b0[31]), (1, 1));
}

#[tokio::test]
async fn unaligned_writes_read_modify_write_only_the_edge_blocks() {
    let (lu, mem, rec) = emulated();
    write(&lu, 0, &pattern(1, BLOCKS)).await;
    rec.take();
    // LBA 6..10 crosses device blocks 0 and 1: both read, patched and written as one.
    write(&lu, 6, &pattern(2, 4)).await;
    assert_eq!(rec.take(), vec![Req::Read(0, 4096), Req::Read(4096, 4096), Req::Write(0, 8192)]);
    let mut model = pattern(1, BLOCKS);
    model[range(6, 4)].copy_from_slice(&pattern(2, 4));
    assert_eq!(&mem.read(0, BLOCKS * 512).await.unwrap()[..], &model[..]);
    // Aligned: straight through.
    write(&lu, 16, &pattern(3, 8)).await;
    assert_eq!(rec.take(), vec![Req::Write(16 * 512, 4096)]);
}

#[tokio::test]
async fn large_unaligned_writes_pass_the_middle_through() {
    let mem = MemDevice::new("big", 2 << 20, 4096);
    let rec = Recorder::new(mem.clone());
    let lu = lu_over(rec.clone(), 512);
    // 1 + 256 + 1 blocks' worth of 512-byte sectors, starting 1 sector into a device block.
    let data = pattern(7, 2 + 256 * 8 - 2 + 6);
    write(&lu, 1, &data).await;
    let reqs = rec.take();
    let end = 512 + data.len() as u64;
    assert_eq!(
        reqs,
        vec![
            Req::Read(0, 4096),
            Req::Read(end & !4095, 4096),
            Req::Write(0, 4096),
            Req::Write(4096, (end & !4095) - 4096),
            Req::Write(end & !4095, 4096),
        ]
    );
    assert_eq!(read(&lu, 1, u32::try_from(data.len() / 512).unwrap()).await, &data[..]);
    assert!(read(&lu, 0, 1).await.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn reads_are_slices_of_the_device_buffer() {
    let (lu, _, rec) = emulated();
    write(&lu, 0, &pattern(4, BLOCKS)).await;
    let aligned = read(&lu, 8, 8).await;
    assert_eq!(aligned.as_ptr(), rec.last_read.lock().as_ptr());
    let unaligned = read(&lu, 9, 2).await;
    // Device block 1 (LBAs 8..16) was read; the answer starts 512 bytes into it.
    assert_eq!(unaligned.as_ptr(), rec.last_read.lock()[512..].as_ptr());
    assert_eq!(&unaligned[..], &pattern(4, BLOCKS)[range(9, 2)]);
}

#[tokio::test]
async fn aligned_writes_share_the_lock_and_unaligned_ones_wait_for_it() {
    let (lu, _, _) = emulated();
    let held = lu.writes.read().await;
    // Another shared holder (an aligned write in flight) does not stop an aligned write.
    tokio::time::timeout(Duration::from_secs(5), write(&lu, 8, &pattern(5, 8))).await.unwrap();
    // A read-modify-write waits until it is alone.
    let lu2 = lu.clone();
    let rmw = tokio::spawn(async move { write(&lu2, 9, &pattern(6, 1)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!rmw.is_finished());
    drop(held);
    tokio::time::timeout(Duration::from_secs(5), rmw).await.unwrap().unwrap();
    assert_eq!(read(&lu, 9, 1).await, &pattern(6, 1)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_to_one_device_block_all_land() {
    let (lu, mem, _) = emulated();
    let rounds = 100u8;
    let mut tasks = Vec::new();
    for t in 0..8u8 {
        let lu = lu.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..rounds {
                // One block in device block 0, and three across the boundaries of device
                // blocks 2 to 5 that neighbouring tasks also patch.
                write(&lu, u64::from(t), &[t.wrapping_mul(16).wrapping_add(r); 512]).await;
                write(&lu, 20 + 3 * u64::from(t), &pattern(t ^ r, 3)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let image = mem.read(0, BLOCKS * 512).await.unwrap();
    let last = rounds - 1;
    for t in 0..8u8 {
        assert!(image[range(u64::from(t), 1)].iter().all(|&b| b == t.wrapping_mul(16).wrapping_add(last)));
        assert_eq!(&image[range(20 + 3 * u64::from(t), 3)], &pattern(t ^ last, 3)[..], "task {t}");
    }
}

#[tokio::test]
async fn write_same_and_unmap_release_whole_device_blocks_and_zero_the_edges() {
    let (lu, _, rec) = emulated();
    let n = nexus(1);
    write(&lu, 0, &pattern(8, BLOCKS)).await;
    rec.take();
    let mut ws = cdb16(op::WRITE_SAME_16, 3, 20);
    ws[1] = 0x08;
    good(&run(&lu, &n, &ws, &[0xFF; 512]).await);
    let reqs = rec.take();
    assert!(reqs.contains(&Req::Discard(4096, 4096)), "{reqs:?}");
    assert!(reqs.contains(&Req::Write(0, 4096)) && reqs.contains(&Req::Write(8192, 4096)), "{reqs:?}");
    let mut model = pattern(8, BLOCKS);
    model[range(3, 20)].fill(0);
    assert_eq!(read(&lu, 0, 64).await, &model[..]);
    // The same through UNMAP, two ranges, one inside a single device block.
    let mut list = vec![0u8; 8 + 32];
    list[1] = 38;
    list[3] = 32;
    list[8..16].copy_from_slice(&33u64.to_be_bytes());
    list[16..20].copy_from_slice(&2u32.to_be_bytes());
    list[24..32].copy_from_slice(&40u64.to_be_bytes());
    list[32..36].copy_from_slice(&17u32.to_be_bytes());
    good(&run(&lu, &n, &[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 40, 0], &list).await);
    let reqs = rec.take();
    assert!(reqs.contains(&Req::Discard(40 * 512, 2 * 4096)), "{reqs:?}");
    model[range(33, 2)].fill(0);
    model[range(40, 17)].fill(0);
    assert_eq!(read(&lu, 0, 64).await, &model[..]);
    // WRITE SAME with a pattern over unaligned edges, and with zeroes.
    let ws = cdb16(op::WRITE_SAME_16, 13, 13);
    good(&run(&lu, &n, &ws, &pattern(9, 1)).await);
    for lba in 13..26 {
        model[range(lba, 1)].copy_from_slice(&pattern(9, 1));
    }
    good(&run(&lu, &n, &cdb16(op::WRITE_SAME_16, 59, 3), &[0; 512]).await);
    model[range(59, 3)].fill(0);
    assert_eq!(read(&lu, 0, 64).await, &model[..]);
    // Every request the device saw was whole device blocks (MemDevice refuses others).
    assert!(rec.take().iter().all(|r| match *r {
        Req::Read(o, l) | Req::Write(o, l) | Req::Discard(o, l) | Req::Zeroes(o, l) => (o | l) % 4096 == 0,
    }));
}

#[tokio::test]
async fn compare_and_write_at_an_unaligned_lba() {
    let (lu, _, _) = emulated();
    let n = nexus(1);
    write(&lu, 0, &pattern(10, 16)).await;
    let mut data = pattern(10, 16)[range(6, 4)].to_vec();
    data.extend_from_slice(&pattern(11, 4));
    good(&run(&lu, &n, &caw(6, 4), &data).await);
    let mut model = pattern(10, 16);
    model[range(6, 4)].copy_from_slice(&pattern(11, 4));
    assert_eq!(read(&lu, 0, 16).await, &model[..]);
    // The old compare data now miscompares, at the first byte.
    let o = run(&lu, &n, &caw(6, 4), &data).await;
    assert_eq!(sense(&o), (0x0E, 0x1D, 0));
    // A miscompare in the third block is reported at its offset.
    let mut late = model[range(7, 3)].to_vec();
    late[1100] ^= 1;
    late.extend_from_slice(&pattern(12, 3));
    let o = run(&lu, &n, &caw(7, 3), &late).await;
    assert_eq!(u32::from_be_bytes(o.sense.as_ref().unwrap()[3..7].try_into().unwrap()), 1100);
    assert_eq!(read(&lu, 0, 16).await, &model[..]);
    // Data-out must be exactly twice the blocks (libiscsi CompareAndWrite.InvalidDataOutSize).
    assert_eq!(sense(&run(&lu, &n, &caw(0, 1), &pattern(0, 4)).await).1, 0x24);
    assert_eq!(sense(&run(&lu, &n, &caw(0, 3), &pattern(0, 4)).await).1, 0x24);
}

/// libiscsi's GetLBAStatus.UnmapSingle with 8 logical blocks per physical block, over a
/// device that reports its all-zero blocks as holes.
#[tokio::test]
async fn lba_status_follows_physical_blocks() {
    let mem = MemDevice::new("holey4k", 512 * 512, 4096);
    let lu = lu_over(Arc::new(Holey(mem)), 512);
    let n = nexus(1);
    let gls = |lba: u64| {
        let mut c = cdb16(op::SERVICE_ACTION_IN_16, lba, 24);
        c[1] = 0x12;
        c
    };
    let first = |d: &Bytes| {
        (
            u64::from_be_bytes(d[8..16].try_into().unwrap()),
            u32::from_be_bytes(d[16..20].try_into().unwrap()),
            d[20],
        )
    };
    let lbppb = 8u64;
    let unmap = |lba: u64, blocks: u64| {
        let mut list = vec![0u8; 24];
        list[1] = 22;
        list[3] = 16;
        list[8..16].copy_from_slice(&lba.to_be_bytes());
        list[16..20].copy_from_slice(&u32::try_from(blocks).unwrap().to_be_bytes());
        list
    };
    let unmap_cdb = [op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    write(&lu, 0, &[b'A'; (256 + 8) * 512]).await;
    let mut i = 0;
    while i + lbppb <= 256 {
        good(&run(&lu, &n, &unmap_cdb, &unmap(i, lbppb)).await);
        let d = good(&run(&lu, &n, &gls(i), &[]).await).clone();
        assert_eq!(first(&d), (i, 8, 1));
        let d = good(&run(&lu, &n, &gls(i + lbppb), &[]).await).clone();
        assert_eq!((first(&d).0, first(&d).2), (i + lbppb, 0));
        i += lbppb;
    }
    let mut i = lbppb;
    while i + lbppb <= 256 {
        write(&lu, 0, &[b'A'; (256 + 8) * 512]).await;
        good(&run(&lu, &n, &unmap_cdb, &unmap(0, i)).await);
        let d = good(&run(&lu, &n, &gls(0), &[]).await).clone();
        assert_eq!(first(&d), (0, u32::try_from(i).unwrap(), 1));
        let d = good(&run(&lu, &n, &gls(i + 1), &[]).await).clone();
        assert_eq!((first(&d).0, first(&d).2), (i + lbppb, 0), "asked about {}", i + 1);
        i += lbppb;
    }
    // Inside the last physical block there is no next one: described from the LBA asked.
    let d = good(&run(&lu, &n, &gls(509), &[]).await).clone();
    assert_eq!(first(&d), (509, 3, 1));
    // Unaligned unmaps leave the partial device blocks mapped (written with zeroes).
    write(&lu, 0, &[b'B'; 64 * 512]).await;
    good(&run(&lu, &n, &unmap_cdb, &unmap(4, 20)).await);
    let mut all = cdb16(op::SERVICE_ACTION_IN_16, 0, 8 + 16 * 4);
    all[1] = 0x12;
    let d = good(&run(&lu, &n, &all, &[]).await).clone();
    assert_eq!(first(&d), (0, 8, 0));
    assert_eq!(u64::from_be_bytes(d[24..32].try_into().unwrap()), 8);
}

/// One step of the model check.
#[derive(Clone, Debug)]
enum Step {
    Write { lba: u64, n: u64, seed: u8 },
    Read { lba: u64, n: u64 },
    WriteSame { lba: u64, n: u64, seed: u8, unmap: bool },
    Unmap { lba: u64, n: u64 },
    OrWrite { lba: u64, n: u64, seed: u8 },
    CompareAndWrite { lba: u64, n: u64, seed: u8, matching: bool },
    WriteAtomic { lba: u64, n: u64, seed: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    let at = (0..BLOCKS, 1..=20u64).prop_map(|(lba, n)| (lba, n.min(BLOCKS - lba)));
    prop_oneof![
        3 => (at.clone(), any::<u8>()).prop_map(|((lba, n), seed)| Step::Write { lba, n, seed }),
        2 => at.clone().prop_map(|(lba, n)| Step::Read { lba, n }),
        1 => (at.clone(), any::<u8>(), any::<bool>())
            .prop_map(|((lba, n), seed, unmap)| Step::WriteSame { lba, n, seed, unmap }),
        1 => at.clone().prop_map(|(lba, n)| Step::Unmap { lba, n }),
        1 => (at.clone(), any::<u8>()).prop_map(|((lba, n), seed)| Step::OrWrite { lba, n, seed }),
        1 => (at.clone(), any::<u8>(), any::<bool>())
            .prop_map(|((lba, n), seed, matching)| Step::CompareAndWrite { lba, n, seed, matching }),
        1 => (at, any::<u8>()).prop_map(|((lba, n), seed)| Step::WriteAtomic { lba, n, seed }),
    ]
}

/// Runs `step` on the LU and on `model`; the LU must agree with the model.
async fn apply(lu: &LogicalUnit, model: &mut [u8], step: &Step) {
    let n1 = nexus(1);
    let blocks = |n: u64| u32::try_from(n).unwrap();
    match *step {
        Step::Write { lba, n, seed } => {
            write(lu, lba, &pattern(seed, n)).await;
            model[range(lba, n)].copy_from_slice(&pattern(seed, n));
        }
        Step::Read { lba, n } => assert_eq!(read(lu, lba, blocks(n)).await, &model[range(lba, n)]),
        Step::WriteSame { lba, n, seed, unmap } => {
            let mut c = cdb16(op::WRITE_SAME_16, lba, blocks(n));
            c[1] = if unmap { 0x08 } else { 0 };
            good(&run(lu, &n1, &c, &pattern(seed, 1)).await);
            for b in lba..lba + n {
                if unmap {
                    model[range(b, 1)].fill(0);
                } else {
                    model[range(b, 1)].copy_from_slice(&pattern(seed, 1));
                }
            }
        }
        Step::Unmap { lba, n } => {
            let mut list = vec![0u8; 24];
            list[1] = 22;
            list[3] = 16;
            list[8..16].copy_from_slice(&lba.to_be_bytes());
            list[16..20].copy_from_slice(&blocks(n).to_be_bytes());
            good(&run(lu, &n1, &[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list).await);
            model[range(lba, n)].fill(0);
        }
        Step::OrWrite { lba, n, seed } => {
            good(&run(lu, &n1, &cdb16(op::ORWRITE_16, lba, blocks(n)), &pattern(seed, n)).await);
            for (m, d) in model[range(lba, n)].iter_mut().zip(pattern(seed, n)) {
                *m |= d;
            }
        }
        Step::CompareAndWrite { lba, n, seed, matching } => {
            let n = n.min(8);
            let mut data = model[range(lba, n)].to_vec();
            if !matching {
                data[0] ^= 0x80;
            }
            data.extend_from_slice(&pattern(seed, n));
            let o = run(lu, &n1, &caw(lba, u8::try_from(n).unwrap()), &data).await;
            if matching {
                good(&o);
                model[range(lba, n)].copy_from_slice(&pattern(seed, n));
            } else {
                assert_eq!(sense(&o), (0x0E, 0x1D, 0));
            }
        }
        Step::WriteAtomic { lba, n, seed } => {
            let mut c = cdb16(op::WRITE_ATOMIC_16, lba, 0);
            c[12..14].copy_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            good(&run(lu, &n1, &c, &pattern(seed, n)).await);
            model[range(lba, n)].copy_from_slice(&pattern(seed, n));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any sequence of block commands at any logical alignment leaves the 512e LU equal to
    /// a flat array of bytes that took the same commands.
    #[test]
    fn block_commands_at_any_alignment_match_a_flat_model(
        steps in prop::collection::vec(step(), 1..24),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let (lu, mem, _) = emulated();
            let mut model = vec![0u8; usize::try_from(BLOCKS * 512).unwrap()];
            for step in &steps {
                apply(&lu, &mut model, step).await;
            }
            assert_eq!(&mem.read(0, BLOCKS * 512).await.unwrap()[..], &model[..]);
        });
    }
}

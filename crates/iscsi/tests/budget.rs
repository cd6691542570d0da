//! What a hostile initiator can make the target hold beyond its byte budget (issue #13,
//! item 1): commands ahead of a CmdSN it never sends, writes with immediate data parked
//! behind a budget it filled, and reads whose CDBs ask for more than it expects. A real
//! listener on loopback, a minimal initiator written here from RFC 7143, and a counting
//! allocator: the heap bytes the process holds are the measure.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use strata_block::{BlockIo, Durability, Geometry, IoError, MemDevice};
use strata_iscsi::IscsiServer;
use strata_net::budget::Budget;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Heap bytes allocated and not yet freed, by the whole process.
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The most `LIVE` has been since it was last reset.
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: isize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// The system allocator, counting what is live.
struct Counting;

// SAFETY: every call goes to the system allocator with the caller's arguments; the
// counter only observes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is System's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` or `realloc` above, that is from System, with
        // `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is the caller's, checked by its contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grew(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> i64 {
    i64::try_from(LIVE.load(Ordering::Relaxed)).unwrap()
}

/// The peak of the heap since the last call, and resets it.
fn peak() -> i64 {
    i64::try_from(PEAK.swap(LIVE.load(Ordering::Relaxed), Ordering::Relaxed)).unwrap()
}

const TARGET: &str = "iqn.2026-11.io.strata:budget";
const KIB: u32 = 1 << 10;
/// Immediate data per write: the first burst this initiator negotiates.
const IMMEDIATE: u32 = 256 * KIB;
/// What commands not yet started may keep per connection (`WAITING_LIMIT`).
const WAITING_LIMIT: i64 = 4 << 20;
/// Heap the target may hold beyond that: its read buffer, the outbox, a write's first
/// R2T burst, the test's own PDU buffer.
const SLACK: i64 = 4 << 20;
const GOOD: u8 = 0x00;
const TASK_SET_FULL: u8 = 0x28;

/// A memory device whose reads hold their data a while before they complete, as a disk's
/// reads hold their buffers: how many run at once shows in the heap.
struct SlowReads(Arc<MemDevice>);

#[async_trait]
impl BlockIo for SlowReads {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        let data = self.0.read(offset, len).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(data)
    }
    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        self.0.write(offset, data, durability).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.0.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.0.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.0.write_zeroes(offset, len).await
    }
}

/// A target with one 1 MiB LU, drawing on `budget`.
async fn server(budget: Arc<Budget>) -> (String, tokio::sync::watch::Sender<bool>) {
    let device: Arc<dyn BlockIo> = Arc::new(SlowReads(MemDevice::new("budget", 1 << 20, 4096)));
    let targets = common::one_lu(TARGET, device, "budget");
    common::listen(IscsiServer::with_budget(targets, budget)).await
}

/// Sends a PDU, its data padded, through `wire` (reused, so the test holds one PDU).
async fn send(s: &mut TcpStream, wire: &mut Vec<u8>, mut h: [u8; 48], data: &[u8]) {
    let len = u32::try_from(data.len()).unwrap().to_be_bytes();
    h[5..8].copy_from_slice(&len[1..]);
    wire.clear();
    wire.extend_from_slice(&h);
    wire.extend_from_slice(data);
    wire.resize(48 + data.len().div_ceil(4) * 4, 0);
    s.write_all(wire).await.unwrap();
}

/// Reads one PDU's header (its data is read and dropped), or None when the target closed.
async fn read(s: &mut TcpStream) -> Option<[u8; 48]> {
    let mut h = [0u8; 48];
    s.read_exact(&mut h).await.ok()?;
    let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
    let mut data = vec![0u8; len.div_ceil(4) * 4];
    s.read_exact(&mut data).await.ok()?;
    Some(h)
}

/// Logs in with a 256 KiB first burst and immediate data; returns the connection and the
/// CmdSN its first command takes.
async fn login(addr: &str) -> (TcpStream, u32) {
    login_with(addr, "").await
}

/// Logs in as [`login`] does, with `keys` (each ending in NUL) added.
async fn login_with(addr: &str, keys: &str) -> (TcpStream, u32) {
    let extra = keys;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut h = common::header(0x43);
    h[1] = 0x80 | (1 << 2) | 3;
    h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    h[24..28].copy_from_slice(&1u32.to_be_bytes());
    let keys = format!(
        "InitiatorName=iqn.2026-11.test:hostile\0TargetName={TARGET}\0SessionType=Normal\0\
         ImmediateData=Yes\0FirstBurstLength={IMMEDIATE}\0MaxBurstLength={IMMEDIATE}\0{extra}"
    );
    send(&mut s, &mut Vec::new(), h, keys.as_bytes()).await;
    let reply = read(&mut s).await.expect("a login response");
    assert_eq!((reply[0] & 0x3f, reply[36], reply[1] & 0x80), (0x23, 0, 0x80), "logged in");
    let exp_cmd_sn = u32::from_be_bytes(reply[28..32].try_into().unwrap());
    (s, exp_cmd_sn)
}

/// A WRITE(10) of `blocks` 4 KiB blocks at LBA 0, expecting `edtl` bytes.
fn write10(itt: u32, cmd_sn: u32, blocks: u16, edtl: u32) -> [u8; 48] {
    let mut h = common::header(0x01);
    h[1] = 0x80 | 0x20; // final, write
    h[16..20].copy_from_slice(&itt.to_be_bytes());
    h[20..24].copy_from_slice(&edtl.to_be_bytes());
    h[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    h[32] = 0x2A;
    h[39..41].copy_from_slice(&blocks.to_be_bytes());
    h
}

/// The SCSI status of every response read within `wait`, by ITT, until `count` came.
async fn statuses(s: &mut TcpStream, count: usize, wait: Duration) -> Vec<(u32, u8)> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        while got.len() < count {
            let Some(h) = read(s).await else { break };
            if h[0] & 0x3f == 0x21 {
                got.push((u32::from_be_bytes(h[16..20].try_into().unwrap()), h[3]));
            }
        }
    })
    .await;
    got
}

/// Waits until the heap stops changing (the target's thread has read what was sent).
async fn settled() -> i64 {
    let mut last = live();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = live();
        if (now - last).abs() < 64 << 10 {
            return now;
        }
        last = now;
    }
    last
}

/// One test, so nothing else allocates in this process while the heap is measured.
#[tokio::test]
async fn hostile_initiators_hold_bounded_memory() {
    let budget = Budget::new(128 << 20);
    let (addr, _stop) = server(budget.clone()).await;
    ahead_of_a_missing_cmd_sn(&addr).await;
    parked_behind_a_full_budget(&addr, &budget).await;
    reads_that_produce_more_than_expected(&addr).await;
    a_command_that_holds_nothing_never_waits(&addr).await;
    a_write_whose_data_out_follows_is_not_parked(&addr).await;
    nop_outs_never_read(&addr).await;
}

/// 127 writes with 256 KiB of immediate data each, all ahead of a CmdSN that comes last:
/// 32 MiB if all were kept. The target keeps the data of the first sixteen and refuses the
/// rest in their turn; once the missing command comes, every one is answered.
async fn ahead_of_a_missing_cmd_sn(addr: &str) {
    let (mut s, first) = login(addr).await;
    let before = settled().await;
    let mut wire = Vec::with_capacity(IMMEDIATE as usize + 64);
    let data = vec![0x5a; IMMEDIATE as usize];
    let ahead = 127u32;
    for i in 1..=ahead {
        send(&mut s, &mut wire, write10(i, first.wrapping_add(i), 64, IMMEDIATE), &data).await;
    }
    let held = settled().await - before;
    // The missing one: every command is answered, none deadlocks.
    send(&mut s, &mut wire, write10(0, first, 64, IMMEDIATE), &data).await;
    let answers = statuses(&mut s, ahead as usize + 1, Duration::from_secs(10)).await;
    eprintln!("ahead of a missing CmdSN: {} KiB held", held >> 10);
    assert!(held < WAITING_LIMIT + SLACK, "{} KiB held for commands ahead of a missing CmdSN", held >> 10);
    assert_eq!(answers.len(), ahead as usize + 1, "every command is answered: {answers:?}");
    let good = answers.iter().filter(|(_, status)| *status == GOOD).count();
    let full = answers.iter().filter(|(_, status)| *status == TASK_SET_FULL).count();
    let kept = usize::try_from(WAITING_LIMIT / i64::from(IMMEDIATE)).unwrap();
    assert_eq!((good, full), (kept + 1, ahead as usize - kept), "{answers:?}");
}

/// A write that announces 16 MiB fills the connection's budget and never sends its data
/// (the target reads on, for its Data-Out); 120 writes with 256 KiB of immediate data
/// follow: 30 MiB if all were parked. Sixteen are parked and the rest answered TASK SET
/// FULL at once; when the first write is aborted, the parked ones run.
async fn parked_behind_a_full_budget(addr: &str, budget: &Budget) {
    let (mut s, first) = login(addr).await;
    let before = settled().await;
    let mut wire = Vec::with_capacity(IMMEDIATE as usize + 64);
    send(&mut s, &mut wire, write10(1000, first, 256, 16 << 20), &[]).await;
    let data = vec![0x5a; IMMEDIATE as usize];
    let behind = 120u32;
    for i in 1..=behind {
        send(&mut s, &mut wire, write10(i, first.wrapping_add(i), 64, IMMEDIATE), &data).await;
    }
    let held = settled().await - before;
    let kept = usize::try_from(WAITING_LIMIT / i64::from(IMMEDIATE)).unwrap();
    let refused = statuses(&mut s, behind as usize - kept, Duration::from_secs(5)).await;
    eprintln!("parked behind a full budget: {} KiB held, {} MiB charged", held >> 10, budget.used() >> 20);
    assert!(held < WAITING_LIMIT + SLACK, "{} KiB held for parked commands", held >> 10);
    assert_eq!(refused.len(), behind as usize - kept, "refused at once: {refused:?}");
    assert!(refused.iter().all(|(_, status)| *status == TASK_SET_FULL), "{refused:?}");
    // ABORT TASK for the write that holds the budget: the parked writes run.
    let mut abort = common::header(0x02 | 0x40);
    abort[1] = 0x80 | 1;
    abort[16..20].copy_from_slice(&2000u32.to_be_bytes());
    abort[20..24].copy_from_slice(&1000u32.to_be_bytes());
    abort[24..28].copy_from_slice(&first.wrapping_add(behind + 1).to_be_bytes());
    abort[32..36].copy_from_slice(&first.to_be_bytes());
    send(&mut s, &mut wire, abort, &[]).await;
    let ran = statuses(&mut s, kept, Duration::from_secs(10)).await;
    assert_eq!(ran.len(), kept, "the parked writes ran: {ran:?}");
    assert!(ran.iter().all(|(_, status)| *status == GOOD), "{ran:?}");
}

/// 64 READ(16)s of 1 MiB each whose initiator expects 4 KiB of each: 64 MiB of read
/// buffers at once if each were charged what its initiator expects. Charged what its CDB
/// produces, a connection's budget (16 MiB) of them runs at a time; each is answered with
/// its 4 KiB and an overflow residual.
async fn reads_that_produce_more_than_expected(addr: &str) {
    let (mut s, first) = login(addr).await;
    let before = settled().await;
    peak();
    let mut wire = Vec::new();
    let reads = 64u32;
    for i in 0..reads {
        let mut h = common::header(0x01);
        h[1] = 0x80 | 0x40; // final, read
        h[16..20].copy_from_slice(&i.to_be_bytes());
        h[20..24].copy_from_slice(&4096u32.to_be_bytes());
        h[24..28].copy_from_slice(&first.wrapping_add(i).to_be_bytes());
        h[32] = 0x88; // READ(16) of 256 blocks at LBA 0
        h[42..46].copy_from_slice(&256u32.to_be_bytes());
        send(&mut s, &mut wire, h, &[]).await;
    }
    let mut answered = 0;
    let mut overflow = 0;
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        while answered < reads {
            let Some(h) = read(&mut s).await else { break };
            // The status rides on the last Data-In (S bit), with the residual.
            if h[0] & 0x3f == 0x25 && h[1] & 0x01 != 0 {
                assert_eq!(h[3], GOOD);
                answered += 1;
                overflow += u32::from(h[1] & 0x04 != 0);
            }
        }
    })
    .await;
    let held = peak() - before;
    eprintln!("reads larger than expected: {} KiB at the peak", held >> 10);
    assert!(done.is_ok() && answered == reads, "{answered} of {reads} reads answered");
    assert_eq!(overflow, reads, "every read reports its overflow");
    assert!(held < (16 << 20) + (1 << 20) + SLACK, "{} KiB held by reads at once", held >> 10);
}

/// A TEST UNIT READY at `cmd_sn`.
fn test_unit_ready(itt: u32, cmd_sn: u32) -> [u8; 48] {
    let mut h = common::header(0x01);
    h[16..20].copy_from_slice(&itt.to_be_bytes());
    h[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    h
}

/// A write announcing 32 MiB runs alone beyond the connection's 16 MiB (it waits for its
/// data); a TEST UNIT READY behind it holds nothing and is answered at once. Before, its
/// charge of 0 bytes was refused and it waited for the write.
async fn a_command_that_holds_nothing_never_waits(addr: &str) {
    let (mut s, first) = login(addr).await;
    let mut wire = Vec::new();
    send(&mut s, &mut wire, write10(1, first, 8192, 32 << 20), &[]).await;
    send(&mut s, &mut wire, test_unit_ready(2, first.wrapping_add(1)), &[]).await;
    let answers = statuses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(answers, vec![(2, GOOD)], "TEST UNIT READY is answered beside a large write");
}

/// With InitialR2T=No, a write without the F bit is followed by unsolicited Data-Out. Behind
/// a write that fills the budget it cannot be parked (its Data-Out would find no task and
/// be lost, and the write would wait for it forever): it is answered TASK SET FULL.
async fn a_write_whose_data_out_follows_is_not_parked(addr: &str) {
    let (mut s, first) = login_with(addr, "InitialR2T=No\0").await;
    let mut wire = Vec::with_capacity(IMMEDIATE as usize + 64);
    send(&mut s, &mut wire, write10(1, first, 4096, 16 << 20), &[]).await;
    let mut h = write10(2, first.wrapping_add(1), 64, IMMEDIATE);
    h[1] = 0x20; // write, no F bit: Data-Out follows
    send(&mut s, &mut wire, h, &[]).await;
    let mut data_out = common::header(0x05);
    data_out[16..20].copy_from_slice(&2u32.to_be_bytes());
    data_out[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    send(&mut s, &mut wire, data_out, &vec![0x5a; IMMEDIATE as usize]).await;
    let answers = statuses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(answers, vec![(2, TASK_SET_FULL)], "the write is refused, not parked without its data");
}

/// An initiator that sends NOP-Outs with 64 KiB of data each and never reads the echoes:
/// the target stops reading once about a FLOOR (1 MiB) of them wait unsent, where before it
/// held 16 MiB (its outbox limit) outside the budget.
async fn nop_outs_never_read(addr: &str) {
    let (mut s, first) = login(addr).await;
    let before = settled().await;
    let mut wire = Vec::with_capacity(64 << 10);
    let data = vec![0x6b; 64 << 10];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        for i in 0..512u32 {
            let mut h = common::header(0x00);
            h[16..20].copy_from_slice(&i.to_be_bytes());
            h[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
            h[24..28].copy_from_slice(&first.wrapping_add(i).to_be_bytes());
            h[0] |= 0x40; // immediate: no CmdSN of its own
            send(&mut s, &mut wire, h, &data).await;
        }
    })
    .await;
    let held = settled().await - before;
    eprintln!("NOP-Outs never read: {} KiB held", held >> 10);
    assert!(held < (1 << 20) + SLACK, "{} KiB held for NOP-In echoes", held >> 10);
}

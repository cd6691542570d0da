//! Whole-command tests: CDB bytes in, status and sense out, against memory devices.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use proptest::prelude::*;
use strata_block::{BlockIo, MemDevice};

use crate::cdb::op;
use crate::{
    Command, Directory, Identity, LogicalUnit, LunMap, Nexus, Outcome, ReservationStore, Reset, Status,
};

mod emulation;

/// A store that remembers every save and can be told to fail.
#[derive(Default)]
struct FakeStore {
    saved: Mutex<Vec<Bytes>>,
    fail: AtomicBool,
}

#[async_trait]
impl ReservationStore for FakeStore {
    async fn save(&self, state: Bytes) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.fail.load(Ordering::Relaxed) {
            return Err("store is down".into());
        }
        self.saved.lock().push(state);
        Ok(())
    }
}

impl FakeStore {
    fn last(&self) -> Option<Bytes> {
        self.saved.lock().last().cloned()
    }
}

fn identity(n: u8) -> Identity {
    let mut naa = [0u8; 16];
    naa[0] = 0x60;
    naa[15] = n;
    Identity {
        vendor: "STRATA".into(),
        product: "VOLUME".into(),
        revision: "0001".into(),
        serial: format!("vol-{n}"),
        naa,
        target_port_group: 1,
        read_only: false,
    }
}

struct Fixture {
    lu: Arc<LogicalUnit>,
    device: Arc<MemDevice>,
    store: Arc<FakeStore>,
    directory: Arc<Directory>,
}

fn fixture_with(blocks: u64, block_size: u32, n: u8, directory: Arc<Directory>) -> Fixture {
    let device = MemDevice::new(format!("m{n}"), blocks * u64::from(block_size), block_size);
    let store = Arc::new(FakeStore::default());
    let lu = LogicalUnit::new(device.clone(), identity(n), None, store.clone(), directory.clone()).unwrap();
    let lu = Arc::new(lu);
    directory.insert(&lu);
    Fixture { lu, device, store, directory }
}

/// A 512e LU of `blocks` 512-byte logical blocks over a device of 4 KiB blocks.
fn fixture_512e(blocks: u64, n: u8, directory: Arc<Directory>) -> Fixture {
    let device = MemDevice::new(format!("e{n}"), blocks * 512, 4096);
    let store = Arc::new(FakeStore::default());
    let lu = LogicalUnit::new(device.clone(), identity(n), None, store.clone(), directory.clone()).unwrap();
    let lu = Arc::new(lu.with_logical_block_size(512).unwrap());
    directory.insert(&lu);
    Fixture { lu, device, store, directory }
}

fn fixture() -> Fixture {
    fixture_with(1024, 512, 1, Arc::new(Directory::new()))
}

fn nexus(i: u8) -> Nexus {
    Nexus {
        initiator_port: format!("iqn.2024-01.test:init{i},i,0x23d00000000{i}"),
        initiator_name: format!("iqn.2024-01.test:init{i}"),
        target_port: "iqn.2024-01.strata:target,t,0x0001".into(),
        relative_port: 1,
    }
}

async fn run(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data: &[u8]) -> Outcome {
    let command = Command {
        cdb: Bytes::copy_from_slice(cdb),
        data_out: Bytes::copy_from_slice(data),
        allocation: 1 << 20,
    };
    lu.execute(n, &command).await
}

/// (sense key, ASC, ASCQ) of a CHECK CONDITION in either format.
fn sense(o: &Outcome) -> (u8, u8, u8) {
    assert_eq!(o.status, Status::CheckCondition, "expected CHECK CONDITION");
    let s = o.sense.as_ref().expect("sense data");
    if s[0] & 0x7F >= 0x72 { (s[1] & 0x0F, s[2], s[3]) } else { (s[2] & 0x0F, s[12], s[13]) }
}

fn good(o: &Outcome) -> &Bytes {
    assert_eq!(o.status, Status::Good, "sense {:?}", o.sense);
    &o.data
}

fn cdb16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn caw(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = cdb16(op::COMPARE_AND_WRITE, lba, 0);
    c[13] = blocks;
    c
}

fn prout(sa: u8, kind: u8, key: u64, sa_key: u64, aptpl: bool) -> ([u8; 10], [u8; 24]) {
    let mut c = [0u8; 10];
    c[0] = op::PERSISTENT_RESERVE_OUT;
    c[1] = sa;
    c[2] = kind;
    c[8] = 24;
    let mut p = [0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    (c, p)
}

fn prin(sa: u8) -> [u8; 10] {
    [op::PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, 0x10, 0, 0]
}

async fn pr(lu: &LogicalUnit, n: &Nexus, sa: u8, kind: u8, key: u64, sa_key: u64) -> Outcome {
    let (c, p) = prout(sa, kind, key, sa_key, false);
    run(lu, n, &c, &p).await
}

const READ: [u8; 10] = [op::READ_10, 0, 0, 0, 0, 1, 0, 0, 1, 0];
const WRITE: [u8; 10] = [op::WRITE_10, 0, 0, 0, 0, 1, 0, 0, 1, 0];
const TUR: [u8; 6] = [0; 6];

#[tokio::test]
async fn read_write_round_trip_and_fua() {
    let f = fixture();
    let n = nexus(1);
    let data: Vec<u8> = (0..2048u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
    good(&run(&f.lu, &n, &cdb16(op::WRITE_16, 10, 4), &data).await);
    assert_eq!(&good(&run(&f.lu, &n, &cdb16(op::READ_16, 10, 4), &[]).await)[..], &data[..]);
    let mut fua = cdb16(op::WRITE_16, 20, 1);
    fua[1] = 0x08;
    good(&run(&f.lu, &n, &fua, &data[..512]).await);
    assert_eq!(f.device.read(20 * 512, 512).await.unwrap(), &data[..512]);
    // READ(6) of "0 blocks" is 256 blocks.
    assert_eq!(good(&run(&f.lu, &n, &[op::READ_6, 0, 0, 0, 0, 0], &[]).await).len(), 256 * 512);
}

#[tokio::test]
async fn short_data_out_writes_whole_blocks_and_extra_is_ignored() {
    let f = fixture();
    let n = nexus(1);
    good(&run(&f.lu, &n, &cdb16(op::WRITE_16, 0, 2), &[b'a'; 1024]).await);
    // Two blocks asked, one and a half sent: one block written.
    good(&run(&f.lu, &n, &cdb16(op::WRITE_16, 0, 2), &[b'b'; 768]).await);
    let back = good(&run(&f.lu, &n, &cdb16(op::READ_16, 0, 2), &[]).await).clone();
    assert!(back[..512].iter().all(|&b| b == b'b') && back[512..].iter().all(|&b| b == b'a'));
    // One block asked, two sent: one written.
    good(&run(&f.lu, &n, &cdb16(op::WRITE_16, 0, 1), &[b'c'; 1024]).await);
    let back = good(&run(&f.lu, &n, &cdb16(op::READ_16, 0, 2), &[]).await).clone();
    assert!(back[..512].iter().all(|&b| b == b'c') && back[512..].iter().all(|&b| b == b'a'));
    assert_eq!(f.lu.data_out_length(&cdb16(op::WRITE_16, 0, 2)), 1024);
}

#[tokio::test]
async fn data_in_length_is_what_a_command_can_produce() {
    let f = fixture();
    let mut luns = LunMap::new();
    luns.insert(0, f.lu.clone());
    // A read produces its blocks whatever the transport expects; one past MAXIMUM
    // TRANSFER LENGTH is refused and produces none.
    assert_eq!(f.lu.data_in_length(&cdb16(op::READ_16, 0, 2)), 1024);
    let max = u32::try_from(crate::block::MAX_TRANSFER_BYTES / 512).unwrap();
    assert_eq!(f.lu.data_in_length(&cdb16(op::READ_16, 0, max)), 8 << 20);
    assert_eq!(f.lu.data_in_length(&cdb16(op::READ_16, 0, max + 1)), 0);
    assert_eq!(f.lu.data_in_length(&cdb16(op::WRITE_16, 0, 2)), 0);
    // Parameter data: its allocation length, but not the 4 GiB a CDB may ask for.
    assert_eq!(f.lu.data_in_length(&[op::INQUIRY, 0, 0, 0, 96, 0]), 96);
    let report = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0];
    assert_eq!(f.lu.data_in_length(&report), crate::cdb::PARAMETER_DATA_LIMIT);
    let produced = run(&f.lu, &nexus(1), &[op::INQUIRY, 1, 0x83, 0xff, 0xff, 0], &[]).await;
    assert!(good(&produced).len() as u64 <= crate::cdb::PARAMETER_DATA_LIMIT);
    // One parse for both directions; a LUN with no LU reads no blocks.
    let write = crate::transfer(&luns, 0, &cdb16(op::WRITE_16, 0, 3));
    assert_eq!(write, crate::Transfer { data_in: 0, data_out: 1536 });
    assert_eq!(crate::transfer(&luns, 0, &cdb16(op::READ_16, 0, 3)).data_in, 1536);
    assert_eq!(crate::transfer(&luns, 5, &cdb16(op::READ_16, 0, 3)), crate::Transfer::default());
    assert_eq!(crate::transfer(&luns, 5, &[op::INQUIRY, 0, 0, 0, 36, 0]).data_in, 36);
}

#[tokio::test]
async fn out_of_range_and_protection_fields() {
    let f = fixture();
    let n = nexus(1);
    assert_eq!(sense(&run(&f.lu, &n, &cdb16(op::READ_16, 1023, 2), &[]).await), (5, 0x21, 0));
    assert_eq!(sense(&run(&f.lu, &n, &cdb16(op::READ_16, u64::MAX, 1), &[]).await), (5, 0x21, 0));
    assert_eq!(sense(&run(&f.lu, &n, &cdb16(op::WRITE_16, 1025, 0), &[]).await), (5, 0x21, 0));
    good(&run(&f.lu, &n, &cdb16(op::READ_16, 1024, 0), &[]).await);
    let mut rdprotect = cdb16(op::READ_16, 0, 1);
    rdprotect[1] = 0x20;
    assert_eq!(sense(&run(&f.lu, &n, &rdprotect, &[]).await), (5, 0x24, 0));
}

#[tokio::test]
async fn compare_and_write_matches_and_miscompares() {
    let f = fixture();
    let n = nexus(1);
    good(&run(&f.lu, &n, &cdb16(op::WRITE_16, 5, 2), &[b'A'; 1024]).await);
    let mut data = vec![b'A'; 1024];
    data.extend_from_slice(&[b'B'; 1024]);
    good(&run(&f.lu, &n, &caw(5, 2), &data).await);
    assert!(good(&run(&f.lu, &n, &cdb16(op::READ_16, 5, 2), &[]).await).iter().all(|&b| b == b'B'));
    // Compare data 'A' no longer matches: miscompare at offset 0, nothing written.
    let o = run(&f.lu, &n, &caw(5, 2), &data).await;
    assert_eq!(sense(&o), (0x0E, 0x1D, 0));
    assert_eq!(&o.sense.as_ref().unwrap()[3..7], &[0, 0, 0, 0]);
    let mut late = vec![b'B'; 1024];
    late[1000] = b'x';
    late.extend_from_slice(&[b'C'; 1024]);
    let o = run(&f.lu, &n, &caw(5, 2), &late).await;
    assert_eq!(sense(&o), (0x0E, 0x1D, 0));
    assert_eq!(u32::from_be_bytes(o.sense.as_ref().unwrap()[3..7].try_into().unwrap()), 1000);
    assert!(good(&run(&f.lu, &n, &cdb16(op::READ_16, 5, 2), &[]).await).iter().all(|&b| b == b'B'));
    // Data-out of the wrong size is refused.
    assert_eq!(sense(&run(&f.lu, &n, &caw(5, 1), &data).await).1, 0x24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_is_atomic_against_concurrent_writers() {
    let f = fixture();
    let per_task = 100u64;
    let mut tasks = Vec::new();
    for t in 0..2u8 {
        let lu = f.lu.clone();
        tasks.push(tokio::spawn(async move {
            let n = nexus(t);
            let mut done = 0;
            while done < per_task {
                let current = good(&run(&lu, &n, &cdb16(op::READ_16, 0, 1), &[]).await).clone();
                let value = u64::from_le_bytes(current[..8].try_into().unwrap());
                let mut data = current.to_vec();
                let mut next = current.to_vec();
                next[..8].copy_from_slice(&(value + 1).to_le_bytes());
                data.extend_from_slice(&next);
                let o = run(&lu, &n, &caw(0, 1), &data).await;
                if o.status == Status::Good {
                    done += 1;
                } else {
                    assert_eq!(sense(&o).0, 0x0E);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let block = f.device.read(0, 512).await.unwrap();
    assert_eq!(u64::from_le_bytes(block[..8].try_into().unwrap()), 2 * per_task);
}

#[tokio::test]
async fn write_same_unmap_and_lba_status() {
    let f = fixture();
    let n = nexus(1);
    let mut ws = cdb16(op::WRITE_SAME_16, 100, 8);
    good(&run(&f.lu, &n, &ws, &[0x5A; 512]).await);
    assert!(good(&run(&f.lu, &n, &cdb16(op::READ_16, 100, 8), &[]).await).iter().all(|&b| b == 0x5A));
    // UNMAP=1 discards whatever the data says (LBPRZ=1: reads as zeroes).
    ws[1] = 0x08;
    good(&run(&f.lu, &n, &ws, &[0xFF; 512]).await);
    assert!(good(&run(&f.lu, &n, &cdb16(op::READ_16, 100, 8), &[]).await).iter().all(|&b| b == 0));
    // ANCHOR is not supported; data-out must be exactly one block.
    ws[1] = 0x18;
    assert_eq!(sense(&run(&f.lu, &n, &ws, &[0; 512]).await).1, 0x24);
    ws[1] = 0;
    assert_eq!(sense(&run(&f.lu, &n, &ws, &[0; 256]).await).1, 0x24);
    // UNMAP with one descriptor, then past the end.
    good(&run(&f.lu, &n, &cdb16(op::WRITE_16, 0, 4), &[1; 2048]).await);
    let unmap = [op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    let mut list = [0u8; 24];
    list[1] = 22;
    list[3] = 16;
    list[16..20].copy_from_slice(&2u32.to_be_bytes());
    good(&run(&f.lu, &n, &unmap, &list).await);
    assert!(good(&run(&f.lu, &n, &cdb16(op::READ_16, 0, 2), &[]).await).iter().all(|&b| b == 0));
    list[8..16].copy_from_slice(&1023u64.to_be_bytes());
    assert_eq!(sense(&run(&f.lu, &n, &unmap, &list).await), (5, 0x21, 0));
    // GET LBA STATUS: memory devices report everything mapped.
    let mut gls = cdb16(op::SERVICE_ACTION_IN_16, 7, 24);
    gls[1] = 0x12;
    let d = good(&run(&f.lu, &n, &gls, &[]).await).clone();
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 7);
    assert_eq!((u32::from_be_bytes(d[16..20].try_into().unwrap()), d[20]), (1017, 0));
    let mut beyond = cdb16(op::SERVICE_ACTION_IN_16, 1024, 24);
    beyond[1] = 0x12;
    assert_eq!(sense(&run(&f.lu, &n, &beyond, &[]).await), (5, 0x21, 0));
}

#[tokio::test]
async fn verify_compares_and_reports_the_offset() {
    let f = fixture();
    let n = nexus(1);
    good(&run(&f.lu, &n, &cdb16(op::WRITE_16, 0, 2), &[7; 1024]).await);
    let mut verify = cdb16(op::VERIFY_16, 0, 2);
    verify[1] = 0x02;
    good(&run(&f.lu, &n, &verify, &[7; 1024]).await);
    let mut bad = [7u8; 1024];
    bad[700] = 8;
    let o = run(&f.lu, &n, &verify, &bad).await;
    assert_eq!(sense(&o), (0x0E, 0x1D, 0));
    assert_eq!(u32::from_be_bytes(o.sense.as_ref().unwrap()[3..7].try_into().unwrap()), 700);
    // BYTCHK=3: every block against the one block sent.
    verify[1] = 0x06;
    good(&run(&f.lu, &n, &verify, &[7; 512]).await);
}

#[tokio::test]
async fn persistent_reservations_per_type_and_conflicts() {
    for (kind, reg_read, reg_write, unreg_read, unreg_write) in [
        (3u8, false, false, false, false),
        (1, true, false, true, false),
        (6, true, true, false, false),
        (5, true, true, true, false),
        (8, true, true, false, false),
        (7, true, true, true, false),
    ] {
        let f = fixture();
        let (a, b, c) = (nexus(1), nexus(2), nexus(3));
        good(&pr(&f.lu, &a, 0x06, 0, 0, 0xAA).await);
        good(&pr(&f.lu, &b, 0x06, 0, 0, 0xBB).await);
        good(&pr(&f.lu, &a, 0x01, kind, 0xAA, 0).await);
        let rr = good(&run(&f.lu, &a, &prin(1), &[]).await).clone();
        assert_eq!(rr[21], kind);
        let all = kind >= 7;
        assert_eq!(u64::from_be_bytes(rr[8..16].try_into().unwrap()), if all { 0 } else { 0xAA });
        good(&run(&f.lu, &a, &READ, &[]).await);
        good(&run(&f.lu, &a, &WRITE, &[0; 512]).await);
        let allowed = |o: &Outcome| match o.status {
            Status::Good => true,
            Status::ReservationConflict => false,
            s => panic!("type {kind}: {s:?}"),
        };
        assert_eq!(allowed(&run(&f.lu, &b, &READ, &[]).await), reg_read, "type {kind}");
        assert_eq!(allowed(&run(&f.lu, &b, &WRITE, &[0; 512]).await), reg_write, "type {kind}");
        assert_eq!(allowed(&run(&f.lu, &c, &READ, &[]).await), unreg_read, "type {kind}");
        assert_eq!(allowed(&run(&f.lu, &c, &WRITE, &[0; 512]).await), unreg_write, "type {kind}");
        // Everyone may still ask who holds what.
        good(&run(&f.lu, &c, &prin(0), &[]).await);
        good(&run(&f.lu, &c, &TUR, &[]).await);
        // A second reservation by a non-holder conflicts; the holder's release ends it.
        assert_eq!(pr(&f.lu, &b, 0x01, 1, 0xBB, 0).await.status, Status::ReservationConflict);
        assert_eq!(
            sense(&pr(&f.lu, &a, 0x02, if kind == 1 { 3 } else { 1 }, 0xAA, 0).await),
            (5, 0x26, 0x04)
        );
        good(&pr(&f.lu, &a, 0x02, kind, 0xAA, 0).await);
        assert_eq!(good(&run(&f.lu, &a, &prin(1), &[]).await)[4..8], [0, 0, 0, 0]);
        good(&run(&f.lu, &c, &WRITE, &[0; 512]).await);
    }
}

#[tokio::test]
async fn register_conflicts_preempt_and_generation() {
    let f = fixture();
    let (a, b) = (nexus(1), nexus(2));
    good(&pr(&f.lu, &a, 0x06, 0, 0, 0x11).await);
    assert_eq!(pr(&f.lu, &a, 0x00, 0, 0, 0x12).await.status, Status::ReservationConflict);
    good(&pr(&f.lu, &b, 0x06, 0, 0, 0x22).await);
    let keys = good(&run(&f.lu, &a, &prin(0), &[]).await).clone();
    let generation = u32::from_be_bytes(keys[0..4].try_into().unwrap());
    assert_eq!(u32::from_be_bytes(keys[4..8].try_into().unwrap()), 16);
    good(&pr(&f.lu, &b, 0x04, 3, 0x22, 0x11).await);
    // The preempted nexus hears of it once, then carries on unregistered.
    assert_eq!(sense(&run(&f.lu, &a, &TUR, &[]).await), (6, 0x2A, 0x05));
    good(&run(&f.lu, &a, &TUR, &[]).await);
    let keys = good(&run(&f.lu, &a, &prin(0), &[]).await).clone();
    assert_eq!(u32::from_be_bytes(keys[0..4].try_into().unwrap()), generation + 1);
    assert_eq!(&keys[4..16], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0x22]);
    // REPORT CAPABILITIES: every type, persist through power loss capable.
    let caps = good(&run(&f.lu, &a, &prin(2), &[]).await).clone();
    assert_eq!((&caps[0..2], caps[2] & 0x01, &caps[4..6]), (&[0u8, 8][..], 1, &[0xEAu8, 0x01][..]));
    // READ FULL STATUS: one descriptor with an iSCSI TransportID.
    let full = good(&run(&f.lu, &a, &prin(3), &[]).await).clone();
    assert_eq!(u64::from_be_bytes(full[8..16].try_into().unwrap()), 0x22);
    assert_eq!(full[32] & 0x0F, 0x05);
    // An unknown PR IN service action is refused.
    assert_eq!(sense(&run(&f.lu, &a, &prin(4), &[]).await), (5, 0x24, 0));
}

#[tokio::test]
async fn aptpl_state_round_trips_through_the_store() {
    let f = fixture();
    let (a, b) = (nexus(1), nexus(2));
    let (c, p) = prout(0x06, 0, 0, 0xA1, true);
    good(&run(&f.lu, &a, &c, &p).await);
    // APTPL belongs to the LU: the latest REGISTER sets it.
    let (c, p) = prout(0x06, 0, 0, 0xB2, true);
    good(&run(&f.lu, &b, &c, &p).await);
    good(&pr(&f.lu, &a, 0x01, 5, 0xA1, 0).await);
    let saved = f.store.last().expect("APTPL state saved");
    assert!(!saved.is_empty());
    // A restart: a new LU from what was saved keeps the registrations and reservation.
    let again =
        LogicalUnit::new(f.device.clone(), identity(1), Some(&saved), f.store.clone(), f.directory.clone())
            .unwrap();
    let rr = good(&run(&again, &a, &prin(1), &[]).await).clone();
    assert_eq!((u64::from_be_bytes(rr[8..16].try_into().unwrap()), rr[21]), (0xA1, 5));
    assert_eq!(run(&again, &nexus(3), &WRITE, &[0; 512]).await.status, Status::ReservationConflict);
    good(&run(&again, &b, &WRITE, &[0; 512]).await);
    // APTPL=0 from now on: the store is emptied.
    let (c, p) = prout(0x00, 0, 0xA1, 0xA3, false);
    good(&run(&again, &a, &c, &p).await);
    assert_eq!(f.store.last().unwrap(), Bytes::new());
    // A failed save fails the command and changes nothing.
    f.store.fail.store(true, Ordering::Relaxed);
    let (c, p) = prout(0x06, 0, 0, 0xC3, true);
    assert_eq!(sense(&run(&again, &nexus(3), &c, &p).await), (4, 0x44, 0));
    assert_eq!(good(&run(&again, &a, &prin(0), &[]).await)[7], 16);
    // Garbage is refused with an error, not a panic.
    let bad =
        LogicalUnit::new(f.device.clone(), identity(1), Some(b"{nope"), f.store.clone(), f.directory.clone());
    assert!(matches!(bad, Err(crate::ScsiError::CorruptReservations(_))));
}

#[tokio::test]
async fn reserve6_conflicts_and_goes_with_its_nexus() {
    let f = fixture();
    let (a, b) = (nexus(1), nexus(2));
    let reserve = [op::RESERVE_6, 0, 0, 0, 0, 0];
    let release = [op::RELEASE_6, 0, 0, 0, 0, 0];
    good(&run(&f.lu, &a, &reserve, &[]).await);
    good(&run(&f.lu, &a, &reserve, &[]).await);
    assert_eq!(run(&f.lu, &b, &reserve, &[]).await.status, Status::ReservationConflict);
    assert_eq!(run(&f.lu, &b, &READ, &[]).await.status, Status::ReservationConflict);
    assert_eq!(
        run(&f.lu, &b, &[op::MODE_SENSE_6, 0, 0x3F, 0, 255, 0], &[]).await.status,
        Status::ReservationConflict
    );
    // INQUIRY passes; RELEASE from the other nexus is a no-op.
    good(&run(&f.lu, &b, &[op::INQUIRY, 0, 0, 0, 255, 0], &[]).await);
    good(&run(&f.lu, &b, &release, &[]).await);
    assert_eq!(run(&f.lu, &b, &READ, &[]).await.status, Status::ReservationConflict);
    f.lu.nexus_lost(&a);
    good(&run(&f.lu, &b, &reserve, &[]).await);
    good(&run(&f.lu, &b, &release, &[]).await);
    good(&run(&f.lu, &a, &READ, &[]).await);
}

#[tokio::test]
async fn unit_attention_after_reset_reaches_every_nexus_once() {
    let f = fixture();
    let (a, b) = (nexus(1), nexus(2));
    good(&run(&f.lu, &a, &TUR, &[]).await);
    good(&run(&f.lu, &b, &TUR, &[]).await);
    good(&run(&f.lu, &a, &[op::RESERVE_6, 0, 0, 0, 0, 0], &[]).await);
    f.lu.reset(&a, Reset::LogicalUnit);
    // INQUIRY does not report or clear it.
    good(&run(&f.lu, &b, &[op::INQUIRY, 0, 0, 0, 255, 0], &[]).await);
    assert_eq!(sense(&run(&f.lu, &b, &READ, &[]).await), (6, 0x29, 0x03));
    good(&run(&f.lu, &b, &READ, &[]).await);
    // REQUEST SENSE returns it as data and clears it.
    let rs = good(&run(&f.lu, &a, &[op::REQUEST_SENSE, 0, 0, 0, 252, 0], &[]).await).clone();
    assert_eq!((rs[2], rs[12], rs[13]), (6, 0x29, 0x03));
    good(&run(&f.lu, &a, &TUR, &[]).await);
    // The reset ended the RESERVE(6).
    good(&run(&f.lu, &b, &[op::RESERVE_6, 0, 0, 0, 0, 0], &[]).await);
    f.lu.reset(&a, Reset::TargetWarm);
    assert_eq!(sense(&run(&f.lu, &a, &TUR, &[]).await), (6, 0x29, 0x00));
}

#[tokio::test]
async fn mode_select_swp_write_protects_and_d_sense_switches_format() {
    let f = fixture();
    let (a, b) = (nexus(1), nexus(2));
    good(&run(&f.lu, &b, &TUR, &[]).await);
    let current = good(&run(&f.lu, &a, &[op::MODE_SENSE_6, 0x08, 0x0A, 0, 255, 0], &[]).await).clone();
    assert_eq!((current[3], current[4], current[5]), (0, 0x0A, 0x0A));
    let mut select = vec![0u8; 4];
    select.extend_from_slice(&current[4..]);
    select[4 + 4] |= 0x08;
    let cdb = [op::MODE_SELECT_6, 0x10, 0, 0, u8::try_from(select.len()).unwrap(), 0];
    good(&run(&f.lu, &a, &cdb, &select).await);
    assert_eq!(sense(&run(&f.lu, &a, &WRITE, &[0; 512]).await), (7, 0x27, 0x02));
    good(&run(&f.lu, &a, &READ, &[]).await);
    let all = good(&run(&f.lu, &a, &[op::MODE_SENSE_6, 0, 0x3F, 0, 255, 0], &[]).await).clone();
    assert_eq!(all[2] & 0x90, 0x90, "WP and DPOFUA");
    assert_eq!(sense(&run(&f.lu, &b, &TUR, &[]).await), (6, 0x2A, 0x01));
    // A bit that is not changeable is refused; then SWP off and D_SENSE on.
    let mut wrong = select.clone();
    wrong[4 + 3] ^= 0x01;
    assert_eq!(sense(&run(&f.lu, &a, &cdb, &wrong).await), (5, 0x26, 0));
    select[4 + 4] &= !0x08;
    select[4 + 2] |= 0x04;
    good(&run(&f.lu, &a, &cdb, &select).await);
    good(&run(&f.lu, &a, &WRITE, &[0; 512]).await);
    let o = run(&f.lu, &a, &cdb16(op::READ_16, u64::MAX, 1), &[]).await;
    assert_eq!(o.sense.as_ref().unwrap()[0], 0x72);
    assert_eq!(sense(&o), (5, 0x21, 0));
    // Saved values are not supported.
    assert_eq!(sense(&run(&f.lu, &a, &[op::MODE_SENSE_6, 0, 0xCA, 0, 255, 0], &[]).await), (5, 0x39, 0));
}

#[tokio::test]
async fn unknown_opcodes_and_short_cdbs_are_illegal_requests() {
    let f = fixture();
    let n = nexus(1);
    let o = run(&f.lu, &n, &[0xC5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense(&o), (5, 0x20, 0));
    assert_eq!(sense(&run(&f.lu, &n, &[op::READ_16, 0, 0], &[]).await), (5, 0x24, 0));
    assert_eq!(sense(&run(&f.lu, &n, &[], &[]).await), (5, 0x24, 0));
    // Unknown service actions point at byte 1 (hosts read that as "not implemented").
    let o = run(&f.lu, &n, &[op::MAINTENANCE_IN, 0x1F, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await;
    assert_eq!(sense(&o), (5, 0x24, 0));
    assert_eq!(&o.sense.as_ref().unwrap()[15..18], &[0xCC, 0, 1]);
}

#[tokio::test]
async fn inquiry_pages_and_capacity() {
    let f = fixture();
    let n = nexus(1);
    let std = good(&run(&f.lu, &n, &[op::INQUIRY, 0, 0, 1, 4, 0], &[]).await).clone();
    assert_eq!((std[2], std[3], usize::from(std[4]) + 5, std[5] & 0x30), (6, 0x12, std.len(), 0x10));
    assert_eq!(&std[8..16], b"STRATA  ");
    let pages = good(&run(&f.lu, &n, &[op::INQUIRY, 1, 0, 0, 255, 0], &[]).await).clone();
    for &page in &pages[4..] {
        let p = good(&run(&f.lu, &n, &[op::INQUIRY, 1, page, 0, 255, 0], &[]).await).clone();
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])) + 4, p.len(), "page {page:#x}");
    }
    let id = good(&run(&f.lu, &n, &[op::INQUIRY, 1, 0x83, 0, 255, 0], &[]).await).clone();
    assert_eq!(&id[4..8], &[0x01, 0x03, 0x00, 0x10]);
    assert_eq!(&id[8..24], &identity(1).naa);
    assert_eq!(sense(&run(&f.lu, &n, &[op::INQUIRY, 0, 1, 0, 255, 0], &[]).await), (5, 0x24, 0));
    // The allocation length cuts the data.
    assert_eq!(good(&run(&f.lu, &n, &[op::INQUIRY, 0, 0, 0, 5, 0], &[]).await).len(), 5);
    let mut rc16 = cdb16(op::SERVICE_ACTION_IN_16, 0, 32);
    rc16[1] = 0x10;
    let cap = good(&run(&f.lu, &n, &rc16, &[]).await).clone();
    assert_eq!((u64::from_be_bytes(cap[0..8].try_into().unwrap()), cap[14] & 0xC0), (1023, 0xC0));
    let rc10 = good(&run(&f.lu, &n, &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await).clone();
    assert_eq!(&rc10[..], &[0, 0, 3, 0xFF, 0, 0, 2, 0]);
}

#[tokio::test]
async fn extended_copy_between_lus_found_through_the_directory() {
    let directory = Arc::new(Directory::new());
    let src = fixture_with(1024, 512, 1, directory.clone());
    let dst = fixture_with(512, 512, 2, directory.clone());
    let n = nexus(1);
    good(&run(&src.lu, &n, &cdb16(op::WRITE_16, 0, 16), &[0x3C; 16 * 512]).await);
    let target = |naa: [u8; 16]| {
        let mut d = vec![0xE4, 0, 0, 0, 0x01, 0x03, 0x00, 0x10];
        d.extend_from_slice(&naa);
        d.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x02, 0x00]);
        d
    };
    let mut list = vec![7u8, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 0];
    list.extend(target(identity(1).naa));
    list.extend(target(identity(2).naa));
    let mut seg = vec![0x02, 0, 0, 0x18, 0, 0, 0, 1, 0, 0, 0, 16];
    seg.extend_from_slice(&0u64.to_be_bytes());
    seg.extend_from_slice(&100u64.to_be_bytes());
    list.extend(&seg);
    let mut xcopy = [0u8; 16];
    xcopy[0] = op::EXTENDED_COPY;
    xcopy[10..14].copy_from_slice(&u32::try_from(list.len()).unwrap().to_be_bytes());
    good(&run(&src.lu, &n, &xcopy, &list).await);
    assert!(dst.device.read(100 * 512, 16 * 512).await.unwrap().iter().all(|&b| b == 0x3C));
    let mut status = [0u8; 16];
    status[0] = op::RECEIVE_COPY_RESULTS;
    status[2] = 7;
    status[13] = 64;
    let s = good(&run(&src.lu, &n, &status, &[]).await).clone();
    assert_eq!((s[4], u16::from_be_bytes([s[5], s[6]])), (1, 1));
    status[2] = 8;
    assert_eq!(sense(&run(&src.lu, &n, &status, &[]).await), (5, 0x24, 0));
    // A LU that is gone from the directory cannot be reached.
    directory.remove(&identity(2).naa);
    assert_eq!(sense(&run(&src.lu, &n, &xcopy, &list).await), (0x0A, 0x0D, 0x02));
    // A destination past the end aborts before anything moves.
    directory.insert(&dst.lu);
    list[16 + 64 + 20..16 + 64 + 28].copy_from_slice(&510u64.to_be_bytes());
    assert_eq!(sense(&run(&src.lu, &n, &xcopy, &list).await).0, 0x0A);
}

#[tokio::test]
async fn sanitize_overwrites_and_blocks_other_commands_meanwhile() {
    let f = fixture_with(64, 512, 1, Arc::new(Directory::new()));
    let n = nexus(1);
    let mut params = vec![0x01, 0, 0, 4];
    params.extend_from_slice(&[1, 2, 3, 4]);
    let sanitize = [op::SANITIZE, 0x01, 0, 0, 0, 0, 0, 0, 8, 0];
    good(&run(&f.lu, &n, &sanitize, &params).await);
    let block = good(&run(&f.lu, &n, &cdb16(op::READ_16, 63, 1), &[]).await).clone();
    assert_eq!(&block[..8], &[1, 2, 3, 4, 1, 2, 3, 4]);
    // Block erase with a parameter list, and unknown service actions, are refused.
    assert_eq!(sense(&run(&f.lu, &n, &[op::SANITIZE, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], &[0; 8]).await).1, 0x24);
    assert_eq!(sense(&run(&f.lu, &n, &[op::SANITIZE, 0x04, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await).1, 0x24);
    // IMMED: the erase runs on; meanwhile only INQUIRY, REPORT LUNS, REQUEST SENSE work.
    let big = fixture_with(8192, 4096, 2, Arc::new(Directory::new()));
    let mut params = vec![0x01, 0, 0x10, 0];
    params.extend_from_slice(&[0xAB; 4096]);
    good(&run(&big.lu, &n, &[op::SANITIZE, 0x81, 0, 0, 0, 0, 0, 0x10, 0x04, 0], &params).await);
    assert_eq!(sense(&run(&big.lu, &n, &TUR, &[]).await), (2, 0x04, 0x1B));
    good(&run(&big.lu, &n, &[op::INQUIRY, 0, 0, 0, 255, 0], &[]).await);
    let rs = good(&run(&big.lu, &n, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], &[]).await).clone();
    assert_eq!((rs[12], rs[13], rs[15]), (0x04, 0x1B, 0x80));
    while run(&big.lu, &n, &TUR, &[]).await.status != Status::Good {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(good(&run(&big.lu, &n, &cdb16(op::READ_16, 8191, 1), &[]).await).iter().all(|&b| b == 0xAB));
}

#[tokio::test]
async fn removable_medium_ejects_unless_prevented() {
    let f = fixture();
    let lu = LogicalUnit::new(f.device.clone(), identity(9), None, f.store.clone(), f.directory.clone())
        .unwrap()
        .with_removable_medium(true);
    let (a, b) = (nexus(1), nexus(2));
    let eject = [op::START_STOP_UNIT, 0, 0, 0, 0x02, 0];
    let load = [op::START_STOP_UNIT, 0, 0, 0, 0x03, 0];
    good(&run(&lu, &a, &[op::PREVENT_ALLOW, 0, 0, 0, 1, 0], &[]).await);
    assert_eq!(sense(&run(&lu, &b, &eject, &[]).await), (5, 0x53, 0x02));
    lu.nexus_lost(&a);
    good(&run(&lu, &b, &eject, &[]).await);
    assert_eq!(sense(&run(&lu, &b, &TUR, &[]).await), (2, 0x3A, 0));
    assert_eq!(sense(&run(&lu, &b, &READ, &[]).await), (2, 0x3A, 0));
    good(&run(&lu, &b, &[op::INQUIRY, 0, 0, 0, 255, 0], &[]).await);
    good(&run(&lu, &b, &load, &[]).await);
    good(&run(&lu, &b, &TUR, &[]).await);
    // A power condition leaves the medium alone.
    good(&run(&lu, &b, &[op::START_STOP_UNIT, 1, 0, 0, 0x32, 0], &[]).await);
    good(&run(&lu, &b, &TUR, &[]).await);
}

#[tokio::test]
async fn report_luns_and_absent_luns() {
    let f = fixture();
    let mut luns = LunMap::new();
    luns.insert(3, f.lu.clone());
    luns.insert(300, f.lu.clone());
    let n = nexus(1);
    let command =
        |cdb: &[u8]| Command { cdb: Bytes::copy_from_slice(cdb), data_out: Bytes::new(), allocation: 4096 };
    let report = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    for lun in [0, 3, 7] {
        let o = crate::execute(&luns, lun, &n, &command(&report)).await;
        assert_eq!(
            &good(&o)[..],
            &[0, 0, 0, 16, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0x41, 0x2C, 0, 0, 0, 0, 0, 0]
        );
    }
    let o = crate::execute(&luns, 0, &n, &command(&[op::INQUIRY, 0, 0, 0, 96, 0])).await;
    assert_eq!(good(&o)[0], 0x7F);
    let o = crate::execute(&luns, 0, &n, &command(&[op::REQUEST_SENSE, 0, 0, 0, 18, 0])).await;
    assert_eq!((good(&o)[2], o.data[12]), (5, 0x25));
    assert_eq!(sense(&crate::execute(&luns, 0, &n, &command(&TUR)).await), (5, 0x25, 0));
    good(&crate::execute(&luns, 3, &n, &command(&TUR)).await);
}

#[tokio::test]
async fn report_supported_opcodes_lists_every_command() {
    let f = fixture();
    let n = nexus(1);
    let mut all = [op::MAINTENANCE_IN, 0x0C, 0x80, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0];
    let d = good(&run(&f.lu, &n, &all, &[]).await).clone();
    let len = usize::try_from(u32::from_be_bytes(d[0..4].try_into().unwrap())).unwrap();
    assert_eq!(len + 4, d.len());
    assert_eq!(len % 20, 0, "every descriptor carries a timeout descriptor");
    all[2] = 0;
    let d = good(&run(&f.lu, &n, &all, &[]).await).clone();
    // Every listed command is accepted by the parser.
    for desc in d[4..].chunks(8) {
        let mut cdb = vec![0u8; usize::from(u16::from_be_bytes([desc[6], desc[7]]))];
        cdb[0] = desc[0];
        if desc[5] & 1 != 0 {
            cdb[1] = desc[3];
        }
        let parsed = crate::parse(&cdb);
        assert!(parsed.is_ok() || parsed.unwrap_err().asc() != 0x20, "{:#x}", desc[0]);
    }
}

/// A memory device that reports all-zero blocks as holes, one span per call (a device
/// may describe only a prefix of what it is asked about).
struct Holey(Arc<MemDevice>);

#[async_trait]
impl BlockIo for Holey {
    fn geometry(&self) -> strata_block::Geometry {
        self.0.geometry()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, strata_block::IoError> {
        self.0.read(offset, len).await
    }
    async fn write(
        &self,
        offset: u64,
        data: Bytes,
        d: strata_block::Durability,
    ) -> Result<(), strata_block::IoError> {
        self.0.write(offset, data, d).await
    }
    async fn flush(&self) -> Result<(), strata_block::IoError> {
        self.0.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), strata_block::IoError> {
        self.0.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), strata_block::IoError> {
        self.0.write_zeroes(offset, len).await
    }
    async fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<strata_block::Span>, strata_block::IoError> {
        let bs = u64::from(self.geometry().block_size);
        let data = self.0.read(offset, len).await?;
        let bs = usize::try_from(bs).unwrap();
        let hole = |i: usize| data[i..i + bs].iter().all(|&b| b == 0);
        let first = hole(0);
        let mut span = 0;
        while span < data.len() && hole(span) == first {
            span += bs;
        }
        Ok(vec![strata_block::Span { len: span as u64, hole: first }])
    }
}

#[tokio::test]
async fn lba_status_covers_the_lu_even_when_the_device_answers_in_pieces() {
    let mem = MemDevice::new("holey", 256 * 512, 512);
    let device: Arc<dyn BlockIo> = Arc::new(Holey(mem.clone()));
    let store = Arc::new(FakeStore::default());
    let lu = LogicalUnit::new(device, identity(5), None, store, Arc::new(Directory::new())).unwrap();
    let n = nexus(1);
    good(&run(&lu, &n, &cdb16(op::WRITE_16, 10, 5), &[1; 5 * 512]).await);
    good(&run(&lu, &n, &cdb16(op::WRITE_16, 100, 1), &[1; 512]).await);
    let mut gls = cdb16(op::SERVICE_ACTION_IN_16, 0, 256);
    gls[1] = 0x12;
    let d = good(&run(&lu, &n, &gls, &[]).await).clone();
    let runs: Vec<(u64, u32, u8)> = d[8..]
        .chunks(16)
        .map(|c| {
            (
                u64::from_be_bytes(c[0..8].try_into().unwrap()),
                u32::from_be_bytes(c[8..12].try_into().unwrap()),
                c[12],
            )
        })
        .collect();
    assert_eq!(runs, vec![(0, 10, 1), (10, 5, 0), (15, 85, 1), (100, 1, 0), (101, 155, 1)]);
    // Block erase: afterwards one deallocated run covers the whole LU.
    good(&run(&lu, &n, &[op::SANITIZE, 0x02, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    let d = good(&run(&lu, &n, &gls, &[]).await).clone();
    assert_eq!(&d[..], &[0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0]);
    // A short allocation length still gets the first descriptor's LBA right.
    gls[10..14].copy_from_slice(&24u32.to_be_bytes());
    gls[2..10].copy_from_slice(&7u64.to_be_bytes());
    let d = good(&run(&lu, &n, &gls, &[]).await).clone();
    assert_eq!((d.len(), u64::from_be_bytes(d[8..16].try_into().unwrap())), (24, 7));
}

/// A command that takes a parameter list, with the CDB's length field set to `len`.
fn with_parameter_list(which: u8, sa: u8, len: usize) -> Vec<u8> {
    let len16 = u16::try_from(len.min(0xFFFF)).unwrap().to_be_bytes();
    let len32 = u32::try_from(len).unwrap().to_be_bytes();
    match which % 6 {
        0 => vec![op::UNMAP, 0, 0, 0, 0, 0, 0, len16[0], len16[1], 0],
        1 => vec![op::MODE_SELECT_6, 0x10, 0, 0, u8::try_from(len.min(255)).unwrap(), 0],
        2 => vec![op::MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, len16[0], len16[1], 0],
        3 => vec![
            op::PERSISTENT_RESERVE_OUT,
            sa & 0x07,
            sa >> 4,
            0,
            0,
            len32[0],
            len32[1],
            len32[2],
            len32[3],
            0,
        ],
        4 => {
            let mut c = vec![op::EXTENDED_COPY, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            c.extend_from_slice(&len32);
            c.extend_from_slice(&[0, 0]);
            c
        }
        _ => vec![
            op::SANITIZE,
            [0x01, 0x02, 0x03, 0x1F][usize::from(sa % 4)],
            0,
            0,
            0,
            0,
            0,
            len16[0],
            len16[1],
            0,
        ],
    }
}

fn opcode() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => prop::sample::select(vec![
            op::TEST_UNIT_READY, op::REQUEST_SENSE, op::READ_6, op::WRITE_6, op::INQUIRY, op::MODE_SELECT_6,
            op::RESERVE_6, op::RELEASE_6, op::MODE_SENSE_6, op::START_STOP_UNIT, op::PREVENT_ALLOW,
            op::READ_CAPACITY_10, op::READ_10, op::WRITE_10, op::WRITE_VERIFY_10, op::VERIFY_10, op::PRE_FETCH_10,
            op::SYNC_CACHE_10, op::READ_DEFECT_DATA_10, op::WRITE_SAME_10, op::UNMAP, op::SANITIZE,
            op::MODE_SELECT_10, op::RESERVE_10, op::RELEASE_10, op::MODE_SENSE_10, op::PERSISTENT_RESERVE_IN,
            op::PERSISTENT_RESERVE_OUT, op::EXTENDED_COPY, op::RECEIVE_COPY_RESULTS, op::READ_16,
            op::COMPARE_AND_WRITE, op::WRITE_16, op::ORWRITE_16, op::WRITE_VERIFY_16, op::VERIFY_16,
            op::PRE_FETCH_16, op::SYNC_CACHE_16, op::WRITE_SAME_16, op::WRITE_ATOMIC_16, op::SERVICE_ACTION_IN_16,
            op::REPORT_LUNS, op::MAINTENANCE_IN, op::READ_12, op::WRITE_12, op::WRITE_VERIFY_12, op::VERIFY_12,
            op::READ_DEFECT_DATA_12,
        ]),
        1 => any::<u8>(),
    ]
}

/// A field that is mostly small, so LBAs and lengths often land inside the device.
fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![3 => Just(0u8), 2 => 0u8..8, 1 => any::<u8>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_cdbs_and_data_never_panic(
        opcode in opcode(),
        rest in prop::collection::vec(byte(), 0..20),
        data in prop::collection::vec(any::<u8>(), 0..1100),
        allocation in any::<u32>(),
        lun in 0u64..3,
        emulated in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let f = if emulated {
            fixture_512e(16, 1, Arc::new(Directory::new()))
        } else {
            fixture_with(16, 512, 1, Arc::new(Directory::new()))
        };
        let mut luns = LunMap::new();
        luns.insert(0, f.lu.clone());
        let mut cdb = vec![opcode];
        cdb.extend(rest);
        let _ = crate::parse(&cdb);
        let command = Command { cdb: Bytes::from(cdb), data_out: Bytes::from(data), allocation };
        let o = rt.block_on(crate::execute(&luns, lun, &nexus(1), &command));
        prop_assert_eq!(o.sense.is_some(), o.status == Status::CheckCondition);
        if o.status != Status::Good {
            prop_assert!(o.data.is_empty());
        }
    }

    #[test]
    fn arbitrary_parameter_lists_never_panic(
        which in any::<u8>(),
        sa in any::<u8>(),
        data in prop::collection::vec(byte(), 0..700),
        emulated in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let f = if emulated {
            fixture_512e(16, 1, Arc::new(Directory::new()))
        } else {
            fixture_with(16, 512, 1, Arc::new(Directory::new()))
        };
        let cdb = with_parameter_list(which, sa, data.len());
        let command = Command { cdb: Bytes::from(cdb), data_out: Bytes::from(data), allocation: 4096 };
        let o = rt.block_on(f.lu.execute(&nexus(1), &command));
        prop_assert_eq!(o.sense.is_some(), o.status == Status::CheckCondition);
    }
}

#[tokio::test]
async fn a_device_out_of_space_is_space_allocation_failed_not_a_medium_error() {
    use strata_block::{FaultAction, FaultPlan, FaultRule, FaultyDevice, OpFilter};
    let mem = MemDevice::new("full", 64 * 512, 512);
    let device = FaultyDevice::new("full", mem, FaultPlan::default());
    let store = Arc::new(FakeStore::default());
    let lu = LogicalUnit::new(device.clone(), identity(6), None, store, Arc::new(Directory::new())).unwrap();
    let n = nexus(1);
    good(&run(&lu, &n, &cdb16(op::WRITE_16, 0, 2), &[5; 2 * 512]).await);
    let full = |ops| FaultPlan { seed: 0, rules: vec![FaultRule::always(ops, FaultAction::NoSpace)] };
    device.set_plan(full(OpFilter::Writes));
    // DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (SBC-3 thin provisioning).
    assert_eq!(sense(&run(&lu, &n, &cdb16(op::WRITE_16, 2, 1), &[6; 512]).await), (0x07, 0x27, 0x07));
    let mut write_same = cdb16(op::WRITE_SAME_16, 4, 4);
    write_same[1] = 0x08; // UNMAP
    assert_eq!(sense(&run(&lu, &n, &write_same, &[0; 512]).await), (0x07, 0x27, 0x07));
    device.set_plan(full(OpFilter::Flushes));
    assert_eq!(
        sense(&run(&lu, &n, &[op::SYNC_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await),
        (0x07, 0x27, 0x07)
    );
    // Reads go on, and writes succeed again once there is space.
    assert_eq!(&good(&run(&lu, &n, &cdb16(op::READ_16, 0, 2), &[]).await)[..], &[5; 2 * 512][..]);
    device.set_plan(FaultPlan::default());
    good(&run(&lu, &n, &cdb16(op::WRITE_16, 2, 1), &[6; 512]).await);
}

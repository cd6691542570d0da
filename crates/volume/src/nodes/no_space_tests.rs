//! Mirror and parity nodes over devices that run out of space: no member is failed, the
//! request fails with no space, reads stay consistent, and the copies (or parity) agree
//! again once space is back.

use std::sync::Arc;

use bytes::Bytes;
use strata_block::{
    BlockIo, Durability, FaultAction, FaultPlan, FaultRule, FaultyDevice, IoError, MemDevice, OpFilter,
};

use super::mirror::Mirror;
use super::parity::Parity;
use crate::spec::ParityLevel;
use crate::tree::Redundant;

const SIZE: u64 = 1 << 20;
const REGION: u64 = 64 << 10;

fn faulty(name: &str) -> Arc<FaultyDevice> {
    FaultyDevice::new(name, MemDevice::new(name, SIZE, 4096), FaultPlan::default())
}

fn no_space() -> FaultPlan {
    FaultPlan { seed: 0, rules: vec![FaultRule::always(OpFilter::Writes, FaultAction::NoSpace)] }
}

fn bitmap_copies(n: usize) -> Vec<Arc<dyn BlockIo>> {
    (0..n).map(|i| MemDevice::new(format!("b{i}"), 64 << 10, 4096) as Arc<dyn BlockIo>).collect()
}

fn fill(byte: u8, len: usize) -> Bytes {
    Bytes::from(vec![byte; len])
}

#[tokio::test]
async fn a_mirror_leg_out_of_space_lags_and_catches_up() {
    let legs = [faulty("l0"), faulty("l1")];
    let mirror =
        Mirror::new(legs.iter().map(|l| l.clone() as Arc<dyn BlockIo>).collect(), REGION, bitmap_copies(2));
    mirror.initialize().await.unwrap();
    mirror.write(0, fill(0xaa, 64 << 10), Durability::Cached).await.unwrap();
    mirror.flush().await.unwrap();

    // Leg 0 (the one reads of this address prefer) is full: leg 1 takes the write alone.
    legs[0].set_plan(no_space());
    let err = mirror.write(8192, fill(0xbb, 8192), Durability::Cached).await.unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert!(mirror.health().failed.is_empty(), "no leg is failed: {:?}", mirror.health());
    // Every read answers from the leg that has the data, whatever its size.
    for (offset, len) in [(0, 64 << 10), (8192, 4096), (12288, 8192), (4096, 8192)] {
        let want = legs[1].read(offset, len).await.unwrap();
        assert_eq!(mirror.read(offset, len).await.unwrap(), want, "read {offset}+{len}");
    }
    assert_ne!(legs[0].read(8192, 8192).await.unwrap(), legs[1].read(8192, 8192).await.unwrap());
    // Still full: flushes succeed, the region stays marked.
    for _ in 0..3 {
        mirror.flush().await.unwrap();
    }
    assert_eq!(mirror.health().dirty_regions, 1);

    // Space is back: a flush copies the lagging range over, and later ones clear the bit.
    legs[0].set_plan(FaultPlan::default());
    for _ in 0..3 {
        mirror.flush().await.unwrap();
    }
    assert_eq!(legs[0].read(0, SIZE).await.unwrap(), legs[1].read(0, SIZE).await.unwrap());
    assert_eq!(mirror.health().dirty_regions, 0);
    mirror.write(8192, fill(0xcc, 4096), Durability::Cached).await.unwrap();
    assert_eq!(mirror.read(8192, 4096).await.unwrap(), fill(0xcc, 4096));
}

#[tokio::test]
async fn a_retried_write_makes_the_mirror_legs_agree() {
    let legs = [faulty("l0"), faulty("l1"), faulty("l2")];
    let mirror =
        Mirror::new(legs.iter().map(|l| l.clone() as Arc<dyn BlockIo>).collect(), REGION, bitmap_copies(3));
    mirror.initialize().await.unwrap();
    legs[2].set_plan(no_space());
    assert!(mirror.write(0, fill(1, 16384), Durability::Cached).await.unwrap_err().is_no_space());
    legs[2].set_plan(FaultPlan::default());
    legs[1].set_plan(no_space());
    // A write that leg 1 misses over a range leg 2 lags in: no leg has all of [0, 32K).
    assert!(mirror.write(8192, fill(2, 16384), Durability::Cached).await.unwrap_err().is_no_space());
    let seen = mirror.read(0, 32768).await.unwrap();
    assert_eq!(&seen[..8192], &fill(1, 8192)[..]);
    assert_eq!(&seen[8192..24576], &fill(2, 16384)[..]);
    legs[1].set_plan(FaultPlan::default());
    mirror.write(0, fill(3, 32768), Durability::Cached).await.unwrap();
    for leg in &legs {
        assert_eq!(leg.read(0, 32768).await.unwrap(), fill(3, 32768));
    }
    assert!(mirror.health().failed.is_empty());
}

/// XOR of every member over the whole device: zero when every RAID 5 row is consistent.
async fn parity_residue(members: &[Arc<FaultyDevice>]) -> bool {
    let mut acc = vec![0u8; usize::try_from(SIZE).unwrap()];
    for m in members {
        let data = m.read(0, SIZE).await.unwrap();
        acc.iter_mut().zip(data.iter()).for_each(|(a, b)| *a ^= b);
    }
    acc.iter().any(|&b| b != 0)
}

#[tokio::test]
async fn a_parity_member_out_of_space_leaves_a_stale_row_repaired_at_flush() {
    let members = [faulty("m0"), faulty("m1"), faulty("m2")];
    let node = Parity::new(
        ParityLevel::Single,
        4096,
        members.iter().map(|m| m.clone() as Arc<dyn BlockIo>).collect(),
        REGION,
        bitmap_copies(3),
    );
    node.initialize().await.unwrap();
    node.write(0, fill(0x11, 64 << 10), Durability::Cached).await.unwrap();
    node.flush().await.unwrap();
    assert!(!parity_residue(&members).await);

    // Row 0 is [0, 8K): data on members 0 and 1, parity on member 2. Parity has no space.
    members[2].set_plan(no_space());
    let err = node.write(0, fill(0x22, 4096), Durability::Cached).await.unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert!(node.health().failed.is_empty());
    assert!(parity_residue(&members).await, "the row's parity is stale");
    assert_eq!(node.read(0, 4096).await.unwrap(), fill(0x22, 4096), "data reads from its member");
    node.flush().await.unwrap();
    node.flush().await.unwrap();
    assert_eq!(node.health().dirty_regions, 1, "a stale row keeps its region marked");

    members[2].set_plan(FaultPlan::default());
    for _ in 0..3 {
        node.flush().await.unwrap();
    }
    assert!(!parity_residue(&members).await, "parity is recomputed once space is back");
    assert_eq!(node.health().dirty_regions, 0);
    // A rebuild from parity is right again: member 0's chunk from the others.
    members[0]
        .set_plan(FaultPlan { seed: 0, rules: vec![FaultRule::always(OpFilter::Reads, FaultAction::Error)] });
    assert_eq!(node.read(0, 8192).await.unwrap(), [fill(0x22, 4096), fill(0x11, 4096)].concat());
}

fn broken() -> FaultPlan {
    FaultPlan { seed: 0, rules: vec![FaultRule::always(OpFilter::All, FaultAction::Error)] }
}

#[tokio::test]
async fn a_mirror_read_fails_rather_than_answer_from_a_lagging_leg() {
    let legs = [faulty("l0"), faulty("l1")];
    let mirror =
        Mirror::new(legs.iter().map(|l| l.clone() as Arc<dyn BlockIo>).collect(), REGION, bitmap_copies(2));
    mirror.initialize().await.unwrap();
    mirror.write(0, fill(0xaa, 64 << 10), Durability::Cached).await.unwrap();
    mirror.flush().await.unwrap();
    legs[1].set_plan(no_space());
    assert!(mirror.write(8192, fill(0xbb, 8192), Durability::Cached).await.unwrap_err().is_no_space());
    assert_eq!(mirror.read(8192, 8192).await.unwrap(), fill(0xbb, 8192), "the host sees the new data");

    // Leg 0, the only one with the new data, fails: leg 1 still holds the old data there.
    legs[0].set_plan(broken());
    for (offset, len) in [(8192, 8192), (12288, 4096), (0, 64 << 10)] {
        let err = match mirror.read(offset, len).await {
            Ok(data) => panic!("read {offset}+{len}: a lagging leg answered {:#x}", data[0]),
            Err(e) => e,
        };
        assert!(matches!(err, IoError::NoCurrentCopy { .. }), "read {offset}+{len}: {err}");
    }
    assert_eq!(mirror.health().failed, vec![0]);
    assert_eq!(mirror.read(0, 8192).await.unwrap(), fill(0xaa, 8192), "where leg 1 is current it answers");
    mirror.flush().await.unwrap();
    assert!(matches!(mirror.read(8192, 4096).await, Err(IoError::NoCurrentCopy { .. })), "still refused");

    // A write that reaches every leg in service makes the range readable again.
    legs[1].set_plan(FaultPlan::default());
    mirror.write(8192, fill(0xcc, 8192), Durability::Cached).await.unwrap();
    assert_eq!(
        mirror.read(0, 24576).await.unwrap(),
        [fill(0xaa, 8192), fill(0xcc, 8192), fill(0xaa, 8192)].concat()
    );
}

/// A parity node over `n` members of 4 KiB chunks, written with `0x11` and flushed.
async fn parity_set(level: ParityLevel, n: usize) -> (Parity, Vec<Arc<FaultyDevice>>) {
    let members: Vec<Arc<FaultyDevice>> = (0..n).map(|i| faulty(&format!("m{i}"))).collect();
    let node = Parity::new(
        level,
        4096,
        members.iter().map(|m| m.clone() as Arc<dyn BlockIo>).collect(),
        REGION,
        bitmap_copies(n),
    );
    node.initialize().await.unwrap();
    node.write(0, fill(0x11, 64 << 10), Durability::Cached).await.unwrap();
    node.flush().await.unwrap();
    (node, members)
}

/// A degraded parity set whose row 0 ran out of space part-way: the failed member's chunk
/// (data chunk 0, the row's first 4 KiB) reads back right or fails, never wrong, until a
/// write makes the row whole. `failed` holds data chunk 0 of row 0, `full` data chunk 1.
async fn degraded_row_out_of_space(level: ParityLevel, n: usize, failed: usize, full: usize) {
    let (node, members) = parity_set(level, n).await;
    members[failed].set_plan(broken());
    assert_eq!(node.read(0, 4096).await.unwrap(), fill(0x11, 4096), "rebuilt from a whole row");
    assert_eq!(node.health().failed, vec![failed]);

    // Data chunk 1 has no space; parity takes the write. Rebuilt from it, chunk 0 would
    // read 0x33 (new parity with old data), which nobody wrote.
    members[full].set_plan(no_space());
    let err = node.write(4096, fill(0x33, 4096), Durability::Cached).await.unwrap_err();
    assert!(err.is_no_space(), "{err}");
    for (offset, len) in [(0, 4096), (0, 8192), (0, 64 << 10)] {
        match node.read(offset, len).await {
            Ok(data) => {
                assert_eq!(&data[..4096], &fill(0x11, 4096)[..], "read {offset}+{len} returned wrong data")
            }
            Err(e) => assert!(matches!(e, IoError::NoCurrentCopy { .. }), "read {offset}+{len}: {e}"),
        }
    }
    assert_eq!(node.read(8192, 4096).await.unwrap(), fill(0x11, 4096), "other rows are unaffected");

    // Space is back, but a degraded stale row cannot be recomputed: it keeps refusing, and
    // a write that would fold the unknown chunk into new parity is refused too.
    members[full].set_plan(FaultPlan::default());
    node.flush().await.unwrap();
    assert!(matches!(node.read(0, 4096).await, Err(IoError::NoCurrentCopy { .. })));
    assert!(matches!(
        node.write(4096, fill(0x44, 4096), Durability::Cached).await,
        Err(IoError::NoCurrentCopy { .. })
    ));
    assert_eq!(node.health().dirty_regions, 1);

    // A write that replaces the failed chunk makes the row whole again.
    node.write(0, fill(0x55, 4096), Durability::Cached).await.unwrap();
    assert_eq!(node.read(0, 8192).await.unwrap(), [fill(0x55, 4096), fill(0x11, 4096)].concat());
    node.write(4096, fill(0x66, 4096), Durability::Cached).await.unwrap();
    assert_eq!(node.read(0, 8192).await.unwrap(), [fill(0x55, 4096), fill(0x66, 4096)].concat());
}

#[tokio::test]
async fn a_degraded_raid5_row_out_of_space_never_rebuilds_wrong_data() {
    // Row 0 of three members: P on member 2, data chunk 0 on member 0, chunk 1 on member 1.
    degraded_row_out_of_space(ParityLevel::Single, 3, 0, 1).await;
}

#[tokio::test]
async fn a_degraded_raid6_row_out_of_space_never_rebuilds_wrong_data() {
    // Row 0 of four members: P on member 3, Q on 0, data chunk 0 on member 1, chunk 1 on 2.
    degraded_row_out_of_space(ParityLevel::Double, 4, 1, 2).await;
}

#[tokio::test]
async fn a_stale_row_refuses_a_rebuild_when_a_member_fails_later() {
    let (node, members) = parity_set(ParityLevel::Single, 3).await;
    members[2].set_plan(no_space());
    assert!(node.write(0, fill(0x22, 4096), Durability::Cached).await.unwrap_err().is_no_space());
    members[1].set_plan(broken());
    assert!(matches!(node.read(4096, 4096).await, Err(IoError::NoCurrentCopy { .. })));
    // Space is back: a write of the whole row makes it whole again.
    members[2].set_plan(FaultPlan::default());
    node.write(0, fill(0x77, 8192), Durability::Cached).await.unwrap();
    assert_eq!(node.read(0, 8192).await.unwrap(), fill(0x77, 8192));
}

#[tokio::test]
async fn bitmap_copies_out_of_space_are_tried_again() {
    let copies = [faulty("b0"), faulty("b1")];
    let legs: Vec<Arc<dyn BlockIo>> = vec![faulty("l0"), faulty("l1")];
    let mirror = Mirror::new(legs, REGION, copies.iter().map(|c| c.clone() as Arc<dyn BlockIo>).collect());
    mirror.initialize().await.unwrap();
    copies.iter().for_each(|c| c.set_plan(no_space()));
    // The region's bit cannot be recorded: the write fails before any data moves.
    let err = mirror.write(0, fill(1, 4096), Durability::Cached).await.unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert!(mirror.health().failed.is_empty());
    copies.iter().for_each(|c| c.set_plan(FaultPlan::default()));
    mirror.write(0, fill(1, 4096), Durability::Cached).await.unwrap();
    assert_eq!(mirror.read(0, 4096).await.unwrap(), fill(1, 4096));
}

#[tokio::test]
async fn a_resync_out_of_space_leaves_the_leg_lagging_instead_of_failing_the_open() {
    let size = 2 << 20;
    let legs: Vec<Arc<FaultyDevice>> = (0..2)
        .map(|i| FaultyDevice::new("l", MemDevice::new(format!("l{i}"), size, 4096), FaultPlan::default()))
        .collect();
    let as_io = || legs.iter().map(|l| l.clone() as Arc<dyn BlockIo>).collect::<Vec<_>>();
    let copies = bitmap_copies(2);
    let before = Mirror::new(as_io(), REGION, copies.clone());
    before.initialize().await.unwrap();
    // Reads of 1 MiB and on prefer leg 1. A crash left leg 1 without the last write there.
    before.write(1 << 20, fill(7, 8192), Durability::Cached).await.unwrap();
    legs[1].write(1 << 20, fill(0, 8192), Durability::Cached).await.unwrap();
    drop(before);

    legs[1].set_plan(no_space());
    let after = Mirror::new(as_io(), REGION, copies);
    assert_eq!(after.recover().await.unwrap(), 1, "one dirty region");
    assert!(after.health().failed.is_empty());
    assert_eq!(after.read(1 << 20, 8192).await.unwrap(), fill(7, 8192), "read from the leg resynced from");
    legs[1].set_plan(FaultPlan::default());
    after.flush().await.unwrap();
    assert_eq!(legs[1].read(1 << 20, 8192).await.unwrap(), fill(7, 8192));
    for _ in 0..2 {
        after.flush().await.unwrap();
    }
    assert_eq!(after.health().dirty_regions, 0);
}

#[tokio::test]
async fn a_leg_the_resync_could_not_catch_up_is_never_resynced_from() {
    let legs = [faulty("l0"), faulty("l1")];
    let as_io = || legs.iter().map(|l| l.clone() as Arc<dyn BlockIo>).collect::<Vec<_>>();
    let copies = bitmap_copies(2);
    let first = Mirror::new(as_io(), REGION, copies.clone());
    first.initialize().await.unwrap();
    first.write(0, fill(0xaa, 64 << 10), Durability::Cached).await.unwrap();
    first.flush().await.unwrap();
    // Leg 0 fails: the acknowledged writes that follow reach leg 1 only.
    legs[0].set_plan(broken());
    first.write(8192, fill(0xbb, 8192), Durability::Cached).await.unwrap();
    first.flush().await.unwrap();
    assert_eq!(first.health().failed, vec![0]);
    drop(first);

    // Leg 0 is back but full: the resync cannot copy what it missed.
    legs[0].set_plan(no_space());
    let second = Mirror::new(as_io(), REGION, copies.clone());
    second.recover().await.unwrap();
    assert_eq!(second.read(8192, 8192).await.unwrap(), fill(0xbb, 8192));
    second.flush().await.unwrap();
    drop(second);

    // Space is back: the next open must resync from leg 1, which has the acknowledged data.
    legs[0].set_plan(FaultPlan::default());
    let third = Mirror::new(as_io(), REGION, copies);
    third.recover().await.unwrap();
    let want = [fill(0xaa, 8192), fill(0xbb, 8192), fill(0xaa, 48 << 10)].concat();
    assert!(legs[1].read(0, 64 << 10).await.unwrap() == want, "leg 1 lost the acknowledged writes");
    assert!(legs[0].read(0, 64 << 10).await.unwrap() == want, "leg 0 was not resynced from leg 1");
    assert!(third.read(0, 64 << 10).await.unwrap() == want, "the mirror reads back other data");
    assert!(third.health().failed.is_empty());
    for _ in 0..2 {
        third.flush().await.unwrap();
    }
    assert_eq!(third.health().dirty_regions, 0);
}

#[tokio::test]
async fn a_leg_behind_since_the_open_is_recorded_until_it_catches_up() {
    let legs = [faulty("l0"), faulty("l1")];
    let as_io = || legs.iter().map(|l| l.clone() as Arc<dyn BlockIo>).collect::<Vec<_>>();
    let copies = bitmap_copies(2);
    let first = Mirror::new(as_io(), REGION, copies.clone());
    first.initialize().await.unwrap();
    legs[0].set_plan(broken());
    first.write(8192, fill(0xbb, 8192), Durability::Cached).await.unwrap();
    drop(first);

    legs[0].set_plan(no_space());
    let second = Mirror::new(as_io(), REGION, copies.clone());
    second.recover().await.unwrap();
    // Space comes back while the controller runs: a flush copies the rest and the bitmap
    // no longer records leg 0, so later flushes clear the region.
    legs[0].set_plan(FaultPlan::default());
    for _ in 0..3 {
        second.flush().await.unwrap();
    }
    assert_eq!(legs[0].read(0, 64 << 10).await.unwrap(), legs[1].read(0, 64 << 10).await.unwrap());
    assert_eq!(second.health().dirty_regions, 0);
    drop(second);
    // A crash now resyncs nothing: the legs agree and neither is recorded as failed.
    let third = Mirror::new(as_io(), REGION, copies);
    assert_eq!(third.recover().await.unwrap(), 0);
}

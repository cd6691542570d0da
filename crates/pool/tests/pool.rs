//! The pool against memory and file devices: persistence, rediscovery, repairs of labels
//! and slots, devices that must never be written, and bad requests.

use std::sync::Arc;

use bytes::Bytes;
use strata_block::{
    BlockIo, CrashPlan, Durability, FaultAction, FaultPlan, FaultRule, FaultyDevice, FileDevice, FileOptions,
    MemDevice, OpFilter,
};
use strata_pool::label::{LABEL_SIZE, Label};
use strata_pool::{Pool, PoolError, PoolOptions, scan_dir};
use strata_volume::{Layout, Role, VolumeRequest, VolumeState};

const MIB: u64 = 1 << 20;

fn options() -> PoolOptions {
    PoolOptions { name: "t".into(), extent_size: MIB, slot_size: 64 * 1024 }
}

async fn pool_of(n: usize) -> (Pool, Vec<Arc<MemDevice>>) {
    let pool = Pool::create(options()).unwrap();
    let mut devices = Vec::new();
    for i in 0..n {
        let dev = MemDevice::with_volatile_cache(format!("m{i}"), 32 * MIB, 4096);
        pool.claim(&format!("m{i}"), dev.clone(), None).await.unwrap();
        devices.push(dev);
    }
    (pool, devices)
}

fn candidates(devices: &[Arc<MemDevice>]) -> Vec<(String, Arc<dyn BlockIo>)> {
    devices.iter().enumerate().map(|(i, d)| (format!("m{i}"), d.clone() as Arc<dyn BlockIo>)).collect()
}

async fn reopen(devices: &[Arc<MemDevice>]) -> (Pool, strata_pool::Discovery) {
    let (pool, report) = Pool::open(candidates(devices)).await.unwrap();
    (pool.expect("a pool"), report)
}

async fn image(dev: &dyn BlockIo) -> Bytes {
    dev.read(0, dev.geometry().size_bytes).await.unwrap()
}

async fn label_of(dev: &dyn BlockIo) -> Label {
    Label::decode(&dev.read(0, LABEL_SIZE).await.unwrap()).unwrap()
}

#[tokio::test]
async fn volumes_are_recorded_before_they_are_acknowledged() {
    let (pool, devices) = pool_of(4).await;
    for layout in Layout::ALL {
        pool.create_volume(&layout.to_string(), VolumeRequest::new(4 * MIB, layout)).await.unwrap();
    }
    let data = Bytes::from(vec![0x5a; 64 * 1024]);
    let v = pool.volume("raid6").unwrap().io();
    v.write(MIB, data.clone(), Durability::Fua).await.unwrap();
    drop((v, pool));
    // Power loss right after the acknowledgements: nothing unflushed survives.
    devices.iter().for_each(|d| d.crash(CrashPlan::LoseAll));
    let (pool, report) = reopen(&devices).await;
    assert_eq!(report.members.len(), 4);
    assert!(report.failed_volumes.is_empty() && report.missing.is_empty(), "{report:?}");
    let mut names: Vec<String> = pool.volumes().iter().map(|v| v.name().to_string()).collect();
    names.sort();
    assert_eq!(names, ["linear", "mirror", "raid10", "raid5", "raid6", "stripe"]);
    let back = pool.volume("raid6").unwrap().io().read(MIB, 64 * 1024).await.unwrap();
    assert_eq!(back, data);
    assert!(pool.volumes().iter().all(|v| v.info().state == VolumeState::Healthy));
}

async fn free(pool: &Pool) -> u64 {
    pool.devices().await.iter().map(|d| d.free_bytes).sum()
}

#[tokio::test]
async fn deleting_a_volume_is_durable_and_frees_its_space() {
    let (pool, devices) = pool_of(2).await;
    let before = free(&pool).await;
    let held = pool.create_volume("a", VolumeRequest::new(8 * MIB, Layout::Mirror)).await.unwrap().io();
    assert!(free(&pool).await < before);
    pool.delete_volume("a").await.unwrap();
    let late = held.write(0, Bytes::from(vec![1; 4096]), Durability::Cached).await;
    assert!(matches!(late, Err(strata_block::IoError::Closed)), "a deleted volume took a write: {late:?}");
    assert_eq!(free(&pool).await, before);
    assert!(matches!(pool.delete_volume("a").await, Err(PoolError::NoSuchVolume(_))));
    drop(pool);
    devices.iter().for_each(|d| d.crash(CrashPlan::LoseAll));
    let (pool, _) = reopen(&devices).await;
    assert!(pool.volume("a").is_none());
    assert_eq!(free(&pool).await, before);
}

#[tokio::test]
async fn a_new_volume_reads_as_zeroes_where_a_deleted_one_wrote() {
    let pool = Pool::create(options()).unwrap();
    let mut devices = Vec::new();
    for i in 0..2 {
        let mem = MemDevice::new(format!("m{i}"), 32 * MIB, 4096);
        let dev = FaultyDevice::new(format!("f{i}"), mem, FaultPlan::default());
        pool.claim(&format!("m{i}"), dev.clone(), None).await.unwrap();
        devices.push(dev);
    }
    let refuse_discards =
        FaultPlan { seed: 0, rules: vec![FaultRule::always(OpFilter::Discards, FaultAction::Error)] };
    for layout in [Layout::Linear, Layout::Stripe, Layout::Mirror] {
        let old = pool.create_volume("old", VolumeRequest::new(8 * MIB, layout)).await.unwrap();
        old.io().write(0, Bytes::from(vec![0xee; 8 << 20]), Durability::Fua).await.unwrap();
        drop(old);
        // The deletion cannot release the space, so the old data stays on the devices.
        devices.iter().for_each(|d| d.set_plan(refuse_discards.clone()));
        pool.delete_volume("old").await.unwrap();
        devices.iter().for_each(|d| d.set_plan(FaultPlan::default()));
        let new = pool.create_volume("new", VolumeRequest::new(8 * MIB, layout)).await.unwrap();
        let back = new.io().read(0, 8 * MIB).await.unwrap();
        assert!(back.iter().all(|&b| b == 0), "{layout}: a new volume shows old data");
        drop(new);
        pool.delete_volume("new").await.unwrap();
    }
}

#[tokio::test]
async fn a_change_that_a_majority_of_replicas_did_not_take_is_refused_and_superseded() {
    let pool = Pool::create(options()).unwrap();
    let mut faulty = Vec::new();
    let mut memory = Vec::new();
    for i in 0..3 {
        let mem = MemDevice::new(format!("m{i}"), 32 * MIB, 4096);
        let dev = FaultyDevice::new(format!("f{i}"), mem.clone(), FaultPlan::default());
        pool.claim(&format!("m{i}"), dev.clone(), None).await.unwrap();
        faulty.push(dev);
        memory.push(mem);
    }
    // Two of the three replicas refuse metadata writes.
    let metadata = (LABEL_SIZE, LABEL_SIZE + 2 * 64 * 1024);
    let refuse = FaultPlan {
        seed: 0,
        rules: vec![FaultRule {
            range: Some(metadata),
            ..FaultRule::always(OpFilter::Writes, FaultAction::Error)
        }],
    };
    faulty[0].set_plan(refuse.clone());
    faulty[1].set_plan(refuse);
    let err = pool.create_volume("lost", VolumeRequest::new(MIB, Layout::Linear)).await.unwrap_err();
    assert!(matches!(err, PoolError::CommitFailed { took: 1, replicas: 3 }), "{err}");
    assert!(pool.volume("lost").is_none());
    faulty.iter().for_each(|f| f.set_plan(FaultPlan::default()));
    drop(pool);
    // The replica that took the refused generation was written back over at once.
    let (pool, _) = reopen(&memory).await;
    assert!(pool.volume("lost").is_none(), "the refused change came back at the next start");
    pool.create_volume("kept", VolumeRequest::new(MIB, Layout::Linear)).await.unwrap();
    drop(pool);
    let (pool, _) = reopen(&memory).await;
    assert!(pool.volume("kept").is_some());
    assert!(pool.volume("lost").is_none(), "the refused change came back");
}

#[tokio::test]
async fn a_device_without_a_label_is_reported_unclaimed_and_never_written() {
    let (pool, mut devices) = pool_of(2).await;
    pool.create_volume("v", VolumeRequest::new(4 * MIB, Layout::Mirror)).await.unwrap();
    drop(pool);
    let stranger = MemDevice::new("stranger", 16 * MIB, 4096);
    let noise: Vec<u8> = (0..16 * MIB).map(|i| (i * 31 % 251) as u8).collect();
    stranger.write(0, Bytes::from(noise.clone()), Durability::Fua).await.unwrap();
    devices.push(stranger.clone());
    let (pool, report) = reopen(&devices).await;
    assert_eq!(report.unclaimed, ["m2"]);
    pool.create_volume("w", VolumeRequest::new(4 * MIB, Layout::Mirror)).await.unwrap();
    assert_eq!(image(stranger.as_ref()).await, noise, "an unclaimed device was written");
    // Claiming it makes it a member.
    pool.claim("m2", stranger.clone(), None).await.unwrap();
    let again = pool.claim("m2", stranger.clone(), None).await;
    assert!(matches!(again, Err(PoolError::AlreadyMember { .. })), "{again:?}");
}

#[tokio::test]
async fn one_corrupt_label_copy_is_detected_and_repaired() {
    let (pool, devices) = pool_of(2).await;
    pool.create_volume("v", VolumeRequest::new(4 * MIB, Layout::Mirror)).await.unwrap();
    drop(pool);
    let dev = &devices[0];
    let mut front = dev.read(0, LABEL_SIZE).await.unwrap().to_vec();
    front[40] ^= 0xff;
    dev.write(0, Bytes::from(front), Durability::Fua).await.unwrap();
    let (pool, report) = reopen(&devices).await;
    assert_eq!(report.repaired.len(), 1, "{report:?}");
    assert!(report.repaired[0].contains("front label copy"), "{report:?}");
    assert!(Label::decode(&dev.read(0, LABEL_SIZE).await.unwrap()).is_ok(), "front copy was not repaired");
    assert_eq!(pool.volume("v").unwrap().info().state, VolumeState::Healthy);
}

#[tokio::test]
async fn a_device_whose_labels_are_all_corrupt_is_reported_and_left_untouched() {
    let (pool, devices) = pool_of(3).await;
    pool.create_volume("v", VolumeRequest::new(4 * MIB, Layout::Mirror)).await.unwrap();
    let spec = pool.volume_spec("v").await.unwrap();
    drop(pool);
    // Damage a device that holds a leg of the mirror.
    let mut victim = None;
    for (i, dev) in devices.iter().enumerate() {
        if spec.devices().contains(&label_of(dev.as_ref()).await.device_id) {
            victim = Some(i);
        }
    }
    let dev = &devices[victim.unwrap()];
    let size = dev.geometry().size_bytes;
    for at in [0, size - LABEL_SIZE] {
        let mut copy = dev.read(at, LABEL_SIZE).await.unwrap().to_vec();
        copy[20] ^= 1;
        dev.write(at, Bytes::from(copy), Durability::Fua).await.unwrap();
    }
    let before = image(dev.as_ref()).await;
    let (pool, report) = reopen(&devices).await;
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert!(report.damaged[0].1.contains("checksum"), "{report:?}");
    assert_eq!(report.missing.len(), 1);
    assert_eq!(pool.volume("v").unwrap().info().state, VolumeState::Degraded);
    pool.volume("v").unwrap().io().write(0, Bytes::from(vec![1; 4096]), Durability::Fua).await.unwrap();
    assert_eq!(image(dev.as_ref()).await, before, "a damaged device was written");
    let err = pool.claim("damaged", dev.clone(), None).await.unwrap_err();
    assert!(matches!(err, PoolError::DamagedLabel { .. }), "{err}");
}

#[tokio::test]
async fn a_torn_newest_slot_falls_back_to_the_previous_generation_and_is_rewritten() {
    let (pool, devices) = pool_of(2).await;
    // Enough volumes that a slot spans several blocks.
    for i in 0..12 {
        pool.create_volume(&format!("a{i}"), VolumeRequest::new(MIB, Layout::Mirror)).await.unwrap();
    }
    pool.create_volume("b", VolumeRequest::new(4 * MIB, Layout::Linear)).await.unwrap();
    let generation = pool.config().await.generation;
    drop(pool);
    // Tear the newest slot on every device: only its first block landed.
    for dev in &devices {
        let label = label_of(dev.as_ref()).await;
        let mut newest = None;
        for index in 0..2 {
            let at = label.metadata_offset + index * label.slot_size;
            let header = dev.read(at, 4096).await.unwrap();
            if strata_pool::slot::decode_header(&header).is_ok_and(|(g, _)| g == generation) {
                newest = Some(at);
            }
        }
        let at = newest.expect("the newest generation is on every device");
        dev.write(at + 4096, Bytes::from(vec![0; 4096]), Durability::Fua).await.unwrap();
    }
    let (pool, report) = reopen(&devices).await;
    assert_eq!(
        pool.config().await.generation,
        generation,
        "rewritten once from generation {}",
        generation - 1
    );
    assert_eq!(pool.volumes().len(), 12);
    assert!(pool.volume("b").is_none(), "volume b lived only in the torn generation");
    assert_eq!(report.repaired.len(), 2, "{report:?}");
    assert!(report.repaired.iter().all(|r| r.contains("torn")), "{report:?}");
    drop(pool);
    let (_, report) = reopen(&devices).await;
    assert!(report.repaired.is_empty(), "the torn slots were not rewritten: {report:?}");
}

#[tokio::test]
async fn map_names_every_copy_and_parity() {
    let (pool, _devices) = pool_of(4).await;
    let request =
        VolumeRequest { width: Some(4), chunk: Some(65536), ..VolumeRequest::new(6 * MIB, Layout::Raid6) };
    pool.create_volume("p", request).await.unwrap();
    let locations = pool.map("p", 70_000).await.unwrap().unwrap();
    let roles: Vec<Role> = locations.iter().map(|l| l.role).collect();
    assert_eq!(roles, [Role::Data, Role::ParityP, Role::ParityQ]);
    let mut devices: Vec<_> = locations.iter().map(|l| l.device).collect();
    devices.sort();
    devices.dedup();
    assert_eq!(devices.len(), 3, "data, P and Q on different devices");
    assert!(pool.map("p", 6 * MIB).await.unwrap().is_none());
    assert!(matches!(pool.map("nope", 0).await, Err(PoolError::NoSuchVolume(_))));

    pool.create_volume("m", VolumeRequest::new(MIB, Layout::Raid10)).await.unwrap();
    let copies = pool.map("m", 0).await.unwrap().unwrap();
    assert_eq!(copies.iter().map(|l| l.role).collect::<Vec<_>>(), [Role::Copy(0), Role::Copy(1)]);
    assert_ne!(copies[0].device, copies[1].device);
}

#[tokio::test]
async fn bad_requests_are_errors_with_a_message() {
    let (pool, _devices) = pool_of(2).await;
    let cases: Vec<(&str, VolumeRequest, &str)> = vec![
        ("ok", VolumeRequest::new(0, Layout::Linear), "greater than zero"),
        (
            "ok",
            VolumeRequest { width: Some(3), ..VolumeRequest::new(MIB, Layout::Stripe) },
            "needs 3 devices",
        ),
        (
            "ok",
            VolumeRequest { copies: Some(3), ..VolumeRequest::new(MIB, Layout::Mirror) },
            "needs 3 devices",
        ),
        ("ok", VolumeRequest::new(MIB, Layout::Raid5), "needs 3 devices"),
        ("ok", VolumeRequest::new(10 << 30, Layout::Linear), "free"),
        ("bad name!", VolumeRequest::new(MIB, Layout::Linear), "not valid"),
        ("", VolumeRequest::new(MIB, Layout::Linear), "not valid"),
    ];
    for (name, request, expected) in cases {
        let err = pool.create_volume(name, request.clone()).await.unwrap_err().to_string();
        assert!(err.contains(expected), "{request:?}: {err}");
    }
    pool.create_volume("x", VolumeRequest::new(MIB, Layout::Linear)).await.unwrap();
    let err = pool.create_volume("x", VolumeRequest::new(MIB, Layout::Linear)).await.unwrap_err();
    assert!(matches!(err, PoolError::VolumeExists(_)));
    let tiny = MemDevice::new("tiny", MIB, 4096);
    assert!(matches!(pool.claim("tiny", tiny, None).await, Err(PoolError::TooSmall { .. })));
    assert!(Pool::create(PoolOptions { extent_size: 3000, ..options() }).is_err());
}

#[tokio::test]
async fn a_released_device_reads_as_unclaimed() {
    let (pool, devices) = pool_of(3).await;
    pool.create_volume("v", VolumeRequest::new(MIB, Layout::Linear)).await.unwrap();
    let used = pool.volume_spec("v").await.unwrap().devices()[0];
    assert!(matches!(pool.release(used).await, Err(PoolError::DeviceInUse { .. })));
    let spare = pool.devices().await.iter().find(|d| d.id != used).unwrap().id;
    pool.release(spare).await.unwrap();
    drop(pool);
    let (pool, report) = reopen(&devices).await;
    assert_eq!(report.unclaimed.len(), 1, "{report:?}");
    assert_eq!(pool.devices().await.len(), 2);
}

#[tokio::test]
async fn a_pool_of_files_is_found_again_by_scanning_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file_options = FileOptions::default();
    let pool = Pool::create(options()).unwrap();
    for i in 0..3 {
        let dev = FileDevice::create(dir.path().join(format!("d{i}")), 64 * MIB, &file_options).unwrap();
        pool.claim(&format!("d{i}"), dev, Some(format!("shelf{i}"))).await.unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), b"not a device").unwrap();
    let v = pool.create_volume("v", VolumeRequest::new(16 * MIB, Layout::Raid5)).await.unwrap();
    let data: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
    v.io().write(3 * MIB, Bytes::from(data.clone()), Durability::Cached).await.unwrap();
    v.io().flush().await.unwrap();
    drop((v, pool));

    let paths = scan_dir(dir.path()).unwrap();
    let (pool, report) = Pool::open_paths(&paths, &file_options).await.unwrap();
    let pool = pool.unwrap();
    assert_eq!(report.members.len(), 3);
    assert_eq!(report.unclaimed.len(), 1);
    assert_eq!(std::fs::read(dir.path().join("notes.txt")).unwrap(), b"not a device");
    let back = pool.volume("v").unwrap().io().read(3 * MIB, MIB).await.unwrap();
    assert_eq!(back.as_ref(), &data[..]);
    let devices = pool.devices().await;
    assert!(devices.iter().all(|d| d.config_replica));
    assert_eq!(devices.iter().filter_map(|d| d.fault_domain.clone()).count(), 3);
}

mod corrupt_metadata {
    use proptest::prelude::*;

    use super::*;

    /// Copies a device so each case corrupts its own image.
    async fn clone_device(dev: &MemDevice) -> Arc<MemDevice> {
        let copy = MemDevice::new("copy", dev.geometry().size_bytes, 4096);
        copy.write(0, image(dev).await, Durability::Fua).await.unwrap();
        copy
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("STRATA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24)))]

        /// Random damage to labels and metadata slots never panics the rediscovery: every
        /// device ends up a member, unclaimed or damaged, or the open fails with an error.
        #[test]
        fn never_panics(flips in proptest::collection::vec((0usize..3, 0u64..200 * 1024, any::<u8>()), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (pool, devices) = pool_of(3).await;
                pool.create_volume("m", VolumeRequest::new(2 * MIB, Layout::Mirror)).await.unwrap();
                pool.create_volume("r", VolumeRequest::new(2 * MIB, Layout::Raid5)).await.unwrap();
                drop(pool);
                let mut copies = Vec::new();
                for dev in &devices {
                    copies.push(clone_device(dev).await);
                }
                for (device, offset, xor) in flips {
                    let dev = &copies[device];
                    let block = offset / 4096 * 4096;
                    let mut raw = dev.read(block, 4096).await.unwrap().to_vec();
                    raw[usize::try_from(offset - block).unwrap()] ^= xor.max(1);
                    dev.write(block, Bytes::from(raw), Durability::Fua).await.unwrap();
                }
                if let Ok((Some(pool), report)) = Pool::open(candidates(&copies)).await {
                    let accounted = report.members.len() + report.unclaimed.len() + report.damaged.len() + report.foreign.len();
                    assert_eq!(accounted, 3, "{report:?}");
                    for volume in pool.volumes() {
                        let _ = volume.io().read(0, 4096).await;
                    }
                }
            });
        }
    }
}

#[tokio::test]
async fn a_missing_member_found_under_another_name_is_taken_back_and_its_volume_opens() {
    let (pool, devices) = pool_of(2).await;
    // A linear volume on the second device only: place one on each, keep the second's.
    pool.create_volume("a", VolumeRequest::new(4 * MIB, Layout::Linear)).await.unwrap();
    pool.create_volume("b", VolumeRequest::new(4 * MIB, Layout::Linear)).await.unwrap();
    let second = pool.devices().await.into_iter().find(|d| d.name == "m1").unwrap().id;
    let on_second =
        ["a", "b"].into_iter().find(|v| pool.volume(v).unwrap().info().devices == [second]).unwrap();
    let volume = pool.volume(on_second).unwrap();
    volume.io().write(0, Bytes::from(vec![0x5a; 4096]), Durability::Fua).await.unwrap();
    drop((volume, pool));

    // Started without it: the volume on it cannot open.
    let (pool, report) = Pool::open(candidates(&devices[..1])).await.unwrap();
    let pool = pool.unwrap();
    assert_eq!(report.missing, [second]);
    assert_eq!(pool.volume(on_second).unwrap().info().state, strata_volume::VolumeState::Failed);
    // Found again under another name: taken back, not refused as another pool's.
    let info = pool.claim("moved/m1", devices[1].clone(), None).await.unwrap();
    assert_eq!((info.id, info.name.as_str()), (second, "moved/m1"));
    let volume = pool.volume(on_second).expect("its volume opens now");
    assert_eq!(volume.io().read(0, 4096).await.unwrap(), Bytes::from(vec![0x5a; 4096]));
    // The new name is recorded: it is what the next start sees in the configuration.
    let again = pool.claim("elsewhere", devices[1].clone(), None).await;
    assert!(
        matches!(again, Err(PoolError::AlreadyMember { ref member, .. }) if member == "moved/m1"),
        "{again:?}"
    );
}

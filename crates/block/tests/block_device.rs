//! The file backend on a real Linux block device: a loop device over a sparse file,
//! set up with `losetup` (the tests run as root, as CI does).

use std::path::PathBuf;
use std::process::Command;

use bytes::Bytes;
use strata_block::{BlockIo, Durability, FileDevice, FileOptions, Geometry};

/// A loop device with the given logical block size, detached when dropped.
struct Loop {
    device: PathBuf,
    _backing: tempfile::NamedTempFile,
}

impl Loop {
    fn new(size: u64, sector_size: u32) -> Self {
        let backing = tempfile::NamedTempFile::new().unwrap();
        backing.as_file().set_len(size).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", "--sector-size", &sector_size.to_string()])
            .arg(backing.path())
            .output()
            .expect("losetup runs");
        assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Self { device, _backing: backing }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

async fn exercise(dev: &dyn BlockIo, block: u64) {
    let two = usize::try_from(2 * block).unwrap();
    let data = Bytes::from((0..4 * block).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    dev.write(block, data.clone(), Durability::Fua).await.unwrap();
    dev.write(8 * block, data.clone(), Durability::Cached).await.unwrap();
    dev.flush().await.unwrap();
    assert_eq!(dev.read(block, 4 * block).await.unwrap(), data);
    dev.discard(block, 2 * block).await.unwrap();
    dev.write_zeroes(8 * block, 4 * block).await.unwrap();
    let back = dev.read(block, 4 * block).await.unwrap();
    assert!(back[..two].iter().all(|&b| b == 0), "discarded blocks read as zeroes");
    assert_eq!(&back[two..], &data[two..]);
    assert!(dev.read(8 * block, 4 * block).await.unwrap().iter().all(|&b| b == 0));
    let misaligned = dev.read(block / 2, block).await.unwrap_err();
    assert!(misaligned.is_request_error(), "{misaligned}");
}

#[tokio::test]
async fn a_block_device_reports_its_own_geometry_and_honours_the_contract() {
    for sector in [512u32, 4096] {
        let lo = Loop::new(32 << 20, sector);
        // A plain-file block size must not override what the device reports.
        let options = FileOptions { file_block_size: 1024, ..FileOptions::default() };
        let dev = FileDevice::open(&lo.device, &options).unwrap();
        assert_eq!(dev.geometry(), Geometry { block_size: sector, size_bytes: 32 << 20 });
        exercise(dev.as_ref(), u64::from(sector)).await;
    }
}

#[tokio::test]
async fn a_block_device_works_with_direct_io() {
    let lo = Loop::new(16 << 20, 4096);
    let dev = FileDevice::open(&lo.device, &FileOptions { direct: true, ..FileOptions::default() }).unwrap();
    exercise(dev.as_ref(), 4096).await;
}

#[tokio::test]
async fn a_block_device_is_held_exclusively_and_a_held_one_is_refused_as_in_use() {
    let lo = Loop::new(16 << 20, 512);
    let dev = FileDevice::open(&lo.device, &FileOptions::default()).unwrap();
    let second =
        FileDevice::open(&lo.device, &FileOptions::default()).err().expect("a second open is refused");
    assert_eq!(second.kind(), std::io::ErrorKind::ResourceBusy);
    assert!(second.to_string().contains("in use"), "{second}");
    drop(dev);
    FileDevice::open(&lo.device, &FileOptions::default()).expect("free again once closed");
}

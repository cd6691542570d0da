//! The storage core end to end on real files: makes (or finds again) a pool of four
//! file-backed devices in a directory, a RAID 10 volume on it, writes and reads it back,
//! and shows where its blocks live. Run it twice: the second run finds everything again
//! from what is written on the files.
//!
//! `cargo run --release -p strata-pool --example quickstart [DIR]` (default ./strata-demo)

use std::path::PathBuf;

use bytes::Bytes;
use strata_block::{BlockIo, Durability, FileDevice, FileOptions};
use strata_pool::{Pool, PoolOptions, scan_dir};
use strata_volume::{Layout, VolumeRequest};

const DEVICE_SIZE: u64 = 1 << 30;
const VOLUME_SIZE: u64 = 512 << 20;
const PATTERN_BYTES: usize = 4 << 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "strata-demo".into()));
    std::fs::create_dir_all(&dir)?;
    let options = FileOptions::default();

    let (found, report) = Pool::open_paths(&scan_dir(&dir)?, &options).await?;
    let pool = match found {
        Some(pool) => {
            println!(
                "Found the pool again in {}: {} devices, {} volumes",
                dir.display(),
                report.members.len(),
                pool.volumes().len()
            );
            for repair in &report.repaired {
                println!("  repaired: {repair}");
            }
            pool
        }
        None => {
            println!("Making a pool of 4 sparse 1 GiB files in {}", dir.display());
            let pool = Pool::create(PoolOptions { name: "demo".into(), ..PoolOptions::default() })?;
            for i in 0..4 {
                let path = dir.join(format!("device{i}"));
                let device = FileDevice::create(&path, DEVICE_SIZE, &options)?;
                pool.claim(&path.display().to_string(), device, Some(format!("shelf{i}"))).await?;
            }
            pool
        }
    };

    let pattern: Vec<u8> = (0..PATTERN_BYTES).map(|i| u8::try_from(i % 251).expect("below 251")).collect();
    let volume = match pool.volume("demo") {
        Some(volume) => volume,
        None => {
            let volume = pool.create_volume("demo", VolumeRequest::new(VOLUME_SIZE, Layout::Raid10)).await?;
            volume.io().write(0, Bytes::from(pattern.clone()), Durability::Fua).await?;
            println!("Created volume 'demo' and wrote {} MiB to it", PATTERN_BYTES >> 20);
            volume
        }
    };
    let back = volume.io().read(0, PATTERN_BYTES as u64).await?;
    let intact = back.as_ref() == &pattern[..];
    let info = volume.info();
    println!(
        "Volume '{}': {} MiB, {}, {:?}; data read back {}",
        info.name,
        info.size_bytes >> 20,
        info.layout,
        info.state,
        if intact { "intact" } else { "DIFFERENT" }
    );
    for offset in [0, 64 << 10, 1 << 20] {
        let locations = pool.map("demo", offset).await?.unwrap_or_default();
        let places: Vec<String> = locations
            .iter()
            .map(|l| format!("{:?} on {} at {}", l.role, &l.device.to_string()[..8], l.device_offset))
            .collect();
        println!("  offset {offset:>8} -> {}", places.join(", "));
    }
    for device in pool.devices().await {
        println!(
            "  device {} {}: {} MiB free of {} MiB{}",
            &device.id.to_string()[..8],
            device.name,
            device.free_bytes >> 20,
            device.data_bytes >> 20,
            if device.config_replica { ", config replica" } else { "" }
        );
    }
    println!("Run it again: the pool and the volume are found again from the files.");
    if intact { Ok(()) } else { Err("the data read back differs".into()) }
}

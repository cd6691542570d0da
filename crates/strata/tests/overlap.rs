//! Overlapping writes sent together over NBD leave every copy of a volume alike (issue
//! #13, item 5): pairs of overlapping 64 KiB writes, each pair sent at once on one
//! connection or split over two, to mirror, raid10, raid5 and raid6 volumes; then the
//! controller stops and the copies are compared straight from the device files, leg by
//! leg for mirrors, P and Q against the data for parity.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{Server, data_dir};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strata_block::{BlockIo, FileDevice, FileOptions};
use strata_testkit::{check_redundancy, pattern};
use strata_volume::NodeSpec;
use uuid::Uuid;

const BLOCK: u64 = 4096;
const WRITE: u32 = 64 << 10;
/// Each pair writes inside a slot of its own, so no later pair hides a difference.
const SLOT: u64 = 128 << 10;
/// Pairs sent at once.
const BATCH: u64 = 64;

const CMD_WRITE: u16 = 1;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;

/// An NBD connection in transmission, with simple replies.
struct Connection(TcpStream);

impl Connection {
    /// Connects and negotiates `export` with NBD_OPT_GO.
    fn open(addr: &str, export: &str) -> Connection {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
        let mut data = u32::try_from(export.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut option = b"IHAVEOPT".to_vec();
        option.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        option.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        option.extend_from_slice(&data);
        s.write_all(&option).unwrap();
        loop {
            let mut header = [0u8; 20];
            s.read_exact(&mut header).unwrap();
            let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
            let mut body = vec![0; u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize];
            s.read_exact(&mut body).unwrap();
            match kind {
                1 => return Connection(s),
                3 => {}
                other => panic!("GO refused: {other:#x} {}", String::from_utf8_lossy(&body)),
            }
        }
    }

    /// Reads `n` simple replies; every one must report success.
    fn expect_replies(&mut self, n: usize) {
        for _ in 0..n {
            let mut reply = [0u8; 16];
            self.0.read_exact(&mut reply).unwrap();
            assert_eq!(u32::from_be_bytes(reply[..4].try_into().unwrap()), 0x6744_6698);
            let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
            assert_eq!(error, 0, "request {:#x} failed", u64::from_be_bytes(reply[8..].try_into().unwrap()));
        }
    }
}

/// Appends one request to `out`.
fn request(out: &mut Vec<u8>, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
    out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Sends `pairs` pairs of overlapping requests to `export`, `BATCH` pairs at a time: a
/// 64 KiB write at the start of the pair's slot, and a 64 KiB write (one in eight a
/// write-zeroes) a few blocks further. A pair goes whole on the first connection, whole
/// on the second, or split over both; one write in four is FUA.
fn send_pairs(addr: &str, export: &str, pairs: u64, seed: u64) {
    let mut connections = [Connection::open(addr, export), Connection::open(addr, export)];
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut cookie = 0;
    for batch in 0..pairs / BATCH {
        let mut buffers = [Vec::new(), Vec::new()];
        let mut sent = [0usize; 2];
        for slot in batch * BATCH..(batch + 1) * BATCH {
            let first = slot * SLOT;
            let second = first + rng.random_range(1..16) * BLOCK;
            let route = match slot % 3 {
                0 => [0, 0],
                1 => [1, 1],
                _ => [0, 1],
            };
            for (offset, conn) in [first, second].into_iter().zip(route) {
                cookie += 1;
                let flags = if rng.random_range(0..4) == 0 { FLAG_FUA } else { 0 };
                let out = &mut buffers[conn];
                if offset == second && rng.random_range(0..8) == 0 {
                    request(out, CMD_WRITE_ZEROES, flags, cookie, offset, WRITE, &[]);
                } else {
                    let data = pattern(rng.random(), offset, WRITE as usize);
                    request(out, CMD_WRITE, flags, cookie, offset, WRITE, &data);
                }
                sent[conn] += 1;
            }
        }
        std::thread::scope(|s| {
            for (connection, buffer) in connections.iter().zip(&buffers) {
                s.spawn(move || (&connection.0).write_all(buffer).unwrap());
            }
        });
        for (connection, n) in connections.iter_mut().zip(sent) {
            connection.expect_replies(n);
        }
    }
}

#[test]
fn overlapping_writes_over_nbd_leave_every_copy_alike() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(4, "512M");
    // Pairs per layout: parity layouts are ordered by their row lock already (the
    // in-process test in crates/testkit/tests/overlap.rs shows it), so fewer will do.
    let layouts = [("mirror", 1024), ("raid10", 1024), ("raid5", 256), ("raid6", 256)];
    for (i, &(layout, pairs)) in layouts.iter().enumerate() {
        server.volume(layout, &(pairs * SLOT).to_string(), layout);
        send_pairs(&server.nbd, layout, pairs, i as u64);
    }
    let trees: Vec<NodeSpec> = layouts
        .iter()
        .map(|(name, _)| {
            serde_json::from_value(server.json(&["volume", "show", name])["tree"].clone()).unwrap()
        })
        .collect();
    let paths: BTreeMap<Uuid, String> = server
        .json(&["device", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_str().unwrap().parse().unwrap(), d["name"].as_str().unwrap().to_string()))
        .collect();
    assert!(server.terminate().success());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let devices: BTreeMap<Uuid, Arc<dyn BlockIo>> = paths
        .iter()
        .map(|(id, path)| {
            let device: Arc<dyn BlockIo> = FileDevice::open(path, &FileOptions::default()).unwrap();
            (*id, device)
        })
        .collect();
    for ((layout, pairs), tree) in layouts.iter().zip(&trees) {
        rt.block_on(check_redundancy(tree, &devices))
            .unwrap_or_else(|e| panic!("{layout}: after {pairs} pairs of overlapping writes, {e}"));
    }
}

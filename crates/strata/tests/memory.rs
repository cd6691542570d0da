//! Clients that never read their replies cannot take the controller's memory, slow other
//! clients down, or hold up SIGTERM (issue #13, item 1): ten such clients on each
//! protocol ask for 8 MiB reads by the dozen while a well-behaved client keeps reading.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::initiator::{Initiator, read10};
use common::{Server, data_dir};

/// Clients that never read, on each protocol.
const FLOODERS: usize = 10;
/// NBD clients that send all but the last block of a 32 MiB write, and no more.
const STALLED_WRITERS: usize = 5;
/// 8 MiB reads each of them asks for (512 MiB per connection if nothing bounded them).
const READS_EACH: u64 = 64;
const READ_LEN: u32 = 8 << 20;
const VOLUME: u64 = 512 << 20;
/// How far above its idle RSS the controller may grow: the controller-wide budget
/// (128 MiB), one 1 MiB floor per connection, and room for the allocator.
const RSS_BOUND: u64 = 256 << 20;
const INITIATOR: &str = "iqn.2026-11.test:memory";

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// An NBD client past its handshake (NBD_OPT_EXPORT_NAME, no zeroes), reading or not.
fn nbd_connect(addr: &str, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut option = b"IHAVEOPT".to_vec();
    option.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    option.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
    option.extend_from_slice(name.as_bytes());
    s.write_all(&option).unwrap();
    let mut info = [0u8; 10]; // size, transmission flags
    s.read_exact(&mut info).unwrap();
    s
}

fn nbd_read_request(cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes()); // flags
    m.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&length.to_be_bytes());
    m
}

/// READ(16) of `blocks` at `lba`.
fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut cdb = vec![0x88, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.extend_from_slice(&blocks.to_be_bytes());
    cdb.extend_from_slice(&[0, 0]);
    cdb
}

/// The slowest of a few 4 KiB reads over NBD by a client that reads its replies.
fn nbd_latency(addr: &str, name: &str) -> Result<Duration, String> {
    let mut s = nbd_connect(addr, name);
    let mut slowest = Duration::ZERO;
    for i in 0..5u64 {
        let started = Instant::now();
        s.write_all(&nbd_read_request(i, i * 4096, 4096)).map_err(|e| e.to_string())?;
        let mut reply = vec![0u8; 16 + 4096];
        s.read_exact(&mut reply).map_err(|e| format!("no NBD reply: {e}"))?;
        assert_eq!(reply[..4], 0x6744_6698u32.to_be_bytes(), "a simple reply");
        assert_eq!(reply[4..8], [0; 4], "the read succeeded");
        slowest = slowest.max(started.elapsed());
    }
    Ok(slowest)
}

/// The slowest of a few 4 KiB reads over iSCSI by an initiator that reads its responses.
fn iscsi_latency(portal: &str, iqn: &str) -> Result<Duration, String> {
    let mut s = Initiator::login(portal, iqn, INITIATOR, false)?;
    let mut slowest = Duration::ZERO;
    for lba in 0..5 {
        let started = Instant::now();
        let read = s.command(&read10(lba, 1), &[], 4096)?;
        assert_eq!((read.status, read.data.len()), (0, 4096));
        slowest = slowest.max(started.elapsed());
    }
    Ok(slowest)
}

#[test]
fn clients_that_never_read_hold_bounded_memory_and_cannot_delay_others_or_sigterm() {
    let (_tmp, dir) = data_dir();
    let mut server = Server::start(&dir);
    server.add_devices(2, "1G");
    server.ok(&["volume", "create", "flood", "--size", "512M", "--layout", "linear"]);
    server.ok(&["export", "add", "flood", "--nbd"]);
    let iqn = "iqn.2026-11.io.strata:flood";
    server.ok(&["export", "add", "flood", "--iscsi", "--iqn", iqn]);
    let pid = server.child.id();
    // Warm both paths up, so idle counts what a served connection costs anyway.
    nbd_latency(&server.nbd, "flood").unwrap();
    iscsi_latency(&server.iscsi, iqn).unwrap();
    // Reads larger than a connection's budget still run, one after the other.
    let mut big = nbd_connect(&server.nbd, "flood");
    let largest = 32 << 20;
    big.write_all(&[nbd_read_request(1, 0, largest), nbd_read_request(2, 0, largest)].concat()).unwrap();
    for _ in 0..2 {
        let mut reply = vec![0u8; 16 + largest as usize];
        big.read_exact(&mut reply).expect("a 32 MiB read is answered");
        assert_eq!(reply[4..8], [0; 4], "the 32 MiB read succeeded");
    }
    drop(big);
    let idle = rss(pid);

    let blocks = READ_LEN / 4096;
    let mut flooders = Vec::new();
    for c in 0..FLOODERS as u64 {
        let mut s = nbd_connect(&server.nbd, "flood");
        let mut requests = Vec::new();
        for i in 0..READS_EACH {
            let offset = ((c * READS_EACH + i) * u64::from(READ_LEN)) % VOLUME;
            requests.extend(nbd_read_request(i, offset, READ_LEN));
        }
        s.write_all(&requests).unwrap();
        flooders.push(s);
    }
    let mut writers = Vec::new();
    for _ in 0..STALLED_WRITERS {
        let s = nbd_connect(&server.nbd, "flood");
        let mut sending = s.try_clone().unwrap();
        writers.push(std::thread::spawn(move || {
            let length = 32u32 << 20;
            let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
            m.extend_from_slice(&0u16.to_be_bytes());
            m.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
            m.extend_from_slice(&7u64.to_be_bytes());
            m.extend_from_slice(&0u64.to_be_bytes());
            m.extend_from_slice(&length.to_be_bytes());
            m.resize(m.len() + length as usize - 4096, 0x77);
            // The server may stop reading: then this times out, which is the point.
            let _ = sending.write_all(&m);
        }));
        flooders.push(s);
    }
    for c in 0..FLOODERS as u64 {
        let mut s = Initiator::login(&server.iscsi, iqn, INITIATOR, false).unwrap();
        for i in 0..READS_EACH {
            let lba = ((c * READS_EACH + i) * u64::from(blocks)) % (VOLUME / 4096);
            let mut header = s.command_header(&read16(lba, blocks), READ_LEN, true, false);
            header[0] |= 0x40; // immediate: no CmdSN window holds it back
            s.send(&header, &[], false);
        }
        flooders.push(s.stream);
    }

    // While they wait, the controller's memory stays bounded and others are served.
    let mut peak = 0;
    let mut slowest = Ok(Duration::ZERO);
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        peak = peak.max(rss(pid));
        for latency in [nbd_latency(&server.nbd, "flood"), iscsi_latency(&server.iscsi, iqn)] {
            peak = peak.max(rss(pid));
            slowest = match (slowest, latency) {
                (Ok(a), Ok(b)) => Ok(a.max(b)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        if slowest.is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    peak = peak.max(rss(pid));

    // SIGTERM ends the controller promptly though the flooders are still connected.
    let started = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(15) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopping = started.elapsed();
    drop(flooders);
    for writer in writers {
        writer.join().unwrap();
    }

    let grown = peak.saturating_sub(idle);
    eprintln!(
        "idle RSS {} MiB, peak {} MiB; slowest 4 KiB read {slowest:?}; SIGTERM took {stopping:?}",
        idle >> 20,
        peak >> 20
    );
    assert!(grown < RSS_BOUND, "RSS grew by {} MiB under clients that never read", grown >> 20);
    let slowest = slowest.expect("4 KiB reads complete beside the flooders");
    assert!(slowest < Duration::from_secs(1), "a 4 KiB read took {slowest:?} beside the flooders");
    let status = status.expect("SIGTERM ends the controller within 15 s");
    assert!(stopping < Duration::from_secs(10), "SIGTERM took {stopping:?} with clients that never read");
    assert!(status.success(), "strata serve exited with {status}; log:\n{}", server.log());
}

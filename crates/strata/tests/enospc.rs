//! A full file system under sparse device files is "no space", not dead disks: writes fail
//! with ENOSPC over NBD and with SPACE ALLOCATION FAILED over iSCSI, no device or volume
//! is failed, flushed data reads back, and once space is freed writes succeed again with
//! no restart and the mirror legs (and RAID 5 parity) agree.
//!
//! Runs as root: the devices live on a 64 MiB tmpfs mounted for the test.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::initiator::{Initiator, read10, write10};
use common::{Server, data_dir, qemu_io};

const HOST: &str = "iqn.2026-11.test:host1";

/// A tmpfs mounted for the test; unmounted when dropped, whatever happened.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let options = format!("size={size},mode=0700");
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &options, "tmpfs"]).arg(at).status();
        assert!(status.is_ok_and(|s| s.success()), "mounting a tmpfs needs root");
        Tmpfs(at.to_path_buf())
    }

    /// Bytes still free.
    fn available(&self) -> u64 {
        let out = Command::new("stat").args(["-f", "-c", "%a %S"]).arg(&self.0).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().unwrap());
        fields.next().unwrap() * fields.next().unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// qemu-io commands that must fail; returns what qemu-io said.
fn qemu_io_fails(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The (file, offset, length) of every member of the volume's one mirror or parity node.
fn members(server: &Server, volume: &str) -> Vec<(PathBuf, u64, u64)> {
    let shown = server.json(&["volume", "show", volume]);
    let devices = server.json(&["device", "list"]);
    let path_of = |id: &serde_json::Value| {
        let device = devices.as_array().unwrap().iter().find(|d| d["id"] == *id).expect("device listed");
        PathBuf::from(device["name"].as_str().unwrap())
    };
    let tree = &shown["tree"];
    assert!(matches!(tree["kind"].as_str(), Some("mirror" | "parity")), "{tree}");
    tree["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (path_of(&c["device"]), c["offset"].as_u64().unwrap(), c["length"].as_u64().unwrap()))
        .collect()
}

fn read_member(member: &(PathBuf, u64, u64)) -> Vec<u8> {
    let file = std::fs::File::open(&member.0).unwrap();
    let mut buf = vec![0u8; usize::try_from(member.2).unwrap()];
    file.read_exact_at(&mut buf, member.1).unwrap();
    buf
}

/// Every volume healthy, every device online: nothing was taken for a failed disk.
fn assert_nothing_failed(server: &Server) {
    for v in server.json(&["volume", "list"]).as_array().unwrap() {
        assert_eq!(v["state"], "healthy", "a full file system is not a failed volume: {v}");
    }
    for d in server.json(&["device", "list"]).as_array().unwrap() {
        assert_eq!(d["state"], "online", "{d}");
    }
    let status = server.json(&["status"]);
    assert_eq!(status["volumes"]["healthy"], 2, "{status}");
    assert_eq!(status["devices"]["online"], 3, "{status}");
}

#[test]
fn a_full_file_system_is_no_space_and_writes_resume_once_space_is_freed() {
    let (_tmp, dir) = data_dir();
    let fs = Tmpfs::mount(&dir.join("devices"), "64M");
    let server = Server::start(&dir);
    // 384 MiB of sparse devices on a 64 MiB file system: adding them says so.
    for i in 0..3 {
        let path = dir.join("devices").join(format!("dev{i}"));
        let args = [
            "device",
            "add",
            path.to_str().unwrap(),
            "--create",
            "128M",
            "--fault-domain",
            &format!("shelf{i}"),
        ];
        if i == 0 {
            let answer = server.json(&args);
            let warning = answer["warnings"][0].as_str().unwrap_or_default();
            assert!(warning.contains("may grow to 128.0 MiB, but it has only"), "{answer}");
        } else {
            let said = server.ok(&args);
            assert!(
                said.contains(&format!(
                    "Warning  The {} device files on this file system may grow to",
                    i + 1
                )),
                "{said}"
            );
        }
    }
    assert!(server.log().contains("device files over-commit their file system"), "{}", server.log());
    let mirror = server.volume("m", "24M", "mirror");
    let raid5 = server.volume("r", "24M", "raid5");
    let iqn = "iqn.2026-11.io.strata:r";
    server.ok(&["export", "add", "r", "--iscsi", "--iqn", iqn]);
    qemu_io(&mirror, &["write -P 0xa1 0 4M", "flush"]);
    qemu_io(&raid5, &["write -P 0xa2 0 4M", "flush"]);

    // Fill the file system but for 1.5 MiB: a 1 MiB mirror write then fits one leg only.
    let filler_path = fs.0.join("filler");
    let mut filler = std::fs::File::create(&filler_path).unwrap();
    let mut left = fs.available().saturating_sub(3 << 19);
    let chunk = vec![0x5fu8; 1 << 20];
    while left > 0 {
        let n = usize::try_from(left.min(1 << 20)).unwrap();
        filler.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    filler.sync_all().unwrap();
    let said = qemu_io_fails(&mirror, &["write -P 0xb1 8M 1M"]);
    assert!(said.contains("No space left on device"), "qemu-io saw:\n{said}");
    let legs = members(&server, "m");
    let diverged = read_member(&legs[0])[8 << 20..9 << 20] != read_member(&legs[1])[8 << 20..9 << 20];
    assert!(diverged, "the 1 MiB write was meant to fit one leg only: the test leaves 1.5 MiB free");
    // Now nothing is left at all.
    for size in [1 << 20, 4096] {
        while filler.write_all(&chunk[..size]).is_ok() {}
    }
    let said = qemu_io_fails(&raid5, &["write -P 0xb2 8M 1M"]);
    assert!(said.contains("No space left on device"), "qemu-io saw:\n{said}");
    let said = qemu_io_fails(&mirror, &["write -P 0xb3 12M 64k"]);
    assert!(said.contains("No space left on device"), "qemu-io saw:\n{said}");

    // iSCSI: DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT; reads go on.
    let mut session = Initiator::login(&server.iscsi, iqn, HOST, false).unwrap();
    let lba = u32::try_from((16 << 20) / 4096).unwrap();
    let answer = session.command(&write10(lba, 16), &[0x77; 64 << 10], 0).unwrap();
    assert_eq!((answer.status, answer.sense_code()), (2, Some((0x07, 0x27, 0x07))), "{answer:?}");
    let answer = session.command(&read10(0, 16), &[], 64 << 10).unwrap();
    assert_eq!((answer.status, &answer.data[..]), (0, &[0xa2; 64 << 10][..]));

    assert_nothing_failed(&server);
    assert!(server.log().contains("no space left for the request"), "{}", server.log());
    qemu_io(&mirror, &["read -P 0xa1 0 4M"]);
    qemu_io(&raid5, &["read -P 0xa2 0 4M"]);

    // Free the space: writes succeed again, with no restart.
    drop(filler);
    std::fs::remove_file(&filler_path).unwrap();
    // Half of the failed write is written again; a flush copies the other half over.
    qemu_io(&mirror, &["write -P 0xc1 8M 512k", "read -P 0xc1 8M 512k", "write -P 0xc3 12M 64k", "flush"]);
    qemu_io(&raid5, &["write -P 0xc2 8M 1M", "read -P 0xc2 8M 1M", "flush"]);
    let answer = session.command(&write10(lba, 16), &[0x77; 64 << 10], 0).unwrap();
    assert_eq!(answer.status, 0, "{answer:?}");
    assert_nothing_failed(&server);
    qemu_io(&mirror, &["read -P 0xa1 0 4M", "read -P 0xc3 12M 64k"]);
    qemu_io(&raid5, &["read -P 0xa2 0 4M", "read -P 0x77 16M 64k"]);

    // The mirror legs agree byte for byte, and every RAID 5 row's parity matches its data.
    let (a, b) = (read_member(&legs[0]), read_member(&legs[1]));
    let differ = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(differ, None, "the mirror legs differ at byte {differ:?}");
    let mut residue = vec![0u8; a.len()];
    let parity = members(&server, "r");
    for member in &parity {
        let data = read_member(member);
        residue.truncate(data.len());
        residue.iter_mut().zip(&data).for_each(|(r, d)| *r ^= d);
    }
    let bad = residue.iter().position(|&x| x != 0);
    assert_eq!(bad, None, "RAID 5 parity does not match its data at member byte {bad:?}");
    drop(session);
    drop(server);
}

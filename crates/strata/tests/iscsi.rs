//! `strata serve` as an iSCSI target, driven by libiscsi's tools (iscsi-inq, iscsi-ls,
//! iscsi-readcapacity16, iscsi-swp), qemu's iSCSI driver, and a hand-written initiator for
//! digests, reservations and bad bytes.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::initiator::{Initiator, read10, write10};
use common::{Server, data_dir, qemu_io, run};

const HOST1: &str = "iqn.2026-11.test:host1";
const HOST9: &str = "iqn.2026-11.test:host9";
const SECRET: &str = "alice-secret-123";
const MUTUAL: &str = "target-secret-456";

/// Runs a libiscsi tool; returns (success, stdout + stderr).
fn tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn tools_see_identity_and_chap_and_masking_hold() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "256M");
    server.ok(&["volume", "create", "v1", "--size", "64M"]);
    let iqn = "iqn.2026-11.io.strata:tools";
    server.ok(&[
        "export",
        "add",
        "v1",
        "--iscsi",
        "--iqn",
        iqn,
        "--lun",
        "3",
        "--allow",
        HOST1,
        "--chap-user",
        "alice",
        "--chap-secret",
        SECRET,
        "--mutual-user",
        "target",
        "--mutual-secret",
        MUTUAL,
    ]);
    let exports = server.json(&["export", "list"]);
    let export = exports.as_array().unwrap().iter().find(|e| e["protocol"] == "iscsi").unwrap().clone();
    assert_eq!(export["name"], iqn);
    assert_eq!(export["lun"], 3);
    assert_eq!(export["portal"], server.iscsi.as_str());
    assert!(export["chap"].get("secret").is_none(), "listings leave secrets out: {export}");
    let table = server.ok(&["export", "list"]);
    assert!(table.contains("PORTAL") && table.contains(iqn) && table.contains(&server.iscsi), "{table}");

    let portal = &server.iscsi;
    let url = format!("iscsi://alice%{SECRET}@{portal}/{iqn}/3");
    let (ok, inq) = tool("iscsi-inq", &["-i", HOST1, &url]);
    assert!(ok, "{inq}");
    assert!(inq.contains("STRATA") && inq.contains("VOLUME"), "{inq}");
    let (ok, serial) = tool("iscsi-inq", &["-i", HOST1, "-e", "1", "-c", "128", &url]);
    let volume = server.json(&["volume", "show", "v1"]);
    let id = volume["id"].as_str().unwrap().replace('-', "");
    assert!(ok && serial.contains(&id), "serial number is the volume id {id}: {serial}");
    let (ok, capacity) = tool("iscsi-readcapacity16", &["-i", HOST1, "-s", &url]);
    assert!(ok && capacity.trim() == (64u64 << 20).to_string(), "{capacity}");

    // Discovery shows the target only to an allowed initiator; -s logs in to list LUNs.
    let (ok, listed) = tool("iscsi-ls", &["-i", HOST1, &format!("iscsi://{portal}")]);
    assert!(ok && listed.contains(iqn), "{listed}");
    let (_, hidden) = tool("iscsi-ls", &["-i", HOST9, &format!("iscsi://{portal}")]);
    assert!(!hidden.contains(iqn), "masked target listed for {HOST9}: {hidden}");
    let (ok, luns) = tool("iscsi-ls", &["-i", HOST1, "-s", &format!("iscsi://alice%{SECRET}@{portal}")]);
    assert!(ok && luns.contains("Lun:3"), "{luns}");
    let (_, no_chap) = tool("iscsi-ls", &["-i", HOST1, "-s", &format!("iscsi://{portal}")]);
    assert!(!no_chap.contains("Lun:3"), "LUNs listed without CHAP: {no_chap}");

    // Mutual CHAP: the target proves itself; a wrong expectation fails the login.
    let mutual = format!("{url}?target_user=target&target_password={MUTUAL}");
    let (ok, out) = tool("iscsi-inq", &["-i", HOST1, &mutual]);
    assert!(ok, "mutual CHAP: {out}");
    let (ok, _) = tool(
        "iscsi-inq",
        &["-i", HOST1, &format!("{url}?target_user=target&target_password=wrong-secret-0")],
    );
    assert!(!ok, "the initiator must refuse a target that cannot answer its challenge");

    // Refused: a wrong secret, no CHAP at all, an initiator not on the allow-list.
    let (ok, _) =
        tool("iscsi-inq", &["-i", HOST1, &format!("iscsi://alice%wrong-secret-00@{portal}/{iqn}/3")]);
    assert!(!ok, "a wrong CHAP secret logged in");
    let (ok, _) = tool("iscsi-inq", &["-i", HOST1, &format!("iscsi://{portal}/{iqn}/3")]);
    assert!(!ok, "a login without CHAP got in");
    let (ok, _) = tool("iscsi-inq", &["-i", HOST9, &url]);
    assert!(!ok, "an initiator not on the allow-list logged in");
    // The refusal is logged (just after the answer goes out, so give it a moment).
    let logged = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        server.log().contains("not allowed on target")
    });
    assert!(logged, "the refusal is logged");

    // Software write protect through MODE SELECT, seen by the next session.
    let (ok, out) = tool("iscsi-swp", &["-i", HOST1, "-s", "on", &url]);
    assert!(ok, "{out}");
    let (_, out) = tool("iscsi-swp", &["-i", HOST1, &url]);
    assert!(out.contains("SWP:1"), "{out}");
    let (ok, out) = tool("iscsi-swp", &["-i", HOST1, "-s", "off", &url]);
    assert!(ok, "{out}");
}

#[test]
fn iscsi_and_nbd_serve_the_same_bytes() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(4, "256M");
    let nbd = server.volume("both", "64M", "raid10");
    let iqn = "iqn.2026-11.io.strata:both";
    server.ok(&["export", "add", "both", "--iscsi", "--iqn", iqn]);
    let mut s = Initiator::login(&server.iscsi, iqn, HOST1, false).unwrap();
    // Written over iSCSI (64 KiB commands: immediate data), read over NBD.
    let pattern = vec![0x5a; 64 << 10];
    for lba in (256..1024).step_by(16) {
        assert_eq!(s.command(&write10(lba, 16), &pattern, 0).unwrap().status, 0);
    }
    qemu_io(&nbd, &["read -P 0x5a 1M 3M", "read -P 0 4M 1M", "write -P 0x77 40M 1M"]);
    // Written over NBD, read over iSCSI in 1 MiB commands (many Data-In PDUs each).
    let read = s.command(&read10(10240, 256), &[], 1 << 20).unwrap();
    assert_eq!(read.status, 0);
    assert!(
        read.data.iter().all(|b| *b == 0x77) && read.data.len() == 1 << 20,
        "NBD's write seen over iSCSI"
    );
    // The first 8 MiB read both ways are identical.
    let copy = dir.with_extension("nbd.raw");
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &nbd, copy.to_str().unwrap()]);
    let via_nbd = std::fs::read(&copy).unwrap();
    let mut via_iscsi = Vec::new();
    for lba in (0..2048u32).step_by(256) {
        via_iscsi.extend(s.command(&read10(lba, 256), &[], 1 << 20).unwrap().data);
    }
    assert!(via_iscsi == via_nbd[..8 << 20], "iSCSI and NBD disagree about the first 8 MiB");
    // Removing the iSCSI export leaves NBD serving; new iSCSI logins are refused.
    server.ok(&["export", "remove", "both", "--iscsi"]);
    assert!(Initiator::login(&server.iscsi, iqn, HOST1, false).is_err());
    qemu_io(&nbd, &["read -P 0x77 40M 1M"]);
}

/// PERSISTENT RESERVE OUT with a 24-byte parameter list.
fn prout(
    s: &mut Initiator,
    action: u8,
    kind: u8,
    key: u64,
    sa_key: u64,
    aptpl: bool,
) -> common::initiator::ScsiResult {
    let mut params = vec![0u8; 24];
    params[..8].copy_from_slice(&key.to_be_bytes());
    params[8..16].copy_from_slice(&sa_key.to_be_bytes());
    params[20] = u8::from(aptpl);
    let cdb = [0x5f, action, kind, 0, 0, 0, 0, 0, 24, 0];
    s.command(&cdb, &params, 0).unwrap()
}

/// PERSISTENT RESERVE IN: (generation, keys) for READ KEYS, or the reservation.
fn prin(s: &mut Initiator, action: u8) -> Vec<u8> {
    let cdb = [0x5e, action, 0, 0, 0, 0, 0, 0x01, 0, 0];
    let r = s.command(&cdb, &[], 256).unwrap();
    assert_eq!(r.status, 0, "PERSISTENT RESERVE IN: {r:?}");
    r.data
}

#[test]
fn persistent_reservations_survive_a_restart() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(2, "256M");
    server.ok(&["volume", "create", "pr", "--size", "32M", "--layout", "mirror"]);
    let iqn = "iqn.2026-11.io.strata:pr";
    server.ok(&["export", "add", "pr", "--iscsi", "--iqn", iqn]);
    let mut a = Initiator::login(&server.iscsi, iqn, HOST1, false).unwrap();
    let key = 0x1122_3344_5566_7788;
    assert_eq!(prout(&mut a, 0x00, 0, 0, key, true).status, 0, "REGISTER with APTPL");
    assert_eq!(prout(&mut a, 0x01, 0x03, key, 0, false).status, 0, "RESERVE exclusive access");
    // Another initiator, not registered, is shut out.
    let mut b = Initiator::login(&server.iscsi, iqn, HOST9, false).unwrap();
    let r = b.command(&read10(0, 1), &[], 4096).unwrap();
    assert_eq!(r.status, 0x18, "RESERVATION CONFLICT for the other initiator: {r:?}");
    drop((a, b));
    server.kill9();

    let server = Server::start(&dir);
    let mut a = Initiator::login(&server.iscsi, iqn, HOST1, false).unwrap();
    let keys = prin(&mut a, 0x00);
    assert_eq!(u32::from_be_bytes(keys[4..8].try_into().unwrap()), 8, "one key after the restart: {keys:?}");
    assert_eq!(u64::from_be_bytes(keys[8..16].try_into().unwrap()), key);
    let reservation = prin(&mut a, 0x01);
    assert_eq!(
        u32::from_be_bytes(reservation[4..8].try_into().unwrap()),
        16,
        "a reservation: {reservation:?}"
    );
    assert_eq!(u64::from_be_bytes(reservation[8..16].try_into().unwrap()), key);
    assert_eq!(reservation[21] & 0x0f, 0x03, "exclusive access");
    let mut b = Initiator::login(&server.iscsi, iqn, HOST9, false).unwrap();
    assert_eq!(b.command(&read10(0, 1), &[], 4096).unwrap().status, 0x18);
    // The holder releases and unregisters; the others are free again.
    assert_eq!(prout(&mut a, 0x02, 0x03, key, 0, false).status, 0, "RELEASE");
    assert_eq!(prout(&mut a, 0x00, 0, key, 0, false).status, 0, "unregister");
    assert_eq!(b.command(&read10(0, 1), &[], 4096).unwrap().status, 0);
}

#[test]
fn digests_are_checked_both_ways() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "256M");
    server.ok(&["volume", "create", "d", "--size", "16M"]);
    let iqn = "iqn.2026-11.io.strata:digests";
    server.ok(&["export", "add", "d", "--iscsi", "--iqn", iqn]);
    let mut s = Initiator::login(&server.iscsi, iqn, HOST1, true).unwrap();
    assert!(s.header_digest && s.data_digest, "the target accepts CRC32C digests");
    let block: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(s.command(&write10(8, 2), &block, 0).unwrap().status, 0);
    // Digests on every reply are checked by the initiator as it reads.
    assert_eq!(s.command(&read10(8, 2), &[], 8192).unwrap().data, block);

    // A corrupted data digest is rejected and the connection ends (ErrorRecoveryLevel 0);
    // the block is not written.
    let other = Initiator::login(&server.iscsi, iqn, HOST9, true);
    let mut other = other.unwrap();
    let header = s.command_header(&write10(8, 1), 4096, false, true);
    s.send(&header, &[0xee; 4096], true);
    let reply = s.read().expect("a Reject before the connection closes");
    assert_eq!((reply.opcode(), reply.header[2]), (0x3f, 0x02), "Reject, data digest error");
    assert!(s.closed_within(Duration::from_secs(5)), "the connection closes");
    let back = other.command(&read10(8, 2), &[], 8192).unwrap();
    assert_eq!(back.data, block, "the damaged write was not applied; the other session carries on");
    // A header whose digest does not match cannot be trusted, not even to Reject it: the
    // connection ends.
    let header = other.command_header(&read10(8, 1), 4096, true, false);
    let mut wire = header.to_vec();
    wire.extend_from_slice(&(crc32c::crc32c(&header) ^ 0x8000_0000).to_le_bytes());
    other.stream.write_all(&wire).unwrap();
    assert!(other.closed_within(Duration::from_secs(5)), "a bad header digest ends the connection");
}

#[test]
fn garbage_and_truncated_pdus_leave_the_target_serving() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "256M");
    server.ok(&["volume", "create", "g", "--size", "16M"]);
    let iqn = "iqn.2026-11.io.strata:garbage";
    server.ok(&["export", "add", "g", "--iscsi", "--iqn", iqn]);
    let mut steady = Initiator::login(&server.iscsi, iqn, HOST1, false).unwrap();
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    for round in 0..40 {
        let mut c = TcpStream::connect(&server.iscsi).unwrap();
        let len = (next() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        if round % 3 == 0 && bytes.len() >= 48 {
            bytes[0] = 0x43; // looks like a login, then garbage or a cut
        }
        let _ = c.write_all(&bytes);
        drop(c);
    }
    // Bad PDUs inside a logged-in session: data beyond the expected length, an unknown
    // opcode, a CmdSN far outside the window, a truncated PDU then hang-up.
    let mut bad = Initiator::login(&server.iscsi, iqn, HOST9, false).unwrap();
    let mut header = [0u8; 48];
    header[0] = 0x1c; // not an opcode
    header[1] = 0x80;
    bad.send(&header, &[], false);
    let reply = bad.read().unwrap();
    assert_eq!((reply.opcode(), reply.header[2]), (0x3f, 0x05), "Reject, command not supported");
    let mut outside = bad.command_header(&read10(0, 1), 4096, true, false);
    outside[24..28].copy_from_slice(&0x4000_0000u32.to_be_bytes());
    bad.send(&outside, &[], false);
    bad.cmd_sn -= 1; // that command took no CmdSN: the target ignored it
    let header = bad.command_header(&write10(0, 1), 512, false, true);
    bad.send(&header, &[0u8; 4096], false);
    let reply = bad.read().unwrap();
    assert_eq!(reply.opcode(), 0x3f, "immediate data beyond the expected length is rejected");
    assert!(bad.closed_within(Duration::from_secs(5)));
    let mut cut = Initiator::login(&server.iscsi, iqn, "iqn.2026-11.test:cut", false).unwrap();
    let header = cut.command_header(&write10(0, 2), 8192, false, true);
    cut.stream.write_all(&header[..30]).unwrap();
    drop(cut);

    // Immediate commands take no CmdSN, so the window does not bound them: a flood of
    // writes that never send their data ends in TASK SET FULL, not in unbounded memory.
    let mut flood = Initiator::login(&server.iscsi, iqn, "iqn.2026-11.test:flood", false).unwrap();
    for _ in 0..300 {
        let mut header = flood.command_header(&write10(0, 16), 65536, false, true);
        header[0] |= 0x40; // immediate
        header[1] &= !0x80; // unsolicited Data-Out would follow
        flood.cmd_sn -= 1;
        flood.send(&header, &[0u8; 4096], false);
    }
    let full = flood.finish().expect("an answer to the flood");
    assert_eq!(full.status, 0x28, "TASK SET FULL");

    // Everyone else is unaffected.
    let r = steady.command(&write10(4, 1), &[0x42; 4096], 0).unwrap();
    assert_eq!(r.status, 0);
    assert_eq!(steady.command(&read10(4, 1), &[], 4096).unwrap().data, vec![0x42; 4096]);
    let (ok, out) = tool("iscsi-inq", &[&format!("iscsi://{}/{iqn}/0", server.iscsi)]);
    assert!(ok, "{out}");
}

/// LUNs (big-endian 8-byte entries) in a REPORT LUNS answer.
fn report_luns(s: &mut Initiator) -> Vec<u64> {
    let r = s.command(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256).unwrap();
    assert_eq!(r.status, 0, "REPORT LUNS: {r:?}");
    let len = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
    r.data[8..8 + len].chunks(8).map(|l| u64::from(u16::from_be_bytes([l[0] & 0x3f, l[1]]))).collect()
}

#[test]
fn lun_masking_and_target_port_groups() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "256M");
    let iqn = "iqn.2026-11.io.strata:shared";
    server.ok(&["volume", "create", "private", "--size", "16M"]);
    server.ok(&["volume", "create", "common", "--size", "16M"]);
    server.ok(&["export", "add", "private", "--iscsi", "--iqn", iqn, "--lun", "0", "--allow", HOST1]);
    server.ok(&["export", "add", "common", "--iscsi", "--iqn", iqn, "--lun", "7", "--allow", HOST1, HOST9]);
    let out = server.cli(&["export", "add", "common", "--iscsi", "--iqn", iqn, "--lun", "7"]);
    assert!(!out.status.success(), "a second iSCSI export of one volume is refused");
    let mut one = Initiator::login(&server.iscsi, iqn, HOST1, false).unwrap();
    let mut nine = Initiator::login(&server.iscsi, iqn, HOST9, false).unwrap();
    assert_eq!(report_luns(&mut one), vec![0, 7]);
    assert_eq!(report_luns(&mut nine), vec![7], "{HOST9} does not see LUN 0");
    // LUN 0 is not there for HOST9: INQUIRY says so, other commands are refused.
    let mut header = nine.command_header(&[0x12, 0, 0, 0, 96, 0], 96, true, false);
    header[8..16].copy_from_slice(&[0; 8]);
    nine.send(&header, &[], false);
    let inquiry = nine.finish().unwrap();
    assert_eq!(inquiry.data[0], 0x7f, "peripheral qualifier 3: no unit at LUN 0 for {HOST9}");
    let mut header = nine.command_header(&read10(0, 1), 4096, true, false);
    header[8..16].copy_from_slice(&[0; 8]);
    nine.send(&header, &[], false);
    let refused = nine.finish().unwrap();
    assert_eq!(
        (refused.status, refused.sense_code().map(|s| (s.0, s.1))),
        (2, Some((5, 0x25))),
        "LOGICAL UNIT NOT SUPPORTED"
    );
    // REPORT TARGET PORT GROUPS (MAINTENANCE IN): one group, active/optimized, with this port.
    let mut header = one.command_header(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256, true, false);
    header[8..16].copy_from_slice(&[0, 7, 0, 0, 0, 0, 0, 0]);
    one.send(&header, &[], false);
    let groups = one.finish().unwrap();
    assert_eq!(groups.status, 0, "{groups:?}");
    let len = u32::from_be_bytes(groups.data[..4].try_into().unwrap()) as usize;
    let descriptor = &groups.data[4..4 + len];
    assert_eq!(descriptor[0] & 0x0f, 0, "active/optimized");
    assert_eq!(descriptor[7], 1, "one target port in the group");
    assert_eq!(u16::from_be_bytes([descriptor[10], descriptor[11]]), 1, "relative target port 1");
    // A TARGET WARM RESET from HOST9, who sees only LUN 7, reaches LUN 0 too: HOST1 gets a
    // unit attention there.
    let mut tmf = [0u8; 48];
    tmf[0] = 0x42; // immediate Task Management Function request
    tmf[1] = 0x80 | 6;
    tmf[16..20].copy_from_slice(&0x7777u32.to_be_bytes());
    tmf[20..24].copy_from_slice(&[0xff; 4]);
    tmf[24..28].copy_from_slice(&nine.cmd_sn.to_be_bytes());
    nine.send(&tmf, &[], false);
    let reply = nine.read().unwrap();
    assert_eq!((reply.opcode(), reply.header[2]), (0x22, 0), "TMF response: function complete");
    let tur = one.command(&[0, 0, 0, 0, 0, 0], &[], 0).unwrap();
    assert_eq!(
        (tur.status, tur.sense_code().map(|s| (s.0, s.1))),
        (2, Some((6, 0x29))),
        "unit attention: reset"
    );
    // Removing LUN 7's export takes it away from a session already logged in.
    server.ok(&["export", "remove", "common"]);
    assert_eq!(report_luns(&mut one), vec![0]);
    // Metrics: iSCSI IO per volume, and the sessions open.
    let metrics = run(
        "curl",
        &[
            "-s",
            "-H",
            &format!("Authorization: Bearer {}", server.token()),
            &format!("{}/metrics", server.api),
        ],
    );
    assert!(
        metrics.contains("strata_io_requests_total{scope=\"iscsi\",name=\"private\",op=\"read\"}"),
        "{metrics}"
    );
    assert!(metrics.lines().any(|l| l == "strata_iscsi_sessions 2"), "two sessions open: {metrics}");
}

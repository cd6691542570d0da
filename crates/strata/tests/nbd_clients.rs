//! Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against a real controller.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Server, data_dir, qemu_io, run};

#[test]
fn qemu_io_writes_and_reads_back_patterns() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(2, "256M");
    let uri = server.volume("vol", "64M", "mirror");
    qemu_io(&uri, &["write -P 0x5a 0 8M", "write -P 0xa5 8M 64k", "write -P 0x33 12k 4k", "flush"]);
    qemu_io(
        &uri,
        &["read -P 0x5a 0 12k", "read -P 0x33 12k 4k", "read -P 0x5a 16k 8176k", "read -P 0xa5 8M 64k"],
    );
    // Unaligned for our 4 KiB blocks: qemu reads, modifies and writes whole blocks.
    qemu_io(
        &uri,
        &["write -P 0x77 1000 300", "read -P 0x77 1000 300", "read -P 0x5a 0 1000", "read -P 0x5a 1300 2796"],
    );
    // FUA writes and zeroing.
    qemu_io(
        &uri,
        &["write -f -P 0x44 16M 1M", "write -z 16M 512k", "read -P 0 16M 512k", "read -P 0x44 16896k 512k"],
    );
}

#[test]
fn qemu_img_convert_copies_an_image_in_and_compare_agrees() {
    let (tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(4, "256M");
    let uri = server.volume("img", "48M", "raid5");
    let image = tmp.path().join("source.raw");
    let image = image.to_str().unwrap();
    run("qemu-img", &["create", "-f", "raw", image, "48M"]);
    qemu_io(image, &["write -P 0x11 0 5M", "write -P 0x22 20M 3M", "write -P 0x33 47M 1M"]);
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", image, &uri]);
    let compare = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", image, &uri]);
    assert!(compare.contains("Images are identical"), "{compare}");
    // And compare notices a difference.
    qemu_io(&uri, &["write -P 0x99 30M 4k"]);
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", image, &uri])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn nbdinfo_lists_exports_and_maps_holes_after_trim() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(4, "256M");
    for layout in ["linear", "raid10"] {
        let uri = server.volume(layout, "32M", layout);
        qemu_io(&uri, &["write -P 0x42 0 8M"]);
        let map = run("nbdinfo", &["--map", &uri]);
        assert!(map.lines().next().unwrap().contains("data"), "{layout}: {map}");
        qemu_io(&uri, &["discard 2M 2M"]);
        let map = run("nbdinfo", &["--map", &uri]);
        let hole = map.lines().find(|l| l.split_whitespace().next() == Some("2097152")).unwrap_or_default();
        assert!(
            hole.contains("hole") && hole.contains("2097152"),
            "{layout}: no 2 MiB hole at 2 MiB after TRIM:\n{map}"
        );
        assert!(
            map.contains("4194304") && map.lines().nth(2).unwrap_or("").contains("data"),
            "{layout}: {map}"
        );
        qemu_io(&uri, &["read -P 0 2M 2M", "read -P 0x42 4M 4M"]);
    }
    let list = run("nbdinfo", &["--list", &format!("nbd://{}", server.nbd)]);
    assert!(list.contains("export=\"linear\"") && list.contains("export=\"raid10\""), "{list}");
}

#[test]
fn nbdcopy_round_trips_data_over_several_connections() {
    let (tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(3, "256M");
    let uri = server.volume("copy", "24M", "stripe");
    let source = tmp.path().join("in.bin");
    let back = tmp.path().join("out.bin");
    let data: Vec<u8> =
        (0..24u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    std::fs::write(&source, &data).unwrap();
    run("nbdcopy", &["--connections=4", "--requests=16", source.to_str().unwrap(), &uri]);
    run("nbdcopy", &["--connections=4", &uri, back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data, "data read back through nbdcopy differs");
}

#[test]
fn fio_verifies_every_layout() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(4, "512M");
    for layout in ["linear", "stripe", "mirror", "raid10", "raid5", "raid6"] {
        let uri = server.volume(layout, "64M", layout);
        let out = run(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bsrange=4k-128k",
                "--iodepth=16",
                "--size=48M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--numjobs=1",
                "--verify_state_save=0",
            ],
        );
        assert!(out.contains("err= 0"), "{layout}: {out}");
    }
}

#[test]
fn export_allow_list_and_read_only() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "256M");
    server.ok(&["volume", "create", "hidden", "--size", "16M"]);
    server.ok(&["export", "add", "hidden", "--nbd", "--allow", "10.9.9.0/24"]);
    server.ok(&["volume", "create", "ro", "--size", "16M"]);
    server.ok(&["export", "add", "ro", "--nbd", "--read-only", "--allow", "127.0.0.1", "10.0.0.0/8"]);
    let list = run("nbdinfo", &["--list", &format!("nbd://{}", server.nbd)]);
    assert!(!list.contains("hidden") && list.contains("export=\"ro\""), "{list}");
    let refused = std::process::Command::new("nbdinfo").arg(server.uri("hidden")).output().unwrap();
    assert!(!refused.status.success(), "a client outside the allow-list connected");
    let write = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &server.uri("ro")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&write.stdout).to_string() + &String::from_utf8_lossy(&write.stderr);
    assert!(!write.status.success() && text.contains("Permission denied"), "{text}");
    let read = run("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0 0 1M", &server.uri("ro")]);
    assert!(!read.contains("failed"), "{read}");
    // A client that ignores the read-only flag gets EPERM.
    let (mut raw, _) = Raw::go(&server.nbd, "ro");
    raw.request(1, 1, 0, 4096, &[1; 4096]);
    assert_eq!(raw.reply(), (1, 1), "write to a read-only export: EPERM");
}

/// A minimal hand-written client, to send what real clients never do.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw(s)
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }

    /// Greeting, then NBD_OPT_GO for `name` (simple replies); returns the export size.
    fn go(addr: &str, name: &str) -> (Raw, u64) {
        let mut c = Raw::connect(addr);
        let greeting = c.read_n(18);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        c.0.write_all(&3u32.to_be_bytes()).unwrap();
        let mut data = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        c.option(7, &data);
        let mut size = 0;
        loop {
            let header = c.read_n(20);
            let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
            let body = c.read_n(len);
            match kind {
                1 => return (c, size),
                3 if body[..2] == [0, 0] => size = u64::from_be_bytes(body[2..10].try_into().unwrap()),
                3 => {}
                other => panic!("GO refused: {other:#x} {}", String::from_utf8_lossy(&body)),
            }
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&length.to_be_bytes());
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let r = self.read_n(16);
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
        (u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap()))
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn bad_clients_get_errors_or_a_clean_disconnect_and_others_carry_on() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "256M");
    let uri = server.volume("v", "16M", "linear");
    let addr = server.nbd.clone();
    // A healthy client stays connected through everything below.
    let (mut good, size) = Raw::go(&addr, "v");
    assert_eq!(size, 16 << 20);

    // Garbage instead of a handshake.
    let mut c = Raw::connect(&addr);
    c.read_n(18);
    c.0.write_all(&[0xff; 300]).unwrap();
    assert!(c.closed());
    // A bad option magic, then an option claiming 4 GiB of data.
    let mut c = Raw::connect(&addr);
    c.read_n(18);
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    c.0.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(c.closed());
    let mut c = Raw::connect(&addr);
    c.read_n(18);
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    c.0.write_all(b"IHAVEOPT\0\0\0\x07\xff\xff\xff\xff").unwrap();
    assert!(c.closed());
    // An unknown export and an unknown option get errors, not a hang.
    let mut c = Raw::connect(&addr);
    c.read_n(18);
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    c.option(99, b"");
    let header = c.read_n(20);
    assert_eq!(u32::from_be_bytes(header[12..16].try_into().unwrap()), (1 << 31) | 1, "ERR_UNSUP");
    let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
    c.read_n(len);

    // In transmission: out of range, misaligned, zero length, unknown command.
    let (mut c, _) = Raw::go(&addr, "v");
    c.request(0, 1, 16 << 20, 4096, &[]);
    assert_eq!(c.reply(), (22, 1), "read past the end: EINVAL");
    c.request(1, 2, 16 << 20, 4096, &[0; 4096]);
    assert_eq!(c.reply(), (28, 2), "write past the end: ENOSPC");
    c.request(0, 3, 100, 4096, &[]);
    assert_eq!(c.reply(), (22, 3), "misaligned read: EINVAL");
    c.request(0, 4, 0, 0, &[]);
    assert_eq!(c.reply(), (22, 4));
    c.request(42, 5, 0, 4096, &[]);
    assert_eq!(c.reply(), (22, 5), "unknown command: EINVAL");
    c.request(0, 6, 0, 64 << 20, &[]);
    assert_eq!(c.reply(), (75, 6), "oversized read: EOVERFLOW");
    // Then an oversized write: the connection is dropped.
    c.request(1, 7, 0, 64 << 20, &[]);
    assert!(c.closed());
    // A write whose payload never fully arrives, then a hang-up.
    let (mut c, _) = Raw::go(&addr, "v");
    c.request(1, 8, 0, 1 << 20, &[7; 1000]);
    drop(c);

    // The first client and new ones carry on.
    good.request(1, 9, 4096, 4096, &[0x5a; 4096]);
    assert_eq!(good.reply(), (0, 9));
    good.request(0, 10, 4096, 4096, &[]);
    assert_eq!(good.reply(), (0, 10));
    assert_eq!(good.read_n(4096), vec![0x5a; 4096]);
    qemu_io(&uri, &["read -P 0x5a 4k 4k", "read -P 0 0 4k"]);
    assert!(
        server.child.id() > 0
            && std::process::Command::new("kill")
                .args(["-0", &server.child.id().to_string()])
                .status()
                .unwrap()
                .success()
    );
}

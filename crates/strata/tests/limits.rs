//! What one client can take from `strata serve`: floods of idle connections on the API, NBD
//! and iSCSI from one address are capped there while clients from another address are
//! served; the API closes connections that send nothing; the limit on open files is raised
//! to the hard limit; an oversized API body is refused with 413.
//!
//! The floods come from 127.0.0.2 (a socket bound there before it connects: Linux routes
//! all of 127/8 to loopback), so the real clients (curl, qemu-io, iscsi-inq) that connect
//! from 127.0.0.1 are the other address.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, data_dir, qemu_io, run};

/// Connections each flood opens: more than the default total cap of 1024 and more than
/// the default soft limit on open files.
const FLOOD: usize = 1100;
/// The per-address cap the tests configure (the default).
const PER_ADDRESS: usize = 64;
/// The soft limit on open files the controller is started with, as on most systems.
const LOW_SOFT_LIMIT: u64 = 1024;

/// The soft limit on open files of this test process, raised to the hard limit: each
/// flood holds more than a thousand sockets here.
fn raise_own_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(limit.rlim_cur >= 4 * FLOOD as u64, "the tests need a hard limit on open files of 4400 or more");
}

/// Starts a controller whose soft limit on open files is 1024 (the hard one is kept),
/// with `config` as its TOML file.
fn start(dir: &std::path::Path, config: &str) -> Server {
    raise_own_file_limit();
    let path = dir.with_extension("toml");
    std::fs::write(&path, config).unwrap();
    Server::start_adjusted(dir, &["--config", path.to_str().unwrap()], |command| {
        // SAFETY: between fork and exec the closure only calls getrlimit and setrlimit,
        // which are async-signal-safe, and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                limit.rlim_cur = LOW_SOFT_LIMIT.min(limit.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
}

/// The soft and hard limits on open files of process `pid`, from /proc/PID/limits.
fn file_limits(pid: u32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    (fields[0].to_string(), fields[1].to_string())
}

/// Opens `n` connections to `to` from 127.0.0.2 and leaves them idle.
fn flood(to: &str, n: usize) -> Vec<TcpStream> {
    let to: SocketAddr = to.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let connected = tokio::time::timeout(Duration::from_secs(5), socket.connect(to)).await;
            if let Ok(Ok(stream)) = connected {
                let stream = stream.into_std().unwrap();
                stream.set_nonblocking(true).unwrap();
                streams.push(stream);
            }
        }
        streams
    })
}

/// How many of `streams` the server has closed (end of stream or reset); what the server
/// sent on the others is read and dropped.
fn closed(streams: &mut [TcpStream]) -> usize {
    let mut buf = [0u8; 512];
    streams
        .iter()
        .filter(|s| {
            loop {
                match (&**s).read(&mut buf) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            }
        })
        .count()
}

/// Waits until at least `at_least` of `streams` are closed; returns how many are, and
/// when that was seen.
fn wait_closed(streams: &mut [TcpStream], at_least: usize, within: Duration) -> (usize, Instant) {
    let deadline = Instant::now() + within;
    loop {
        let n = closed(streams);
        if n >= at_least || Instant::now() > deadline {
            return (n, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// curl from 127.0.0.1 against the API; (status code, body).
fn curl(server: &Server, args: &[&str], path: &str) -> (String, String) {
    let auth = format!("Authorization: Bearer {}", server.token());
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "--interface", "127.0.0.1", "-w", "\n%{http_code}", "-H", &auth])
        .args(args)
        .arg(format!("{}{path}", server.api))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

/// The value of the series named exactly `series` (name and labels) in the controller's
/// `/metrics`, if it is there.
fn metric(server: &Server, series: &str) -> Option<u64> {
    let (code, body) = curl(server, &[], "/metrics");
    assert_eq!(code, "200", "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap_or_else(|_| panic!("not a count: {value}")))
}

#[test]
fn an_api_flood_is_capped_per_address_and_idle_connections_are_closed() {
    let (_tmp, dir) = data_dir();
    let idle = Duration::from_secs(6);
    let config =
        format!("[connections]\nper_address = {PER_ADDRESS}\napi_idle_timeout_ms = {}\n", idle.as_millis());
    let server = start(&dir, &config);
    let (soft, hard) = file_limits(server.child.id());
    assert_eq!(soft, hard, "serve raises its soft limit on open files to the hard limit");
    assert!(server.log().contains("limit on open files"), "{}", server.log());
    server.add_devices(1, "64M");
    let uri = server.volume("v", "16M", "linear");
    qemu_io(&uri, &["write -P 7 0 64k"]);

    // A client that sends half a request head, one that sends nothing, and one that idles
    // after a request.
    let api = server.api.trim_start_matches("http://").to_string();
    let mut slow = TcpStream::connect(&api).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut kept_alive = TcpStream::connect(&api).unwrap();
    kept_alive.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = [0u8; 12];
    kept_alive.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let mut watched = vec![slow, TcpStream::connect(&api).unwrap(), kept_alive];
    watched.iter().for_each(|s| s.set_nonblocking(true).unwrap());
    let opened = Instant::now();

    let mut streams = flood(&api, FLOOD);
    assert_eq!(streams.len(), FLOOD, "every flood connection is accepted by the kernel");
    // The API still answers the other address, and the controller still accepts NBD
    // (a thousand API connections would have used up a soft limit of 1024).
    let (code, body) = curl(&server, &[], "/v1/status");
    assert_eq!(code, "200", "{body}");
    qemu_io(&uri, &["read -P 7 0 64k"]);
    // Connections over the per-address cap are closed at once, long before the idle
    // timeout; the admitted ones are still open.
    let (n, seen) = wait_closed(&mut streams, FLOOD - PER_ADDRESS, Duration::from_secs(10));
    assert!(seen < opened + idle, "the flood over the cap took {:?} to close", seen - opened);
    assert_eq!(n, FLOOD - PER_ADDRESS, "all but {PER_ADDRESS} of the flood are closed at once");
    // (Checked only while the timeout is still well ahead: a loaded machine may get here late.)
    if opened.elapsed() < idle - Duration::from_secs(1) {
        assert_eq!(closed(&mut watched), 0, "the slow, silent and idle clients are not closed early");
    }
    // Then the idle timeout closes the rest, the silent client and the slow one.
    let (n, _) = wait_closed(&mut streams, FLOOD, idle + Duration::from_secs(5));
    assert_eq!(n, FLOOD, "idle connections are closed after the idle timeout");
    let (n, seen) = wait_closed(&mut watched, 3, Duration::from_secs(5));
    assert_eq!(n, 3, "the slow, silent and idle clients are closed after the idle timeout");
    assert!(seen >= opened + idle - Duration::from_millis(200), "closed after {:?}", seen - opened);
    let (code, _) = curl(&server, &[], "/v1/status");
    assert_eq!(code, "200");
    assert!(server.terminate().success());
}

#[test]
fn an_nbd_flood_from_one_address_leaves_room_for_others() {
    let (_tmp, dir) = data_dir();
    let server = start(&dir, "[connections]\ntotal = 1024\n");
    server.add_devices(1, "64M");
    let uri = server.volume("v", "16M", "linear");
    qemu_io(&uri, &["write -P 9 0 1M"]);
    let mut streams = flood(&server.nbd, FLOOD);
    let (n, _) = wait_closed(&mut streams, FLOOD - PER_ADDRESS, Duration::from_secs(10));
    assert_eq!(n, FLOOD - PER_ADDRESS, "the flooding address keeps {PER_ADDRESS} connections");
    // The other address is served while the flood holds its places (negotiation takes up
    // to 30 s before it times out).
    qemu_io(&uri, &["read -P 9 0 1M", "write -P 10 1M 1M", "read -P 10 1M 1M"]);
    let info = run("nbdinfo", &["--size", &uri]);
    assert_eq!(info.trim(), (16u64 << 20).to_string());
    assert_eq!(closed(&mut streams), FLOOD - PER_ADDRESS, "the flood's admitted connections stay");
    // An operator sees the refusals and the shared byte budget in the metrics.
    let refused = metric(&server, r#"strata_connections_refused_total{protocol="nbd",cap="per_address"}"#);
    assert_eq!(refused, Some((FLOOD - PER_ADDRESS) as u64), "every refused connection is counted");
    let refused_total = metric(&server, r#"strata_connections_refused_total{protocol="nbd",cap="total"}"#);
    assert_eq!(refused_total, Some(0), "none was over the total cap");
    assert!(metric(&server, "strata_frontend_budget_used_bytes").is_some(), "the budget's use is shown");
    assert!(metric(&server, "strata_frontend_budget_waiters").is_some(), "the budget's line is shown");
    // SIGTERM ends the connections still negotiating.
    let stopping = Instant::now();
    assert!(server.terminate().success());
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[test]
fn an_iscsi_flood_from_one_address_leaves_room_for_others() {
    let (_tmp, dir) = data_dir();
    let server = start(&dir, "[connections]\nper_address = 64\n");
    server.add_devices(1, "64M");
    server.ok(&["volume", "create", "v", "--size", "16M"]);
    let iqn = "iqn.2026-11.io.strata:flood";
    let host = "iqn.2026-11.test:legit";
    server.ok(&["export", "add", "v", "--iscsi", "--iqn", iqn, "--allow", host]);
    let mut streams = flood(&server.iscsi, FLOOD);
    let (n, _) = wait_closed(&mut streams, FLOOD - PER_ADDRESS, Duration::from_secs(10));
    assert_eq!(n, FLOOD - PER_ADDRESS, "the flooding address keeps {PER_ADDRESS} connections");
    let url = format!("iscsi://{}/{iqn}/0", server.iscsi);
    let out = Command::new("iscsi-inq").args(["-i", host, &url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("STRATA"), "{text}");
    assert_eq!(closed(&mut streams), FLOOD - PER_ADDRESS);
    let stopping = Instant::now();
    assert!(server.terminate().success());
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[test]
fn an_oversized_api_body_gets_413() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    let body_file = dir.with_extension("json");
    let padding = "x".repeat(3 << 20);
    std::fs::write(&body_file, format!("{{\"name\": \"v\", \"size\": 1048576, \"pad\": \"{padding}\"}}"))
        .unwrap();
    let data = format!("@{}", body_file.display());
    let json = ["-H", "Content-Type: application/json", "--data-binary", data.as_str()];
    let (code, body) = curl(&server, &json, "/v1/volumes");
    assert_eq!(code, "413", "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert!(v["error"].as_str().is_some_and(|m| m.contains("larger")), "{body}");
    // A small malformed body is still a 400, and the API keeps serving.
    let (code, body) = curl(&server, &["-H", "Content-Type: application/json", "-d", "{"], "/v1/volumes");
    assert_eq!(code, "400", "{body}");
    let (code, _) = curl(&server, &[], "/v1/status");
    assert_eq!(code, "200");
}

//! Session behaviour that needs a clock or two logins: the target's keep-alive pings, and
//! reinstatement of a session by its ISID. A real listener on loopback, a minimal
//! initiator written here from RFC 7143.

mod common;

use std::sync::Arc;
use std::time::Duration;

use strata_block::{BlockIo, MemDevice};
use strata_iscsi::IscsiServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TARGET: &str = "iqn.2026-11.io.strata:sessions";

/// A server pinging after `interval` of silence, dropping after `timeout` without answer.
async fn server(interval: Duration, timeout: Duration) -> (String, tokio::sync::watch::Sender<bool>) {
    let device: Arc<dyn BlockIo> = MemDevice::new("sessions", 1 << 20, 4096);
    let targets = common::one_lu(TARGET, device, "sessions");
    common::listen(IscsiServer::with_keepalive(targets, interval, timeout)).await
}

async fn send(s: &mut TcpStream, mut h: [u8; 48], data: &[u8]) {
    let len = u32::try_from(data.len()).unwrap().to_be_bytes();
    h[5..8].copy_from_slice(&len[1..]);
    let mut wire = h.to_vec();
    wire.extend_from_slice(data);
    wire.resize(48 + data.len().div_ceil(4) * 4, 0);
    s.write_all(&wire).await.unwrap();
}

/// Reads one PDU (header and data), or None when the target closed the connection.
async fn read(s: &mut TcpStream) -> Option<([u8; 48], Vec<u8>)> {
    let mut h = [0u8; 48];
    s.read_exact(&mut h).await.ok()?;
    let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
    let mut data = vec![0u8; len.div_ceil(4) * 4];
    s.read_exact(&mut data).await.ok()?;
    data.truncate(len);
    Some((h, data))
}

async fn login(addr: &str, isid: [u8; 6]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut h = common::header(0x43);
    h[1] = 0x80 | (1 << 2) | 3;
    h[8..14].copy_from_slice(&isid);
    h[24..28].copy_from_slice(&1u32.to_be_bytes());
    let keys = format!("InitiatorName=iqn.2026-11.test:host\0TargetName={TARGET}\0SessionType=Normal\0");
    send(&mut s, h, keys.as_bytes()).await;
    let (reply, _) = read(&mut s).await.expect("a login response");
    assert_eq!((reply[0] & 0x3f, reply[36], reply[1] & 0x80), (0x23, 0, 0x80), "logged in");
    s
}

/// Waits for the next PDU for at most `wait`.
async fn next(s: &mut TcpStream, wait: Duration) -> Result<Option<([u8; 48], Vec<u8>)>, ()> {
    tokio::time::timeout(wait, read(s)).await.map_err(|_| ())
}

#[tokio::test]
async fn idle_initiators_are_pinged_and_dropped_when_silent() {
    let (addr, _stop) = server(Duration::from_millis(200), Duration::from_millis(400)).await;
    let mut s = login(&addr, [0x80, 0, 0, 0, 0, 1]).await;
    // Silence: a NOP-In ping with a target transfer tag and no task.
    let (ping, _) = next(&mut s, Duration::from_secs(2)).await.unwrap().expect("a ping");
    assert_eq!(ping[0] & 0x3f, 0x20, "NOP-In");
    assert_eq!(&ping[16..20], &[0xff; 4], "ITT is reserved");
    assert_ne!(&ping[20..24], &[0xff; 4], "TTT asks for an answer");
    // Answered: the connection lives on and is pinged again later.
    let mut answer = common::header(0x40);
    answer[16..20].copy_from_slice(&[0xff; 4]);
    answer[20..24].copy_from_slice(&ping[20..24]);
    send(&mut s, answer, &[]).await;
    let (again, _) = next(&mut s, Duration::from_secs(2)).await.unwrap().expect("a second ping");
    assert_eq!(again[0] & 0x3f, 0x20);
    // Not answered: dropped.
    assert!(next(&mut s, Duration::from_secs(2)).await.unwrap().is_none(), "closed after an unanswered ping");
}

#[tokio::test]
async fn a_login_with_the_same_isid_reinstates_the_session() {
    let (addr, _stop) = server(Duration::from_secs(60), Duration::from_secs(60)).await;
    let isid = [0x80, 0, 0, 0, 0, 2];
    let mut old = login(&addr, isid).await;
    let mut other = login(&addr, [0x80, 0, 0, 0, 0, 3]).await;
    let mut new = login(&addr, isid).await;
    assert!(next(&mut old, Duration::from_secs(5)).await.unwrap().is_none(), "the old connection is closed");
    for s in [&mut new, &mut other] {
        let mut ping = common::header(0x40);
        ping[0] |= 0x40; // immediate
        ping[16..20].copy_from_slice(&7u32.to_be_bytes());
        ping[20..24].copy_from_slice(&[0xff; 4]);
        send(s, ping, b"echo").await;
        let (reply, data) = next(s, Duration::from_secs(2)).await.unwrap().expect("a NOP-In");
        assert_eq!(
            (reply[0] & 0x3f, &reply[16..20], data.as_slice()),
            (0x20, &7u32.to_be_bytes()[..], &b"echo"[..])
        );
    }
}

#[tokio::test]
async fn an_initiator_that_stops_reading_is_dropped_by_keep_alive() {
    let (addr, _stop) = server(Duration::from_millis(200), Duration::from_millis(400)).await;
    let mut s = login(&addr, [0x80, 0, 0, 0, 0, 4]).await;
    // 32 reads of 1 MiB (the whole unit), immediate, and then no byte read: more than the
    // socket buffers hold, so the target's writes block.
    let reads = 32u32;
    for itt in 0..reads {
        let mut h = common::header(0x01 | 0x40);
        h[1] = 0x80 | 0x40; // final, read
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&(1u32 << 20).to_be_bytes());
        h[24..28].copy_from_slice(&2u32.to_be_bytes());
        h[32..42].copy_from_slice(&[0x28, 0, 0, 0, 0, 0, 0, 1, 0, 0]); // READ(10), 256 blocks
        send(&mut s, h, &[]).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Long past keep-alive's interval and timeout: the target has given up on this
    // initiator, and what it could not send is gone.
    let mut answered = 0;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some((h, _)) = read(&mut s).await {
            let status = (h[0] & 0x3f == 0x25 && h[1] & 0x01 != 0) || h[0] & 0x3f == 0x21;
            answered += u32::from(status);
        }
    })
    .await;
    assert!(closed.is_ok(), "the target closed the connection");
    assert!(answered < reads, "{answered} of {reads} reads answered: the target waited for the initiator");
}

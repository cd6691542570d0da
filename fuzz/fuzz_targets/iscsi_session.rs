//! Any bytes from an initiator, whole connections at a time (login, negotiation, full
//! feature phase): the target answers or hangs up, never panics or hangs. Seeds start with
//! a valid login so the fuzzer reaches the full feature phase.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use strata_block::{BlockIo, MemDevice};
use strata_iscsi::{IscsiServer, Refusal, TargetNode, Targets};
use strata_scsi::{Directory, Identity, LogicalUnit, LunMap, Volatile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct One(Arc<TargetNode>);

impl Targets for One {
    fn lookup(&self, target: &str, _: &str) -> Result<Arc<TargetNode>, Refusal> {
        if target == self.0.name { Ok(self.0.clone()) } else { Err(Refusal::NotFound) }
    }
    fn list(&self, _: &str) -> Vec<Arc<TargetNode>> {
        vec![self.0.clone()]
    }
    fn generation(&self) -> u64 {
        0
    }
    // A refused login would otherwise wait a second per input.
    fn failed_login_delay(&self) -> Duration {
        Duration::ZERO
    }
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let device: Arc<dyn BlockIo> = MemDevice::new("fuzz", 1 << 20, 4096);
        let identity = Identity {
            vendor: "STRATA".into(),
            product: "FUZZ".into(),
            revision: "0001".into(),
            serial: "fuzz".into(),
            naa: [0x60; 16],
            target_port_group: 1,
            read_only: false,
        };
        let lu = LogicalUnit::new(device, identity, None, Arc::new(Volatile), Arc::new(Directory::new())).unwrap();
        let mut luns = LunMap::new();
        luns.insert(0, Arc::new(lu));
        let node = TargetNode { name: "iqn.2026-11.io.strata:fuzz".into(), alias: None, every_lu: luns.values().cloned().collect(), luns, chap: None, mutual: None };
        let server = IscsiServer::new(Arc::new(One(Arc::new(node))));
        let (client, served) = tokio::io::duplex(1 << 16);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let session = server.connection(served, peer, "127.0.0.1:3260".into(), shutdown);
        let talk = async move {
            let (mut rx, mut tx) = tokio::io::split(client);
            let send = async move {
                let _ = tx.write_all(data).await;
                let _ = tx.shutdown().await;
            };
            let drain = async move {
                let mut sink = Vec::new();
                let _ = rx.read_to_end(&mut sink).await;
            };
            tokio::join!(send, drain);
        };
        let done = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(session, talk) }).await;
        assert!(done.is_ok(), "the connection hung");
    });
});

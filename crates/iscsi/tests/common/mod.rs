//! Shared by the target's integration tests: one target with one logical unit over a
//! memory device, served by a real listener on loopback, and the PDU header they start
//! from.
#![allow(dead_code)]

use std::sync::Arc;

use strata_block::BlockIo;
use strata_iscsi::{IscsiServer, Refusal, TargetNode, Targets};
use strata_scsi::{Directory, Identity, LogicalUnit, LunMap, Volatile};
use tokio::sync::watch;

/// Exactly one target, seen by every initiator.
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
}

/// A target named `name` whose LUN 0 is `device` (serial number `serial`), open to all.
pub fn one_lu(name: &str, device: Arc<dyn BlockIo>, serial: &str) -> Arc<dyn Targets> {
    let identity = Identity {
        vendor: "STRATA".into(),
        product: "TEST".into(),
        revision: "0001".into(),
        serial: serial.into(),
        naa: [0x60; 16],
        target_port_group: 1,
        read_only: false,
    };
    let lu =
        LogicalUnit::new(device, identity, None, Arc::new(Volatile), Arc::new(Directory::new())).unwrap();
    let mut luns = LunMap::new();
    luns.insert(0, Arc::new(lu));
    let node = TargetNode {
        name: name.into(),
        alias: None,
        every_lu: luns.values().cloned().collect(),
        luns,
        chap: None,
        mutual: None,
    };
    Arc::new(One(Arc::new(node)))
}

/// Serves `server` on a loopback port: its address, and the sender that stops it.
pub async fn listen(server: Arc<IscsiServer>) -> (String, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = watch::channel(false);
    let listener = strata_net::listener::Listener::new(listener, "iSCSI", Default::default());
    tokio::spawn(server.run(listener, stopped));
    (addr, stop)
}

/// A basic header segment with `opcode`, the immediate bit and the final bit set.
pub fn header(opcode: u8) -> [u8; 48] {
    let mut h = [0u8; 48];
    h[0] = opcode;
    h[1] = 0x80;
    h
}

//! Any CDB with any data-out against a small logical unit: every command gets an
//! outcome (GOOD, CHECK CONDITION with sense, RESERVATION CONFLICT ...), never a panic or
//! a hang, and the sense data is well formed.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use strata_block::{BlockIo, MemDevice};
use strata_scsi::{Command, Directory, Identity, LogicalUnit, LunMap, Nexus, Status, Volatile};

fuzz_target!(|data: &[u8]| {
    // First byte: how many bytes of CDB follow (up to 32); the rest is data-out.
    let Some((&n, rest)) = data.split_first() else { return };
    let n = usize::from(n % 33).min(rest.len());
    let (cdb, data_out) = rest.split_at(n);
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
        let nexus = Nexus {
            initiator_port: "iqn.fuzz,i,0x000000000001".into(),
            initiator_name: "iqn.fuzz".into(),
            target_port: "iqn.target,t,0x0001".into(),
            relative_port: 1,
        };
        let command = Command { cdb: Bytes::copy_from_slice(cdb), data_out: Bytes::copy_from_slice(data_out), allocation: 1 << 16 };
        for lun in [0, 1] {
            let outcome = tokio::time::timeout(Duration::from_secs(10), strata_scsi::execute(&luns, lun, &nexus, &command))
                .await
                .expect("the command hung");
            if outcome.status == Status::CheckCondition {
                let sense = outcome.sense.expect("CHECK CONDITION carries sense");
                assert!(matches!(sense.first().map(|b| b & 0x7f), Some(0x70 | 0x72)), "sense format");
            }
        }
    });
});

//! Where a byte of a volume lives: down the tree to every device and offset that holds it
//! (the data, each mirror copy, and the parity that covers it). Backs `strata volume map`.

use serde::{Deserialize, Serialize};

use crate::spec::{DeviceId, NodeSpec};

/// What a location holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The data itself.
    Data,
    /// Copy `n` of a mirror (copies are equals; `n` is the leg).
    Copy(usize),
    /// The P parity of the row.
    ParityP,
    /// The Q parity of the row (RAID 6).
    ParityQ,
}

/// One place a volume byte is stored or protected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// The device.
    pub device: DeviceId,
    /// Byte offset on the device.
    pub device_offset: u64,
    /// What is stored there.
    pub role: Role,
}

/// Maps `offset` of the tree described by `spec` to every location that stores it;
/// `None` if the offset is beyond the tree.
pub fn map(spec: &NodeSpec, offset: u64) -> Option<Vec<Location>> {
    if offset >= spec.size() {
        return None;
    }
    let mut out = Vec::new();
    walk(spec, offset, Role::Data, &mut out);
    Some(out)
}

fn walk(spec: &NodeSpec, offset: u64, role: Role, out: &mut Vec<Location>) {
    match spec {
        NodeSpec::Extent { device, offset: start, .. } => {
            out.push(Location { device: *device, device_offset: start + offset, role });
        }
        NodeSpec::Concat { children } => {
            let mut at = offset;
            for child in children {
                if at < child.size() {
                    return walk(child, at, role, out);
                }
                at -= child.size();
            }
        }
        NodeSpec::Stripe { chunk, children } => {
            let n = children.len() as u64;
            let c = offset / chunk;
            let child = &children[usize::try_from(c % n).expect("child index")];
            walk(child, (c / n) * chunk + offset % chunk, role, out);
        }
        NodeSpec::Mirror { children, .. } => {
            for (i, child) in children.iter().enumerate() {
                let leg_role = if role == Role::Data { Role::Copy(i) } else { role };
                walk(child, offset, leg_role, out);
            }
        }
        NodeSpec::Parity { level, chunk, children, .. } => {
            let n = children.len();
            let parity = level.parity_members();
            let d = (n - parity) as u64;
            let c = offset / chunk;
            let (row, k) = (c / d, usize::try_from(c % d).expect("data index"));
            let at = row * chunk + offset % chunk;
            let p = n - 1 - usize::try_from(row % n as u64).expect("member index");
            walk(&children[(p + parity + k) % n], at, role, out);
            walk(&children[p], at, Role::ParityP, out);
            if parity == 2 {
                walk(&children[(p + 1) % n], at, Role::ParityQ, out);
            }
        }
    }
}

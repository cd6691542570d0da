//! The volume tree as data: what is stored in the configuration and turned into live
//! nodes by [`crate::Tree::open`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identity of a device, as written in its label.
pub type DeviceId = Uuid;

/// Parity level of a parity node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParityLevel {
    /// Single parity (RAID 5): survives one member.
    Single,
    /// Double parity (RAID 6): survives two members.
    Double,
}

impl ParityLevel {
    /// Number of parity chunks per row.
    pub fn parity_members(self) -> usize {
        match self {
            ParityLevel::Single => 1,
            ParityLevel::Double => 2,
        }
    }
}

/// Where a redundant node keeps its write-intent bitmap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapSpec {
    /// Bytes of the node's address space covered by one bit.
    pub region_size: u64,
    /// Extents holding identical copies, one on each member's device.
    pub copies: Vec<NodeSpec>,
}

/// One node of a volume tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeSpec {
    /// A contiguous range of one device.
    Extent {
        /// The device.
        device: DeviceId,
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        length: u64,
    },
    /// Children back to back.
    Concat {
        /// The children, in address order.
        children: Vec<NodeSpec>,
    },
    /// Round-robin chunks over equal-sized children (RAID 0).
    Stripe {
        /// Chunk size in bytes, a power of two.
        chunk: u64,
        /// The children.
        children: Vec<NodeSpec>,
    },
    /// Identical copies (RAID 1).
    Mirror {
        /// The copies.
        children: Vec<NodeSpec>,
        /// Write-intent bitmap.
        bitmap: BitmapSpec,
    },
    /// Rotating parity over equal-sized members (RAID 5 and 6).
    Parity {
        /// Single or double parity.
        level: ParityLevel,
        /// Chunk size in bytes, a power of two.
        chunk: u64,
        /// The members.
        children: Vec<NodeSpec>,
        /// Write-intent bitmap.
        bitmap: BitmapSpec,
    },
}

impl NodeSpec {
    /// Bytes of address space the node offers.
    pub fn size(&self) -> u64 {
        match self {
            NodeSpec::Extent { length, .. } => *length,
            NodeSpec::Concat { children } => children.iter().map(NodeSpec::size).fold(0, u64::saturating_add),
            NodeSpec::Stripe { children, .. } => {
                children.iter().map(NodeSpec::size).min().unwrap_or(0).saturating_mul(children.len() as u64)
            }
            NodeSpec::Mirror { children, .. } => children.iter().map(NodeSpec::size).min().unwrap_or(0),
            NodeSpec::Parity { level, children, .. } => {
                let data = children.len().saturating_sub(level.parity_members()) as u64;
                children.iter().map(NodeSpec::size).min().unwrap_or(0).saturating_mul(data)
            }
        }
    }

    /// Every extent in the tree, bitmaps included.
    pub fn extents(&self) -> Vec<(DeviceId, u64, u64)> {
        let mut out = Vec::new();
        self.visit_extents(&mut |d, o, l| out.push((d, o, l)));
        out
    }

    fn visit_extents(&self, f: &mut dyn FnMut(DeviceId, u64, u64)) {
        match self {
            NodeSpec::Extent { device, offset, length } => f(*device, *offset, *length),
            NodeSpec::Concat { children } | NodeSpec::Stripe { children, .. } => {
                children.iter().for_each(|c| c.visit_extents(f));
            }
            NodeSpec::Mirror { children, bitmap } | NodeSpec::Parity { children, bitmap, .. } => {
                children.iter().for_each(|c| c.visit_extents(f));
                bitmap.copies.iter().for_each(|c| c.visit_extents(f));
            }
        }
    }

    /// Every device the tree touches, each once, in first-seen order.
    pub fn devices(&self) -> Vec<DeviceId> {
        let mut out: Vec<DeviceId> = Vec::new();
        for (d, _, _) in self.extents() {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }
}

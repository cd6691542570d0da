//! A live volume tree: built from its [`NodeSpec`], recovered after a crash, and served
//! as one [`BlockIo`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use strata_block::{BlockIo, Durability, Geometry, IoError, IoOp, Span};
use tokio::sync::Notify;

use crate::nodes::bitmap::Bitmap;
use crate::nodes::concat::ConcatMap;
use crate::nodes::extent::{Extent, Missing};
use crate::nodes::mirror::Mirror;
use crate::nodes::parity::Parity;
use crate::nodes::split::Split;
use crate::nodes::stripe::StripeMap;
use crate::spec::{BitmapSpec, DeviceId, NodeSpec};

/// Mirror and parity nodes: the ones with members that can fail and a bitmap to recover.
#[async_trait]
pub(crate) trait Redundant: Send + Sync {
    /// Writes a clean bitmap: the node has just been made and its members agree.
    async fn initialize(&self) -> Result<(), IoError>;
    /// Reads the bitmap and resyncs the dirty regions; returns how many there were.
    async fn recover(&self) -> Result<usize, IoError>;
    /// Members, failures and dirty regions right now.
    fn health(&self) -> NodeHealth;
}

/// The state of one mirror or parity node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    /// Number of members (legs).
    pub members: usize,
    /// Indexes of failed members.
    pub failed: Vec<usize>,
    /// How many members may fail without losing data.
    pub tolerance: usize,
    /// Regions marked in the write-intent bitmap.
    pub dirty_regions: usize,
}

/// Overall state of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Every member of every redundant node is working.
    Healthy,
    /// Some members failed; all data is still readable.
    Degraded,
    /// A node lost more members than it can cover, or a non-redundant device is gone.
    Failed,
}

/// Why a tree cannot be built from its description (corrupt or inconsistent metadata).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// An extent reaches past the end of its device.
    #[error("Extent at {offset}+{length} is beyond the end of device {device} ({device_size} bytes)")]
    ExtentOutOfRange {
        /// The device.
        device: DeviceId,
        /// Extent start.
        offset: u64,
        /// Extent length.
        length: u64,
        /// Device size.
        device_size: u64,
    },
    /// A node that is malformed in itself.
    #[error("Malformed {node} node: {reason}")]
    Malformed {
        /// Node kind.
        node: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A volume tree ready for IO.
pub struct Tree {
    spec: NodeSpec,
    size: u64,
    root: Arc<dyn BlockIo>,
    redundant: Vec<Arc<dyn Redundant>>,
    missing: bool,
    closed: AtomicBool,
    active: AtomicUsize,
    drained: Notify,
}

/// One request in progress on a tree; see [`Tree::close`].
struct Active<'a>(&'a Tree);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.closed.load(Ordering::SeqCst) {
            self.0.drained.notify_waiters();
        }
    }
}

/// Finds the live device for an id; `None` if it is not present.
pub type DeviceLookup<'a> = &'a (dyn Fn(DeviceId) -> Option<Arc<dyn BlockIo>> + Sync);

struct Builder<'a> {
    lookup: DeviceLookup<'a>,
    redundant: Vec<Arc<dyn Redundant>>,
    missing: bool,
}

/// Most regions a bitmap may have; planned bitmaps have at most 32 Ki.
const MAX_REGIONS: u64 = 1 << 22;

fn malformed(node: &'static str, reason: impl Into<String>) -> BuildError {
    BuildError::Malformed { node, reason: reason.into() }
}

impl Builder<'_> {
    fn node(&mut self, spec: &NodeSpec) -> Result<Arc<dyn BlockIo>, BuildError> {
        Ok(match spec {
            NodeSpec::Extent { device, offset, length } => match (self.lookup)(*device) {
                Some(dev) => {
                    let g = dev.geometry();
                    let bs = u64::from(g.block_size);
                    if offset.checked_add(*length).is_none_or(|end| end > g.size_bytes) {
                        return Err(BuildError::ExtentOutOfRange {
                            device: *device,
                            offset: *offset,
                            length: *length,
                            device_size: g.size_bytes,
                        });
                    }
                    if *length == 0 || offset % bs != 0 || length % bs != 0 {
                        return Err(malformed(
                            "extent",
                            format!("{offset}+{length} is not aligned to {bs} bytes"),
                        ));
                    }
                    Arc::new(Extent::new(dev, *offset, *length))
                }
                None => {
                    self.missing = true;
                    Arc::new(Missing::new(device.to_string(), *length))
                }
            },
            NodeSpec::Concat { children } => {
                if children.is_empty() {
                    return Err(malformed("concat", "no children"));
                }
                let children = self.children(children)?;
                let map = ConcatMap::new(children.iter().map(|c| c.geometry().size_bytes));
                let size = map.size();
                Arc::new(Split::new(map, children, size))
            }
            NodeSpec::Stripe { chunk, children } => {
                check_members("stripe", children, 2, Some(*chunk))?;
                let children = self.children(children)?;
                let child_size = children.iter().map(|c| c.geometry().size_bytes).min().unwrap_or(0);
                let size = (child_size / chunk * chunk).saturating_mul(children.len() as u64);
                Arc::new(Split::new(StripeMap::new(*chunk, children.len()), children, size))
            }
            NodeSpec::Mirror { children, bitmap } => {
                check_members("mirror", children, 1, None)?;
                let copies = self.bitmap(spec.size(), bitmap)?;
                let node = Arc::new(Mirror::new(self.children(children)?, bitmap.region_size, copies));
                self.redundant.push(node.clone());
                node
            }
            NodeSpec::Parity { level, chunk, children, bitmap } => {
                check_members("parity", children, level.parity_members() + 2, Some(*chunk))?;
                let copies = self.bitmap(spec.size(), bitmap)?;
                let members = self.children(children)?;
                let node = Arc::new(Parity::new(*level, *chunk, members, bitmap.region_size, copies));
                self.redundant.push(node.clone());
                node
            }
        })
    }

    fn children(&mut self, specs: &[NodeSpec]) -> Result<Vec<Arc<dyn BlockIo>>, BuildError> {
        specs.iter().map(|s| self.node(s)).collect()
    }

    fn bitmap(&mut self, node_size: u64, spec: &BitmapSpec) -> Result<Vec<Arc<dyn BlockIo>>, BuildError> {
        if spec.copies.is_empty() || !spec.region_size.is_power_of_two() || spec.region_size < 4096 {
            return Err(malformed(
                "bitmap",
                format!("region {} with {} copies", spec.region_size, spec.copies.len()),
            ));
        }
        if node_size / spec.region_size > MAX_REGIONS {
            return Err(malformed(
                "bitmap",
                format!("region {} is too small for a {node_size}-byte node", spec.region_size),
            ));
        }
        let missing = self.missing;
        let copies = self.children(&spec.copies)?;
        // A missing bitmap copy alone does not make the volume degraded.
        self.missing = missing;
        let need = Bitmap::new(node_size, spec.region_size, copies.clone()).encoded_len();
        if let Some(small) = spec.copies.iter().find(|c| c.size() < need) {
            return Err(malformed(
                "bitmap",
                format!("copy of {} bytes is smaller than the {need} bytes needed", small.size()),
            ));
        }
        Ok(copies)
    }
}

fn check_members(
    node: &'static str,
    children: &[NodeSpec],
    min: usize,
    chunk: Option<u64>,
) -> Result<(), BuildError> {
    if children.len() < min || children.len() > 64 {
        return Err(malformed(
            node,
            format!("{} children; between {min} and 64 are allowed", children.len()),
        ));
    }
    if let Some(chunk) = chunk {
        if !chunk.is_power_of_two() || chunk < 512 {
            return Err(malformed(node, format!("chunk {chunk} is not a power of two of at least 512")));
        }
        if children.iter().any(|c| c.size() < chunk) {
            return Err(malformed(node, "a child is smaller than one chunk"));
        }
    }
    let first = children[0].size();
    if children.iter().any(|c| c.size() != first) {
        return Err(malformed(node, "children differ in size"));
    }
    Ok(())
}

impl Tree {
    fn build(spec: NodeSpec, size: u64, lookup: DeviceLookup<'_>) -> Result<Self, BuildError> {
        let mut builder = Builder { lookup, redundant: Vec::new(), missing: false };
        let root = builder.node(&spec)?;
        let g = root.geometry();
        if size == 0 || size > g.size_bytes || !size.is_multiple_of(u64::from(g.block_size)) {
            return Err(malformed(
                "volume",
                format!("size {size} does not fit the {}-byte tree", g.size_bytes),
            ));
        }
        Ok(Self {
            spec,
            size,
            root,
            redundant: builder.redundant,
            missing: builder.missing,
            closed: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            drained: Notify::new(),
        })
    }

    /// Builds a tree on newly allocated space, zeroes it, and writes its clean bitmaps: a
    /// new volume reads as zeroes (never as a deleted volume's data), and the copies and
    /// parity of its mirror and parity nodes agree from the start.
    pub async fn create(spec: NodeSpec, size: u64, lookup: DeviceLookup<'_>) -> Result<Self, TreeError> {
        let tree = Self::build(spec, size, lookup)?;
        tree.zero_fill().await?;
        for node in &tree.redundant {
            node.initialize().await?;
        }
        Ok(tree)
    }

    /// Opens an existing tree: builds it and resyncs what its bitmaps say may differ.
    pub async fn open(spec: NodeSpec, size: u64, lookup: DeviceLookup<'_>) -> Result<Self, TreeError> {
        let tree = Self::build(spec, size, lookup)?;
        for node in &tree.redundant {
            let dirty = node.recover().await?;
            if dirty > 0 {
                tracing::info!(dirty, "resynced dirty regions");
            }
        }
        Ok(tree)
    }

    /// Zeroes the new tree through its nodes, so every copy and every parity agrees. It
    /// discards (which reads as zeroes): whole rows and legs become one hole punched per
    /// device range, so a thin file stays thin and nothing is written.
    async fn zero_fill(&self) -> Result<(), IoError> {
        let size = self.root.geometry().size_bytes;
        let step = 64 << 20;
        let mut at = 0;
        while at < size {
            let n = step.min(size - at);
            self.root.discard(at, n).await?;
            at += n;
        }
        self.root.flush().await
    }

    /// Refuses new requests ([`IoError::Closed`]) and waits for those in flight: after
    /// this, nothing holding the tree can touch its extents, which may then be reused.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            drained.await;
        }
    }

    /// Stops the tree for a clean shutdown: closes it as [`Tree::close`] does, then
    /// flushes twice. The first flush makes every write durable; the second clears the
    /// write-intent regions the first one could not (a region is cleared only by a flush
    /// issued after the one that followed its last write), so the next open resyncs
    /// nothing.
    pub async fn shut_down(&self) -> Result<(), IoError> {
        self.close().await;
        self.root.flush().await?;
        self.root.flush().await
    }

    /// Admits a request unless the tree is closed.
    fn begin(&self) -> Result<Active<'_>, IoError> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let active = Active(self);
        if self.closed.load(Ordering::SeqCst) {
            return Err(IoError::Closed);
        }
        Ok(active)
    }

    /// The description this tree was built from.
    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// The state of every mirror and parity node.
    pub fn node_health(&self) -> Vec<NodeHealth> {
        self.redundant.iter().map(|n| n.health()).collect()
    }

    /// Healthy, degraded or failed.
    pub fn state(&self) -> VolumeState {
        let nodes = self.node_health();
        if nodes.iter().any(|n| n.failed.len() > n.tolerance) || (self.missing && nodes.is_empty()) {
            VolumeState::Failed
        } else if self.missing || nodes.iter().any(|n| !n.failed.is_empty()) {
            VolumeState::Degraded
        } else {
            VolumeState::Healthy
        }
    }
}

/// Why a tree could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The description is inconsistent.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Writing bitmaps or resyncing failed.
    #[error("Volume recovery failed")]
    Io(#[from] IoError),
}

#[async_trait]
impl BlockIo for Tree {
    fn geometry(&self) -> Geometry {
        Geometry { block_size: self.root.geometry().block_size, size_bytes: self.size }
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        let _active = self.begin()?;
        self.geometry().check(IoOp::Read, offset, len)?;
        self.root.read(offset, len).await
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let _active = self.begin()?;
        self.geometry().check(IoOp::Read, offset, buf.len() as u64)?;
        self.root.read_into(offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        let _active = self.begin()?;
        self.geometry().check(IoOp::Write, offset, data.len() as u64)?;
        self.root.write(offset, data, durability).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        let _active = self.begin()?;
        self.root.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let _active = self.begin()?;
        self.geometry().check(IoOp::Discard, offset, len)?;
        self.root.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let _active = self.begin()?;
        self.geometry().check(IoOp::WriteZeroes, offset, len)?;
        self.root.write_zeroes(offset, len).await
    }

    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        let _active = self.begin()?;
        self.geometry().check(IoOp::Read, offset, len)?;
        self.root.allocation(offset, len).await
    }
}

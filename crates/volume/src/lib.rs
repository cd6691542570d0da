//! Volume trees: a volume is a tree of nodes (extent, concat, stripe, mirror, parity),
//! described as data ([`NodeSpec`]), planned from an operator's request
//! ([`VolumeRequest::plan`]), and built into a live [`Tree`] that serves block IO.
//!
//! ```text
//!   VolumeRequest ──plan(Allocator)──▶ NodeSpec ──Tree::create / Tree::open──▶ Tree: BlockIo
//!                                        │
//!                                        └──map(offset)──▶ [(device, device offset, role)]
//! ```

mod layout;
mod map;
mod nodes;
mod spec;
mod tree;

pub use layout::{
    AllocatedLeg, Allocator, DEFAULT_CHUNK, Layout, LayoutError, VolumeRequest, bitmap_bytes, region_size,
};
pub use map::{Location, Role, map};
pub use nodes::range_lock::{Acquire, RangeGuard, RangeLock};
pub use spec::{BitmapSpec, DeviceId, NodeSpec, ParityLevel};
pub use tree::{BuildError, DeviceLookup, NodeHealth, Tree, TreeError, VolumeState};

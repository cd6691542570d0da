//! From an operator's request ("10 GiB, raid10, 2 copies, width 2") to a volume tree.
//!
//! The request is checked here, with errors that say what to change; the pool decides
//! where the legs go through the [`Allocator`] trait and this module assembles the tree.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::spec::{BitmapSpec, NodeSpec, ParityLevel};

/// Default chunk size of striped and parity layouts.
pub const DEFAULT_CHUNK: u64 = 64 * 1024;
/// Smallest write-intent region; the region grows so a bitmap stays within 32 Ki bits.
const MIN_REGION: u64 = 64 * 1024;
const MAX_REGIONS: u64 = 32 * 1024;
/// Bytes before the bits in an encoded bitmap (see `nodes::bitmap`).
pub(crate) const BITMAP_HEADER: usize = 64;

/// The shapes a volume can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Extents back to back, on any devices.
    Linear,
    /// RAID 0 over `width` devices.
    Stripe,
    /// RAID 1 with `copies` copies.
    Mirror,
    /// Stripe of `width` mirrors of `copies` copies each.
    Raid10,
    /// Single parity over `width` devices.
    Raid5,
    /// Double parity over `width` devices.
    Raid6,
}

impl Layout {
    /// Every layout, in the order the CLI lists them.
    pub const ALL: [Layout; 6] =
        [Layout::Linear, Layout::Stripe, Layout::Mirror, Layout::Raid10, Layout::Raid5, Layout::Raid6];

    fn min_width(self) -> u32 {
        match self {
            Layout::Linear | Layout::Mirror => 1,
            Layout::Stripe | Layout::Raid10 => 2,
            Layout::Raid5 => 3,
            Layout::Raid6 => 4,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Linear => "linear",
            Layout::Stripe => "stripe",
            Layout::Mirror => "mirror",
            Layout::Raid10 => "raid10",
            Layout::Raid5 => "raid5",
            Layout::Raid6 => "raid6",
        })
    }
}

impl FromStr for Layout {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Layout::ALL
            .into_iter()
            .find(|l| l.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| LayoutError::UnknownLayout(s.to_string()))
    }
}

/// What an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRequest {
    /// Size in bytes the host will see.
    pub size: u64,
    /// The shape.
    pub layout: Layout,
    /// Copies of each block (mirror, raid10); default 2.
    #[serde(default)]
    pub copies: Option<u32>,
    /// Devices a stripe or parity set spans (stripe, raid10, raid5, raid6); default: as many
    /// as the pool has (raid10: as many mirrors as fit).
    #[serde(default)]
    pub width: Option<u32>,
    /// Chunk size in bytes (stripe, raid10, raid5, raid6); default 64 KiB.
    #[serde(default)]
    pub chunk: Option<u64>,
}

/// Why a request cannot be built. Every message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// Unknown layout name.
    #[error("Unknown layout '{0}'; use one of linear, stripe, mirror, raid10, raid5, raid6")]
    UnknownLayout(String),
    /// Zero size.
    #[error("Volume size must be greater than zero")]
    ZeroSize,
    /// Size not a multiple of the block size.
    #[error(
        "Volume size {size} is not a multiple of the {block_size}-byte block size; round it up to {rounded}"
    )]
    UnalignedSize {
        /// Requested size.
        size: u64,
        /// Pool block size.
        block_size: u32,
        /// A size that would work.
        rounded: u64,
    },
    /// Bad chunk.
    #[error("Chunk size {chunk} must be a power of two between {block_size} and 16 MiB, e.g. 65536")]
    BadChunk {
        /// Requested chunk.
        chunk: u64,
        /// Pool block size.
        block_size: u32,
    },
    /// A parameter that the layout does not use.
    #[error("{parameter} does not apply to a {layout} volume; leave it out")]
    UnusedParameter {
        /// `copies`, `width` or `chunk`.
        parameter: &'static str,
        /// The layout.
        layout: Layout,
    },
    /// Width or copies too small.
    #[error("A {layout} volume needs {parameter} of at least {min}, not {given}")]
    TooSmall {
        /// The layout.
        layout: Layout,
        /// `copies` or `width`.
        parameter: &'static str,
        /// Smallest allowed.
        min: u32,
        /// What was asked.
        given: u32,
    },
    /// More devices needed than the pool can offer.
    #[error(
        "A {layout} volume with {parameter} {needed} needs {needed} devices{domains} with {leg_bytes} bytes free each, \
         but only {available} have that; add devices or lower {parameter}"
    )]
    NotEnoughDevices {
        /// The layout.
        layout: Layout,
        /// `copies` or `width`.
        parameter: &'static str,
        /// Devices needed.
        needed: usize,
        /// Devices that qualify.
        available: usize,
        /// Free space needed on each.
        leg_bytes: u64,
        /// " in different fault domains" when domains are in play.
        domains: &'static str,
    },
    /// Not enough free space.
    #[error("The pool has {free} bytes free, {needed} are needed; add devices or ask for less")]
    NotEnoughSpace {
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// The volume would be too large to address.
    #[error("Volume size {0} is too large")]
    TooLarge(u64),
}

/// One leg handed out by an [`Allocator`]: a range on a single device, and a bitmap extent
/// on that same device when one was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatedLeg {
    /// The leg's data: an extent, or a concat of extents on one device.
    pub data: NodeSpec,
    /// The bitmap copy kept with this leg.
    pub bitmap: Option<NodeSpec>,
}

/// Placement, as the pool does it.
pub trait Allocator {
    /// The pool's block size.
    fn block_size(&self) -> u32;
    /// Devices in the pool.
    fn device_count(&self) -> usize;
    /// Allocates a set of `legs` legs of `leg_size` bytes (and `bitmap_size` more on the
    /// same device when non-zero), every leg on its own device and, where devices carry
    /// fault domains, in its own domain.
    fn allocate_set(
        &mut self,
        layout: Layout,
        parameter: &'static str,
        legs: usize,
        leg_size: u64,
        bitmap_size: u64,
    ) -> Result<Vec<AllocatedLeg>, LayoutError>;
    /// Allocates `size` bytes anywhere, spanning devices if needed.
    fn allocate_linear(&mut self, size: u64) -> Result<NodeSpec, LayoutError>;
}

/// The checked form of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    layout: Layout,
    copies: u32,
    width: u32,
    chunk: u64,
}

impl VolumeRequest {
    /// A request with the layout's defaults.
    pub fn new(size: u64, layout: Layout) -> Self {
        Self { size, layout, copies: None, width: None, chunk: None }
    }

    fn shape(&self, block_size: u32, devices: usize) -> Result<Shape, LayoutError> {
        let layout = self.layout;
        if self.size == 0 {
            return Err(LayoutError::ZeroSize);
        }
        let bs = u64::from(block_size);
        if !self.size.is_multiple_of(bs) {
            let rounded = self.size.div_ceil(bs).checked_mul(bs).ok_or(LayoutError::TooLarge(self.size))?;
            return Err(LayoutError::UnalignedSize { size: self.size, block_size, rounded });
        }
        let uses_copies = matches!(layout, Layout::Mirror | Layout::Raid10);
        let uses_width = !matches!(layout, Layout::Linear | Layout::Mirror);
        let unused = |parameter| LayoutError::UnusedParameter { parameter, layout };
        if self.copies.is_some() && !uses_copies {
            return Err(unused("copies"));
        }
        if self.width.is_some() && !uses_width {
            return Err(unused("width"));
        }
        if self.chunk.is_some() && !uses_width {
            return Err(unused("chunk"));
        }
        let copies = if uses_copies { self.copies.unwrap_or(2) } else { 1 };
        if uses_copies && copies < 2 {
            return Err(LayoutError::TooSmall { layout, parameter: "copies", min: 2, given: copies });
        }
        let devices = u32::try_from(devices).unwrap_or(u32::MAX);
        let default_width = match layout {
            Layout::Raid10 => devices / copies.max(1),
            Layout::Linear | Layout::Mirror => 1,
            _ => devices,
        };
        let width = self.width.unwrap_or(default_width.max(layout.min_width()));
        if width < layout.min_width() {
            return Err(LayoutError::TooSmall {
                layout,
                parameter: "width",
                min: layout.min_width(),
                given: width,
            });
        }
        let chunk = if uses_width { self.chunk.unwrap_or(DEFAULT_CHUNK) } else { DEFAULT_CHUNK };
        if !chunk.is_power_of_two() || chunk < bs || chunk > 16 << 20 {
            return Err(LayoutError::BadChunk { chunk, block_size });
        }
        Ok(Shape { layout, copies, width, chunk })
    }

    /// Builds the volume tree, taking space from `alloc`. On error nothing has been
    /// committed: the caller discards the allocator's changes.
    pub fn plan(&self, alloc: &mut dyn Allocator) -> Result<NodeSpec, LayoutError> {
        let Shape { layout, copies, width, chunk } = self.shape(alloc.block_size(), alloc.device_count())?;
        let size = self.size;
        let width_n = width as usize;
        // Bytes per leg, such that `data_width` legs hold the whole size.
        let per_leg = |data_width: u64| -> Result<u64, LayoutError> {
            let row = chunk.checked_mul(data_width).ok_or(LayoutError::TooLarge(size))?;
            let leg = size.div_ceil(row).checked_mul(chunk).ok_or(LayoutError::TooLarge(size))?;
            leg.checked_mul(data_width).map(|_| leg).ok_or(LayoutError::TooLarge(size))
        };
        Ok(match layout {
            Layout::Linear => alloc.allocate_linear(size)?,
            Layout::Stripe => {
                let leg = per_leg(u64::from(width))?;
                let legs = alloc.allocate_set(layout, "width", width_n, leg, 0)?;
                NodeSpec::Stripe { chunk, children: legs.into_iter().map(|l| l.data).collect() }
            }
            Layout::Mirror => mirror(alloc, layout, copies as usize, size)?,
            Layout::Raid10 => {
                let leg = per_leg(u64::from(width))?;
                let children = (0..width)
                    .map(|_| mirror(alloc, layout, copies as usize, leg))
                    .collect::<Result<_, _>>()?;
                NodeSpec::Stripe { chunk, children }
            }
            Layout::Raid5 | Layout::Raid6 => {
                let level = if layout == Layout::Raid5 { ParityLevel::Single } else { ParityLevel::Double };
                let data_width = if level == ParityLevel::Single { width - 1 } else { width - 2 };
                let leg = per_leg(u64::from(data_width))?;
                let region = region_size(leg * u64::from(data_width));
                let bitmap_size = bitmap_bytes(leg * u64::from(data_width), region);
                let legs = alloc.allocate_set(layout, "width", width_n, leg, bitmap_size)?;
                let (children, copies) = split_legs(legs);
                NodeSpec::Parity {
                    level,
                    chunk,
                    children,
                    bitmap: BitmapSpec { region_size: region, copies },
                }
            }
        })
    }
}

fn mirror(
    alloc: &mut dyn Allocator,
    layout: Layout,
    copies: usize,
    size: u64,
) -> Result<NodeSpec, LayoutError> {
    let region = region_size(size);
    let legs = alloc.allocate_set(layout, "copies", copies, size, bitmap_bytes(size, region))?;
    let (children, copies) = split_legs(legs);
    Ok(NodeSpec::Mirror { children, bitmap: BitmapSpec { region_size: region, copies } })
}

fn split_legs(legs: Vec<AllocatedLeg>) -> (Vec<NodeSpec>, Vec<NodeSpec>) {
    legs.into_iter().map(|l| (l.data, l.bitmap.expect("bitmap requested"))).unzip()
}

/// The write-intent region for a node of `size` bytes.
pub fn region_size(size: u64) -> u64 {
    size.div_ceil(MAX_REGIONS).next_power_of_two().max(MIN_REGION)
}

/// Bytes an encoded bitmap of a `size`-byte node takes: a multiple of 4 KiB, which every
/// supported block size divides.
pub fn bitmap_bytes(size: u64, region: u64) -> u64 {
    let regions = size.div_ceil(region);
    (BITMAP_HEADER as u64 + regions.div_ceil(8)).div_ceil(4096) * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out extents on numbered devices with unlimited space.
    struct Unlimited(usize, u64);

    impl Allocator for Unlimited {
        fn block_size(&self) -> u32 {
            4096
        }
        fn device_count(&self) -> usize {
            self.0
        }
        fn allocate_set(
            &mut self,
            layout: Layout,
            parameter: &'static str,
            legs: usize,
            leg: u64,
            bm: u64,
        ) -> Result<Vec<AllocatedLeg>, LayoutError> {
            if legs > self.0 {
                return Err(LayoutError::NotEnoughDevices {
                    layout,
                    parameter,
                    needed: legs,
                    available: self.0,
                    leg_bytes: leg,
                    domains: "",
                });
            }
            Ok((0..legs)
                .map(|i| {
                    let device = uuid::Uuid::from_u128(i as u128);
                    self.1 += leg + bm;
                    AllocatedLeg {
                        data: NodeSpec::Extent { device, offset: self.1, length: leg },
                        bitmap: (bm > 0).then(|| NodeSpec::Extent {
                            device,
                            offset: self.1 + leg,
                            length: bm,
                        }),
                    }
                })
                .collect())
        }
        fn allocate_linear(&mut self, size: u64) -> Result<NodeSpec, LayoutError> {
            Ok(NodeSpec::Extent { device: uuid::Uuid::nil(), offset: 0, length: size })
        }
    }

    fn plan(r: VolumeRequest, devices: usize) -> Result<NodeSpec, LayoutError> {
        r.plan(&mut Unlimited(devices, 0))
    }

    #[test]
    fn every_layout_covers_the_requested_size() {
        for layout in Layout::ALL {
            let spec = plan(VolumeRequest::new(10 << 20, layout), 6).unwrap();
            assert!(spec.size() >= 10 << 20, "{layout}: {}", spec.size());
        }
    }

    #[test]
    fn malformed_requests_are_errors_that_say_what_to_change() {
        let cases = [
            (VolumeRequest::new(0, Layout::Linear), "greater than zero"),
            (VolumeRequest::new(1000, Layout::Linear), "round it up to 4096"),
            (VolumeRequest { width: Some(5), ..VolumeRequest::new(1 << 20, Layout::Stripe) }, "lower width"),
            (
                VolumeRequest { copies: Some(3), ..VolumeRequest::new(1 << 20, Layout::Mirror) },
                "lower copies",
            ),
            (
                VolumeRequest { chunk: Some(3000), ..VolumeRequest::new(1 << 20, Layout::Stripe) },
                "power of two",
            ),
            (VolumeRequest { copies: Some(1), ..VolumeRequest::new(1 << 20, Layout::Mirror) }, "at least 2"),
            (VolumeRequest { width: Some(2), ..VolumeRequest::new(1 << 20, Layout::Raid5) }, "at least 3"),
            (VolumeRequest { width: Some(2), ..VolumeRequest::new(1 << 20, Layout::Mirror) }, "leave it out"),
        ];
        for (request, expected) in cases {
            let message = plan(request.clone(), 2).unwrap_err().to_string();
            assert!(message.contains(expected), "{request:?}: {message}");
        }
        let message = "raid7".parse::<Layout>().unwrap_err().to_string();
        assert!(message.contains("use one of"), "{message}");
    }
}

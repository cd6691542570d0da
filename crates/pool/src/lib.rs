//! Device-side state: what is written on each device and how a pool is rebuilt from it.
//!
//! ```text
//!   device: | label A | slot 0 | slot 1 | pad | extents ............................ | label B |
//!           0         4 KiB                    data_offset                  size-4 KiB
//! ```
//!
//! - [`label`]: two copies of who the device is and which pool it belongs to.
//! - [`slot`]: two alternating metadata slots holding the device's records and, on config
//!   replicas, the whole configuration ([`config`]).
//! - [`Pool`]: claims devices, allocates extents, creates and deletes volumes, and
//!   rebuilds itself from the devices at start-up ([`Pool::open`]).

mod alloc;
pub mod config;
mod discover;
mod error;
pub mod label;
mod pool;
pub mod slot;

pub use discover::{Discovery, Inspection, inspect, scan_dir};
pub use error::PoolError;
pub use pool::{CONFIG_REPLICAS, DeviceInfo, DeviceState, Pool, PoolOptions, Volume, VolumeInfo};

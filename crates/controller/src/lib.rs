//! The Strata controller: the pool of this machine's devices, its volumes and exports,
//! managed through a REST API and served to hosts over NBD.
//!
//! ```text
//!   strata CLI ──HTTP──▶ api (axum) ──▶ controller ──▶ pool / volumes (strata-pool)
//!   NBD clients ──TCP──▶ strata-nbd ──▶ export: metered volume ──▶ volume tree ──▶ devices
//! ```

pub mod api;
pub mod config;
pub mod controller;
pub mod data_dir;
pub mod devices;
pub mod exports;
pub mod failure;
pub mod http;
pub mod metrics;
pub mod serve;
pub mod size;
pub mod space;

pub use config::ServeConfig;
pub use controller::Controller;
pub use serve::serve;

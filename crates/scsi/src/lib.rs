//! SCSI logical units over Strata block devices: the SPC-4/SBC-3 command set, sense data,
//! unit attentions, reservations (RESERVE(6) and persistent) and ALUA, with no knowledge
//! of the transport. The iSCSI target (`strata-iscsi`) is one transport; others can follow.
//!
//! ```text
//!   transport (iSCSI) ── Nexus + Command{cdb, data_out, allocation} ──▶ execute(LunMap)
//!                                                                        │ REPORT LUNS,
//!                                                                        │ unknown LUNs
//!                                                                        ▼
//!                                                   LogicalUnit::execute ─▶ BlockIo
//!                       ◀── Outcome{status, data_in, sense} ─────────────┘
//! ```
//!
//! The transport collects all data-out before calling `execute` and truncates the data-in
//! to the initiator's expected transfer length (computing residuals itself).
//!
//! | module | what |
//! |--------|------|
//! | `cdb` | CDB decoding ([`parse`]): fields read with lengths checked, bad input as sense data |
//! | `sense` | sense data, fixed and descriptor format |
//! | `lu` | [`LogicalUnit`]: dispatch, readiness, START STOP UNIT, resets, nexus loss |
//! | `block` | READ, WRITE, VERIFY, COMPARE AND WRITE, WRITE SAME, UNMAP, GET LBA STATUS, ... |
//! | `granularity` | logical blocks smaller than the device's (512e): read-modify-write at the edges |
//! | `inquiry`, `mode`, `opcodes` | INQUIRY and VPD pages, mode pages, REPORT SUPPORTED OPERATION CODES |
//! | `reservations` | RESERVE(6)/RELEASE(6) and persistent reservations (APTPL through [`ReservationStore`]) |
//! | `unit_attention` | per-nexus state: unit attentions, PREVENT ALLOW, held copy results |
//! | `copy`, `sanitize` | EXTENDED COPY / RECEIVE COPY RESULTS ([`Directory`]), SANITIZE |
//! | `target` | [`execute`] over a [`LunMap`]: REPORT LUNS and LUNs with no LU, LUN encoding |
//!
//! What the transport does around `execute`:
//! - call [`LogicalUnit::nexus_lost`] on every LU when a session logs out or its
//!   connection is lost, and [`LogicalUnit::reset`] for LOGICAL UNIT RESET (on that LU) and
//!   TARGET WARM/COLD RESET (on every LU);
//! - compute write residuals from [`LogicalUnit::data_out_length`] (a write whose data-out
//!   is short writes the whole blocks it got; extra data-out is ignored), and bound the
//!   memory of a command before it runs by its [`LogicalUnit::data_in_length`] (both from
//!   one parse: [`transfer`]);
//! - abort tasks itself (ABORT TASK, ABORT TASK SET, CLEAR TASK SET, the abort half of
//!   PREEMPT AND ABORT): a command future may be dropped at an await point, and a running
//!   SANITIZE carries on in the background as SBC-3 requires. The control mode page says
//!   TAS=0, so tasks aborted on behalf of another nexus end without a status
//!   ([`Status::TaskAborted`] is never required).

mod block;
mod cdb;
mod copy;
mod granularity;
mod inquiry;
mod lu;
mod mode;
mod opcodes;
mod reservations;
mod sanitize;
mod sense;
mod target;
#[cfg(test)]
mod tests;
mod unit_attention;

use async_trait::async_trait;
use bytes::Bytes;

pub use cdb::{Cdb, parse};
pub use copy::Directory;
pub use lu::LogicalUnit;
pub use sense::Sense;
pub use target::{LunMap, Transfer, decode_lun, encode_lun, execute, transfer};

/// The I_T nexus a command arrives on: who sent it, through which target port.
/// Reservations and unit attentions are kept per nexus.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Initiator port name (iSCSI: `iqn.…,i,0x<ISID>`), unique per session.
    pub initiator_port: String,
    /// Initiator device name (iSCSI: the initiator's IQN), shared by its sessions.
    pub initiator_name: String,
    /// Target port name (iSCSI: `iqn.…,t,0x<TPGT>`).
    pub target_port: String,
    /// Relative target port identifier (1-based) reported in VPD 0x83 and by PR.
    pub relative_port: u16,
}

/// A command as the transport received it.
#[derive(Clone, Debug)]
pub struct Command {
    /// The CDB (6 to 16 bytes, or longer with an additional CDB segment); trailing bytes
    /// past the opcode's length are ignored.
    pub cdb: Bytes,
    /// Every byte of data-out the initiator sent (may differ from what the CDB implies).
    pub data_out: Bytes,
    /// The initiator's expected data-in length: the most data-in it can take.
    pub allocation: u32,
}

/// SCSI status codes (SAM-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// GOOD.
    Good = 0x00,
    /// CHECK CONDITION: sense data says why.
    CheckCondition = 0x02,
    /// CONDITION MET (PRE-FETCH found the range cached).
    ConditionMet = 0x04,
    /// BUSY.
    Busy = 0x08,
    /// RESERVATION CONFLICT (no sense data).
    ReservationConflict = 0x18,
    /// TASK SET FULL.
    TaskSetFull = 0x28,
    /// TASK ABORTED.
    TaskAborted = 0x40,
}

/// What a command produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// SCSI status.
    pub status: Status,
    /// Data-in (the transport sends at most `Command::allocation` bytes of it).
    pub data: Bytes,
    /// Sense data (fixed or descriptor format as the LU's D_SENSE bit says), with CHECK
    /// CONDITION.
    pub sense: Option<Bytes>,
}

/// Task management functions the transport passes on (SAM-5 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// LOGICAL UNIT RESET.
    LogicalUnit,
    /// TARGET WARM RESET.
    TargetWarm,
    /// TARGET COLD RESET.
    TargetCold,
}

/// Identity of a logical unit, fixed by the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// T10 vendor identification ("STRATA"), padded or cut to 8 characters.
    pub vendor: String,
    /// Product identification, padded or cut to 16 characters.
    pub product: String,
    /// Product revision level, padded or cut to 4 characters.
    pub revision: String,
    /// Unit serial number (VPD page 80h); hosts use it to recognise the LU on every path.
    pub serial: String,
    /// NAA 6 (IEEE registered extended) designator (VPD page 83h): the name multipath and
    /// EXTENDED COPY know the LU by.
    pub naa: [u8; 16],
    /// ALUA target port group of this controller (one group per controller, reported
    /// active/optimized).
    pub target_port_group: u16,
    /// Refuse every command that writes the medium (DATA PROTECT, WRITE PROTECTED).
    pub read_only: bool,
}

/// Where persistent reservations are kept so they survive a restart (APTPL).
#[async_trait]
pub trait ReservationStore: Send + Sync + 'static {
    /// Replaces the persisted state (opaque bytes produced by the LU; empty = nothing
    /// persisted). The PERSISTENT RESERVE OUT that caused it completes only after this
    /// returns, and fails if it fails.
    async fn save(&self, state: Bytes) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// A store that keeps nothing: reservations last as long as the process (scratch units,
/// tests and fuzzing).
pub struct Volatile;

#[async_trait]
impl ReservationStore for Volatile {
    async fn save(&self, _: Bytes) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

/// Why a logical unit could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScsiError {
    /// The persisted reservation state does not decode.
    #[error("The persisted reservation state is not valid")]
    CorruptReservations(#[source] serde_json::Error),
    /// The persisted reservation state decodes but its reservation has no single holder.
    #[error("The persisted reservation state has a reservation without a single holder")]
    InconsistentReservations,
    /// The device's geometry cannot be served (block size not a power of two between 512
    /// and 64 KiB, or a size that is zero or not a whole number of blocks).
    #[error("A device of {size_bytes} bytes in {block_size}-byte blocks cannot be a logical unit")]
    Geometry {
        /// The device's block size.
        block_size: u32,
        /// The device's size in bytes.
        size_bytes: u64,
    },
    /// A logical block size the LU cannot emulate over its device: it must be 512, 1024 or
    /// 2048 bytes and smaller than the device's block, or the device's block size.
    #[error(
        "A logical block of {size} bytes cannot be served over {device_block_size}-byte device blocks \
         (use 512, 1024 or 2048 below the device's block size, or the device's block size)"
    )]
    LogicalBlockSize {
        /// The logical block size asked for.
        size: u32,
        /// The device's block size.
        device_block_size: u32,
    },
}

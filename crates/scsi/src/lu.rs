//! The logical unit: one Strata volume as a SCSI direct-access block device.
//!
//! ```text
//!   execute(nexus, command)
//!     ├─ unit attention pending for the nexus? ── CHECK CONDITION, UNIT ATTENTION
//!     │    (INQUIRY, REPORT LUNS, REQUEST SENSE pass; REQUEST SENSE reports it)
//!     ├─ cdb::parse ─────────────────────────────── CHECK CONDITION, ILLEGAL REQUEST
//!     ├─ sanitizing / no medium / sanitize failed ─ CHECK CONDITION, NOT READY / MEDIUM ERROR
//!     ├─ reservations.check ─────────────────────── RESERVATION CONFLICT
//!     └─ the command (block.rs, inquiry.rs, mode.rs, reservations.rs, copy.rs, ...)
//!          data-in cut to the CDB's ALLOCATION LENGTH
//! ```
//!
//! State is shared by commands from every session, each running on its own thread: the
//! checks every command makes are atomic loads (unit attentions pending, a reservation
//! held, sanitizing, medium present, mode bits); locks are taken only when one of those
//! says there is something to look at, and none is held across an await.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use strata_block::{BlockIo, IoOp};

use crate::block::io_sense;
use crate::cdb::{self, Action, op};
use crate::copy::Directory;
use crate::mode::ModeState;
use crate::reservations::Reservations;
use crate::sanitize::Sanitizer;
use crate::sense::{self, Reply, Sense};
use crate::unit_attention::{Nexuses, Ua};
use crate::{Command, Identity, Nexus, Outcome, ReservationStore, Reset, ScsiError};

/// A SCSI logical unit backed by a Strata block device.
pub struct LogicalUnit {
    pub(crate) device: Arc<dyn BlockIo>,
    pub(crate) identity: Identity,
    /// Bytes per logical block, what hosts address: the device's block size, or a
    /// fraction of it ("512e", see `granularity.rs`).
    pub(crate) block_size: u32,
    /// Bytes per device block: the unit of every device request, and the physical block
    /// READ CAPACITY(16) reports.
    pub(crate) device_block_size: u32,
    /// Capacity in logical blocks.
    pub(crate) blocks: u64,
    pub(crate) removable: bool,
    pub(crate) directory: Arc<Directory>,
    pub(crate) mode: ModeState,
    pub(crate) nexuses: Nexuses,
    pub(crate) reservations: Reservations,
    pub(crate) sanitizer: Arc<Sanitizer>,
    /// Shared by ordinary writes, exclusive for COMPARE AND WRITE, ORWRITE, WRITE ATOMIC
    /// (and the start of a sanitize). A tokio lock: it is held across device IO.
    pub(crate) writes: tokio::sync::RwLock<()>,
    medium_present: AtomicBool,
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("identity", &self.identity)
            .field("block_size", &self.block_size)
            .field("device_block_size", &self.device_block_size)
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

impl LogicalUnit {
    /// A LU serving `device`. `persisted` is what was last given to `store.save` (`None`
    /// if nothing ever was): persistent reservations made with APTPL=1 come back from it.
    /// `directory` is where EXTENDED COPY finds the other LUs it may copy to and from; this
    /// LU is not added to it (the caller does that once it holds the LU in an `Arc`).
    pub fn new(
        device: Arc<dyn BlockIo>,
        identity: Identity,
        persisted: Option<&[u8]>,
        store: Arc<dyn ReservationStore>,
        directory: Arc<Directory>,
    ) -> Result<Self, ScsiError> {
        let geometry = device.geometry();
        let block_size = geometry.block_size;
        if !block_size.is_power_of_two()
            || !(512..=65536).contains(&block_size)
            || !geometry.size_bytes.is_multiple_of(u64::from(block_size))
            || geometry.size_bytes == 0
        {
            return Err(ScsiError::Geometry { block_size, size_bytes: geometry.size_bytes });
        }
        Ok(LogicalUnit {
            blocks: geometry.size_bytes / u64::from(block_size),
            block_size,
            device_block_size: block_size,
            device,
            identity,
            removable: false,
            directory,
            mode: ModeState::default(),
            nexuses: Nexuses::default(),
            reservations: Reservations::new(persisted, store)?,
            sanitizer: Arc::default(),
            writes: tokio::sync::RwLock::new(()),
            medium_present: AtomicBool::new(true),
        })
    }

    /// Reports the medium as removable (RMB=1), so START STOP UNIT with LOEJ ejects and
    /// loads it and PREVENT ALLOW MEDIUM REMOVAL guards that. Off by default: hosts treat
    /// removable disks differently (Windows refuses them for clustering and dynamic
    /// disks), so only turn it on where a host wants ejectable media.
    pub fn with_removable_medium(mut self, removable: bool) -> Self {
        self.removable = removable;
        self
    }

    /// Serves the device in logical blocks of `size` bytes: 512, 1024 or 2048 when that is
    /// smaller than the device's block, or the device's block size itself (the default).
    ///
    /// Many hosts (VMware ESXi, older Windows and Linux tools) cannot use 4096-byte logical
    /// blocks, so a volume on 4 KiB device blocks is offered as "512e": 512-byte logical
    /// blocks, eight to a physical block (READ CAPACITY(16) says so, and hosts that care
    /// align their IO to it). IO that is not aligned to the device block costs a
    /// read-modify-write of the partial device blocks at its edges and is serialized with
    /// every other write of the LU; aligned IO runs as fast as on a native LU. Call it
    /// before the LU serves any command (it takes the LU by value).
    pub fn with_logical_block_size(mut self, size: u32) -> Result<Self, ScsiError> {
        let device = self.device_block_size;
        let emulated = matches!(size, 512 | 1024 | 2048) && size < device;
        if size != device && !emulated {
            return Err(ScsiError::LogicalBlockSize { size, device_block_size: device });
        }
        self.blocks = self.device.geometry().size_bytes / u64::from(size);
        self.block_size = size;
        Ok(self)
    }

    /// The identity the controller gave this LU.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Bytes per logical block, as hosts see it (READ CAPACITY): the device's block size
    /// unless [`LogicalUnit::with_logical_block_size`] chose a smaller one.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Bytes of data-out `cdb` asks for (0 when it asks for none or does not parse), so
    /// the transport can compute write residuals against its expected transfer length.
    pub fn data_out_length(&self, cdb: &[u8]) -> u64 {
        cdb::parse(cdb).map_or(0, |c| c.data_out_length(self.block_size))
    }

    /// Bytes of data-in `cdb` produces at most (0 when it produces none or does not
    /// parse), so the transport can charge the buffer a command holds while it runs, before
    /// it runs (see [`crate::Cdb::data_in_length`]).
    pub fn data_in_length(&self, cdb: &[u8]) -> u64 {
        cdb::parse(cdb).map_or(0, |c| c.data_in_length(self.block_size))
    }

    /// Runs one command from `nexus`.
    pub async fn execute(&self, nexus: &Nexus, command: &Command) -> Outcome {
        let opcode = command.cdb.first().copied();
        match opcode {
            Some(op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) | None => {
                self.nexuses.with(nexus, |_| ())
            }
            Some(_) => {
                if let Some(ua) = self.nexuses.take(nexus) {
                    return sense::check_condition(ua, self.mode.d_sense());
                }
            }
        }
        let parsed = match cdb::parse(&command.cdb) {
            Ok(parsed) => parsed,
            Err(sense) => return sense::check_condition(sense, self.mode.d_sense()),
        };
        let reply = match self.ready(&parsed.request) {
            Err(sense) => Err(sense.into()),
            Ok(()) => match self.reservations.check(nexus, &parsed.request) {
                Err(conflict) => Err(conflict),
                Ok(()) => self.dispatch(nexus, parsed.request, parsed.allocation, &command.data_out).await,
            },
        };
        let reply = reply.map(|mut data| {
            if let Some(limit) = parsed.allocation {
                data.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            }
            data
        });
        sense::outcome(reply, self.mode.d_sense())
    }

    /// Whether another LU's EXTENDED COPY may read or write this one now.
    pub(crate) fn accessible(&self) -> bool {
        !self.sanitizer.running() && !self.sanitizer.failed() && self.medium_present.load(Ordering::Acquire)
    }

    /// NOT READY while sanitizing or with no medium; MEDIUM ERROR after a failed sanitize.
    fn ready(&self, request: &Action) -> Result<(), Sense> {
        use Action::*;
        if matches!(request, Inquiry { .. } | ReportLuns { .. } | RequestSense { .. }) {
            return Ok(());
        }
        if self.sanitizer.running() {
            return Err(Sense::sanitize_in_progress(self.sanitizer.progress()));
        }
        let medium_access = matches!(
            request,
            TestUnitReady
                | Read(_)
                | Write(_)
                | WriteVerify { .. }
                | Verify { .. }
                | OrWrite(_)
                | WriteAtomic { .. }
                | CompareAndWrite(_)
                | WriteSame { .. }
                | Unmap { .. }
                | PreFetch { .. }
                | SyncCache { .. }
                | GetLbaStatus { .. }
                | ExtendedCopy { .. }
        );
        let needs_medium =
            medium_access || matches!(request, ReadCapacity10 | ReadCapacity16 | Sanitize { .. });
        if needs_medium && !self.medium_present.load(Ordering::Acquire) {
            return Err(Sense::no_medium());
        }
        if medium_access && self.sanitizer.failed() {
            return Err(Sense::sanitize_failed());
        }
        Ok(())
    }

    async fn dispatch(&self, nexus: &Nexus, request: Action, allocation: Option<u32>, data: &Bytes) -> Reply {
        use Action::*;
        match request {
            TestUnitReady => Ok(Bytes::new()),
            RequestSense { descriptor } => Ok(self.request_sense(nexus, descriptor)),
            Inquiry { evpd, page } => self.inquiry(nexus, evpd, page),
            ModeSense { ten, dbd, llbaa, pc, page, subpage } => {
                self.mode_sense(ten, dbd, llbaa, pc, page, subpage)
            }
            ModeSelect { ten, sp, length } => self.mode_select(nexus, ten, sp, length, data),
            ReadCapacity10 => self.read_capacity_10(),
            ReadCapacity16 => self.read_capacity_16(),
            Read(io) => self.read(io).await,
            Write(io) => self.write(io, data).await,
            WriteVerify { io, bytchk } => self.write_verify(io, bytchk, data).await,
            Verify { io, bytchk } => self.verify(io, bytchk, data).await,
            OrWrite(io) => self.or_write(io, data).await,
            WriteAtomic { io, boundary } => self.write_atomic(io, boundary, data).await,
            CompareAndWrite(io) => self.compare_and_write(io, data).await,
            WriteSame { io, unmap, anchor, ndob, .. } => self.write_same(io, unmap, anchor, ndob, data).await,
            Unmap { anchor, length } => self.unmap(anchor, length, data).await,
            PreFetch { lba, blocks } => self.pre_fetch(lba, blocks),
            SyncCache { lba, blocks } => self.sync_cache(lba, blocks).await,
            GetLbaStatus { lba } => self.get_lba_status(lba, allocation.unwrap_or(0)).await,
            ReportLuns { .. } => Ok(crate::target::report_luns([0u64].into_iter())),
            ReportSupportedOpcodes { rctd, options, opcode, sa } => {
                crate::opcodes::report(rctd, options, opcode, sa)
            }
            ReportTargetPortGroups { extended } => Ok(self.report_target_port_groups(nexus, extended)),
            PrIn { sa } => self.reservations.pr_in(sa),
            PrOut { sa, scope, kind, length } => {
                let length = usize::try_from(length).unwrap_or(usize::MAX);
                let params = data.get(..length).ok_or(Sense::param_list_length())?;
                self.reservations.pr_out(nexus, (sa, scope, kind), params, &self.nexuses).await
            }
            Reserve => self.reservations.reserve(nexus),
            Release => self.reservations.release(nexus),
            StartStop { power, no_flush, loej, start } => self.start_stop(power, no_flush, loej, start).await,
            PreventAllow { prevent } => {
                self.nexuses.with(nexus, |state| state.prevent.store(prevent, Ordering::Release));
                Ok(Bytes::new())
            }
            Sanitize { immed, sa, length, .. } => self.sanitize(immed, sa, length, data).await,
            ExtendedCopy { length } => self.extended_copy(nexus, length, data).await,
            ReceiveCopyResults { sa, list_id } => self.receive_copy_results(nexus, sa, list_id),
            ReadDefectData { twelve, flags } => Ok(read_defect_data(twelve, flags)),
        }
    }

    /// REQUEST SENSE: a pending unit attention (which it clears), else the state of the LU.
    fn request_sense(&self, nexus: &Nexus, descriptor: bool) -> Bytes {
        let sense = if let Some(ua) = self.nexuses.take(nexus) {
            ua
        } else if self.sanitizer.running() {
            Sense::sanitize_in_progress(self.sanitizer.progress())
        } else if !self.medium_present.load(Ordering::Acquire) {
            Sense::no_medium()
        } else if self.sanitizer.failed() {
            Sense::sanitize_failed()
        } else {
            Sense::none()
        };
        sense.encode(descriptor)
    }

    /// START STOP UNIT. There are no power states to change; stopping flushes the cache
    /// (unless NO_FLUSH), and LOEJ ejects or loads a removable medium.
    async fn start_stop(&self, power: u8, no_flush: bool, loej: bool, start: bool) -> Reply {
        if power != 0 {
            // A power condition: START and LOEJ are ignored (SBC-3 §5.25).
            return Ok(Bytes::new());
        }
        let present = self.medium_present.load(Ordering::Acquire);
        if !start && !no_flush && present {
            self.device.flush().await.map_err(|e| io_sense(&e, IoOp::Flush))?;
        }
        if loej && self.removable {
            let mut prevented = false;
            self.nexuses.for_each(|_, state| prevented |= state.prevent.load(Ordering::Acquire));
            if prevented {
                return Err(Sense::removal_prevented().into());
            }
            self.medium_present.store(start, Ordering::Release);
        }
        Ok(Bytes::new())
    }

    /// REPORT TARGET PORT GROUPS: one group, this controller's, active/optimized, holding
    /// the port the command came through.
    fn report_target_port_groups(&self, nexus: &Nexus, extended: bool) -> Bytes {
        let mut group = vec![0x00, 0x0F];
        group.extend_from_slice(&self.identity.target_port_group.to_be_bytes());
        group.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
        group.extend_from_slice(&nexus.relative_port.to_be_bytes());
        let mut out = Vec::with_capacity(8 + group.len());
        let header = if extended { 8 } else { 4 };
        out.extend_from_slice(&u32::try_from(header - 4 + group.len()).unwrap_or(0).to_be_bytes());
        if extended {
            // Format type 001b; implicit transitions take no time.
            out.extend_from_slice(&[0x10, 0, 0, 0]);
        }
        out.extend_from_slice(&group);
        Bytes::from(out)
    }

    /// A task management reset (`by` is the nexus that asked). Ends RESERVE(6)
    /// reservations and every PREVENT ALLOW MEDIUM REMOVAL and leaves a unit attention for
    /// every nexus, `by` included (SAM-5 §6.3: the reset is reported on every I_T nexus).
    /// Persistent reservations stay, and so do mode parameters: a host that turned the
    /// write cache off and is not told it came back on would stop flushing. A running
    /// sanitize goes on. For target resets the transport calls this on every LU.
    pub fn reset(&self, by: &Nexus, reset: Reset) {
        tracing::info!(initiator = %by.initiator_port, ?reset, lu = %self.identity.serial, "Reset");
        self.reservations.drop_reserve6(None);
        self.nexuses.for_each(|_, state| state.prevent.store(false, Ordering::Release));
        let ua = match reset {
            Reset::LogicalUnit => Ua::LU_RESET,
            Reset::TargetWarm | Reset::TargetCold => Ua::RESET,
        };
        self.nexuses.with(by, |_| ());
        self.nexuses.queue(ua, |_| true);
    }

    /// `nexus` is gone (logout, connection loss): its RESERVE(6) reservation, PREVENT
    /// ALLOW MEDIUM REMOVAL, pending unit attentions and held copy results go with it.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        self.reservations.drop_reserve6(Some(nexus));
        self.nexuses.remove(nexus);
    }
}

/// READ DEFECT DATA(10/12): an empty list in whatever format was asked for.
fn read_defect_data(twelve: bool, flags: u8) -> Bytes {
    if twelve {
        Bytes::copy_from_slice(&[0, flags, 0, 0, 0, 0, 0, 0])
    } else {
        Bytes::copy_from_slice(&[0, flags, 0, 0])
    }
}

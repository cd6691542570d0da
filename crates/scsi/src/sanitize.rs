//! SANITIZE (SBC-3 §5.30): overwrite, block erase, cryptographic erase, exit failure mode.
//!
//! A sanitize runs on a thread of its own so it outlives its command: ABORT TASK, resets
//! and the loss of the nexus that started it do not stop it (SBC-3 §4.11). While it runs
//! the LU answers INQUIRY, REPORT LUNS and REQUEST SENSE (with the progress) and nothing
//! else: every other command gets NOT READY, SANITIZE IN PROGRESS. A sanitize that fails
//! leaves the medium unusable (MEDIUM ERROR, SANITIZE COMMAND FAILED) until another
//! succeeds or EXIT FAILURE MODE.
//!
//! Block erase and cryptographic erase both discard the whole device: Strata has no
//! media encryption key to change, and a discarded range reads as zeroes, which is what
//! either erase promises a host. Overwrite is paced at [`OVERWRITE_RATE`] so that one
//! sanitize cannot starve the other volumes sharing its devices.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use strata_block::{BlockIo, Durability, IoOp};

use crate::block::io_sense;
use crate::lu::LogicalUnit;
use crate::sense::{Reply, Sense};

/// Bytes per second an overwrite pass writes at most.
pub(crate) const OVERWRITE_RATE: u64 = 64 << 20;
/// Bytes per device request while sanitizing.
const CHUNK: u64 = 1 << 20;
/// Bytes per discard while erasing.
const ERASE_CHUNK: u64 = 1 << 30;

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const FAILED: u8 = 2;

/// The sanitize state of a LU, shared with the thread doing the work.
#[derive(Default)]
pub(crate) struct Sanitizer {
    state: AtomicU8,
    done: AtomicU64,
    total: AtomicU64,
}

impl Sanitizer {
    pub fn running(&self) -> bool {
        self.state.load(Ordering::Acquire) == RUNNING
    }

    pub fn failed(&self) -> bool {
        self.state.load(Ordering::Acquire) == FAILED
    }

    /// Fraction done, in 65536ths (the sense data progress indication).
    pub fn progress(&self) -> u16 {
        let total = self.total.load(Ordering::Relaxed).max(1);
        let done = self.done.load(Ordering::Relaxed).min(total);
        u16::try_from(u128::from(done) * 0xFFFF / u128::from(total)).unwrap_or(u16::MAX)
    }
}

/// What a sanitize does to the medium.
enum Job {
    Erase,
    Overwrite { block: Bytes, passes: u8, invert: bool },
}

impl LogicalUnit {
    /// SANITIZE with service action `sa` and the parameter list in `data`.
    pub(crate) async fn sanitize(&self, immed: bool, sa: u8, length: u16, data: &Bytes) -> Reply {
        let bs = usize::try_from(self.block_size).unwrap_or(0);
        let length = usize::from(length);
        let job = match sa {
            0x1F => {
                if length != 0 {
                    return Err(Sense::invalid_cdb(7, None).into());
                }
                let _ =
                    self.sanitizer.state.compare_exchange(FAILED, IDLE, Ordering::AcqRel, Ordering::Acquire);
                return Ok(Bytes::new());
            }
            0x02 | 0x03 => {
                if length != 0 {
                    return Err(Sense::invalid_cdb(7, None).into());
                }
                Job::Erase
            }
            _ => {
                if length <= 4 || length > bs + 4 {
                    return Err(Sense::invalid_cdb(7, None).into());
                }
                if data.len() < length {
                    return Err(Sense::param_list_length().into());
                }
                let p = &data[..length];
                let passes = p[0] & 0x1F;
                if passes == 0 {
                    return Err(Sense::invalid_param(0, Some(4)).into());
                }
                let pattern_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
                if pattern_len == 0 || pattern_len > bs || pattern_len + 4 != length {
                    return Err(Sense::invalid_param(2, None).into());
                }
                // The pattern repeats from the start of every block.
                let pattern = &p[4..];
                let block: Vec<u8> = pattern.iter().copied().cycle().take(bs).collect();
                Job::Overwrite { block: Bytes::from(block), passes, invert: p[0] & 0x80 != 0 }
            }
        };
        self.writable()?;
        {
            // Let writes in flight finish; commands after this see the sanitize.
            let _exclusive = self.exclusive().await;
            let state = self.sanitizer.state.load(Ordering::Acquire);
            if state == RUNNING {
                return Err(Sense::sanitize_in_progress(self.sanitizer.progress()).into());
            }
            self.sanitizer.state.store(RUNNING, Ordering::Release);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let device = Arc::clone(&self.device);
        let sanitizer = Arc::clone(&self.sanitizer);
        let device_block_size = self.device_block_size;
        let spawned = std::thread::Builder::new().name("sanitize".into()).spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
                Ok(rt) => rt.block_on(run(&*device, &sanitizer, device_block_size, job)),
                Err(_) => Err(Sense::internal_failure()),
            };
            let state = if result.is_ok() { IDLE } else { FAILED };
            sanitizer.state.store(state, Ordering::Release);
            if let Err(sense) = &result {
                tracing::warn!(
                    ?sense,
                    "Sanitize failed; the medium stays unusable until a sanitize succeeds"
                );
            }
            let _ = tx.send(result);
        });
        if spawned.is_err() {
            self.sanitizer.state.store(IDLE, Ordering::Release);
            return Err(Sense::internal_failure().into());
        }
        if immed {
            return Ok(Bytes::new());
        }
        match rx.await {
            Ok(Ok(())) => Ok(Bytes::new()),
            Ok(Err(sense)) => Err(sense.into()),
            Err(_) => Err(Sense::internal_failure().into()),
        }
    }
}

/// Does the work of a sanitize on the whole of `device` (whose blocks are
/// `device_block_size` bytes, a whole number of the logical blocks an overwrite pattern
/// fills).
async fn run(device: &dyn BlockIo, s: &Sanitizer, device_block_size: u32, job: Job) -> Result<(), Sense> {
    let size = device.geometry().size_bytes;
    s.done.store(0, Ordering::Relaxed);
    match job {
        Job::Erase => {
            s.total.store(size, Ordering::Relaxed);
            let mut at = 0;
            while at < size {
                let n = ERASE_CHUNK.min(size - at);
                device.discard(at, n).await.map_err(|e| io_sense(&e, IoOp::Discard))?;
                at += n;
                s.done.store(at, Ordering::Relaxed);
            }
        }
        Job::Overwrite { block, passes, invert } => {
            s.total.store(size * u64::from(passes), Ordering::Relaxed);
            let bs = u64::from(device_block_size);
            let chunk_len = (CHUNK / bs).max(1) * bs;
            let started = Instant::now();
            let mut written = 0u64;
            for pass in 0..passes {
                let flip = if invert && pass % 2 == 1 { 0xFF } else { 0x00 };
                let mut chunk = BytesMut::with_capacity(usize::try_from(chunk_len).unwrap_or(0));
                while (chunk.len() as u64) < chunk_len {
                    chunk.extend(block.iter().map(|b| b ^ flip));
                }
                let chunk = chunk.freeze();
                let mut at = 0;
                while at < size {
                    let n = chunk_len.min(size - at);
                    let piece = chunk.slice(..usize::try_from(n).unwrap_or(0));
                    device
                        .write(at, piece, Durability::Cached)
                        .await
                        .map_err(|e| io_sense(&e, IoOp::Write))?;
                    at += n;
                    written += n;
                    s.done.store(written, Ordering::Relaxed);
                    let due = Duration::from_secs_f64(written as f64 / OVERWRITE_RATE as f64);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(ahead).await;
                    }
                }
            }
        }
    }
    device.flush().await.map_err(|e| io_sense(&e, IoOp::Flush))
}

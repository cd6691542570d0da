//! A fault-injecting wrapper that can sit anywhere a [`BlockIo`] can.
//!
//! Faults are described by data ([`FaultPlan`], serde) and decided by a seeded RNG, so a
//! failing test prints a plan and a seed that replay the same faults.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{BlockIo, Durability, Geometry, IoError, IoOp};

/// Which requests a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OpFilter {
    /// Every request.
    #[default]
    All,
    /// Reads only.
    Reads,
    /// Writes, discards and write-zeroes.
    Writes,
    /// Flushes only.
    Flushes,
    /// Discards only.
    Discards,
}

impl OpFilter {
    fn matches(self, op: IoOp) -> bool {
        match self {
            OpFilter::All => true,
            OpFilter::Reads => op == IoOp::Read,
            OpFilter::Writes => matches!(op, IoOp::Write | IoOp::Discard | IoOp::WriteZeroes),
            OpFilter::Flushes => op == IoOp::Flush,
            OpFilter::Discards => op == IoOp::Discard,
        }
    }
}

/// What happens to a request a rule picks.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// The request fails with [`IoError::Injected`] and does nothing.
    Error,
    /// The request is delayed, then carried out.
    Delay {
        /// Added latency in microseconds.
        micros: u64,
    },
    /// A write lands only in part (a random whole-block prefix), then fails.
    TornWrite,
    /// The device vanishes: this and every later request fails with [`IoError::Gone`].
    Disappear,
    /// The request fails with [`IoError::NoSpace`] and does nothing, as on a full file
    /// system; the device stays usable.
    NoSpace,
}

/// One fault rule; a request must match every condition for the action to fire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultRule {
    /// Which operations.
    #[serde(default)]
    pub ops: OpFilter,
    /// Byte range `[start, end)` the request must overlap, if set.
    #[serde(default)]
    pub range: Option<(u64, u64)>,
    /// The rule is armed only after this many requests have reached the device.
    #[serde(default)]
    pub after_ops: u64,
    /// Chance that a matching request is hit, from 0.0 to 1.0.
    #[serde(default = "always")]
    pub probability: f64,
    /// What to do.
    pub action: FaultAction,
}

fn always() -> f64 {
    1.0
}

impl FaultRule {
    /// A rule that hits every matching request with `action`.
    pub fn always(ops: OpFilter, action: FaultAction) -> Self {
        Self { ops, range: None, after_ops: 0, probability: 1.0, action }
    }
}

/// A set of rules and the seed that drives their random choices.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultPlan {
    /// RNG seed.
    #[serde(default)]
    pub seed: u64,
    /// Rules, checked in order; the first that fires decides.
    #[serde(default)]
    pub rules: Vec<FaultRule>,
}

/// Wraps a device and injects the faults of a [`FaultPlan`].
pub struct FaultyDevice {
    name: String,
    inner: Arc<dyn BlockIo>,
    plan: Mutex<(FaultPlan, SmallRng)>,
    ops: AtomicU64,
    gone: AtomicBool,
}

enum Decision {
    Pass,
    Fail(IoError),
    Delay(Duration),
    Tear,
}

impl FaultyDevice {
    /// Wraps `inner`; with an empty plan every request passes through.
    pub fn new(name: impl Into<String>, inner: Arc<dyn BlockIo>, plan: FaultPlan) -> Arc<Self> {
        let rng = SmallRng::seed_from_u64(plan.seed);
        Arc::new(Self {
            name: name.into(),
            inner,
            plan: Mutex::new((plan, rng)),
            ops: AtomicU64::new(0),
            gone: AtomicBool::new(false),
        })
    }

    /// Replaces the plan (and reseeds from it).
    pub fn set_plan(&self, plan: FaultPlan) {
        let rng = SmallRng::seed_from_u64(plan.seed);
        *self.plan.lock() = (plan, rng);
    }

    /// Makes the device vanish now.
    pub fn disappear(&self) {
        self.gone.store(true, Ordering::SeqCst);
    }

    /// Brings a vanished device back (its contents are whatever they were).
    pub fn reappear(&self) {
        self.gone.store(false, Ordering::SeqCst);
    }

    /// True once the device has vanished.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    fn decide(&self, op: IoOp, offset: u64, len: u64) -> Decision {
        let seen = self.ops.fetch_add(1, Ordering::SeqCst);
        if self.is_gone() {
            return Decision::Fail(IoError::Gone { device: self.name.clone() });
        }
        let mut guard = self.plan.lock();
        let (plan, rng) = &mut *guard;
        for rule in &plan.rules {
            let in_range = rule.range.is_none_or(|(s, e)| offset < e && offset + len.max(1) > s);
            if !rule.ops.matches(op) || !in_range || seen < rule.after_ops {
                continue;
            }
            if rule.probability < 1.0 && !rng.random_bool(rule.probability.clamp(0.0, 1.0)) {
                continue;
            }
            return match rule.action {
                FaultAction::Error => Decision::Fail(IoError::Injected { op, offset }),
                FaultAction::Delay { micros } => Decision::Delay(Duration::from_micros(micros)),
                FaultAction::TornWrite if op == IoOp::Write => Decision::Tear,
                FaultAction::TornWrite => continue,
                FaultAction::Disappear => {
                    self.disappear();
                    Decision::Fail(IoError::Gone { device: self.name.clone() })
                }
                FaultAction::NoSpace => {
                    Decision::Fail(IoError::NoSpace { op, device: self.name.clone(), offset, len })
                }
            };
        }
        Decision::Pass
    }

    async fn gate(&self, op: IoOp, offset: u64, len: u64) -> Result<bool, IoError> {
        match self.decide(op, offset, len) {
            Decision::Pass => Ok(false),
            Decision::Fail(e) => Err(e),
            Decision::Delay(d) => {
                tokio::time::sleep(d).await;
                Ok(false)
            }
            Decision::Tear => Ok(true),
        }
    }
}

#[async_trait]
impl BlockIo for FaultyDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        self.gate(IoOp::Read, offset, len).await?;
        self.inner.read(offset, len).await
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        self.gate(IoOp::Read, offset, buf.len() as u64).await?;
        self.inner.read_into(offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        if self.gate(IoOp::Write, offset, data.len() as u64).await? {
            let bs = u64::from(self.geometry().block_size);
            let blocks = data.len() as u64 / bs;
            let keep = self.plan.lock().1.random_range(0..blocks.max(1));
            if keep > 0 {
                let prefix = data.slice(..usize::try_from(keep * bs).expect("fits usize"));
                self.inner.write(offset, prefix, durability).await?;
            }
            return Err(IoError::Injected { op: IoOp::Write, offset });
        }
        self.inner.write(offset, data, durability).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.gate(IoOp::Flush, 0, 0).await?;
        self.inner.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.gate(IoOp::Discard, offset, len).await?;
        self.inner.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.gate(IoOp::WriteZeroes, offset, len).await?;
        self.inner.write_zeroes(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    fn wrap(plan: FaultPlan) -> Arc<FaultyDevice> {
        FaultyDevice::new("f", MemDevice::new("m", 64 * 1024, 512), plan)
    }

    #[tokio::test]
    async fn plan_is_data_and_hits_the_named_range_after_n_ops() {
        let plan: FaultPlan = serde_json::from_str(
            r#"{"seed": 7, "rules": [{"ops": "writes", "range": [4096, 8192], "after_ops": 1,
                 "action": "error"}]}"#,
        )
        .unwrap();
        let dev = wrap(plan);
        let data = Bytes::from(vec![1u8; 512]);
        dev.write(4096, data.clone(), Durability::Cached).await.unwrap(); // op 0: not armed yet
        assert!(dev.write(4096, data.clone(), Durability::Cached).await.is_err());
        dev.write(0, data.clone(), Durability::Cached).await.unwrap(); // outside the range
        dev.read(4096, 512).await.unwrap(); // reads are not affected
    }

    #[tokio::test]
    async fn torn_write_lands_a_prefix_and_fails() {
        let dev = wrap(FaultPlan {
            seed: 3,
            rules: vec![FaultRule::always(OpFilter::Writes, FaultAction::TornWrite)],
        });
        let err = dev.write(0, Bytes::from(vec![9u8; 8192]), Durability::Cached).await;
        assert!(matches!(err, Err(IoError::Injected { .. })));
        let image = dev.inner.read(0, 8192).await.unwrap();
        let new_blocks = image.chunks(512).take_while(|b| b[0] == 9).count();
        assert!(new_blocks < 16);
        assert!(image.chunks(512).skip(new_blocks).all(|b| b.iter().all(|&x| x == 0)));
    }

    #[tokio::test]
    async fn disappearance_is_permanent_until_reappear() {
        let dev = wrap(FaultPlan {
            seed: 0,
            rules: vec![FaultRule {
                after_ops: 2,
                ..FaultRule::always(OpFilter::All, FaultAction::Disappear)
            }],
        });
        dev.read(0, 512).await.unwrap();
        dev.read(0, 512).await.unwrap();
        assert!(matches!(dev.read(0, 512).await, Err(IoError::Gone { .. })));
        dev.set_plan(FaultPlan::default());
        assert!(matches!(dev.flush().await, Err(IoError::Gone { .. })));
        dev.reappear();
        dev.flush().await.unwrap();
    }
}

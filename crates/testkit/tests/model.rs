//! Model-based property tests: every layout, several geometries, random IO compared block
//! for block with a flat reference image; then the same with devices failing at a random
//! point, and with a crash at a random point followed by a rebuild from the devices.
//!
//! Case counts: `STRATA_PROPTEST_CASES` (CI sets a larger number than the inner loop).

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use strata_block::{BlockIo, FaultAction, FaultPlan, FaultRule, OpFilter};
use strata_testkit::{
    Op, PoolShape, Reference, TestPool, apply, check_redundancy, issue, ops, record, request,
    survivable_failures,
};
use strata_volume::Layout;

/// One geometry: devices, block size, volume width and chunk.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    devices: usize,
    block_size: u32,
    width: u32,
    chunk: u64,
}

fn geometry(layout: Layout) -> impl Strategy<Value = Geometry> {
    let (min_width, max_width) = match layout {
        Layout::Linear | Layout::Mirror => (1u32, 1u32),
        Layout::Stripe | Layout::Raid10 => (2, 3),
        Layout::Raid5 => (3, 5),
        Layout::Raid6 => (4, 6),
    };
    (
        min_width..=max_width,
        prop_oneof![Just(512u32), Just(4096u32)],
        prop_oneof![Just(4096u64), Just(16384), Just(65536)],
    )
        .prop_map(move |(width, block_size, chunk)| {
            let devices = match layout {
                Layout::Raid10 => width as usize * 2,
                Layout::Linear | Layout::Mirror => 3,
                _ => width as usize,
            };
            Geometry { devices, block_size, width, chunk: chunk.max(u64::from(block_size)) }
        })
}

const VOLUME: u64 = 2 << 20;

async fn setup(layout: Layout, g: Geometry) -> (TestPool, Arc<dyn BlockIo>) {
    let shape = PoolShape {
        devices: g.devices,
        device_size: 8 << 20,
        block_size: g.block_size,
        extent_size: 1 << 20,
    };
    let pool = TestPool::new(shape).await;
    let volume =
        pool.pool.create_volume("v", request(layout, VOLUME, g.width, g.chunk)).await.expect("create volume");
    let io: Arc<dyn BlockIo> = volume.io();
    (pool, io)
}

fn config() -> Config {
    Config {
        cases: strata_testkit::cases(12),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..Config::default()
    }
}

fn ops_for(g: Geometry) -> impl Strategy<Value = Vec<Op>> {
    let blocks = VOLUME / u64::from(g.block_size);
    // Large enough to cover whole stripes and rows sometimes.
    let max = (g.chunk * 8 / u64::from(g.block_size)).min(blocks);
    ops(blocks, max, 60)
}

/// Every read matches the reference.
fn io_matches_reference(layout: Layout, g: Geometry, ops: Vec<Op>) -> Result<(), TestCaseError> {
    strata_testkit::runtime().block_on(async {
        let (_pool, volume) = setup(layout, g).await;
        let mut reference = Reference::new(VOLUME, g.block_size);
        for op in &ops {
            apply(volume.as_ref(), &mut reference, op).await.map_err(TestCaseError::fail)?;
        }
        let all = volume.read(0, VOLUME).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(all.as_ref() == reference.read(0, VOLUME), "final image differs");
        Ok(())
    })
}

/// With the devices the layout can lose failing at a random point, every read still
/// returns the reference data, and a rebuild from the surviving devices does too.
fn survives_device_failure(
    layout: Layout,
    g: Geometry,
    ops: Vec<Op>,
    fail_at: usize,
) -> Result<(), TestCaseError> {
    strata_testkit::runtime().block_on(async {
        let (pool, volume) = setup(layout, g).await;
        let spec = pool.pool.volume_spec("v").await.expect("spec");
        let doomed = survivable_failures(&spec).expect("redundant layout");
        let mut reference = Reference::new(VOLUME, g.block_size);
        for (i, op) in ops.iter().enumerate() {
            if i == fail_at % ops.len() {
                doomed.iter().for_each(|id| pool.faulty[pool.index_of(*id)].disappear());
            }
            apply(volume.as_ref(), &mut reference, op).await.map_err(TestCaseError::fail)?;
        }
        doomed.iter().for_each(|id| pool.faulty[pool.index_of(*id)].disappear());
        let all = volume.read(0, VOLUME).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(all.as_ref() == reference.read(0, VOLUME), "degraded image differs");
        prop_assert_eq!(
            pool.pool.volume("v").expect("volume").info().state,
            strata_volume::VolumeState::Degraded
        );

        // Rebuild from the survivors, then bring the lost devices back: they catch up.
        volume.flush().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        drop(volume);
        let reopened = pool.crash_and_reopen(0).await;
        let volume = reopened.pool.volume("v").expect("volume after rebuild").io();
        let all = volume.read(0, VOLUME).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            all.as_ref() == reference.read(0, VOLUME),
            "image differs after rebuild without the lost devices"
        );

        // More writes while degraded; then the lost devices come back and catch up from
        // the regions the bitmaps kept dirty for them.
        for op in ops.iter().rev().take(10) {
            apply(volume.as_ref(), &mut reference, op).await.map_err(TestCaseError::fail)?;
        }
        volume.flush().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        drop(volume);
        doomed.iter().for_each(|id| reopened.faulty[reopened.index_of(*id)].reappear());
        let healed = reopened.crash_and_reopen(1).await;
        let volume = healed.pool.volume("v").expect("volume after the devices returned");
        prop_assert_eq!(volume.info().state, strata_volume::VolumeState::Healthy);
        let all = volume.io().read(0, VOLUME).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(all.as_ref() == reference.read(0, VOLUME), "image differs after the devices returned");
        let spec = healed.pool.volume_spec("v").await.expect("spec");
        check_redundancy(&spec, &healed.device_map()).await.map_err(TestCaseError::fail)?;
        Ok(())
    })
}

/// After a crash at a random point (unflushed writes dropped or torn) and a rebuild from
/// the devices: flushed and FUA writes are intact, other blocks hold something that was
/// written there, and mirrors and parity agree after resync.
fn survives_crash(
    layout: Layout,
    g: Geometry,
    ops: Vec<Op>,
    crash_at: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    strata_testkit::runtime().block_on(async {
        let (pool, volume) = setup(layout, g).await;
        let mut reference = Reference::new(VOLUME, g.block_size);
        for op in ops.iter().take(crash_at % (ops.len() + 1)) {
            apply(volume.as_ref(), &mut reference, op).await.map_err(TestCaseError::fail)?;
        }
        drop(volume);
        let pool = pool.crash_and_reopen(seed).await;
        let volume = pool.pool.volume("v").expect("volume after crash").io();
        let all = volume.read(0, VOLUME).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        reference.check_after_crash(&all).map_err(TestCaseError::fail)?;
        let spec = pool.pool.volume_spec("v").await.expect("spec");
        check_redundancy(&spec, &pool.device_map()).await.map_err(TestCaseError::fail)?;
        // The volume keeps working after recovery.
        for op in ops.iter().skip(crash_at % (ops.len() + 1)).take(10) {
            apply(volume.as_ref(), &mut reference, op).await.map_err(TestCaseError::fail)?;
        }
        Ok(())
    })
}

/// The blocks an op touches, `[first, end)`; `None` for a flush.
fn span(op: &Op) -> Option<(u64, u64)> {
    match *op {
        Op::Read { block, blocks }
        | Op::Write { block, blocks, .. }
        | Op::Discard { block, blocks }
        | Op::WriteZeroes { block, blocks } => Some((block, block + blocks)),
        Op::Flush => None,
    }
}

/// Ops issued together, with random device latency so they interleave: writes that share
/// a parity row or a bitmap region race for real. Ops in a batch never overlap each other,
/// so the reference does not depend on their order.
fn concurrent_io_matches_reference(
    layout: Layout,
    g: Geometry,
    ops: Vec<Op>,
    seed: u64,
) -> Result<(), TestCaseError> {
    strata_testkit::runtime().block_on(async {
        let (pool, volume) = setup(layout, g).await;
        for (i, dev) in pool.faulty.iter().enumerate() {
            dev.set_plan(FaultPlan {
                seed: seed.wrapping_add(i as u64),
                rules: vec![FaultRule {
                    probability: 0.5,
                    ..FaultRule::always(OpFilter::All, FaultAction::Delay { micros: 30 })
                }],
            });
        }
        let mut reference = Reference::new(VOLUME, g.block_size);
        let mut batch: Vec<&Op> = Vec::new();
        let mut batches = Vec::new();
        for op in &ops {
            let overlaps = span(op)
                .is_some_and(|(s, e)| batch.iter().filter_map(|b| span(b)).any(|(bs, be)| s < be && bs < e));
            if overlaps || batch.len() == 8 {
                batches.push(std::mem::take(&mut batch));
            }
            batch.push(op);
        }
        batches.push(batch);
        for batch in batches {
            let results = futures::future::join_all(batch.iter().map(|op| issue(volume.as_ref(), op))).await;
            // No op of a batch touches what another touches, so recording them in any order
            // checks each read against what it must have seen.
            for (op, result) in batch.iter().zip(results) {
                let read = result.map_err(TestCaseError::fail)?;
                record(&mut reference, op, read.as_ref(), u64::from(g.block_size))
                    .map_err(TestCaseError::fail)?;
            }
        }
        let all = volume.read(0, VOLUME).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(all.as_ref() == reference.read(0, VOLUME), "final image differs");
        Ok(())
    })
}

macro_rules! layout_properties {
    ($module:ident, $layout:expr, redundant: $redundant:tt) => {
        mod $module {
            use super::*;

            proptest! {
                #![proptest_config(config())]

                #[test]
                fn io_matches_reference((g, ops) in geometry($layout).prop_flat_map(|g| (Just(g), ops_for(g)))) {
                    super::io_matches_reference($layout, g, ops)?;
                }

                #[test]
                fn concurrent_io_matches_reference(
                    (g, ops) in geometry($layout).prop_flat_map(|g| (Just(g), ops_for(g))),
                    seed in any::<u64>(),
                ) {
                    super::concurrent_io_matches_reference($layout, g, ops, seed)?;
                }

                #[test]
                fn survives_crash(
                    (g, ops) in geometry($layout).prop_flat_map(|g| (Just(g), ops_for(g))),
                    crash_at in any::<usize>(),
                    seed in any::<u64>(),
                ) {
                    super::survives_crash($layout, g, ops, crash_at, seed)?;
                }
            }

            layout_properties!(@failure $layout, $redundant);
        }
    };
    (@failure $layout:expr, true) => {
        proptest! {
            #![proptest_config(config())]

            #[test]
            fn survives_device_failure(
                (g, ops) in geometry($layout).prop_flat_map(|g| (Just(g), ops_for(g))),
                fail_at in any::<usize>(),
            ) {
                super::survives_device_failure($layout, g, ops, fail_at)?;
            }
        }
    };
    (@failure $layout:expr, false) => {};
}

layout_properties!(linear, Layout::Linear, redundant: false);
layout_properties!(stripe, Layout::Stripe, redundant: false);
layout_properties!(mirror, Layout::Mirror, redundant: true);
layout_properties!(raid10, Layout::Raid10, redundant: true);
layout_properties!(raid5, Layout::Raid5, redundant: true);
layout_properties!(raid6, Layout::Raid6, redundant: true);

//! Where the legs of a mirror disagree because a leg ran out of space.
//!
//! A leg whose device has no space left (`IoError::NoSpace`) is not failed: it stays in
//! service and the write fails with no space, so the host retries it (or pauses, as qemu
//! does with `werror=enospc`). But the legs that had space took the write, so the copies
//! now differ over its range. Each leg's *lagging* ranges are kept here:
//!
//! ```text
//!   write [8K, 16K) ─▶ leg 0 took it, leg 1 no space ─▶ leg 1 lags over [8K, 16K)
//!   read  [0, 64K)  ─▶ goes to a leg that lags nowhere in it (leg 0)
//!   write [8K, 16K) ─▶ both took it                  ─▶ nothing lags
//!   flush           ─▶ catch up: copy what still lags from a leg that has it
//! ```
//!
//! A range lags on a leg until a write of it reaches every leg or the mirror copies it
//! over (at a flush, or at open). Whatever happens, at least one leg in service lags
//! nowhere in a given byte: the reference, whose data every read returns. When every leg
//! ran out of space, each may hold a different part of the write; the first of them that
//! lagged nowhere in the range before becomes the reference.
//!
//! The set lives in memory. Its write-intent regions stay set in the bitmap (pinned) while
//! anything lags in them, so after a crash the resync at open makes the legs agree again.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Disjoint, non-adjacent byte ranges, kept merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RangeSet {
    /// Start → end.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `r`, merging it with the ranges it touches.
    pub(crate) fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Takes `r` out, splitting the ranges it cuts.
    pub(crate) fn remove(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let cut: Vec<(u64, u64)> = self
            .ranges
            .range(..r.end)
            .rev()
            .take_while(|(_, e)| **e > r.start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in cut {
            self.ranges.remove(&s);
            if s < r.start {
                self.ranges.insert(s, r.start);
            }
            if e > r.end {
                self.ranges.insert(r.end, e);
            }
        }
    }

    /// True if some byte of `r` is in the set.
    pub(crate) fn overlaps(&self, r: &Range<u64>) -> bool {
        !r.is_empty() && self.ranges.range(..r.end).next_back().is_some_and(|(_, e)| *e > r.start)
    }

    /// The ranges, in order.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(s, e)| *s..*e)
    }

    /// Where, in `r`, the set next starts or ends after `at` (the end of `r` if nowhere):
    /// every byte of `[at, boundary)` is in the set or none is.
    fn boundary_after(&self, at: u64, end: u64) -> u64 {
        match self.ranges.range(..=at).next_back() {
            Some((_, e)) if *e > at => (*e).min(end),
            _ => self.ranges.range(at..).next().map_or(end, |(s, _)| (*s).min(end)),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// The lagging ranges of every leg of one mirror.
pub(crate) struct Divergence {
    /// False while nothing lags anywhere: the common case costs one atomic load.
    any: AtomicBool,
    lagging: Mutex<Vec<RangeSet>>,
}

/// Bit `i` of a leg mask is leg `i`.
pub(crate) type LegMask = u64;

impl Divergence {
    pub(crate) fn new(legs: usize) -> Self {
        Self { any: AtomicBool::new(false), lagging: Mutex::new(vec![RangeSet::default(); legs]) }
    }

    /// True while some leg lags somewhere.
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Legs that lag somewhere in `r`.
    pub(crate) fn lagging_in(&self, r: &Range<u64>) -> LegMask {
        if !self.any() {
            return 0;
        }
        let lagging = self.lagging.lock();
        lagging.iter().enumerate().filter(|(_, set)| set.overlaps(r)).fold(0, |m, (i, _)| m | 1 << i)
    }

    /// `r` cut where the lagging legs change: `(piece, legs lagging over all of it)`.
    pub(crate) fn pieces(&self, r: &Range<u64>) -> Vec<(Range<u64>, LegMask)> {
        let lagging = self.lagging.lock();
        let mut out = Vec::new();
        let mut at = r.start;
        while at < r.end {
            let next = lagging.iter().map(|set| set.boundary_after(at, r.end)).min().unwrap_or(r.end);
            let next = if next <= at { r.end } else { next };
            let mask = lagging
                .iter()
                .enumerate()
                .filter(|(_, set)| set.overlaps(&(at..at + 1)))
                .fold(0, |m, (i, _)| m | 1 << i);
            out.push((at..next, mask));
            at = next;
        }
        out
    }

    /// After a change of `r` reached the legs: those in `took` hold it, those in `short` ran
    /// out of space. Returns true if the lagging ranges changed (the caller re-pins `r`'s
    /// bitmap regions).
    pub(crate) fn after_change(&self, r: Range<u64>, took: LegMask, short: LegMask) -> bool {
        if r.is_empty() || (short == 0 && !self.any()) {
            return false;
        }
        let mut lagging = self.lagging.lock();
        let reference = if took != 0 || short == 0 {
            took
        } else {
            // Nobody took all of it: the first short leg that was a reference before.
            let legs = (0..lagging.len()).filter(|&i| short & 1 << i != 0);
            let clean = legs.clone().find(|&i| !lagging[i].overlaps(&r));
            1 << clean.or_else(|| legs.clone().next()).expect("a short leg")
        };
        for (i, set) in lagging.iter_mut().enumerate() {
            if reference & 1 << i != 0 {
                set.remove(r.clone());
            } else if short & 1 << i != 0 {
                set.insert(r.clone());
            }
        }
        self.any.store(lagging.iter().any(|s| !s.is_empty()), Ordering::Release);
        true
    }

    /// Records that leg `leg` lags over `r` (a resync could not copy it there).
    pub(crate) fn lag(&self, leg: usize, r: Range<u64>) {
        let mut lagging = self.lagging.lock();
        lagging[leg].insert(r);
        self.any.store(true, Ordering::Release);
    }

    /// Leg `leg` caught up over `r`.
    pub(crate) fn caught_up(&self, leg: usize, r: Range<u64>) {
        let mut lagging = self.lagging.lock();
        lagging[leg].remove(r);
        self.any.store(lagging.iter().any(|s| !s.is_empty()), Ordering::Release);
    }

    /// True if leg `leg` lags anywhere.
    pub(crate) fn lags(&self, leg: usize) -> bool {
        self.any() && !self.lagging.lock()[leg].is_empty()
    }

    /// True if any leg lags somewhere in `r`.
    pub(crate) fn overlaps(&self, r: &Range<u64>) -> bool {
        self.lagging_in(r) != 0
    }

    /// Every lagging range: `(leg, range)`.
    pub(crate) fn snapshot(&self) -> Vec<(usize, Range<u64>)> {
        let lagging = self.lagging.lock();
        lagging.iter().enumerate().flat_map(|(i, set)| set.ranges().map(move |r| (i, r))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[Range<u64>]) -> RangeSet {
        let mut s = RangeSet::default();
        ranges.iter().for_each(|r| s.insert(r.clone()));
        s
    }

    #[test]
    fn range_set_merges_and_splits() {
        let mut s = set(&[0..4, 8..12, 4..6, 20..30]);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![0..6, 8..12, 20..30]);
        s.insert(5..21);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![0..30]);
        s.remove(10..12);
        s.remove(0..2);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![2..10, 12..30]);
        assert!(s.overlaps(&(9..11)) && !s.overlaps(&(10..12)) && !s.overlaps(&(30..40)));
        assert_eq!(s.boundary_after(0, 100), 2);
        assert_eq!(s.boundary_after(3, 100), 10);
        assert_eq!(s.boundary_after(10, 11), 11);
        s.remove(0..100);
        assert!(s.is_empty());
    }

    #[test]
    fn a_short_leg_lags_until_a_change_reaches_every_leg() {
        let d = Divergence::new(2);
        assert!(!d.after_change(0..8, 0b11, 0), "nothing lags: nothing to do");
        assert!(d.after_change(8..16, 0b01, 0b10));
        assert_eq!(d.lagging_in(&(0..64)), 0b10);
        assert_eq!(d.lagging_in(&(0..8)), 0);
        // Leg 1 takes a later write that leg 0 could not: the lag moves with the data.
        d.after_change(12..20, 0b10, 0b01);
        assert_eq!(d.snapshot(), vec![(0, 12..20), (1, 8..12)]);
        assert_eq!(d.pieces(&(0..24)), vec![(0..8, 0), (8..12, 0b10), (12..20, 0b01), (20..24, 0)]);
        d.after_change(0..24, 0b11, 0);
        assert!(!d.any());
    }

    #[test]
    fn when_every_leg_is_short_one_becomes_the_reference() {
        let d = Divergence::new(3);
        d.after_change(0..8, 0, 0b111);
        assert_eq!(d.lagging_in(&(0..8)), 0b110);
        // Leg 0 lags over the next one already; leg 1 does not and is chosen.
        d.lag(0, 8..16);
        d.after_change(8..16, 0, 0b011);
        assert_eq!(d.lagging_in(&(8..16)), 0b001);
    }
}

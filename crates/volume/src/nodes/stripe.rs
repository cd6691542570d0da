//! Stripe (RAID 0): chunk `c` of the node lives on child `c % n` at chunk `c / n`.
//!
//! ```text
//!   node:    | c0 | c1 | c2 | c3 | c4 | c5 | ...
//!   child 0: | c0 | c3 | ...
//!   child 1: | c1 | c4 | ...
//!   child 2: | c2 | c5 | ...
//! ```

use super::split::{AddressMap, Share};
use super::{pieces, to_usize};

/// Chunk size and child count.
pub(crate) struct StripeMap {
    chunk: u64,
    children: usize,
}

impl StripeMap {
    pub(crate) fn new(chunk: u64, children: usize) -> Self {
        Self { chunk, children }
    }
}

impl AddressMap for StripeMap {
    fn shares(&self, offset: u64, len: u64) -> Vec<Share> {
        let n = self.children as u64;
        pieces(offset, len, self.chunk)
            .map(|p| Share {
                child: to_usize(p.unit % n),
                offset: (p.unit / n) * self.chunk + p.offset_in_unit,
                len: p.len,
                at: p.offset_in_request,
            })
            .collect()
    }

    /// One range per child: a child's chunks of a request are consecutive rows, so they
    /// are adjacent on the child.
    fn zero_shares(&self, offset: u64, len: u64) -> Vec<Share> {
        let mut ranges: Vec<Option<Share>> = vec![None; self.children];
        for s in self.shares(offset, len) {
            match &mut ranges[s.child] {
                Some(range) => range.len = s.offset + s.len - range.offset,
                slot => *slot = Some(s),
            }
        }
        ranges.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_go_round_the_children_and_zeroing_is_one_range_each() {
        let map = StripeMap::new(4, 3);
        let shares = map.shares(2, 12);
        let placed: Vec<(usize, u64, u64)> = shares.iter().map(|s| (s.child, s.offset, s.len)).collect();
        assert_eq!(placed, [(0, 2, 2), (1, 0, 4), (2, 0, 4), (0, 4, 2)]);
        let zero: Vec<(usize, u64, u64)> =
            map.zero_shares(2, 12).iter().map(|s| (s.child, s.offset, s.len)).collect();
        assert_eq!(zero, [(0, 2, 4), (1, 0, 4), (2, 0, 4)]);
    }
}

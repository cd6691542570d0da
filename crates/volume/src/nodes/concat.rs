//! Concat: children back to back, so a volume grows by appending.

use super::split::{AddressMap, Share};

/// Where each child starts.
pub(crate) struct ConcatMap {
    /// `starts[i]` is where child `i` begins; one more entry holds the end.
    starts: Vec<u64>,
}

impl ConcatMap {
    /// The map for children of the given sizes, in order.
    pub(crate) fn new(sizes: impl IntoIterator<Item = u64>) -> Self {
        let mut starts: Vec<u64> = vec![0];
        for size in sizes {
            let end = starts.last().copied().unwrap_or(0);
            starts.push(end.saturating_add(size));
        }
        Self { starts }
    }

    /// Bytes of all children together.
    pub(crate) fn size(&self) -> u64 {
        *self.starts.last().expect("non-empty")
    }
}

impl AddressMap for ConcatMap {
    fn shares(&self, offset: u64, len: u64) -> Vec<Share> {
        let mut out = Vec::new();
        let end = offset + len;
        let mut child = self.starts.partition_point(|&s| s <= offset) - 1;
        let mut at = offset;
        while at < end {
            let n = self.starts[child + 1].min(end) - at;
            if n > 0 {
                out.push(Share { child, offset: at - self.starts[child], len: n, at: at - offset });
            }
            at += n;
            child += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cross_child_boundaries_and_skip_empty_children() {
        let map = ConcatMap::new([8, 0, 4, 8]);
        let shares = map.shares(6, 8);
        assert_eq!(
            shares,
            [
                Share { child: 0, offset: 6, len: 2, at: 0 },
                Share { child: 2, offset: 0, len: 4, at: 2 },
                Share { child: 3, offset: 0, len: 2, at: 6 },
            ]
        );
    }
}

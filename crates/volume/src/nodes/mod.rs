//! The live nodes of a volume tree; each is a [`strata_block::BlockIo`] over its children.

pub(crate) mod bitmap;
pub(crate) mod concat;
pub(crate) mod extent;
pub(crate) mod gf;
pub(crate) mod mirror;
pub(crate) mod parity;
pub(crate) mod stripe;

use bytes::{Bytes, BytesMut};

/// One piece of a request cut at `unit` boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Which unit (chunk, child) of the address space.
    pub unit: u64,
    /// Offset inside the unit.
    pub offset_in_unit: u64,
    /// Bytes in this piece.
    pub len: u64,
    /// Offset of the piece inside the request.
    pub offset_in_request: u64,
}

/// Cuts `[offset, offset + len)` at every multiple of `unit`.
pub(crate) fn pieces(offset: u64, len: u64, unit: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let unit_index = at / unit;
            let offset_in_unit = at % unit;
            let len = (unit - offset_in_unit).min(end - at);
            let piece = Piece { unit: unit_index, offset_in_unit, len, offset_in_request: at - offset };
            at += len;
            piece
        })
    })
}

/// Joins the pieces of a read, copying only when there is more than one.
pub(crate) fn gather(parts: Vec<Bytes>) -> Bytes {
    if parts.len() == 1 {
        return parts.into_iter().next().expect("one part");
    }
    let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    parts.iter().for_each(|p| out.extend_from_slice(p));
    out.freeze()
}

/// A `usize` from a byte count that is known to fit in memory.
pub(crate) fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("request fits in memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_request_exactly() {
        let p: Vec<_> =
            pieces(3, 10, 4).map(|p| (p.unit, p.offset_in_unit, p.len, p.offset_in_request)).collect();
        assert_eq!(p, vec![(0, 3, 1, 0), (1, 0, 4, 1), (2, 0, 4, 5), (3, 0, 1, 9)]);
    }
}

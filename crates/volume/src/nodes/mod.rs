//! The live nodes of a volume tree; each is a [`strata_block::BlockIo`] over its children.

pub(crate) mod bitmap;
pub(crate) mod concat;
pub(crate) mod divergence;
pub(crate) mod extent;
pub(crate) mod gf;
pub(crate) mod members;
pub(crate) mod mirror;
#[cfg(test)]
mod no_space_tests;
pub(crate) mod parity;
pub(crate) mod range_lock;
pub(crate) mod split;
pub(crate) mod stripe;

use bytes::BytesMut;
use futures::future::try_join_all;
use strata_block::IoError;

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

/// Reads the parts of one request into one buffer: `parts` yields each part's length in
/// request order, and `read(i, buf)` fills part `i`. The filled parts are joined back
/// without copying, since they are neighbours in one allocation.
pub(crate) async fn read_parts<F, Fut>(
    buf: BytesMut,
    parts: impl Iterator<Item = u64>,
    mut read: F,
) -> Result<BytesMut, IoError>
where
    F: FnMut(usize, BytesMut) -> Fut,
    Fut: Future<Output = Result<BytesMut, IoError>>,
{
    let mut rest = buf;
    let mut reads = Vec::new();
    for (i, len) in parts.enumerate() {
        reads.push(read(i, rest.split_to(to_usize(len))));
    }
    let mut filled = try_join_all(reads).await?.into_iter();
    let mut out = filled.next().unwrap_or_default();
    filled.for_each(|part| out.unsplit(part));
    Ok(out)
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

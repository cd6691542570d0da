//! What a connection has to send, gathered so that everything finished goes out in one
//! vectored write and large data segments are never copied.
//!
//! Writing is cancel-safe: [`Outbox::write_some`] takes one write's worth off the queue
//! only once the socket took it, so the connection loop can race it against keep-alive,
//! shutdown and completions, and a client that does not read blocks nothing else.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::pdu::{self, Digests};

/// What a connection has to send: small PDUs are copied into one buffer, large data
/// segments are queued as they are and go out with the rest in one vectored write.
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) buf: BytesMut,
    /// Ready to go, in order, before `buf`.
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`.
    queued: usize,
}

impl Outbox {
    /// Data segments at least this long are not copied.
    const COPY_LIMIT: usize = 16 << 10;
    /// Most buffers handed to one vectored write.
    const MAX_SLICES: usize = 64;

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.queued == 0
    }

    /// Bytes waiting to be sent.
    pub(super) fn len(&self) -> usize {
        self.buf.len() + self.queued
    }

    /// A data segment with its padding and digest, after the header just encoded.
    pub(super) fn data(&mut self, data: Bytes, digests: Digests) {
        if data.len() < Self::COPY_LIMIT {
            pdu::encode_data(&mut self.buf, &data, digests);
            return;
        }
        let (trailer, len) = pdu::data_trailer(&data, digests);
        self.seal();
        self.push(data);
        self.buf.put_slice(&trailer[..len]);
    }

    /// Drops everything unsent (the client is gone).
    pub(super) fn clear(&mut self) {
        self.buf.clear();
        self.frames.clear();
        self.queued = 0;
    }

    fn push(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.queued += frame.len();
            self.frames.push_back(frame);
        }
    }

    /// Moves what `buf` holds to the frames.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            let sealed = self.buf.split().freeze();
            self.push(sealed);
        }
    }

    /// One vectored write of what is queued; returns the bytes the socket took. Nothing
    /// is lost if the future is dropped before it completes.
    pub(super) async fn write_some<W: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut W,
    ) -> std::io::Result<usize> {
        self.seal();
        let slices: Vec<IoSlice<'_>> =
            self.frames.iter().take(Self::MAX_SLICES).map(|f| IoSlice::new(f)).collect();
        let written = stream.write_vectored(&slices).await?;
        if written == 0 && !slices.is_empty() {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.advance(written);
        if self.is_empty() && self.buf.capacity() < (64 << 10) {
            self.buf.reserve(64 << 10);
        }
        Ok(written)
    }

    /// Writes as much as the socket takes without waiting; returns whether any byte went.
    pub(super) fn write_now<W: AsyncWrite + Unpin>(&mut self, stream: &mut W) -> std::io::Result<bool> {
        let mut progress = false;
        while !self.is_empty() {
            match self.write_some(stream).now_or_never() {
                Some(written) => progress |= written? > 0,
                None => break,
            }
        }
        Ok(progress)
    }

    fn advance(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let front = self.frames.front_mut().expect("written bytes came from frames");
            if written >= front.len() {
                written -= front.len();
                self.frames.pop_front();
            } else {
                bytes::Buf::advance(front, written);
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_cut_short_keeps_the_rest_in_order() {
        let (mut near, mut far) = tokio::io::duplex(1000);
        let mut outbox = Outbox::default();
        outbox.buf.put_slice(&[1u8; 700]);
        outbox.data(Bytes::from(vec![2u8; 20 << 10]), Digests::default());
        let total = outbox.len();
        // The pipe takes 1000 bytes, then would block: the rest stays queued.
        assert!(outbox.write_now(&mut near).unwrap());
        assert_eq!(outbox.len(), total - 1000);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut far, &mut all).await.unwrap();
            all
        });
        while !outbox.is_empty() {
            outbox.write_some(&mut near).await.unwrap();
        }
        drop(near);
        let all = reader.await.unwrap();
        assert_eq!(all.len(), total);
        assert!(all[..700].iter().all(|b| *b == 1));
        assert!(all[700..700 + (20 << 10)].iter().all(|b| *b == 2));
    }
}

//! What a connection has to send, gathered so that everything finished goes out in one
//! vectored write and large data segments are never copied.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::pdu::{self, Digests};

/// What a connection has to send: small PDUs are copied into one buffer, large data
/// segments are queued as they are and go out with the rest in one vectored write.
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) buf: BytesMut,
    frames: Vec<Bytes>,
}

impl Outbox {
    /// Data segments at least this long are not copied.
    const COPY_LIMIT: usize = 16 << 10;

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.frames.is_empty()
    }

    /// A data segment with its padding and digest, after the header just encoded.
    pub(super) fn data(&mut self, data: Bytes, digests: Digests) {
        if data.len() < Self::COPY_LIMIT {
            pdu::encode_data(&mut self.buf, &data, digests);
            return;
        }
        let (trailer, len) = pdu::data_trailer(&data, digests);
        self.frames.push(self.buf.split().freeze());
        self.frames.push(data);
        self.buf.put_slice(&trailer[..len]);
    }

    pub(super) async fn flush<W: AsyncWrite + Unpin>(&mut self, stream: &mut W) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.frames.push(self.buf.split().freeze());
        }
        let mut frames: std::collections::VecDeque<Bytes> =
            self.frames.drain(..).filter(|f| !f.is_empty()).collect();
        while !frames.is_empty() {
            let slices: Vec<std::io::IoSlice<'_>> =
                frames.iter().take(64).map(|f| std::io::IoSlice::new(f)).collect();
            let mut written = stream.write_vectored(&slices).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let front = frames.front_mut().expect("written bytes came from frames");
                if written >= front.len() {
                    written -= front.len();
                    frames.pop_front();
                } else {
                    bytes::Buf::advance(front, written);
                    written = 0;
                }
            }
        }
        self.buf.reserve(64 << 10);
        Ok(())
    }
}

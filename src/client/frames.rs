//! DERP frames over whichever transport the upgrade left: a reader that
//! reassembles frames from TCP or TLS, unwrapping WebSocket frames when the
//! upgrade was one (a DERP frame may span WebSocket messages), and a writer
//! that sends a batch as one write, as one masked binary frame over
//! WebSocket. It exists so the handshake, the probe, mesh links and the
//! bench read and write frames without caring which transport is underneath.
//!
//! The WebSocket framing is [`crate::protocol::ws`], as on the relay's side:
//! tungstenite's client copied each packet into a message of its own and
//! masked it byte by byte, which cost the bench more per packet than the
//! relay spent forwarding it and so capped what a WebSocket run could show.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

use super::error::ClientError;
use crate::protocol::frame::{RawFrame, bytes_needed, decode_frame, server_frame_limit};
use crate::protocol::ws::{self, Decoded, WsDecoder};
use crate::stream::ReadAhead;

/// A frame-sized read: big enough that a full 64 KiB packet is one read.
const READ_CHUNK: usize = 64 << 10;
/// A relay that does not take a batch within this long is treated as stuck.
pub const WRITE_STALL: Duration = Duration::from_secs(10);

pub(super) enum ReadSide {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<ReadAhead<TcpStream>>>),
}

/// The answer owed to the relay's latest WebSocket ping: the reader finds the
/// ping, the writer sends the pong ahead of its next batch (RFC 6455 §5.5.3
/// lets an endpoint answer only the most recent one).
#[derive(Default)]
pub(super) struct PongOwed(Mutex<Option<Bytes>>);

impl PongOwed {
    fn set(&self, p: Bytes) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(p);
        }
    }

    fn take(&self) -> Option<Bytes> {
        self.0.lock().ok().and_then(|mut p| p.take())
    }
}

/// Reads DERP frames from either transport. WebSocket frames are only a
/// carrier: a DERP frame may span them, so every transport reassembles in
/// `buf`.
pub struct FrameReader {
    side: ReadSide,
    buf: BytesMut,
    /// Set after a WebSocket upgrade: its frames are decoded into `buf`.
    ws: Option<(WsDecoder, Arc<PongOwed>)>,
}

impl FrameReader {
    /// A raw frame stream on a plain TCP read half (also used by the bench's
    /// forwarder endpoints, which speak frames without a relay).
    pub fn from_tcp(rd: OwnedReadHalf) -> Self {
        FrameReader::new(ReadSide::Tcp(rd), BytesMut::new(), None)
    }

    /// `buf` holds what was read past the upgrade's response head: DERP
    /// bytes, or WebSocket frames when `ws` is set.
    pub(super) fn new(
        side: ReadSide,
        buf: BytesMut,
        ws: Option<(WsDecoder, Arc<PongOwed>)>,
    ) -> Self {
        match ws {
            None => FrameReader { side, buf, ws },
            Some((mut dec, pongs)) => {
                *dec.input() = buf;
                FrameReader {
                    side,
                    buf: BytesMut::new(),
                    ws: Some((dec, pongs)),
                }
            }
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn next_frame(&mut self) -> Result<Option<RawFrame>, ClientError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buf, server_frame_limit)
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn fill(&mut self) -> Result<bool, ClientError> {
        let Some((dec, pongs)) = &mut self.ws else {
            self.buf.reserve(bytes_needed(&self.buf).max(READ_CHUNK));
            return Ok(read_buf(&mut self.side, &mut self.buf).await? > 0);
        };
        loop {
            let decoded = dec
                .decode(&mut self.buf, |p| pongs.set(p))
                .map_err(|e| ClientError::Protocol(format!("relay's WebSocket stream: {e}")))?;
            match decoded {
                Decoded::Closed => return Ok(false),
                Decoded::Data(0) => {}
                Decoded::Data(_) => return Ok(true),
            }
            let raw = dec.input();
            raw.reserve(READ_CHUNK);
            if read_buf(&mut self.side, raw).await? == 0 {
                return Ok(false);
            }
        }
    }
}

async fn read_buf(side: &mut ReadSide, buf: &mut BytesMut) -> std::io::Result<usize> {
    match side {
        ReadSide::Tcp(rd) => rd.read_buf(buf).await,
        ReadSide::Tls(rd) => rd.read_buf(buf).await,
    }
}

pub(super) enum WriteSide {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<ReadAhead<TcpStream>>>),
}

/// A WebSocket writer's state: where frames are built, and its masks.
pub(super) struct WsOut {
    frame: Vec<u8>,
    /// splitmix64 state for the frames' mask keys. RFC 6455 wants masks an
    /// attacker cannot predict, against script in a browser steering a proxy
    /// cache; seeded from the OS per connection that holds, without a
    /// getrandom call per batch.
    mask_state: u64,
    pongs: Arc<PongOwed>,
}

impl WsOut {
    pub(super) fn new(pongs: Arc<PongOwed>) -> Self {
        let mut seed = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        WsOut {
            frame: Vec::new(),
            mask_state: u64::from_ne_bytes(seed),
            pongs,
        }
    }

    fn mask(&mut self) -> [u8; 4] {
        self.mask_state = self.mask_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.mask_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let z = (z ^ (z >> 31)) as u32;
        z.to_ne_bytes()
    }
}

/// Writes batches of encoded frames.
pub struct FrameWriter {
    side: WriteSide,
    ws: Option<WsOut>,
}

impl FrameWriter {
    pub fn from_tcp(wr: OwnedWriteHalf) -> Self {
        FrameWriter::new(WriteSide::Tcp(wr), None)
    }

    pub(super) fn new(side: WriteSide, ws: Option<WsOut>) -> Self {
        FrameWriter { side, ws }
    }

    /// Writes everything in `buf` (a batch of frames) as one write (one
    /// binary frame over WebSocket, after the pong owed if any), and leaves
    /// `buf` empty for reuse.
    pub async fn send(&mut self, buf: &mut BytesMut) -> Result<(), ClientError> {
        let write = async {
            let head: &[u8] = match &mut self.ws {
                None => &[],
                Some(w) => {
                    w.frame.clear();
                    if let Some(p) = w.pongs.take() {
                        let mask = w.mask();
                        ws::encode_client_pong(&mut w.frame, &p, mask);
                    }
                    // Masked where it is: the batch is ours to clear anyway,
                    // and the header goes out in the same write.
                    let mask = w.mask();
                    ws::encode_client_header(&mut w.frame, ws::OP_BINARY, buf.len(), mask);
                    ws::unmask(buf, mask, 0);
                    &w.frame
                }
            };
            match &mut self.side {
                WriteSide::Tcp(w) => write_all_vectored(w, head, buf).await?,
                WriteSide::Tls(w) => {
                    // rustls buffers both into records until flushed.
                    w.write_all(head).await?;
                    w.write_all(buf).await?;
                    w.flush().await?;
                }
            }
            buf.clear();
            Ok::<_, ClientError>(())
        };
        timeout(WRITE_STALL, write)
            .await
            .map_err(|_| ClientError::WriteStall(WRITE_STALL))?
    }
}

/// Writes `a` then `b` with as few system calls as the socket allows (one,
/// usually), so a WebSocket header and its payload leave in one segment.
async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    mut a: &[u8],
    mut b: &[u8],
) -> std::io::Result<()> {
    while !a.is_empty() {
        let n = w
            .write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    w.write_all(b).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keys_differ_frame_to_frame_and_connection_to_connection() {
        let mut a = WsOut::new(Arc::default());
        let mut b = WsOut::new(Arc::default());
        let keys: Vec<[u8; 4]> = (0..1000).map(|_| a.mask()).collect();
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert!(distinct.len() > 990, "{} distinct of 1000", distinct.len());
        assert_ne!(keys[..8], (0..8).map(|_| b.mask()).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn only_the_latest_ping_is_owed_and_only_once() {
        let p = PongOwed::default();
        assert!(p.take().is_none());
        p.set(Bytes::from_static(b"one"));
        p.set(Bytes::from_static(b"two"));
        assert_eq!(p.take().as_deref(), Some(&b"two"[..]));
        assert!(p.take().is_none());
    }
}

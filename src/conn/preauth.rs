//! The connection before the client has proven its key: a bounded reader and
//! writer that hold only the bytes that actually arrived.
//!
//! Everything here runs for strangers, so nothing is reserved from what a peer
//! announces. On `Upgrade: DERP` that is a plain byte stream read in small
//! steps. On WebSocket, tungstenite would reserve a whole announced frame (and
//! its limits cannot be changed on a live `WebSocketStream`), so the handshake's
//! few WebSocket frames are decoded here with a limit of a few KiB; once the
//! ClientInfo box has opened, the stream and any bytes already read go to the
//! connection's own WebSocket reader (`conn::ws`), which reserves nothing
//! from an announced length either.

use std::io;

use super::transport::{self, ConnReader, ConnWriter, RawIo};
use super::ws;
use crate::protocol::frame::{HEADER_LEN, MAX_CLIENT_INFO_PAYLOAD};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest read made before authentication; buffers grow by at most this much
/// per read, and only when the bytes are there.
const READ_STEP: usize = 1024;
/// Largest WebSocket frame accepted before authentication: the biggest
/// ClientInfo frame fits, nothing much larger does.
pub const MAX_PREAUTH_WS_FRAME: usize = MAX_CLIENT_INFO_PAYLOAD + HEADER_LEN + 64;

/// A freshly upgraded connection, not yet authenticated.
pub enum PreAuth {
    Derp(RawIo),
    Ws(WsPreAuth),
}

pub struct WsPreAuth {
    io: RawIo,
    /// Raw WebSocket bytes not yet decoded into frames.
    raw: BytesMut,
    /// Inside a fragmented data message (a frame without FIN was seen).
    in_message: bool,
}

impl PreAuth {
    pub fn derp(io: RawIo) -> Self {
        PreAuth::Derp(io)
    }

    pub fn websocket(io: RawIo) -> Self {
        PreAuth::Ws(WsPreAuth {
            io,
            raw: BytesMut::new(),
            in_message: false,
        })
    }

    /// Writes DERP bytes: as they are, or as one binary WebSocket message.
    pub async fn write(&mut self, derp: &[u8]) -> io::Result<()> {
        match self {
            PreAuth::Derp(io) => {
                io.write_all(derp).await?;
                io.flush().await
            }
            PreAuth::Ws(w) => {
                let mut out = Vec::with_capacity(derp.len() + ws::PREFIX);
                ws::encode_binary(&mut out, derp);
                w.io.write_all(&out).await?;
                w.io.flush().await
            }
        }
    }

    /// Appends the next DERP bytes to `buf`, reading at most `want` (capped at
    /// a small step). Returns 0 at end of stream.
    pub async fn read_some(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        let step = want.clamp(1, READ_STEP);
        match self {
            PreAuth::Derp(io) => {
                buf.reserve(step);
                io.read_buf(&mut BufMut::limit(&mut *buf, step)).await
            }
            PreAuth::Ws(w) => w.read_some(buf, step).await,
        }
    }

    /// The authenticated connection's reader and writer. WebSocket bytes
    /// already read but not decoded are the reader's first.
    pub fn into_conn(self) -> (ConnReader, ConnWriter) {
        match self {
            PreAuth::Derp(io) => transport::derp(io),
            PreAuth::Ws(w) => transport::websocket(w.io, w.raw, w.in_message),
        }
    }

    pub async fn close(self) {
        let _ = match self {
            PreAuth::Derp(mut io) => io.shutdown().await,
            PreAuth::Ws(mut w) => w.io.shutdown().await,
        };
    }
}

impl WsPreAuth {
    async fn read_some(&mut self, buf: &mut BytesMut, step: usize) -> io::Result<usize> {
        loop {
            let need = match ws::parse_header(&self.raw, MAX_PREAUTH_WS_FRAME as u64)? {
                Some(h) if self.raw.len() >= h.header_len + h.payload_len as usize => {
                    match self.take_frame(&h, buf)? {
                        Some(n) => return Ok(n),
                        None => continue,
                    }
                }
                Some(h) => h.header_len + h.payload_len as usize - self.raw.len(),
                None => 2,
            };
            self.raw.reserve(need.clamp(step, READ_STEP));
            let n = self
                .io
                .read_buf(&mut BufMut::limit(&mut self.raw, READ_STEP))
                .await?;
            if n == 0 {
                return Ok(0);
            }
        }
    }

    /// Consumes the complete frame `h` at the front of `raw`: DERP bytes are
    /// unmasked onto `buf`. `Some(n)` is what `read_some` returns (0 = the
    /// client closed); `None` means nothing for the caller yet.
    fn take_frame(&mut self, h: &ws::Header, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        self.raw.advance(h.header_len);
        let len = h.payload_len as usize;
        let payload = self.raw.split_to(len);
        match h.opcode {
            // Continuation or binary: the DERP byte stream.
            0x0 | 0x2 => {
                if (h.opcode == 0x0) != self.in_message {
                    return Err(bad("WebSocket continuation out of order"));
                }
                self.in_message = !h.fin;
                let start = buf.len();
                buf.extend_from_slice(&payload);
                ws::unmask(&mut buf[start..], h.mask, 0);
                Ok((len > 0).then_some(len))
            }
            0x1 => Err(bad("text WebSocket message; DERP uses binary messages")),
            0x8 => Ok(Some(0)),
            // Ping and pong before the handshake: nothing to answer yet.
            0x9 | 0xa => Ok(None),
            _ => Err(bad("unknown WebSocket opcode")),
        }
    }
}

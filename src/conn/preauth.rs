//! The connection before the client has proven its key: a bounded reader and
//! writer that hold only the bytes that actually arrived.
//!
//! Everything here runs for strangers, so nothing is reserved from what a peer
//! announces. On `Upgrade: DERP` that is a plain byte stream read in small
//! steps. On WebSocket, tungstenite would reserve a whole announced frame (and
//! its limits cannot be changed on a live `WebSocketStream`), so the handshake's
//! few WebSocket frames are decoded here with a limit of a few KiB, and the
//! stream is handed to tungstenite, with any bytes already read, only once the
//! ClientInfo box has opened.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::transport::{self, ConnReader, ConnWriter, RawIo};
use crate::protocol::frame::{HEADER_LEN, MAX_CLIENT_INFO_PAYLOAD};
use crate::stream::ReadAhead;

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
                let mut out = Vec::with_capacity(derp.len() + 10);
                out.push(0x82); // FIN | binary
                match derp.len() {
                    n if n < 126 => out.push(n as u8),
                    n if n <= u16::MAX as usize => {
                        out.push(126);
                        out.extend_from_slice(&(n as u16).to_be_bytes());
                    }
                    n => {
                        out.push(127);
                        out.extend_from_slice(&(n as u64).to_be_bytes());
                    }
                }
                out.extend_from_slice(derp);
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
    /// already read but not decoded go to tungstenite first.
    pub async fn into_conn(
        self,
        ws_config: WebSocketConfig,
    ) -> io::Result<(ConnReader, ConnWriter)> {
        match self {
            PreAuth::Derp(io) => Ok(transport::derp(io)),
            PreAuth::Ws(w) => {
                if w.in_message {
                    // tungstenite would see a continuation without its start.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "ClientInfo ended inside a fragmented WebSocket message",
                    ));
                }
                let raw = w.raw.to_vec();
                let ws = WebSocketStream::from_partially_read(
                    ReadAhead::new(w.io),
                    raw,
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                Ok(transport::websocket(ws))
            }
        }
    }

    pub async fn close(self) {
        let _ = match self {
            PreAuth::Derp(mut io) => io.shutdown().await,
            PreAuth::Ws(mut w) => w.io.shutdown().await,
        };
    }
}

/// A parsed WebSocket frame header.
struct WsHeader {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// Parses a client frame header from `b`; `Ok(None)` if more bytes are needed.
fn parse_header(b: &[u8]) -> io::Result<Option<WsHeader>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err(bad("WebSocket frame with reserved bits set"));
    }
    if b[1] & 0x80 == 0 {
        return Err(bad("unmasked WebSocket frame from a client"));
    }
    let (len, mut at) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([b[2], b[3]]) as u64, 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(l), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_PREAUTH_WS_FRAME as u64 {
        return Err(bad("WebSocket frame too large before the handshake"));
    }
    if b.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&b[at..at + 4]);
    at += 4;
    Ok(Some(WsHeader {
        fin: b[0] & 0x80 != 0,
        opcode: b[0] & 0x0f,
        mask,
        header_len: at,
        payload_len: len as usize,
    }))
}

impl WsPreAuth {
    async fn read_some(&mut self, buf: &mut BytesMut, step: usize) -> io::Result<usize> {
        loop {
            let need = match parse_header(&self.raw)? {
                Some(h) if self.raw.len() >= h.header_len + h.payload_len => {
                    match self.take_frame(&h, buf)? {
                        Some(n) => return Ok(n),
                        None => continue,
                    }
                }
                Some(h) => h.header_len + h.payload_len - self.raw.len(),
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
    fn take_frame(&mut self, h: &WsHeader, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        self.raw.advance(h.header_len);
        let payload = self.raw.split_to(h.payload_len);
        match h.opcode {
            // Continuation or binary: the DERP byte stream.
            0x0 | 0x2 => {
                if (h.opcode == 0x0) != self.in_message {
                    return Err(bad("WebSocket continuation out of order"));
                }
                self.in_message = !h.fin;
                let start = buf.len();
                buf.extend_from_slice(&payload);
                for (i, byte) in buf[start..].iter_mut().enumerate() {
                    *byte ^= h.mask[i % 4];
                }
                Ok((h.payload_len > 0).then_some(h.payload_len))
            }
            0x1 => Err(bad("text WebSocket message; DERP uses binary messages")),
            0x8 => Ok(Some(0)),
            // Ping and pong before the handshake: nothing to answer yet.
            0x9 | 0xa => Ok(None),
            _ => Err(bad("unknown WebSocket opcode")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bounds() {
        // Masked binary frame announcing 2^40 bytes: refused from the header.
        let mut h = vec![0x82, 0xff];
        h.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse_header(&h).is_err());
        // Unmasked client frame.
        assert!(parse_header(&[0x82, 0x05]).is_err());
        // Incomplete.
        assert!(parse_header(&[0x82]).unwrap().is_none());
        assert!(parse_header(&[0x82, 0xfe, 0x00]).unwrap().is_none());
        let ok = parse_header(&[0x82, 0x83, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!((ok.opcode, ok.payload_len, ok.header_len), (2, 3, 6));
    }
}

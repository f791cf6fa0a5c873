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

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::transport::{self, ConnReader, ConnWriter, RawIo};
use crate::protocol::frame::{HEADER_LEN, MAX_CLIENT_INFO_PAYLOAD};
use crate::protocol::ws;

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
    /// The same decoder the authenticated connection goes on with, limited
    /// to handshake-sized frames.
    dec: ws::WsDecoder,
}

impl PreAuth {
    pub fn derp(io: RawIo) -> Self {
        PreAuth::Derp(io)
    }

    pub fn websocket(io: RawIo) -> Self {
        PreAuth::Ws(WsPreAuth {
            io,
            dec: ws::WsDecoder::new(MAX_PREAUTH_WS_FRAME as u64),
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
                let mut out = Vec::with_capacity(derp.len() + ws::MAX_SERVER_HEADER);
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
            PreAuth::Ws(w) => transport::websocket(w.io, w.dec),
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
            // Pings before the handshake: nothing to answer them with yet.
            match self.dec.decode(buf, |_| {})? {
                ws::Decoded::Closed => return Ok(0),
                ws::Decoded::Data(0) => {}
                ws::Decoded::Data(n) => return Ok(n),
            }
            let want = self.dec.wants().clamp(step, READ_STEP);
            let raw = self.dec.input();
            raw.reserve(want);
            if self.io.read_buf(&mut BufMut::limit(raw, READ_STEP)).await? == 0 {
                return Ok(0);
            }
        }
    }
}

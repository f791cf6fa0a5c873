//! The two ways a client's bytes reach us, behind one reader and one writer
//! type, so the connection logic is written once.
//!
//! HTTP `Upgrade: DERP` gives a raw byte stream. WebSocket carries the same
//! byte stream in binary messages, which may split or merge frames freely; the
//! reader flattens messages back into bytes and the frame decoder does the rest.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::ws::{self, WsReader, WsWriter};
use crate::protocol::frame;
use crate::protocol::ws::WsDecoder;
use crate::reasons::CloseReason;
use crate::routing::SendQueue;

pub use super::RawIo;

pub enum ConnReader {
    Derp(ReadHalf<RawIo>),
    /// Boxed: its buffer and frame state would otherwise sit in every reader
    /// task, `Upgrade: DERP` ones included.
    Ws(Box<WsReader>),
}

pub enum ConnWriter {
    Derp(WriteHalf<RawIo>),
    /// Boxed, as the reader.
    Ws(Box<WsWriter>),
}

/// Splits an upgraded DERP stream.
pub fn derp(io: RawIo) -> (ConnReader, ConnWriter) {
    let (r, w) = tokio::io::split(io);
    (ConnReader::Derp(r), ConnWriter::Derp(w))
}

/// Splits a WebSocket, going on with the handshake's frame decoder.
pub fn websocket(io: RawIo, dec: WsDecoder) -> (ConnReader, ConnWriter) {
    let (r, w) = tokio::io::split(io);
    (
        ConnReader::Ws(Box::new(WsReader::new(r, dec))),
        ConnWriter::Ws(Box::new(WsWriter::new(w))),
    )
}

impl ConnReader {
    /// Waits for the next bytes without reserving a buffer first: the first
    /// byte goes through a one-byte stack buffer, and the next read (made at
    /// once) collects the rest. Costs an extra read syscall only when an idle
    /// connection wakes up. On WebSocket the byte is not DERP data yet: it
    /// waits in the frame buffer for the next `read_some`.
    pub async fn read_first(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            ConnReader::Derp(r) => ws::read_one(r, buf).await,
            ConnReader::Ws(r) => r.read_first().await,
        }
    }

    /// Appends whatever arrives next to `buf` (after reserving `hint` bytes for a
    /// raw stream). Returns 0 at end of stream. WebSocket pings are answered
    /// through `pongs`.
    pub async fn read_some(
        &mut self,
        buf: &mut BytesMut,
        hint: usize,
        pongs: &SendQueue,
    ) -> io::Result<usize> {
        match self {
            ConnReader::Derp(r) => {
                buf.reserve(hint);
                r.read_buf(buf).await
            }
            ConnReader::Ws(r) => r.read_some(buf, hint, pongs).await,
        }
    }

    /// Gives back the transport's own read buffer while idle.
    pub fn release(&mut self) {
        if let ConnReader::Ws(r) = self {
            r.release();
        }
    }

    /// Why a failed `read_some` ends the connection: on WebSocket, the peer
    /// breaking the framing rules is told so with a close code (see
    /// [`ConnWriter::abort`]); everything else is a plain read error.
    pub fn close_reason(&self, e: &io::Error) -> CloseReason {
        match (self, e.kind()) {
            (ConnReader::Ws(_), io::ErrorKind::Unsupported) => CloseReason::TextMessage,
            (ConnReader::Ws(_), io::ErrorKind::InvalidData) => CloseReason::WsProtocol,
            _ => CloseReason::ReadError,
        }
    }
}

/// The WebSocket close code that tells a client its connection ends for
/// `why`, for the reasons that are the client's own doing (RFC 6455 §7.4.1;
/// upstream derper sends 1003 for text and 1002 for protocol errors).
pub fn ws_close_code(why: CloseReason) -> Option<CloseCode> {
    match why {
        CloseReason::TextMessage => Some(CloseCode::Unsupported),
        CloseReason::WsProtocol | CloseReason::BadFrame => Some(CloseCode::Protocol),
        CloseReason::MeshFrameFromClient => Some(CloseCode::Policy),
        _ => None,
    }
}

impl ConnWriter {
    /// Bytes a batch buffer starts with (room for the WebSocket header).
    pub fn batch_start(&self) -> usize {
        match self {
            ConnWriter::Derp(_) => 0,
            ConnWriter::Ws(_) => ws::PREFIX,
        }
    }

    /// Writes one batch of whole frames (after [`Self::batch_start`] reserved
    /// bytes): one write, one binary message on WebSocket. `ping` also sends
    /// a WebSocket-level ping, which proxies in the path see as traffic.
    pub async fn write_batch(&mut self, buf: &mut BytesMut, ping: bool) -> io::Result<()> {
        match self {
            ConnWriter::Derp(w) => {
                w.write_all(buf).await?;
                buf.clear();
                w.flush().await
            }
            ConnWriter::Ws(w) => w.write_batch(buf, ping).await,
        }
    }

    /// Whether control frames wait for the next write.
    pub fn has_control(&self) -> bool {
        matches!(self, ConnWriter::Ws(w) if w.has_control())
    }

    /// Queues a WebSocket pong for the next write.
    pub fn queue_pong(&mut self, payload: &bytes::Bytes) {
        if let ConnWriter::Ws(w) = self {
            w.queue_pong(payload);
        }
    }

    /// Tells the client the relay is going away and closes: a Restarting frame
    /// on raw DERP (reconnect after `reconnect_in_ms`, keep trying for
    /// `try_for_ms`), close code 1001 on WebSocket.
    pub async fn goodbye(&mut self, reconnect_in_ms: u32, try_for_ms: u32) -> io::Result<()> {
        match self {
            ConnWriter::Derp(w) => {
                let mut b = BytesMut::new();
                frame::encode_restarting(&mut b, reconnect_in_ms, try_for_ms);
                w.write_all(&b).await?;
                w.shutdown().await
            }
            ConnWriter::Ws(w) => {
                w.close_with(CloseCode::Away.into(), "derp-relay restarting")
                    .await
            }
        }
    }

    /// Closes a connection whose key was not admitted: WebSocket clients get
    /// close code 1008 (policy violation) with the reason; DERP has no frame
    /// for it, so the stream just ends before ServerInfo (as upstream does).
    pub async fn refuse(&mut self, reason: &str) {
        match self {
            ConnWriter::Derp(_) => self.close().await,
            ConnWriter::Ws(w) => {
                let why = format!("not admitted: {reason}");
                let _ = w.close_with(CloseCode::Policy.into(), &why).await;
            }
        }
    }

    /// Ends a connection the client broke the protocol on: a WebSocket close
    /// frame with the code for `why`; on raw DERP, which has no such frame,
    /// the stream just ends.
    pub async fn abort(&mut self, why: CloseReason) {
        match (&mut *self, ws_close_code(why)) {
            (ConnWriter::Ws(w), Some(code)) => {
                let _ = w.close_with(code.into(), why.as_str()).await;
            }
            _ => self.close().await,
        }
    }

    /// Best-effort close after an error (a normal close frame on WebSocket).
    pub async fn close(&mut self) {
        let _ = match self {
            ConnWriter::Derp(w) => w.shutdown().await,
            ConnWriter::Ws(w) => w.close_with(CloseCode::Normal.into(), "").await,
        };
    }
}

//! The two ways a client's bytes reach us, behind one reader and one writer
//! type, so the connection logic is written once.
//!
//! HTTP `Upgrade: DERP` gives a raw byte stream. WebSocket carries the same
//! byte stream in binary messages, which may split or merge frames freely; the
//! reader flattens messages back into bytes and the frame decoder does the rest.

use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::protocol::frame;
use crate::reasons::CloseReason;

pub type RawIo = TokioIo<Upgraded>;
pub type WsIo = crate::stream::ReadAhead<RawIo>;
type Ws = WebSocketStream<WsIo>;

pub enum ConnReader {
    Derp(ReadHalf<RawIo>),
    Ws(SplitStream<Ws>),
}

pub enum ConnWriter {
    Derp(WriteHalf<RawIo>),
    /// Boxed: the sink keeps a pending message inline (64 bytes), and this
    /// enum sits in every writer task's state, idle ones included.
    Ws(Box<SplitSink<Ws, Message>>),
}

/// Splits an upgraded DERP stream.
pub fn derp(io: RawIo) -> (ConnReader, ConnWriter) {
    let (r, w) = tokio::io::split(io);
    (ConnReader::Derp(r), ConnWriter::Derp(w))
}

/// Splits a WebSocket.
pub fn websocket(ws: Ws) -> (ConnReader, ConnWriter) {
    let (w, r) = ws.split();
    (ConnReader::Ws(r), ConnWriter::Ws(Box::new(w)))
}

impl ConnReader {
    /// Waits for the next bytes without reserving a buffer first: the first
    /// byte goes through a one-byte stack buffer, and the next read (made at
    /// once) collects the rest. Costs an extra read syscall only when an idle
    /// connection wakes up.
    pub async fn read_first(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            ConnReader::Derp(r) => {
                let mut first = [0u8; 1];
                let n = r.read(&mut first).await?;
                buf.extend_from_slice(&first[..n]);
                Ok(n)
            }
            // WebSocket messages arrive in tungstenite's own buffer anyway.
            ConnReader::Ws(_) => self.read_some(buf, 0).await,
        }
    }

    /// Appends whatever arrives next to `buf` (after reserving `hint` bytes for a
    /// raw stream). Returns 0 at end of stream.
    pub async fn read_some(&mut self, buf: &mut BytesMut, hint: usize) -> io::Result<usize> {
        match self {
            ConnReader::Derp(r) => {
                buf.reserve(hint);
                r.read_buf(buf).await
            }
            ConnReader::Ws(r) => loop {
                match r.next().await {
                    None => return Ok(0),
                    Some(Err(WsError::Io(e))) => return Err(e),
                    // Any other tungstenite error is the peer breaking the
                    // WebSocket rules; the kind tells `close_reason` so.
                    Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                    Some(Ok(Message::Binary(b))) => {
                        if b.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::Unsupported,
                            "text WebSocket message; DERP uses binary messages",
                        ));
                    }
                    // Pings are answered by tungstenite itself.
                    Some(Ok(_)) => continue,
                }
            },
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
    /// Writes one batch of whole frames: one write (or one WebSocket message).
    /// `ping` also sends a WebSocket-level ping, which proxies in the path see
    /// as traffic.
    pub async fn write_batch(&mut self, buf: &mut BytesMut, ping: bool) -> io::Result<()> {
        match self {
            ConnWriter::Derp(w) => {
                w.write_all(buf).await?;
                buf.clear();
                w.flush().await
            }
            ConnWriter::Ws(w) => {
                if ping {
                    w.feed(Message::Ping(Bytes::new()))
                        .await
                        .map_err(io::Error::other)?;
                }
                w.send(Message::Binary(buf.split().freeze()))
                    .await
                    .map_err(io::Error::other)
            }
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
                let close = CloseFrame {
                    code: CloseCode::Away,
                    reason: "derp-relay restarting".into(),
                };
                w.send(Message::Close(Some(close)))
                    .await
                    .map_err(io::Error::other)?;
                w.close().await.map_err(io::Error::other)
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
                let close = CloseFrame {
                    code: CloseCode::Policy,
                    reason: format!("not admitted: {reason}").into(),
                };
                let _ = w.send(Message::Close(Some(close))).await;
                let _ = w.close().await;
            }
        }
    }

    /// Ends a connection the client broke the protocol on: a WebSocket close
    /// frame with the code for `why`, then the close handshake; on raw DERP,
    /// which has no such frame, the stream just ends.
    pub async fn abort(&mut self, why: CloseReason) {
        match (&mut *self, ws_close_code(why)) {
            (ConnWriter::Ws(w), Some(code)) => {
                let close = CloseFrame {
                    code,
                    reason: why.as_str().into(),
                };
                let _ = w.send(Message::Close(Some(close))).await;
                let _ = w.close().await;
            }
            _ => self.close().await,
        }
    }

    /// Best-effort close after an error.
    pub async fn close(&mut self) {
        let _ = match self {
            ConnWriter::Derp(w) => w.shutdown().await,
            ConnWriter::Ws(w) => w.close().await.map_err(io::Error::other),
        };
    }
}

//! DERP frames over whichever transport the upgrade left: a reader that
//! reassembles frames from TCP, TLS or WebSocket messages (a frame may span
//! messages) and a writer that sends a batch as one write or one message. It
//! exists so the handshake, the probe and the bench read and write frames
//! without caring which transport is underneath.

use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::error::{ClientError, ws_io_error};
use super::net::Conn;
use crate::protocol::frame::{RawFrame, bytes_needed, decode_frame, server_frame_limit};
use crate::stream::ReadAhead;

/// A frame-sized read: big enough that a full 64 KiB packet is one read.
const READ_CHUNK: usize = 64 << 10;
/// A relay that does not take a batch within this long is treated as stuck.
pub const WRITE_STALL: Duration = Duration::from_secs(10);

type WsStream = WebSocketStream<ReadAhead<Conn>>;

pub(super) enum ReadSide {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<ReadAhead<TcpStream>>>),
    Ws(SplitStream<WsStream>),
}

/// Reads DERP frames from either transport. WebSocket messages are only a
/// carrier: a frame may span messages, so every transport reassembles in `buf`.
pub struct FrameReader {
    pub(super) side: ReadSide,
    pub(super) buf: BytesMut,
}

impl FrameReader {
    /// A raw frame stream on a plain TCP read half (also used by the bench's
    /// forwarder endpoints, which speak frames without a relay).
    pub fn from_tcp(rd: OwnedReadHalf) -> Self {
        FrameReader {
            side: ReadSide::Tcp(rd),
            buf: BytesMut::new(),
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
        let buf = &mut self.buf;
        match &mut self.side {
            ReadSide::Tcp(rd) => {
                buf.reserve(bytes_needed(buf).max(READ_CHUNK));
                Ok(rd.read_buf(buf).await? > 0)
            }
            ReadSide::Tls(rd) => {
                buf.reserve(bytes_needed(buf).max(READ_CHUNK));
                Ok(rd.read_buf(buf).await? > 0)
            }
            ReadSide::Ws(rd) => loop {
                match rd.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(false),
                    Some(Ok(Message::Binary(b))) => {
                        buf.extend_from_slice(&b);
                        return Ok(true);
                    }
                    Some(Ok(Message::Text(_))) => {
                        return Err(ClientError::Protocol(
                            "relay sent a WebSocket text message".into(),
                        ));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(ws_io_error(e)),
                }
            },
        }
    }
}

pub(super) enum WriteSide {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<ReadAhead<TcpStream>>>),
    Ws(SplitSink<WsStream, Message>),
}

/// Writes batches of encoded frames.
pub struct FrameWriter(pub(super) WriteSide);

impl FrameWriter {
    pub fn from_tcp(wr: OwnedWriteHalf) -> Self {
        FrameWriter(WriteSide::Tcp(wr))
    }

    /// Writes everything in `buf` (a batch of frames) as one write or one
    /// WebSocket message, and leaves `buf` empty for reuse.
    pub async fn send(&mut self, buf: &mut BytesMut) -> Result<(), ClientError> {
        let write = async {
            match &mut self.0 {
                WriteSide::Tcp(w) => {
                    w.write_all(buf).await?;
                    buf.clear();
                }
                WriteSide::Tls(w) => {
                    w.write_all(buf).await?;
                    // rustls holds records until flushed.
                    w.flush().await?;
                    buf.clear();
                }
                WriteSide::Ws(w) => w
                    .send(Message::Binary(buf.split().freeze()))
                    .await
                    .map_err(ws_io_error)?,
            }
            Ok::<_, ClientError>(())
        };
        timeout(WRITE_STALL, write)
            .await
            .map_err(|_| ClientError::WriteStall(WRITE_STALL))?
    }
}

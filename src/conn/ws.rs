//! WebSocket I/O for authenticated connections: the framing itself
//! ([`crate::protocol::ws`]) written here rather than left to tungstenite.
//!
//! tungstenite assembles each message in a buffer of its own, hands it over
//! as a new allocation and copies every outgoing message into its write
//! buffer: on this path that was three copies of every received packet and
//! two of every sent one, against one and one for `Upgrade: DERP`. Here a
//! read lands in one buffer, each frame's payload is unmasked straight onto
//! the DERP decoder's buffer, and a batch of DERP frames is sent as one
//! binary frame whose header is written into space reserved in front of it.
//! Only the opening handshake's accept key is tungstenite's.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use super::RawIo;
use crate::protocol::ws::{self, Decoded, MAX_SERVER_HEADER, WsDecoder};
use crate::routing::{Control, SendQueue};

/// Room kept in front of a batch for its frame header (the longest one).
pub const PREFIX: usize = MAX_SERVER_HEADER;

/// Reads at most one byte onto `buf`, through a stack buffer: waiting in
/// this holds no heap buffer (both transports' idle wait).
pub async fn read_one(r: &mut ReadHalf<RawIo>, buf: &mut BytesMut) -> io::Result<usize> {
    let mut first = [0u8; 1];
    let n = r.read(&mut first).await?;
    buf.extend_from_slice(&first[..n]);
    Ok(n)
}

/// The read side of an authenticated WebSocket connection.
pub struct WsReader {
    io: ReadHalf<RawIo>,
    dec: WsDecoder,
}

impl WsReader {
    /// Goes on from where the handshake's decoder stopped (bytes it read past
    /// ClientInfo, a fragmented message or a frame it was in the middle of),
    /// without its frame-size limit.
    pub fn new(io: ReadHalf<RawIo>, mut dec: WsDecoder) -> Self {
        dec.lift_limit();
        WsReader { io, dec }
    }

    /// Waits for the first byte of an idle connection without holding a
    /// buffer (see [`super::transport::ConnReader::read_first`]). It goes to
    /// the frame buffer; the reader's next `read_some` decodes it with the
    /// rest. Kept this small because an idle reader task is as large as the
    /// future it waits in.
    pub async fn read_first(&mut self) -> io::Result<usize> {
        read_one(&mut self.io, self.dec.input()).await
    }

    /// Appends the next DERP bytes to `buf`, reading `hint` bytes at a time;
    /// 0 at the end of the stream or on a close frame. Pings are answered
    /// through `pongs` (the writer owns the write half).
    pub async fn read_some(
        &mut self,
        buf: &mut BytesMut,
        hint: usize,
        pongs: &SendQueue,
    ) -> io::Result<usize> {
        loop {
            let pong = |p| {
                pongs.push_control(Control::WsPong(p));
            };
            match self.dec.decode(buf, pong)? {
                Decoded::Closed => return Ok(0),
                Decoded::Data(0) => {}
                Decoded::Data(n) => return Ok(n),
            }
            let raw = self.dec.input();
            raw.reserve(hint.max(64));
            if self.io.read_buf(raw).await? == 0 {
                return Ok(0);
            }
        }
    }

    /// Drops the read buffer if nothing is in it (an idle connection).
    pub fn release(&mut self) {
        self.dec.release();
    }
}

/// The write side of an authenticated WebSocket connection.
pub struct WsWriter {
    io: WriteHalf<RawIo>,
    /// Control frames (pongs, pings) to send before the next batch.
    control: Vec<u8>,
}

impl WsWriter {
    pub fn new(io: WriteHalf<RawIo>) -> Self {
        WsWriter {
            io,
            control: Vec::new(),
        }
    }

    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    pub fn queue_pong(&mut self, payload: &Bytes) {
        ws::encode_pong(&mut self.control, payload);
    }

    /// Sends `batch` (`PREFIX` reserved bytes, then DERP frames) as one
    /// binary frame, after any control frames queued (and a ping if `ping`).
    pub async fn write_batch(&mut self, batch: &mut BytesMut, ping: bool) -> io::Result<()> {
        if ping {
            ws::encode_ping(&mut self.control);
        }
        if !self.control.is_empty() {
            // Rare (keepalives, answers to pings): a write of their own.
            self.io.write_all(&self.control).await?;
            self.control.clear();
        }
        let len = batch.len().saturating_sub(PREFIX);
        if len > 0 {
            let at = PREFIX - ws::header_len(len);
            ws::put_header(&mut batch[at..PREFIX], ws::OP_BINARY, len);
            self.io.write_all(&batch[at..]).await?;
        }
        batch.clear();
        self.io.flush().await
    }

    /// Sends a close frame with `code` and `reason` (cut to fit a control
    /// frame) and ends the stream.
    pub async fn close_with(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.control);
        ws::encode_close(&mut out, code, reason);
        self.io.write_all(&out).await?;
        self.io.shutdown().await
    }
}

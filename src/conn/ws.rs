//! WebSocket framing (RFC 6455) for authenticated connections, written here
//! rather than left to tungstenite.
//!
//! DERP over WebSocket is one byte stream cut into binary messages anywhere,
//! so nothing needs whole messages. tungstenite assembles each message in a
//! buffer of its own, hands it over as a new allocation and copies every
//! outgoing message into its write buffer: on this path that was three copies
//! of every received packet and two of every sent one, against one and one
//! for `Upgrade: DERP`. Here a read lands in one buffer, each frame's payload
//! is unmasked straight onto the DERP decoder's buffer (one copy, the unmask
//! included), and a batch of DERP frames is sent as one binary frame whose
//! header is written into space reserved in front of it. The handshake (and
//! the WebSocket client used by mesh links and the bench) stay tungstenite's.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use super::RawIo;
use crate::routing::{Control, SendQueue};

/// Room kept in front of a batch for its frame header (the longest one).
pub const PREFIX: usize = 10;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;
/// The largest length a frame header may carry (RFC 6455 §5.2: 63 bits):
/// the limit once a client is authenticated.
pub const ANY_LENGTH: u64 = i64::MAX as u64;
/// Control frames carry at most this much (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

/// A client frame's header.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: u64,
}

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

/// Parses a client frame header at the front of `b`: `Ok(None)` if more bytes
/// are needed; an error for anything RFC 6455 forbids a client, or a payload
/// over `max`.
fn parse_header(b: &[u8], max: u64) -> io::Result<Option<Header>> {
    if b.len() < 2 {
        return Ok(None);
    }
    // No extension is ever negotiated, so no reserved bit may be set.
    if b[0] & 0x70 != 0 {
        return Err(bad("WebSocket frame with reserved bits set"));
    }
    if b[1] & 0x80 == 0 {
        return Err(bad("unmasked WebSocket frame from a client"));
    }
    let (len, at) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
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
    if len > max {
        return Err(bad("WebSocket frame too large"));
    }
    if b.len() < at + 4 {
        return Ok(None);
    }
    Ok(Some(Header {
        fin: b[0] & 0x80 != 0,
        opcode: b[0] & 0x0f,
        mask: [b[at], b[at + 1], b[at + 2], b[at + 3]],
        header_len: at + 4,
        payload_len: len,
    }))
}

/// XORs `data` with `mask`, starting `phase` bytes into the mask (a frame's
/// payload may be unmasked over several reads). Eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4], phase: usize) {
    let m: [u8; 4] = std::array::from_fn(|i| mask[(phase + i) % 4]);
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= m[i % 4];
    }
}

/// Length of a server (unmasked) frame header for `len` payload bytes.
fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes a server frame header for `len` payload bytes into the end of
/// `into` (which must hold `header_len(len)`).
fn put_header(into: &mut [u8], opcode: u8, len: usize) {
    into[0] = 0x80 | opcode;
    match len {
        0..=125 => into[1] = len as u8,
        126..=65535 => {
            into[1] = 126;
            into[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            into[1] = 127;
            into[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Appends a whole server frame.
fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let start = out.len();
    let h = header_len(payload.len());
    out.resize(start + h, 0);
    put_header(&mut out[start..], opcode, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a binary frame (the handshake's writes before authentication).
pub fn encode_binary(out: &mut Vec<u8>, payload: &[u8]) {
    encode_frame(out, OP_BINARY, payload);
}

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

/// What decoding the buffered bytes gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// This many DERP bytes went onto the caller's buffer (maybe 0: more
    /// bytes needed).
    Data(usize),
    /// The client sent a close frame.
    Closed,
}

impl WsReader {
    /// Goes on from where the handshake's decoder stopped (bytes it read past
    /// ClientInfo, a fragmented message or a frame it was in the middle of),
    /// without its frame-size limit.
    pub fn new(io: ReadHalf<RawIo>, mut dec: WsDecoder) -> Self {
        dec.max_frame = ANY_LENGTH;
        WsReader { io, dec }
    }

    /// Waits for the first byte of an idle connection without holding a
    /// buffer (see [`super::transport::ConnReader::read_first`]). It goes to
    /// the frame buffer; the reader's next `read_some` decodes it with the
    /// rest. Kept this small because an idle reader task is as large as the
    /// future it waits in.
    pub async fn read_first(&mut self) -> io::Result<usize> {
        read_one(&mut self.io, &mut self.dec.raw).await
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
            let raw = &mut self.dec.raw;
            raw.reserve(hint.max(64));
            if self.io.read_buf(raw).await? == 0 {
                return Ok(0);
            }
        }
    }

    /// Drops the read buffer if nothing is in it (an idle connection).
    pub fn release(&mut self) {
        if self.dec.raw.is_empty() {
            self.dec.raw = BytesMut::new();
        }
    }
}

/// Client frames to DERP bytes, with no I/O (so it can be fuzzed and
/// property-tested on any cut of the stream).
pub struct WsDecoder {
    /// Bytes read but not yet decoded.
    raw: BytesMut,
    /// Largest frame a header may announce.
    max_frame: u64,
    /// Payload bytes still to come of the data frame being read.
    left: u64,
    mask: [u8; 4],
    /// Bytes of that frame's payload unmasked so far, modulo 4.
    phase: usize,
    /// Inside a fragmented data message (a data frame without FIN was seen).
    in_message: bool,
}

impl WsDecoder {
    /// Refuses any frame announcing more than `max_frame` bytes from its
    /// header (before authentication; [`WsReader`] lifts the limit).
    pub fn new(max_frame: u64) -> Self {
        WsDecoder {
            raw: BytesMut::new(),
            max_frame,
            left: 0,
            mask: [0; 4],
            phase: 0,
            in_message: false,
        }
    }

    /// How many more raw bytes would let `decode` make progress: a read size
    /// that does not reserve more than the stream is about to carry.
    pub fn wants(&self) -> usize {
        if self.left > 0 {
            return usize::try_from(self.left).unwrap_or(usize::MAX);
        }
        match parse_header(&self.raw, self.max_frame) {
            Ok(Some(h)) => (h.header_len + h.payload_len as usize).saturating_sub(self.raw.len()),
            _ => 2,
        }
    }

    /// Where newly read bytes go.
    pub fn input(&mut self) -> &mut BytesMut {
        &mut self.raw
    }

    /// Decodes what is buffered: DERP bytes onto `buf`, each ping's payload
    /// to `on_ping`. An error is the client breaking RFC 6455 (`InvalidData`)
    /// or sending text (`Unsupported`).
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        mut on_ping: impl FnMut(Bytes),
    ) -> io::Result<Decoded> {
        let mut data = 0;
        loop {
            if self.left > 0 {
                let take = self.left.min(self.raw.len() as u64) as usize;
                if take == 0 {
                    return Ok(Decoded::Data(data));
                }
                let start = buf.len();
                buf.extend_from_slice(&self.raw[..take]);
                unmask(&mut buf[start..], self.mask, self.phase);
                self.raw.advance(take);
                self.phase = (self.phase + take) % 4;
                self.left -= take as u64;
                data += take;
                continue;
            }
            // Data frames are consumed as they arrive, so nothing is reserved
            // from an announced length, whatever the limit.
            let Some(h) = parse_header(&self.raw, self.max_frame)? else {
                return Ok(Decoded::Data(data));
            };
            match h.opcode {
                OP_CONTINUATION | OP_BINARY => {
                    if (h.opcode == OP_CONTINUATION) != self.in_message {
                        return Err(bad("WebSocket continuation out of order"));
                    }
                    self.in_message = !h.fin;
                    self.raw.advance(h.header_len);
                    self.left = h.payload_len;
                    self.mask = h.mask;
                    self.phase = 0;
                }
                OP_TEXT => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "text WebSocket message; DERP uses binary messages",
                    ));
                }
                OP_CLOSE | OP_PING | OP_PONG => {
                    if !h.fin || h.payload_len > MAX_CONTROL as u64 {
                        return Err(bad("fragmented or oversized WebSocket control frame"));
                    }
                    let whole = h.header_len + h.payload_len as usize;
                    if self.raw.len() < whole {
                        return Ok(Decoded::Data(data));
                    }
                    if h.opcode == OP_CLOSE {
                        // DERP bytes before it still count; the next call
                        // sees the close again and ends the stream.
                        if data > 0 {
                            return Ok(Decoded::Data(data));
                        }
                        self.raw.clear();
                        return Ok(Decoded::Closed);
                    }
                    self.raw.advance(h.header_len);
                    let mut p = self.raw.split_to(h.payload_len as usize);
                    if h.opcode == OP_PING {
                        unmask(&mut p, h.mask, 0);
                        on_ping(p.freeze());
                    }
                }
                _ => return Err(bad("unknown WebSocket opcode")),
            }
        }
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
        encode_frame(&mut self.control, OP_PONG, payload);
    }

    /// Sends `batch` (`PREFIX` reserved bytes, then DERP frames) as one
    /// binary frame, after any control frames queued (and a ping if `ping`).
    pub async fn write_batch(&mut self, batch: &mut BytesMut, ping: bool) -> io::Result<()> {
        if ping {
            encode_frame(&mut self.control, OP_PING, &[]);
        }
        if !self.control.is_empty() {
            // Rare (keepalives, answers to pings): a write of their own.
            self.io.write_all(&self.control).await?;
            self.control.clear();
        }
        let len = batch.len().saturating_sub(PREFIX);
        if len > 0 {
            let at = PREFIX - header_len(len);
            put_header(&mut batch[at..PREFIX], OP_BINARY, len);
            self.io.write_all(&batch[at..]).await?;
        }
        batch.clear();
        self.io.flush().await
    }

    /// Sends a close frame with `code` and `reason` (cut to fit a control
    /// frame) and ends the stream.
    pub async fn close_with(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut end = reason.len().min(MAX_CONTROL - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = Vec::with_capacity(2 + end);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        let mut out = std::mem::take(&mut self.control);
        encode_frame(&mut out, OP_CLOSE, &payload);
        self.io.write_all(&out).await?;
        self.io.shutdown().await
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
        assert!(parse_header(&h, 4096).is_err());
        h.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            parse_header(&h, u64::MAX).unwrap().unwrap().payload_len,
            1 << 40
        );
        // Unmasked client frame; reserved bits.
        assert!(parse_header(&[0x82, 0x05], 4096).is_err());
        assert!(parse_header(&[0xc2, 0x85], 4096).is_err());
        // Incomplete.
        assert!(parse_header(&[0x82], 4096).unwrap().is_none());
        assert!(parse_header(&[0x82, 0xfe, 0x00], 4096).unwrap().is_none());
        let ok = parse_header(&[0x82, 0x83, 1, 2, 3, 4], 4096)
            .unwrap()
            .unwrap();
        assert_eq!((ok.opcode, ok.payload_len, ok.header_len), (2, 3, 6));
    }

    #[test]
    fn unmask_matches_the_bytewise_rule_at_every_phase_and_length() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for phase in 0..4 {
            for len in 0..40 {
                let data: Vec<u8> = (0..len as u8).collect();
                let mut got = data.clone();
                unmask(&mut got, mask, phase);
                let want: Vec<u8> = data
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[(phase + i) % 4])
                    .collect();
                assert_eq!(got, want, "phase {phase} len {len}");
            }
        }
        // RFC 6455 §5.7: a masked "Hello".
        let mut hello = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        unmask(&mut hello, mask, 0);
        assert_eq!(&hello, b"Hello");
    }

    #[test]
    fn server_headers_use_the_shortest_length_form() {
        for (len, want) in [(0usize, vec![0x82, 0]), (125, vec![0x82, 125])] {
            let mut out = Vec::new();
            encode_binary(&mut out, &vec![0; len]);
            assert_eq!(out[..2], want[..]);
        }
        let mut out = Vec::new();
        encode_binary(&mut out, &[0; 126]);
        assert_eq!(out[..4], [0x82, 126, 0, 126]);
        let mut out = Vec::new();
        encode_binary(&mut out, &[0; 70_000]);
        assert_eq!(out[..2], [0x82, 127]);
        assert_eq!(out[2..10], 70_000u64.to_be_bytes());
        assert_eq!(out.len(), 10 + 70_000);
    }
}

//! WebSocket framing (RFC 6455) for DERP, both ends of it, with no I/O.
//!
//! DERP over WebSocket is one byte stream cut into binary messages anywhere,
//! so nothing here assembles whole messages: [`WsDecoder`] turns frames into
//! DERP bytes as they arrive (unmasking a client's payload on the way, so a
//! received packet is copied once), and the encoders write a header in front
//! of a batch of DERP frames so it goes out as one binary frame. The relay's
//! connections (`conn::ws`) and our own client (`client`: the bench, the
//! probe, mesh links) share it; the opening handshakes are HTTP and live with
//! their callers.

use bytes::{Buf, Bytes, BytesMut};
use std::io;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;
/// The largest length a frame header may carry (RFC 6455 §5.2: 63 bits):
/// the limit once a client is authenticated.
pub const ANY_LENGTH: u64 = i64::MAX as u64;
/// Control frames carry at most this much (RFC 6455 §5.5).
pub const MAX_CONTROL: usize = 125;
/// The longest header a server frame has; a client frame adds its mask.
pub const MAX_SERVER_HEADER: usize = 10;

/// A frame's header.
struct Header {
    fin: bool,
    opcode: u8,
    /// `None` for a server's (unmasked) frame.
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: u64,
}

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

/// Parses a frame header at the front of `b`: `Ok(None)` if more bytes are
/// needed; an error for anything RFC 6455 forbids the sender (a client must
/// mask, a server must not), or a payload over `max`.
fn parse_header(b: &[u8], max: u64, from_client: bool) -> io::Result<Option<Header>> {
    if b.len() < 2 {
        return Ok(None);
    }
    // No extension is ever negotiated, so no reserved bit may be set.
    if b[0] & 0x70 != 0 {
        return Err(bad("WebSocket frame with reserved bits set"));
    }
    let masked = b[1] & 0x80 != 0;
    if masked != from_client {
        return Err(bad(if from_client {
            "unmasked WebSocket frame from a client"
        } else {
            "masked WebSocket frame from a server"
        }));
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
    let mask_len = if masked { 4 } else { 0 };
    if b.len() < at + mask_len {
        return Ok(None);
    }
    Ok(Some(Header {
        fin: b[0] & 0x80 != 0,
        opcode: b[0] & 0x0f,
        mask: masked.then(|| [b[at], b[at + 1], b[at + 2], b[at + 3]]),
        header_len: at + mask_len,
        payload_len: len,
    }))
}

/// XORs `data` with `mask`, starting `phase` bytes into the mask (a frame's
/// payload may be unmasked over several reads). Eight bytes at a time.
/// Masking and unmasking are the same operation.
pub fn unmask(data: &mut [u8], mask: [u8; 4], phase: usize) {
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
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes a server frame header for `len` payload bytes into the front of
/// `into` (which must hold `header_len(len)`).
pub fn put_header(into: &mut [u8], opcode: u8, len: usize) {
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
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let start = out.len();
    let h = header_len(payload.len());
    out.resize(start + h, 0);
    put_header(&mut out[start..], opcode, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a server binary frame (the handshake's writes before
/// authentication).
pub fn encode_binary(out: &mut Vec<u8>, payload: &[u8]) {
    encode_frame(out, OP_BINARY, payload);
}

/// A server's ping with no payload (keepalive through proxies).
pub fn encode_ping(out: &mut Vec<u8>) {
    encode_frame(out, OP_PING, &[]);
}

/// A server's answer to a client's ping.
pub fn encode_pong(out: &mut Vec<u8>, payload: &[u8]) {
    encode_frame(out, OP_PONG, payload);
}

/// A server's close frame: `code`, then `reason` cut to fit a control frame.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(out, OP_CLOSE, &payload);
}

/// Appends a client frame header for `len` payload bytes masked with
/// `mask` (the payload, masked, follows it on the wire).
pub fn encode_client_header(out: &mut Vec<u8>, opcode: u8, len: usize, mask: [u8; 4]) {
    let start = out.len();
    out.resize(start + header_len(len), 0);
    put_header(&mut out[start..], opcode, len);
    out[start + 1] |= 0x80;
    out.extend_from_slice(&mask);
}

/// Appends a whole client frame: the header, then `payload` masked.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    encode_client_header(out, opcode, payload.len(), mask);
    let at = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[at..], mask, 0);
}

/// A client's answer to a server's ping.
pub fn encode_client_pong(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    encode_client_frame(out, OP_PONG, payload, mask);
}

/// What decoding the buffered bytes gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// This many DERP bytes went onto the caller's buffer (maybe 0: more
    /// bytes needed).
    Data(usize),
    /// The other end sent a close frame.
    Closed,
}

/// WebSocket frames to DERP bytes, with no I/O (so it can be fuzzed and
/// property-tested on any cut of the stream).
pub struct WsDecoder {
    /// Bytes read but not yet decoded.
    raw: BytesMut,
    /// Largest frame a header may announce.
    max_frame: u64,
    /// The frames come from a client (masked) rather than a server.
    from_client: bool,
    /// Payload bytes still to come of the data frame being read.
    left: u64,
    /// That frame's mask (`None`: a server's frame).
    mask: Option<[u8; 4]>,
    /// Bytes of that frame's payload unmasked so far, modulo 4.
    phase: usize,
    /// Inside a fragmented data message (a data frame without FIN was seen).
    in_message: bool,
}

impl WsDecoder {
    /// Decodes a client's frames, refusing any that announces more than
    /// `max_frame` bytes from its header (before authentication; see
    /// [`WsDecoder::lift_limit`]).
    pub fn new(max_frame: u64) -> Self {
        WsDecoder {
            raw: BytesMut::new(),
            max_frame,
            from_client: true,
            left: 0,
            mask: None,
            phase: 0,
            in_message: false,
        }
    }

    /// Decodes a relay's (unmasked) frames, of any length.
    pub fn from_server() -> Self {
        WsDecoder {
            from_client: false,
            ..WsDecoder::new(ANY_LENGTH)
        }
    }

    /// Accepts frames of any length from now on (the client is authenticated).
    pub fn lift_limit(&mut self) {
        self.max_frame = ANY_LENGTH;
    }

    /// How many more raw bytes would let `decode` make progress: a read size
    /// that does not reserve more than the stream is about to carry.
    pub fn wants(&self) -> usize {
        if self.left > 0 {
            return usize::try_from(self.left).unwrap_or(usize::MAX);
        }
        match parse_header(&self.raw, self.max_frame, self.from_client) {
            Ok(Some(h)) => (h.header_len + h.payload_len as usize).saturating_sub(self.raw.len()),
            _ => 2,
        }
    }

    /// Where newly read bytes go.
    pub fn input(&mut self) -> &mut BytesMut {
        &mut self.raw
    }

    /// Decodes what is buffered: DERP bytes onto `buf`, each ping's payload
    /// to `on_ping`. An error is the peer breaking RFC 6455 (`InvalidData`)
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
                if let Some(mask) = self.mask {
                    unmask(&mut buf[start..], mask, self.phase);
                    self.phase = (self.phase + take) % 4;
                }
                self.raw.advance(take);
                self.left -= take as u64;
                data += take;
                continue;
            }
            // Data frames are consumed as they arrive, so nothing is reserved
            // from an announced length, whatever the limit.
            let Some(h) = parse_header(&self.raw, self.max_frame, self.from_client)? else {
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
                        if let Some(mask) = h.mask {
                            unmask(&mut p, mask, 0);
                        }
                        on_ping(p.freeze());
                    }
                }
                _ => return Err(bad("unknown WebSocket opcode")),
            }
        }
    }

    /// Drops the read buffer if nothing is in it (an idle connection).
    pub fn release(&mut self) {
        if self.raw.is_empty() {
            self.raw = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes everything buffered, in as many calls as it takes (as the
    /// relay's reader does), into a fresh buffer each time.
    fn decode_all(
        dec: &mut WsDecoder,
        out: &mut BytesMut,
        mut on_ping: impl FnMut(Bytes),
    ) -> io::Result<Decoded> {
        let mut n = 0;
        loop {
            let mut buf = BytesMut::new();
            let r = dec.decode(&mut buf, &mut on_ping);
            out.extend_from_slice(&buf);
            match r? {
                Decoded::Data(0) => return Ok(Decoded::Data(n)),
                Decoded::Data(k) => n += k,
                Decoded::Closed => return Ok(Decoded::Closed),
            }
        }
    }

    #[test]
    fn header_bounds() {
        // Masked binary frame announcing 2^40 bytes: refused from the header.
        let mut h = vec![0x82, 0xff];
        h.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse_header(&h, 4096, true).is_err());
        h.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            parse_header(&h, u64::MAX, true)
                .unwrap()
                .unwrap()
                .payload_len,
            1 << 40
        );
        // Unmasked client frame; reserved bits.
        assert!(parse_header(&[0x82, 0x05], 4096, true).is_err());
        assert!(parse_header(&[0xc2, 0x85], 4096, true).is_err());
        // Incomplete.
        assert!(parse_header(&[0x82], 4096, true).unwrap().is_none());
        assert!(
            parse_header(&[0x82, 0xfe, 0x00], 4096, true)
                .unwrap()
                .is_none()
        );
        let ok = parse_header(&[0x82, 0x83, 1, 2, 3, 4], 4096, true)
            .unwrap()
            .unwrap();
        assert_eq!((ok.opcode, ok.payload_len, ok.header_len), (2, 3, 6));
        // A server must not mask, and its header has no mask bytes.
        assert!(parse_header(&[0x82, 0x83, 1, 2, 3, 4], 4096, false).is_err());
        let ok = parse_header(&[0x82, 0x03], 4096, false).unwrap().unwrap();
        assert_eq!((ok.mask, ok.payload_len, ok.header_len), (None, 3, 2));
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

    #[test]
    fn client_frames_match_rfc_6455_and_decode_on_the_server() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let mut out = Vec::new();
        encode_client_frame(&mut out, OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(
            out,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        // Every length form, read back by the relay's decoder at any cut.
        for len in [0usize, 1, 125, 126, 65535, 65536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut wire = Vec::new();
            encode_client_frame(&mut wire, OP_BINARY, &payload, [9, 8, 7, 6]);
            encode_client_pong(&mut wire, b"p", [1, 2, 3, 4]);
            for cut in [1usize, 3, 1000] {
                let mut dec = WsDecoder::new(ANY_LENGTH);
                let mut got = BytesMut::new();
                for piece in wire.chunks(cut) {
                    dec.input().extend_from_slice(piece);
                    decode_all(&mut dec, &mut got, |_| {}).unwrap();
                }
                assert_eq!(got[..], payload[..], "len {len} cut {cut}");
                assert!(dec.input().is_empty());
            }
        }
    }

    #[test]
    fn a_client_decoder_reads_server_frames_and_refuses_masked_ones() {
        let mut wire = Vec::new();
        encode_binary(&mut wire, b"derp bytes");
        encode_ping(&mut wire);
        encode_binary(&mut wire, &[5; 300]);
        encode_close(&mut wire, 1001, "going away");
        let mut dec = WsDecoder::from_server();
        dec.input().extend_from_slice(&wire);
        let mut got = BytesMut::new();
        let mut pings = 0;
        assert_eq!(
            decode_all(&mut dec, &mut got, |_| pings += 1).unwrap(),
            Decoded::Closed
        );
        assert_eq!((&got[..10], got.len(), pings), (&b"derp bytes"[..], 310, 1));

        let mut masked = Vec::new();
        encode_client_frame(&mut masked, OP_BINARY, b"x", [1, 2, 3, 4]);
        let mut dec = WsDecoder::from_server();
        dec.input().extend_from_slice(&masked);
        assert!(dec.decode(&mut BytesMut::new(), |_| {}).is_err());
    }
}

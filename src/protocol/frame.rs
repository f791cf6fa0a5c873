//! DERP frames: `type:u8 | len:u32be | payload[len]`.
//!
//! Decoding works on a growable `BytesMut` and hands out payloads as `Bytes`
//! slices of it, so a forwarded packet is never copied between the socket read
//! and the receiver's write buffer. Every frame type has a size limit that is
//! checked from the header alone, before any payload is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::keys::{KEY_LEN, PublicKey};

pub const HEADER_LEN: usize = 5;
/// First 8 bytes of the ServerKey payload: "DERP" and U+1F511 (key) in UTF-8.
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91];
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest packet a SendPacket/RecvPacket may carry.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest sealed JSON blob in ClientInfo/ServerInfo.
pub const MAX_INFO_LEN: usize = 1 << 20;
pub const NONCE_LEN: usize = 24;
/// Largest ClientInfo payload (key, nonce, box) this server reads. Upstream
/// allows 256 KiB; a real one is 150 to 300 bytes, and every byte of it is
/// held before the client has proven anything, so the bound is tight.
pub const MAX_CLIENT_INFO_PAYLOAD: usize = 4096;
/// Prefix of Tailscale disco (NAT traversal) messages, "TS" and U+1F4AC.
pub const DISCO_MAGIC: [u8; 6] = [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
/// Disco magic + sender disco key + nonce: anything shorter is not disco.
const DISCO_MIN_LEN: usize = DISCO_MAGIC.len() + KEY_LEN + NONCE_LEN;
/// PeerPresent as current servers write it: key, IPv6 (or v4-mapped)
/// address, port, flags.
pub const PEER_PRESENT_LEN: usize = KEY_LEN + 16 + 2 + 1;
/// PeerPresent flag: an ordinary client.
pub const PEER_PRESENT_IS_REGULAR: u8 = 0x01;
/// PeerPresent flag: a mesh peer (another relay of the region).
pub const PEER_PRESENT_IS_MESH_PEER: u8 = 0x02;
/// PeerPresent flag: a prober (`IsProber` in ClientInfo).
pub const PEER_PRESENT_IS_PROBER: u8 = 0x04;
/// Unknown frame types are skipped, but still bounded.
const MAX_UNKNOWN_FRAME: usize = MAX_PACKET_SIZE + 2 * KEY_LEN;

/// Frame types of DERP v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    ServerKey = 0x01,
    ClientInfo = 0x02,
    ServerInfo = 0x03,
    SendPacket = 0x04,
    RecvPacket = 0x05,
    KeepAlive = 0x06,
    NotePreferred = 0x07,
    PeerGone = 0x08,
    PeerPresent = 0x09,
    ForwardPacket = 0x0a,
    WatchConns = 0x10,
    ClosePeer = 0x11,
    Ping = 0x12,
    Pong = 0x13,
    Health = 0x14,
    Restarting = 0x15,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<Self> {
        use FrameType::*;
        Some(match b {
            0x01 => ServerKey,
            0x02 => ClientInfo,
            0x03 => ServerInfo,
            0x04 => SendPacket,
            0x05 => RecvPacket,
            0x06 => KeepAlive,
            0x07 => NotePreferred,
            0x08 => PeerGone,
            0x09 => PeerPresent,
            0x0a => ForwardPacket,
            0x10 => WatchConns,
            0x11 => ClosePeer,
            0x12 => Ping,
            0x13 => Pong,
            0x14 => Health,
            0x15 => Restarting,
            _ => return None,
        })
    }
}

/// Why a byte stream is not valid DERP. Any of these closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame type {frame_type:#04x} with length {len} exceeds the limit of {limit}")]
    TooLarge {
        frame_type: u8,
        len: usize,
        limit: usize,
    },
    #[error("frame type {frame_type:#04x} payload of {len} bytes is too short")]
    TooShort { frame_type: u8, len: usize },
    #[error("frame type {0:#04x} is not valid in this direction or phase")]
    Unexpected(u8),
    #[error("expected frame type {expected:#04x}, got {got:#04x}")]
    WrongType { expected: u8, got: u8 },
}

/// One frame, header stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub frame_type: u8,
    pub payload: Bytes,
}

/// The largest payload a server accepts from a client for each frame type.
pub fn client_frame_limit(frame_type: u8) -> usize {
    match FrameType::from_u8(frame_type) {
        Some(FrameType::ClientInfo) => MAX_CLIENT_INFO_PAYLOAD,
        Some(FrameType::SendPacket) => KEY_LEN + MAX_PACKET_SIZE,
        Some(FrameType::ForwardPacket) => 2 * KEY_LEN + MAX_PACKET_SIZE,
        Some(FrameType::NotePreferred) => 1,
        Some(FrameType::Ping | FrameType::Pong) => 8,
        Some(FrameType::WatchConns) => 0,
        Some(FrameType::ClosePeer) => KEY_LEN,
        // Server-only types: small limit, and they are rejected once complete.
        Some(_) => KEY_LEN + 16 + 2 + 1,
        None => MAX_UNKNOWN_FRAME,
    }
}

/// The largest payload a client accepts from a server (used by our own clients).
pub fn server_frame_limit(frame_type: u8) -> usize {
    match FrameType::from_u8(frame_type) {
        Some(FrameType::ServerInfo) => NONCE_LEN + MAX_INFO_LEN,
        Some(FrameType::RecvPacket) => KEY_LEN + MAX_PACKET_SIZE,
        Some(FrameType::Health) => MAX_INFO_LEN,
        _ => MAX_UNKNOWN_FRAME,
    }
}

/// Bytes still missing before `buf` holds one whole frame (0 when it does), or
/// at least the header if that is incomplete.
pub fn bytes_needed(buf: &[u8]) -> usize {
    if buf.len() < HEADER_LEN {
        return HEADER_LEN - buf.len();
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    (HEADER_LEN + len).saturating_sub(buf.len())
}

/// Takes one complete frame off the front of `buf`, if there is one.
///
/// The length is checked against `limit(frame_type)` as soon as the header is
/// in, so an oversized frame fails before its body is read or allocated.
pub fn decode_frame(
    buf: &mut BytesMut,
    limit: impl Fn(u8) -> usize,
) -> Result<Option<RawFrame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let frame_type = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let max = limit(frame_type);
    if len > max {
        return Err(FrameError::TooLarge {
            frame_type,
            len,
            limit: max,
        });
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    Ok(Some(RawFrame {
        frame_type,
        payload,
    }))
}

/// Reason byte of a PeerGone frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PeerGoneReason {
    /// The peer was connected here and has left.
    Disconnected = 0x00,
    /// The peer is not connected here (answer to a disco packet).
    NotHere = 0x01,
}

/// A frame a client may send after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    SendPacket {
        dst: PublicKey,
        packet: Bytes,
    },
    ForwardPacket {
        src: PublicKey,
        dst: PublicKey,
        packet: Bytes,
    },
    NotePreferred(bool),
    Ping([u8; 8]),
    Pong([u8; 8]),
    WatchConns,
    ClosePeer(PublicKey),
    /// A type this server does not know; newer clients may send these.
    Unknown(u8),
}

fn key_at(p: &[u8], at: usize) -> PublicKey {
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&p[at..at + KEY_LEN]);
    PublicKey(k)
}

fn eight(p: &[u8]) -> [u8; 8] {
    let mut d = [0u8; 8];
    d.copy_from_slice(&p[..8]);
    d
}

impl ClientFrame {
    /// Interprets a frame received from a client after the handshake.
    pub fn parse(frame: RawFrame) -> Result<Self, FrameError> {
        let RawFrame {
            frame_type,
            mut payload,
        } = frame;
        let short = |need: usize| {
            if payload.len() < need {
                Err(FrameError::TooShort {
                    frame_type,
                    len: payload.len(),
                })
            } else {
                Ok(())
            }
        };
        Ok(match FrameType::from_u8(frame_type) {
            Some(FrameType::SendPacket) => {
                short(KEY_LEN)?;
                let dst = key_at(&payload, 0);
                // Advanced rather than sliced: a slice is one more reference
                // count taken and one dropped on the read buffer the writers
                // are releasing packets of from the other core, per packet.
                payload.advance(KEY_LEN);
                ClientFrame::SendPacket {
                    dst,
                    packet: payload,
                }
            }
            Some(FrameType::ForwardPacket) => {
                short(2 * KEY_LEN)?;
                let (src, dst) = (key_at(&payload, 0), key_at(&payload, KEY_LEN));
                payload.advance(2 * KEY_LEN);
                ClientFrame::ForwardPacket {
                    src,
                    dst,
                    packet: payload,
                }
            }
            Some(FrameType::NotePreferred) => {
                short(1)?;
                ClientFrame::NotePreferred(payload[0] != 0)
            }
            Some(FrameType::Ping) => {
                short(8)?;
                ClientFrame::Ping(eight(&payload))
            }
            Some(FrameType::Pong) => {
                short(8)?;
                ClientFrame::Pong(eight(&payload))
            }
            Some(FrameType::WatchConns) => ClientFrame::WatchConns,
            Some(FrameType::ClosePeer) => {
                short(KEY_LEN)?;
                ClientFrame::ClosePeer(key_at(&payload, 0))
            }
            Some(_) => return Err(FrameError::Unexpected(frame_type)),
            None => ClientFrame::Unknown(frame_type),
        })
    }
}

/// A frame a server sends; parsed by our own clients (load generator, probe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    ServerKey(PublicKey),
    ServerInfo(Bytes),
    RecvPacket {
        src: PublicKey,
        packet: Bytes,
    },
    KeepAlive,
    PeerGone {
        key: PublicKey,
        reason: Option<u8>,
    },
    Ping([u8; 8]),
    Pong([u8; 8]),
    Health(Bytes),
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    /// Mesh watchers only: `key` is connected to the sending node.
    PeerPresent {
        key: PublicKey,
        /// The client's address, when the frame carried one (50+ bytes).
        addr: Option<std::net::SocketAddr>,
        /// Flag bits (0x01 client, 0x02 mesh peer, 0x04 prober); 0 if absent.
        flags: u8,
    },
    Other(u8),
}

impl ServerFrame {
    pub fn parse(frame: RawFrame) -> Result<Self, FrameError> {
        let RawFrame {
            frame_type,
            mut payload,
        } = frame;
        let short = |need: usize| {
            if payload.len() < need {
                Err(FrameError::TooShort {
                    frame_type,
                    len: payload.len(),
                })
            } else {
                Ok(())
            }
        };
        Ok(match FrameType::from_u8(frame_type) {
            Some(FrameType::ServerKey) => {
                short(MAGIC.len() + KEY_LEN)?;
                if payload[..MAGIC.len()] != MAGIC {
                    return Err(FrameError::Unexpected(frame_type));
                }
                ServerFrame::ServerKey(key_at(&payload, MAGIC.len()))
            }
            Some(FrameType::ServerInfo) => ServerFrame::ServerInfo(payload),
            Some(FrameType::RecvPacket) => {
                short(KEY_LEN)?;
                let src = key_at(&payload, 0);
                payload.advance(KEY_LEN);
                ServerFrame::RecvPacket {
                    src,
                    packet: payload,
                }
            }
            Some(FrameType::KeepAlive) => ServerFrame::KeepAlive,
            Some(FrameType::PeerGone) => {
                short(KEY_LEN)?;
                ServerFrame::PeerGone {
                    key: key_at(&payload, 0),
                    reason: payload.get(KEY_LEN).copied(),
                }
            }
            Some(FrameType::Ping) => {
                short(8)?;
                ServerFrame::Ping(eight(&payload))
            }
            Some(FrameType::Pong) => {
                short(8)?;
                ServerFrame::Pong(eight(&payload))
            }
            Some(FrameType::Health) => ServerFrame::Health(payload),
            Some(FrameType::PeerPresent) => {
                short(KEY_LEN)?;
                // Readers accept 32 (old servers), 50 (no flags) or 51+ bytes.
                let addr = (payload.len() >= PEER_PRESENT_LEN - 1).then(|| {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&payload[KEY_LEN..KEY_LEN + 16]);
                    let port = u16::from_be_bytes([payload[KEY_LEN + 16], payload[KEY_LEN + 17]]);
                    std::net::SocketAddr::new(std::net::Ipv6Addr::from(ip).to_canonical(), port)
                });
                ServerFrame::PeerPresent {
                    key: key_at(&payload, 0),
                    addr,
                    flags: payload.get(PEER_PRESENT_LEN - 1).copied().unwrap_or(0),
                }
            }
            Some(FrameType::Restarting) => {
                short(8)?;
                ServerFrame::Restarting {
                    reconnect_in_ms: u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]),
                    try_for_ms: u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]),
                }
            }
            _ => ServerFrame::Other(frame_type),
        })
    }
}

/// True for Tailscale disco packets, which get their own queue and PeerGone(NotHere).
pub fn is_disco(packet: &[u8]) -> bool {
    packet.len() >= DISCO_MIN_LEN && packet.starts_with(&DISCO_MAGIC)
}

pub fn put_header(buf: &mut BytesMut, t: FrameType, len: usize) {
    buf.reserve(HEADER_LEN + len);
    buf.put_u8(t as u8);
    // Callers bound `len` by the frame limits above, all far below u32::MAX.
    buf.put_u32(len as u32);
}

pub fn encode_server_key(buf: &mut BytesMut, key: &PublicKey) {
    put_header(buf, FrameType::ServerKey, MAGIC.len() + KEY_LEN);
    buf.put_slice(&MAGIC);
    buf.put_slice(key.as_bytes());
}

/// `sealed` is nonce followed by the box, as produced by the handshake module.
pub fn encode_server_info(buf: &mut BytesMut, sealed: &[u8]) {
    put_header(buf, FrameType::ServerInfo, sealed.len());
    buf.put_slice(sealed);
}

/// `sealed` is the client key, nonce and box, as produced by the handshake module.
pub fn encode_client_info(buf: &mut BytesMut, sealed: &[u8]) {
    put_header(buf, FrameType::ClientInfo, sealed.len());
    buf.put_slice(sealed);
}

pub fn encode_recv_packet(buf: &mut BytesMut, src: &PublicKey, packet: &[u8]) {
    put_header(buf, FrameType::RecvPacket, KEY_LEN + packet.len());
    buf.put_slice(src.as_bytes());
    buf.put_slice(packet);
}

pub fn encode_send_packet(buf: &mut BytesMut, dst: &PublicKey, packet: &[u8]) {
    put_header(buf, FrameType::SendPacket, KEY_LEN + packet.len());
    buf.put_slice(dst.as_bytes());
    buf.put_slice(packet);
}

pub fn encode_keepalive(buf: &mut BytesMut) {
    put_header(buf, FrameType::KeepAlive, 0);
}

pub fn encode_ping(buf: &mut BytesMut, data: [u8; 8]) {
    put_header(buf, FrameType::Ping, 8);
    buf.put_slice(&data);
}

pub fn encode_pong(buf: &mut BytesMut, data: [u8; 8]) {
    put_header(buf, FrameType::Pong, 8);
    buf.put_slice(&data);
}

pub fn encode_note_preferred(buf: &mut BytesMut, preferred: bool) {
    put_header(buf, FrameType::NotePreferred, 1);
    buf.put_u8(preferred as u8);
}

pub fn encode_peer_gone(buf: &mut BytesMut, key: &PublicKey, reason: PeerGoneReason) {
    put_header(buf, FrameType::PeerGone, KEY_LEN + 1);
    buf.put_slice(key.as_bytes());
    buf.put_u8(reason as u8);
}

/// Mesh: subscribe to PeerPresent/PeerGone (empty payload).
pub fn encode_watch_conns(buf: &mut BytesMut) {
    put_header(buf, FrameType::WatchConns, 0);
}

/// Mesh: `key` is connected here, from `addr` (zeros when not an ip:port),
/// with `flags` (`PEER_PRESENT_IS_*`). 51 bytes, as derper writes it.
pub fn encode_peer_present(
    buf: &mut BytesMut,
    key: &PublicKey,
    addr: Option<std::net::SocketAddr>,
    flags: u8,
) {
    put_header(buf, FrameType::PeerPresent, PEER_PRESENT_LEN);
    buf.put_slice(key.as_bytes());
    match addr {
        Some(a) => {
            let ip = match a.ip() {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            buf.put_slice(&ip.octets());
            buf.put_u16(a.port());
        }
        None => buf.put_slice(&[0u8; 18]),
    }
    buf.put_u8(flags);
}

/// Mesh: a packet from `src` (a client of the sending node) for `dst`.
pub fn encode_forward_packet(buf: &mut BytesMut, src: &PublicKey, dst: &PublicKey, packet: &[u8]) {
    put_header(buf, FrameType::ForwardPacket, 2 * KEY_LEN + packet.len());
    buf.put_slice(src.as_bytes());
    buf.put_slice(dst.as_bytes());
    buf.put_slice(packet);
}

/// Mesh: close every connection of `key` on the receiving node.
pub fn encode_close_peer(buf: &mut BytesMut, key: &PublicKey) {
    put_header(buf, FrameType::ClosePeer, KEY_LEN);
    buf.put_slice(key.as_bytes());
}

pub fn encode_restarting(buf: &mut BytesMut, reconnect_in_ms: u32, try_for_ms: u32) {
    put_header(buf, FrameType::Restarting, 8);
    buf.put_u32(reconnect_in_ms);
    buf.put_u32(try_for_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn one(buf: &mut BytesMut) -> RawFrame {
        decode_frame(buf, client_frame_limit).unwrap().unwrap()
    }

    fn one_server(buf: &mut BytesMut) -> ServerFrame {
        ServerFrame::parse(decode_frame(buf, server_frame_limit).unwrap().unwrap()).unwrap()
    }

    #[test]
    fn send_packet_round_trip_at_every_size_class() {
        for size in [0usize, 1, 1280, MAX_PACKET_SIZE] {
            let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let mut buf = BytesMut::new();
            encode_send_packet(&mut buf, &k(9), &data);
            let f = ClientFrame::parse(one(&mut buf)).unwrap();
            assert_eq!(
                f,
                ClientFrame::SendPacket {
                    dst: k(9),
                    packet: Bytes::from(data)
                }
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let mut buf = BytesMut::new();
        encode_server_key(&mut buf, &k(1));
        encode_server_info(&mut buf, b"sealed");
        encode_recv_packet(&mut buf, &k(2), b"hello");
        encode_keepalive(&mut buf);
        encode_peer_gone(&mut buf, &k(3), PeerGoneReason::NotHere);
        encode_ping(&mut buf, *b"12345678");
        encode_pong(&mut buf, *b"87654321");
        encode_restarting(&mut buf, 500, 30_000);
        assert_eq!(one_server(&mut buf), ServerFrame::ServerKey(k(1)));
        assert_eq!(
            one_server(&mut buf),
            ServerFrame::ServerInfo(Bytes::from_static(b"sealed"))
        );
        assert_eq!(
            one_server(&mut buf),
            ServerFrame::RecvPacket {
                src: k(2),
                packet: Bytes::from_static(b"hello")
            }
        );
        assert_eq!(one_server(&mut buf), ServerFrame::KeepAlive);
        assert_eq!(
            one_server(&mut buf),
            ServerFrame::PeerGone {
                key: k(3),
                reason: Some(1)
            }
        );
        assert_eq!(one_server(&mut buf), ServerFrame::Ping(*b"12345678"));
        assert_eq!(one_server(&mut buf), ServerFrame::Pong(*b"87654321"));
        assert_eq!(
            one_server(&mut buf),
            ServerFrame::Restarting {
                reconnect_in_ms: 500,
                try_for_ms: 30_000
            }
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn server_key_frame_is_byte_exact() {
        let mut buf = BytesMut::new();
        encode_server_key(&mut buf, &k(0xaa));
        assert_eq!(&buf[..5], &[0x01, 0, 0, 0, 40]);
        assert_eq!(&buf[5..13], b"DERP\xF0\x9F\x94\x91");
        assert_eq!(&buf[13..], &[0xaa; 32]);
    }

    #[test]
    fn client_control_frames_round_trip() {
        let mut buf = BytesMut::new();
        encode_note_preferred(&mut buf, true);
        encode_ping(&mut buf, [1; 8]);
        encode_pong(&mut buf, [2; 8]);
        put_header(&mut buf, FrameType::WatchConns, 0);
        put_header(&mut buf, FrameType::ClosePeer, 32);
        buf.put_slice(&[5; 32]);
        put_header(&mut buf, FrameType::ForwardPacket, 64 + 3);
        buf.put_slice(&[6; 32]);
        buf.put_slice(&[7; 32]);
        buf.put_slice(b"abc");
        buf.put_slice(&[0x7f, 0, 0, 0, 2, 9, 9]);
        let frames: Vec<_> = std::iter::from_fn(|| {
            decode_frame(&mut buf, client_frame_limit)
                .unwrap()
                .map(|f| ClientFrame::parse(f).unwrap())
        })
        .collect();
        assert_eq!(
            frames,
            vec![
                ClientFrame::NotePreferred(true),
                ClientFrame::Ping([1; 8]),
                ClientFrame::Pong([2; 8]),
                ClientFrame::WatchConns,
                ClientFrame::ClosePeer(k(5)),
                ClientFrame::ForwardPacket {
                    src: k(6),
                    dst: k(7),
                    packet: Bytes::from_static(b"abc")
                },
                ClientFrame::Unknown(0x7f),
            ]
        );
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut full = BytesMut::new();
        encode_send_packet(&mut full, &k(1), &[3; 100]);
        let bytes = full.freeze();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(
                decode_frame(&mut buf, client_frame_limit).unwrap(),
                None,
                "at byte {i}"
            );
            assert!(bytes_needed(&buf) > 0);
            buf.put_u8(*b);
        }
        assert_eq!(bytes_needed(&buf), 0);
        assert!(
            decode_frame(&mut buf, client_frame_limit)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn oversized_frames_fail_on_the_header_alone() {
        let mut buf = BytesMut::new();
        put_header(
            &mut buf,
            FrameType::SendPacket,
            KEY_LEN + MAX_PACKET_SIZE + 1,
        );
        let err = decode_frame(&mut buf, client_frame_limit).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                frame_type: 0x04,
                ..
            }
        ));

        let mut buf = BytesMut::from(&[0x12, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode_frame(&mut buf, client_frame_limit),
            Err(FrameError::TooLarge { .. })
        ));

        let mut buf = BytesMut::from(&[0x7f, 0x7f, 0, 0, 0][..]);
        assert!(matches!(
            decode_frame(&mut buf, client_frame_limit),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn short_and_server_only_frames_are_rejected() {
        let cases: &[(u8, &[u8])] = &[
            (0x04, &[1; 31]),
            (0x0a, &[1; 63]),
            (0x07, &[]),
            (0x12, &[1; 7]),
            (0x13, &[]),
            (0x11, &[1; 31]),
        ];
        for (t, p) in cases {
            let f = RawFrame {
                frame_type: *t,
                payload: Bytes::copy_from_slice(p),
            };
            assert!(
                matches!(ClientFrame::parse(f), Err(FrameError::TooShort { .. })),
                "type {t:#x}"
            );
        }
        for t in [0x01u8, 0x03, 0x05, 0x06, 0x08, 0x09, 0x14, 0x15, 0x02] {
            let f = RawFrame {
                frame_type: t,
                payload: Bytes::new(),
            };
            assert_eq!(ClientFrame::parse(f), Err(FrameError::Unexpected(t)));
        }
    }

    #[test]
    fn bad_server_key_magic_is_rejected() {
        let mut buf = BytesMut::new();
        put_header(&mut buf, FrameType::ServerKey, 40);
        buf.put_slice(&[0; 40]);
        let f = decode_frame(&mut buf, server_frame_limit).unwrap().unwrap();
        assert!(ServerFrame::parse(f).is_err());
    }

    #[test]
    fn disco_detection() {
        let mut p = DISCO_MAGIC.to_vec();
        p.resize(62, 0);
        assert!(is_disco(&p));
        assert!(!is_disco(&p[..61]));
        p[0] = 0;
        assert!(!is_disco(&p));
    }
}

//! STUN (RFC 5389) as far as Tailscale uses it: the Binding Request its
//! netcheck sends and the Binding Success the relay answers with.
//!
//! It follows `net/stun/stun.go` rather than the whole RFC on purpose. derper
//! answers only requests shaped like Tailscale's (SOFTWARE `tailnode`, a valid
//! FINGERPRINT last), so a spoofed-source datagram from anything else cannot
//! turn the relay into a reflector; a client that is not Tailscale gets
//! silence, as from derper. Everything works on caller-owned buffers so the
//! UDP task allocates nothing per datagram.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Bytes of the fixed STUN header.
pub const HEADER_LEN: usize = 20;
/// RFC 5389's magic cookie, bytes 4–7 of every message.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// Tailscale's request: header, SOFTWARE `tailnode` (12), FINGERPRINT (8).
pub const REQUEST_LEN: usize = HEADER_LEN + SOFTWARE_ATTR_LEN + FINGERPRINT_ATTR_LEN;
/// The longest response we write (IPv6 XOR-MAPPED-ADDRESS).
pub const MAX_RESPONSE_LEN: usize = HEADER_LEN + 4 + 20;
/// The SOFTWARE value Tailscale clients send and derper requires.
pub const SOFTWARE: &[u8] = b"tailnode";

const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Pre-RFC 5389 code point some servers still use; Tailscale reads it too.
const ATTR_XOR_MAPPED_ADDRESS_OLD: u16 = 0x8020;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
const SOFTWARE_ATTR_LEN: usize = 4 + SOFTWARE.len();
const FINGERPRINT_ATTR_LEN: usize = 8;
/// XORed into the CRC so a STUN FINGERPRINT differs from other CRC-32 uses (RFC 5389 §15.5).
const FINGERPRINT_XOR: u32 = 0x5354_554E;
const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

/// A STUN transaction id, echoed in the response.
pub type TxId = [u8; 12];

/// Why a datagram is not a request we answer (or not a response we accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("not a Binding Request")]
    NotBindingRequest,
    #[error("not a Binding Success response")]
    NotBindingSuccess,
    #[error("message length does not match the datagram")]
    BadLength,
    #[error("malformed attributes")]
    MalformedAttrs,
    #[error("no SOFTWARE \"tailnode\" attribute")]
    WrongSoftware,
    #[error("FINGERPRINT is not the last attribute")]
    NoFingerprint,
    #[error("FINGERPRINT does not match")]
    WrongFingerprint,
    #[error("transaction id does not match the request")]
    WrongTxId,
    #[error("no mapped address")]
    NoAddress,
}

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32/IEEE. A byte-at-a-time table is enough: a request is 32 bytes.
pub fn crc32(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c = CRC_TABLE[((c ^ u32::from(x)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// The FINGERPRINT value for a message whose bytes before that attribute are `b`.
pub fn fingerprint(b: &[u8]) -> u32 {
    crc32(b) ^ FINGERPRINT_XOR
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// Header checks shared by both directions: length ≥ 20, top two bits zero,
/// magic cookie, and a message length that is the rest of the datagram
/// (a datagram cut short by a small buffer or a middlebox is refused here).
fn check_header(b: &[u8]) -> Result<(), StunError> {
    if b.len() < HEADER_LEN || b[0] & 0b1100_0000 != 0 || b[4..8] != MAGIC_COOKIE {
        return Err(StunError::NotStun);
    }
    if usize::from(u16_at(b, 2)) != b.len() - HEADER_LEN {
        return Err(StunError::BadLength);
    }
    Ok(())
}

/// Walks the attributes after the header as `stun.go`'s `foreachAttr`: each
/// is type(2) length(2) value, padded to 4; one running past the end is malformed.
fn for_each_attr(mut b: &[u8], mut f: impl FnMut(u16, &[u8])) -> Result<(), StunError> {
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(StunError::MalformedAttrs);
        }
        let typ = u16_at(b, 0);
        let len = usize::from(u16_at(b, 2));
        let padded = (len + 3) & !3;
        b = &b[4..];
        if padded > b.len() {
            return Err(StunError::MalformedAttrs);
        }
        f(typ, &b[..len]);
        b = &b[padded..];
    }
    Ok(())
}

/// Accepts a Binding Request only in Tailscale's shape and returns its
/// transaction id; anything else is an error the caller ignores silently.
pub fn parse_binding_request(b: &[u8]) -> Result<TxId, StunError> {
    check_header(b)?;
    if b[0..2] != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest);
    }
    let mut software_ok = false;
    let mut last = None;
    let mut got_fp = None;
    for_each_attr(&b[HEADER_LEN..], |typ, value| {
        last = Some(typ);
        if typ == ATTR_SOFTWARE && value == SOFTWARE {
            software_ok = true;
        }
        got_fp = (typ == ATTR_FINGERPRINT && value.len() == 4)
            .then(|| u32::from_be_bytes([value[0], value[1], value[2], value[3]]));
    })?;
    if !software_ok {
        return Err(StunError::WrongSoftware);
    }
    // got_fp is reset by every later attribute, so Some means it is the last
    // one and, being 4 bytes unpadded, exactly the datagram's final 8 bytes.
    let (Some(ATTR_FINGERPRINT), Some(got)) = (last, got_fp) else {
        return Err(StunError::NoFingerprint);
    };
    if got != fingerprint(&b[..b.len() - FINGERPRINT_ATTR_LEN]) {
        return Err(StunError::WrongFingerprint);
    }
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&b[8..HEADER_LEN]);
    Ok(tx)
}

/// Writes the Binding Success for `tx` telling the client it was seen at
/// `addr`, and returns its length. An IPv4-mapped IPv6 source (an IPv4 client
/// on a dual-stack socket) is answered as IPv4, which every client reads.
pub fn write_binding_response(
    tx: &TxId,
    addr: SocketAddr,
    out: &mut [u8; MAX_RESPONSE_LEN],
) -> usize {
    let ip = addr.ip().to_canonical();
    let value_len: usize = match ip {
        IpAddr::V4(_) => 8,
        IpAddr::V6(_) => 20,
    };
    out[0..2].copy_from_slice(&BINDING_SUCCESS);
    out[2..4].copy_from_slice(&((4 + value_len) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(tx);
    out[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(value_len as u16).to_be_bytes());
    out[24] = 0;
    let port = addr.port() ^ u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
    out[26..28].copy_from_slice(&port.to_be_bytes());
    match ip {
        IpAddr::V4(v4) => {
            out[25] = FAMILY_IPV4;
            for (i, o) in v4.octets().iter().enumerate() {
                out[28 + i] = o ^ MAGIC_COOKIE[i];
            }
        }
        IpAddr::V6(v6) => {
            out[25] = FAMILY_IPV6;
            // IPv6 is XORed with cookie ‖ transaction id, i.e. header bytes 4..20.
            for (i, o) in v6.octets().iter().enumerate() {
                out[28 + i] = o ^ out[4 + i];
            }
        }
    }
    HEADER_LEN + 4 + value_len
}

/// Writes Tailscale's Binding Request (as `stun.Request`) for `tx`: used by
/// `probe --stun` and the bench, and by tests as the client side.
pub fn write_binding_request(tx: &TxId, out: &mut [u8; REQUEST_LEN]) {
    out[0..2].copy_from_slice(&BINDING_REQUEST);
    out[2..4].copy_from_slice(&((REQUEST_LEN - HEADER_LEN) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(tx);
    out[20..22].copy_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    out[22..24].copy_from_slice(&(SOFTWARE.len() as u16).to_be_bytes());
    out[24..32].copy_from_slice(SOFTWARE);
    out[32..34].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    out[34..36].copy_from_slice(&4u16.to_be_bytes());
    let fp = fingerprint(&out[..32]);
    out[36..40].copy_from_slice(&fp.to_be_bytes());
}

/// Reads the mapped address from a Binding Success for `tx`, as Tailscale's
/// client does: XOR-MAPPED-ADDRESS (either code point) first, else
/// MAPPED-ADDRESS; IPv4-mapped IPv6 is unmapped.
pub fn parse_binding_response(b: &[u8], tx: &TxId) -> Result<SocketAddr, StunError> {
    check_header(b)?;
    if b[0..2] != BINDING_SUCCESS {
        return Err(StunError::NotBindingSuccess);
    }
    if b[8..HEADER_LEN] != tx[..] {
        return Err(StunError::WrongTxId);
    }
    let mut xor_key = [0u8; 16];
    xor_key.copy_from_slice(&b[4..HEADER_LEN]);
    let mut xored = None;
    let mut plain = None;
    for_each_attr(&b[HEADER_LEN..], |typ, value| match typ {
        ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_OLD if xored.is_none() => {
            xored = decode_address(value, Some(&xor_key));
        }
        ATTR_MAPPED_ADDRESS if plain.is_none() => plain = decode_address(value, None),
        _ => {}
    })?;
    let addr = xored.or(plain).ok_or(StunError::NoAddress)?;
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

fn decode_address(v: &[u8], xor_key: Option<&[u8; 16]>) -> Option<SocketAddr> {
    let key = |i: usize| xor_key.map_or(0, |k| k[i]);
    if v.len() < 4 {
        return None;
    }
    let port = u16_at(v, 2) ^ u16::from_be_bytes([key(0), key(1)]);
    let ip = match (v[1], v.len()) {
        (FAMILY_IPV4, 8) => IpAddr::V4(Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|i| {
            v[4 + i] ^ key(i)
        }))),
        (FAMILY_IPV6, 20) => IpAddr::V6(Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|i| {
            v[4 + i] ^ key(i)
        }))),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    const VECTOR_TX: TxId = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    const VECTOR_REQUEST: &str = "00 01 00 14 21 12 A4 42 00 01 02 03 04 05 06 07 08 09 0A 0B \
        80 22 00 08 74 61 69 6C 6E 6F 64 65 80 28 00 04 8A AB AD 90";
    const VECTOR_RESPONSE: &str = "01 01 00 0C 21 12 A4 42 00 01 02 03 04 05 06 07 08 09 0A 0B \
        00 20 00 08 00 01 F5 23 E1 12 A6 43";

    // RFC 5769 §2.1–2.3 (the ICE/credentials attributes are just bytes here).
    const RFC_TX: &str = "b7 e7 a7 01 bc 34 d6 86 fa 87 df ae";
    const RFC_REQUEST: &str = "00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae \
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74 \
        00 24 00 04 6e 00 01 ff 80 29 00 08 93 2f f9 b1 51 26 3b 36 \
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20 \
        00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2 \
        80 28 00 04 e5 7a 3b cf";
    const RFC_RESPONSE_V4: &str = "01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae \
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 \
        00 20 00 08 00 01 a1 47 e1 12 a6 43 \
        00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7 \
        80 28 00 04 c0 7d 4c 96";
    const RFC_RESPONSE_V6: &str = "01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae \
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 \
        00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9 \
        00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41 \
        80 28 00 04 c8 fb 0b 4c";

    fn rfc_tx() -> TxId {
        hex(RFC_TX).try_into().unwrap()
    }

    fn fingerprint_holds(b: &[u8]) -> bool {
        let (body, fp) = b.split_at(b.len() - 4);
        fingerprint(&body[..body.len() - 4]) == u32::from_be_bytes(fp.try_into().unwrap())
    }

    fn response(tx: &TxId, addr: SocketAddr) -> Vec<u8> {
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let n = write_binding_response(tx, addr, &mut out);
        out[..n].to_vec()
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn protocol_test_vector_byte_exact() {
        let req = hex(VECTOR_REQUEST);
        let mut ours = [0u8; REQUEST_LEN];
        write_binding_request(&VECTOR_TX, &mut ours);
        assert_eq!(ours[..], req[..], "our request is Tailscale's");
        assert_eq!(parse_binding_request(&req), Ok(VECTOR_TX));
        let client: SocketAddr = "192.0.2.1:54321".parse().unwrap();
        assert_eq!(response(&VECTOR_TX, client), hex(VECTOR_RESPONSE));
        assert_eq!(
            parse_binding_response(&hex(VECTOR_RESPONSE), &VECTOR_TX),
            Ok(client)
        );
    }

    #[test]
    fn ipv4_mapped_source_is_answered_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:54321".parse().unwrap();
        assert_eq!(response(&VECTOR_TX, mapped), hex(VECTOR_RESPONSE));
    }

    #[test]
    fn rfc5769_vectors_fingerprints_and_addresses() {
        let tx = rfc_tx();
        let req = hex(RFC_REQUEST);
        assert!(fingerprint_holds(&req));
        // A well-formed Binding Request, but not Tailscale's: derper ignores it.
        assert_eq!(parse_binding_request(&req), Err(StunError::WrongSoftware));

        let v4 = hex(RFC_RESPONSE_V4);
        assert!(fingerprint_holds(&v4));
        assert_eq!(
            parse_binding_request(&v4),
            Err(StunError::NotBindingRequest)
        );
        let a4: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        assert_eq!(parse_binding_response(&v4, &tx), Ok(a4));
        // Our XOR-MAPPED-ADDRESS attribute is the RFC's, byte for byte.
        assert_eq!(response(&tx, a4)[20..], v4[36..48]);

        let v6 = hex(RFC_RESPONSE_V6);
        assert!(fingerprint_holds(&v6));
        let a6: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap();
        assert_eq!(parse_binding_response(&v6, &tx), Ok(a6));
        assert_eq!(response(&tx, a6)[20..], v6[36..60]);
        assert_eq!(
            parse_binding_response(&v6, &VECTOR_TX),
            Err(StunError::WrongTxId)
        );
    }

    /// A request with the given attributes after the header, length field set.
    fn request_with(attrs: &[u8]) -> Vec<u8> {
        let mut b = hex(VECTOR_REQUEST)[..HEADER_LEN].to_vec();
        b[2..4].copy_from_slice(&(attrs.len() as u16).to_be_bytes());
        b.extend_from_slice(attrs);
        b
    }

    fn with_fingerprint(mut b: Vec<u8>) -> Vec<u8> {
        let len = (b.len() - HEADER_LEN + 8) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        let fp = fingerprint(&b);
        b.extend_from_slice(&[0x80, 0x28, 0, 4]);
        b.extend_from_slice(&fp.to_be_bytes());
        b
    }

    #[test]
    fn rejects_everything_else() {
        let good = hex(VECTOR_REQUEST);
        let reject = |b: &[u8], want: StunError| assert_eq!(parse_binding_request(b), Err(want));

        for n in 0..good.len() {
            assert!(
                parse_binding_request(&good[..n]).is_err(),
                "truncated to {n}"
            );
        }
        reject(&[], StunError::NotStun);
        let mut b = good.clone();
        b[0] |= 0x40;
        reject(&b, StunError::NotStun);
        let mut b = good.clone();
        b[7] ^= 1;
        reject(&b, StunError::NotStun);
        let mut b = good.clone();
        b[1] = 0x02; // another method
        reject(&b, StunError::NotBindingRequest);
        let mut b = good.clone();
        b[0..2].copy_from_slice(&[0x00, 0x11]); // Binding Indication
        reject(&b, StunError::NotBindingRequest);
        let mut b = good.clone();
        b.extend_from_slice(&[0; 4]); // trailing bytes the length does not cover
        reject(&b, StunError::BadLength);
        let mut b = good.clone();
        b[3] = 0x18; // length claims more than arrived
        reject(&b, StunError::BadLength);
        let mut b = good.clone();
        b[36] ^= 0xFF;
        reject(&b, StunError::WrongFingerprint);
        let mut b = good.clone();
        b[10] ^= 1; // the fingerprint covers the transaction id too
        reject(&b, StunError::WrongFingerprint);

        // Header only: no SOFTWARE.
        reject(&request_with(&[]), StunError::WrongSoftware);
        // Other software, valid fingerprint.
        let other = with_fingerprint(request_with(b"\x80\x22\x00\x08tailnodf"));
        reject(&other, StunError::WrongSoftware);
        // "tailnode" as a prefix of a longer value is not "tailnode".
        let longer = with_fingerprint(request_with(b"\x80\x22\x00\x09tailnode!\0\0\0"));
        reject(&longer, StunError::WrongSoftware);
        // SOFTWARE but no FINGERPRINT.
        reject(
            &request_with(b"\x80\x22\x00\x08tailnode"),
            StunError::NoFingerprint,
        );
        // FINGERPRINT not last.
        let mut b = with_fingerprint(request_with(b"\x80\x22\x00\x08tailnode"));
        b.extend_from_slice(b"\x00\x24\x00\x04abcd");
        let len = (b.len() - HEADER_LEN) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        reject(&b, StunError::NoFingerprint);
        // An attribute running past the end.
        reject(
            &request_with(b"\x80\x22\x00\x08tailnode\x80\x28\x00\x08\0\0\0\0"),
            StunError::MalformedAttrs,
        );
        // A dangling partial attribute header.
        let mut b = request_with(b"\x80\x22\x00\x08tailnode\x80\x28");
        b[2..4].copy_from_slice(&14u16.to_be_bytes());
        reject(&b, StunError::MalformedAttrs);
        // Extra attributes before the fingerprint are fine, as in Go.
        let extra = with_fingerprint(request_with(
            b"\x00\x24\x00\x04abcd\x80\x22\x00\x08tailnode",
        ));
        assert_eq!(parse_binding_request(&extra), Ok(VECTOR_TX));
        // Our own response is not a request.
        reject(&hex(VECTOR_RESPONSE), StunError::NotBindingRequest);
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        // xorshift: deterministic, so a failure reproduces.
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let good = hex(VECTOR_REQUEST);
        let tx = VECTOR_TX;
        let mut buf = [0u8; 128];
        for round in 0..200_000u32 {
            let len = (next() % buf.len() as u64) as usize;
            if round % 2 == 0 {
                for b in buf[..len].iter_mut() {
                    *b = next() as u8;
                }
                if len >= HEADER_LEN && round % 4 == 0 {
                    // Make the header plausible so the attribute walk runs.
                    buf[0] &= 0x3F;
                    buf[4..8].copy_from_slice(&MAGIC_COOKIE);
                    buf[2..4].copy_from_slice(&((len - HEADER_LEN) as u16).to_be_bytes());
                }
            } else {
                // Flip a few bytes of a good request, then cut it somewhere.
                buf[..good.len()].copy_from_slice(&good);
                for _ in 0..(next() % 4) {
                    buf[(next() % good.len() as u64) as usize] = next() as u8;
                }
            }
            let b = &buf[..if round % 2 == 0 {
                len
            } else {
                len.min(good.len())
            }];
            if parse_binding_request(b).is_ok() {
                // Only SOFTWARE plus FINGERPRINT can pass: never shorter than Tailscale's.
                assert!(b.len() >= REQUEST_LEN && b.len() % 4 == 0);
            }
            let _ = parse_binding_response(b, &tx);
        }
    }
}

//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a TCP
//! load balancer writes before the client's first byte, so a relay behind it
//! still learns who the client is. Pure: bytes in, a verdict out; the accept
//! loop does the reading.
//!
//! Bounded by construction: a v1 line is at most 107 bytes, a v2 header at most
//! [`V2_MAX_BODY`] bytes after its 16-byte preamble, and anything longer is an
//! error, so a peer cannot make the relay buffer what it announces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 line the spec allows, CRLF included.
pub const V1_MAX: usize = 107;
/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Address block plus TLVs we accept after the v2 preamble. Cloud balancers
/// add a few TLVs (AWS: the VPC endpoint id, GCP: the PSC connection id), far
/// below this; the spec's u16 would allow 64 KiB.
pub const V2_MAX_BODY: usize = 1024;
/// The most bytes a header can take: what a reader may buffer at most.
pub const MAX_HEADER: usize = 16 + V2_MAX_BODY;

const V1_PREFIX: &[u8] = b"PROXY ";

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection carries a client: its address and the one it dialled.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer speaks for itself (v2 LOCAL, e.g. its health check) or
    /// for a non-TCP client (v1 UNKNOWN, v2 UNSPEC/UNIX): the TCP peer stands.
    Local,
}

/// A parse that could finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// The header, and how many bytes of the buffer it took.
    Done(ProxyHeader, usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header (the connection starts with other bytes)")]
    Missing,
    #[error("PROXY v1 line longer than {V1_MAX} bytes")]
    V1TooLong,
    #[error("PROXY v2 header announces {0} bytes, more than the {V2_MAX_BODY} accepted")]
    V2TooLong(usize),
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// Whether the first bytes of a connection are (the start of) a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    /// A whole v1 or v2 signature is there.
    Present,
    /// Too few bytes to say; they agree with a signature so far.
    Undecided,
    /// These bytes cannot begin a header.
    Absent,
}

/// Tells a header from a TLS ClientHello or an HTTP request after as few
/// bytes as possible (a `P` may be `POST` or `PROXY`).
pub fn signature(buf: &[u8]) -> Signature {
    let agrees = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    let v1 = agrees(V1_PREFIX);
    let v2 = agrees(&V2_SIGNATURE);
    if (v1 && buf.len() >= V1_PREFIX.len()) || (v2 && buf.len() >= V2_SIGNATURE.len()) {
        Signature::Present
    } else if v1 || v2 {
        Signature::Undecided
    } else {
        Signature::Absent
    }
}

/// Parses a header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    match signature(buf) {
        Signature::Absent => Err(ProxyHeaderError::Missing),
        Signature::Undecided => Ok(Parsed::Incomplete),
        Signature::Present if buf.starts_with(V1_PREFIX) => parse_v1(buf),
        Signature::Present => parse_v2(buf),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not ASCII"))?;
    let mut f = line.split(' ');
    let proto = f.next().unwrap_or("");
    if proto == "UNKNOWN" {
        // The spec: the rest of an UNKNOWN line is to be ignored.
        return Ok(Parsed::Done(ProxyHeader::Local, end + 2));
    }
    let v6 = match proto {
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return Err(ProxyHeaderError::Malformed(
            "v1 line does not have 4 address fields",
        ));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        let ip = if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        ip.map_err(|_| ProxyHeaderError::Malformed("v1 address does not match its protocol"))
    };
    let port = |s: &str| -> Result<u16, ProxyHeaderError> {
        // The spec forbids leading zeros and signs, which `parse` would accept.
        if s.is_empty()
            || (s.len() > 1 && s.starts_with('0'))
            || !s.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ProxyHeaderError::Malformed(
                "v1 port is not a decimal number",
            ));
        }
        s.parse()
            .map_err(|_| ProxyHeaderError::Malformed("v1 port is out of range"))
    };
    Ok(Parsed::Done(
        ProxyHeader::Proxied {
            source: SocketAddr::new(ip(src)?, port(sport)?),
            destination: SocketAddr::new(ip(dst)?, port(dport)?),
        },
        end + 2,
    ))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version nibble is not 2"));
    }
    if len > V2_MAX_BODY {
        return Err(ProxyHeaderError::V2TooLong(len));
    }
    let total = 16 + len;
    if buf.len() < total {
        return Ok(Parsed::Incomplete);
    }
    let body = &buf[16..total];
    let header = match ver_cmd & 0x0f {
        0 => ProxyHeader::Local,
        1 => match family {
            // TCP over IPv4, TCP over IPv6.
            0x11 => {
                let a = body.get(..12).ok_or(ProxyHeaderError::Malformed(
                    "v2 IPv4 address block too short",
                ))?;
                let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(0), port(8)),
                    destination: SocketAddr::new(ip(4), port(10)),
                }
            }
            0x21 => {
                let a = body.get(..36).ok_or(ProxyHeaderError::Malformed(
                    "v2 IPv6 address block too short",
                ))?;
                let ip = |o: usize| {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&a[o..o + 16]);
                    IpAddr::V6(Ipv6Addr::from(b))
                };
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(0), port(32)),
                    destination: SocketAddr::new(ip(16), port(34)),
                }
            }
            // UNSPEC or a UNIX socket: no client address to take.
            0x00 | 0x31 => ProxyHeader::Local,
            _ => {
                return Err(ProxyHeaderError::Malformed(
                    "v2 family is not TCP, UNIX or UNSPEC",
                ));
            }
        },
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v2 command is neither LOCAL nor PROXY",
            ));
        }
    };
    Ok(Parsed::Done(header, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /";
        assert_eq!(
            parse(h).unwrap(),
            Parsed::Done(
                ProxyHeader::Proxied {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:443")
                },
                h.len() - 5
            )
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 443\r\n";
        assert!(matches!(
            parse(h).unwrap(),
            Parsed::Done(ProxyHeader::Proxied { source, .. }, n) if source == sa("[2001:db8::1]:1") && n == h.len()
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN whatever\r\n").unwrap(),
            Parsed::Done(ProxyHeader::Local, 24)
        );
    }

    #[test]
    fn v1_bounds_and_garbage() {
        for n in 0..20 {
            let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n";
            assert_eq!(parse(&h[..n]).unwrap(), Parsed::Incomplete, "{n}");
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(ProxyHeaderError::V1TooLong));
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 070 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 70000 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyHeaderError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b"POST /derp"), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(&[0x16, 3, 1]), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b"P").unwrap(), Parsed::Incomplete);
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v2_ipv4_ipv6_local_and_tlvs() {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb];
        body.extend_from_slice(&[0x04, 0, 1, 0xff]); // a TLV, ignored
        let mut h = v2(1, 0x11, &body);
        let n = h.len();
        h.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse(&h).unwrap(),
            Parsed::Done(
                ProxyHeader::Proxied {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:443")
                },
                n
            )
        );
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&"2001:db8::8".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&[0, 9, 1, 187]);
        let h = v2(1, 0x21, &body);
        assert!(matches!(
            parse(&h).unwrap(),
            Parsed::Done(ProxyHeader::Proxied { source, destination }, 52)
                if source == sa("[2001:db8::7]:9") && destination == sa("[2001:db8::8]:443")
        ));
        assert_eq!(
            parse(&v2(0, 0, &[])).unwrap(),
            Parsed::Done(ProxyHeader::Local, 16)
        );
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]).unwrap(), Parsed::Incomplete, "{n}");
        }
    }

    #[test]
    fn v2_bounds_and_garbage() {
        let mut h = v2(1, 0x11, &[]);
        h[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyHeaderError::V2TooLong(2000)));
        assert!(matches!(
            parse(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(&v2(1, 0x12, &[0; 12])),
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(&v2(5, 0x11, &[0; 12])),
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        assert!(matches!(
            parse(&bad_version),
            Err(ProxyHeaderError::Malformed(_))
        ));
    }

    #[test]
    fn signature_decides_early() {
        assert_eq!(signature(b""), Signature::Undecided);
        assert_eq!(signature(b"PRO"), Signature::Undecided);
        assert_eq!(signature(b"PROXY "), Signature::Present);
        assert_eq!(signature(b"PUT"), Signature::Absent);
        assert_eq!(signature(&V2_SIGNATURE[..5]), Signature::Undecided);
        assert_eq!(signature(&V2_SIGNATURE), Signature::Present);
        assert_eq!(signature(b"\r\n\r\nX"), Signature::Absent);
    }
}

//! Reading the PROXY protocol header right after TCP accept, before TLS and
//! HTTP, so the client address a TCP balancer passes on is the one the rate
//! limit, the pending limit, the bindings and the logs see.
//!
//! Only the balancers the operator names may send it, and they must: from one
//! of them a connection without a header is refused (otherwise the balancer's
//! address would stand in for every client), and from anyone else a
//! connection that starts with a header is refused (otherwise a client could
//! pick its own address). Other connections from anyone else are served as
//! direct clients. Bytes read past the header are handed on in
//! [`Prefixed`], so nothing the client sent with it is lost.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::Cidr;
use crate::protocol::proxy_header::{
    self, MAX_HEADER, Parsed, ProxyHeader, ProxyHeaderError, Signature,
};

/// Who may send the header.
#[derive(Debug, Default, Clone)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn new(list: Vec<Cidr>) -> Self {
        TrustedProxies(list)
    }

    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// Why a connection was refused before any HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ProxyRefusal {
    #[error("from trusted balancer {peer}: {why}")]
    Trusted {
        peer: SocketAddr,
        why: ProxyHeaderError,
    },
    #[error("PROXY header from {peer}, which is not a trusted balancer")]
    Forged { peer: SocketAddr },
    #[error("reading from {peer}: {source}")]
    Io { peer: SocketAddr, source: io::Error },
}

/// A TCP stream with the bytes read ahead of it (while looking for a header)
/// put back in front.
pub struct Prefixed {
    ahead: Vec<u8>,
    at: usize,
    tcp: TcpStream,
}

impl Prefixed {
    pub fn new(tcp: TcpStream) -> Self {
        Prefixed {
            ahead: Vec::new(),
            at: 0,
            tcp,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

/// Reads what the connection starts with and decides whose address it
/// carries: the header's client for a trusted balancer, the TCP peer
/// otherwise. The caller bounds the time it may take.
pub async fn accept(
    mut tcp: TcpStream,
    peer: SocketAddr,
    trusted: &TrustedProxies,
) -> Result<(Prefixed, SocketAddr), ProxyRefusal> {
    if !trusted.enabled() {
        return Ok((Prefixed::new(tcp), peer));
    }
    let io = |source| ProxyRefusal::Io { peer, source };
    let mut buf = Vec::new();
    if trusted.trusts(peer.ip()) {
        // Small first: a v1 line or a v2 header with TCP addresses fits, and
        // only a balancer that adds TLVs makes it grow (up to MAX_HEADER).
        buf.reserve(232);
        loop {
            match proxy_header::parse(&buf) {
                Ok(Parsed::Done(h, n)) => {
                    let client = match h {
                        ProxyHeader::Proxied { source, .. } => source,
                        ProxyHeader::Local => peer,
                    };
                    buf.drain(..n);
                    return Ok((with_ahead(tcp, buf), client));
                }
                Ok(Parsed::Incomplete) => {}
                Err(why) => return Err(ProxyRefusal::Trusted { peer, why }),
            }
            let room = MAX_HEADER.saturating_sub(buf.len()).max(1);
            buf.reserve(room.min(512));
            let n = (&mut tcp)
                .take(room as u64)
                .read_buf(&mut buf)
                .await
                .map_err(io)?;
            if n == 0 {
                return Err(ProxyRefusal::Trusted {
                    peer,
                    why: ProxyHeaderError::Missing,
                });
            }
        }
    }
    // Anyone else: look only as far as it takes to tell a header from TLS
    // or HTTP (one read, almost always).
    let mut first = [0u8; 16];
    let mut have = 0;
    loop {
        match proxy_header::signature(&first[..have]) {
            Signature::Present => return Err(ProxyRefusal::Forged { peer }),
            Signature::Absent => break,
            Signature::Undecided if have == first.len() => break,
            Signature::Undecided => {}
        }
        let n = tcp.read(&mut first[have..]).await.map_err(io)?;
        if n == 0 {
            break;
        }
        have += n;
    }
    buf.extend_from_slice(&first[..have]);
    Ok((with_ahead(tcp, buf), peer))
}

fn with_ahead(tcp: TcpStream, mut ahead: Vec<u8>) -> Prefixed {
    ahead.shrink_to_fit();
    Prefixed { ahead, at: 0, tcp }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.at < me.ahead.len() {
            let n = (me.ahead.len() - me.at).min(buf.remaining());
            buf.put_slice(&me.ahead[me.at..me.at + n]);
            me.at += n;
            if me.at == me.ahead.len() {
                // Gone for good: a long-lived connection keeps no copy.
                me.ahead = Vec::new();
                me.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

//! A DERP client over either transport, with or without TLS, for the tools that
//! talk to a relay from outside: `derp-bench` (load) and `derp-relay probe`
//! (does this deployment work end to end?).
//!
//! It lives in the library so both binaries share one implementation of the
//! upgrade, the handshake and frame reassembly, and so a failure can be told
//! apart precisely (TLS, an HTTP refusal such as 429, a key the relay refused)
//! rather than collapsing into "connection failed". The wire format itself stays
//! in [`crate::protocol`]; this module only adds sockets.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::{WebSocketStream, client_async};

use crate::protocol::PublicKey;
use crate::protocol::frame::{
    RawFrame, ServerFrame, bytes_needed, decode_frame, encode_client_info, server_frame_limit,
};
use crate::protocol::handshake::ClientSecret;

/// A frame-sized read: big enough that a full 64 KiB packet is one read.
const READ_CHUNK: usize = 64 << 10;
/// A relay that does not take a batch within this long is treated as stuck.
pub const WRITE_STALL: Duration = Duration::from_secs(10);
/// Response headers longer than this are not from a relay.
const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// How much of an error response body is kept for the message.
const MAX_ERROR_BODY: usize = 512;

/// Why talking to a relay failed, one variant per thing an operator would fix
/// differently.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("cannot resolve {host}: {why}")]
    Resolve { host: String, why: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("TLS handshake with {host} failed: {why}")]
    Tls { host: String, why: String },
    #[error("{}", describe_http_refusal(*.status, .reason, .retry_after.as_deref(), .body))]
    Http {
        status: u16,
        reason: String,
        retry_after: Option<String>,
        body: String,
    },
    #[error("WebSocket upgrade failed: {0}")]
    WebSocket(String),
    #[error("relay closed the connection before sending ServerKey")]
    ClosedBeforeServerKey,
    #[error(
        "relay closed the connection after ClientInfo without sending ServerInfo: \
         key {key} was refused (not in the allowed-keys file, --tofu-lock, or a bad handshake)"
    )]
    Refused { key: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("write stalled for {0:?}")]
    WriteStall(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn describe_http_refusal(
    status: u16,
    reason: &str,
    retry_after: Option<&str>,
    body: &str,
) -> String {
    let hint = match status {
        429 => " (rate limited: too many requests from this address)",
        503 => " (the relay is at its client cap or shutting down)",
        426 => " (the request did not arrive as an upgrade: a proxy dropped the Upgrade header?)",
        400 => " (bad upgrade request)",
        _ => "",
    };
    let mut s = format!("relay answered HTTP {status} {reason}{hint}");
    if let Some(r) = retry_after {
        s.push_str(&format!("; Retry-After: {r}"));
    }
    let body = body.trim();
    if !body.is_empty() {
        s.push_str(&format!("; body: {body:?}"));
    }
    s
}

/// A relay address: `http(s)://` means `Upgrade: DERP`, `ws(s)://` WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    pub websocket: bool,
    pub tls: bool,
    /// Host name or IP literal, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Path and query; `/derp` when the URL has none.
    pub path: String,
}

impl RelayUrl {
    /// Parses `http://`, `https://`, `ws://` or `wss://` URLs; the path
    /// defaults to `/derp` and the port to the scheme's.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let bad = |why: String| ClientError::Url {
            url: text.to_owned(),
            why,
        };
        let uri: http::Uri = text.trim().parse().map_err(|e| bad(format!("{e}")))?;
        let (websocket, tls) = match uri.scheme_str() {
            Some("http") => (false, false),
            Some("https") => (false, true),
            Some("ws") => (true, false),
            Some("wss") => (true, true),
            Some(other) => {
                return Err(bad(format!(
                    "scheme {other:?} is not one of http, https, ws, wss"
                )));
            }
            None => {
                return Err(bad(
                    "no scheme: use http://, https://, ws:// or wss://".into()
                ));
            }
        };
        let host = uri.host().ok_or_else(|| bad("no host".into()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => "/derp".to_owned(),
            Some(p) => p.to_owned(),
        };
        Ok(RelayUrl {
            websocket,
            tls,
            host,
            port,
            path,
        })
    }

    /// `host:port`, with brackets around an IPv6 literal.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }

    pub fn scheme(&self) -> &'static str {
        match (self.websocket, self.tls) {
            (false, false) => "http",
            (false, true) => "https",
            (true, false) => "ws",
            (true, true) => "wss",
        }
    }

    /// What the transport is called in messages.
    pub fn transport(&self) -> &'static str {
        if self.websocket {
            "WebSocket"
        } else {
            "Upgrade: DERP"
        }
    }
}

impl std::fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme(), self.authority(), self.path)
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn authority(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// How to reach the relay.
#[derive(Clone)]
pub struct ConnectOptions {
    /// Source address to bind (the load generator spreads clients over many
    /// loopback addresses so per-IP limits see many hosts).
    pub bind: Option<IpAddr>,
    /// TLS settings for https/wss; `None` uses the Mozilla roots.
    pub tls: Option<Arc<ClientConfig>>,
    /// Limit for each TCP connect attempt.
    pub connect_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            bind: None,
            tls: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// TLS client settings trusting the Mozilla root set plus `extra_roots`
/// (a private CA, or a test certificate). ALPN offers only HTTP/1.1: an
/// upgrade cannot happen over HTTP/2, and a terminator that negotiated h2
/// would never pass `Upgrade: DERP` through.
pub fn tls_config(extra_roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("CA certificate not usable: {e}"))?;
    }
    // An explicit provider: test builds also carry other rustls users, and the
    // process-wide default is ambiguous when more than one provider is compiled in.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads every certificate in a PEM file (for `--ca-file`).
pub fn load_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificates found", path.display()));
    }
    Ok(certs)
}

/// Resolves `host` and connects to the first address that answers. With
/// `bind`, only addresses of the same family are tried.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    opts: &ConnectOptions,
) -> Result<TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ClientError::Resolve {
                host: host.to_owned(),
                why: e.to_string(),
            })?
            .collect(),
    };
    let addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| opts.bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4()))
        .collect();
    let mut last = None;
    for addr in &addrs {
        match connect_one(*addr, opts).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Resolve {
        host: host.to_owned(),
        why: match opts.bind {
            Some(b) => format!("no address of the same family as the source address {b}"),
            None => "no addresses".into(),
        },
    }))
}

async fn connect_one(addr: SocketAddr, opts: &ConnectOptions) -> Result<TcpStream, ClientError> {
    let err = |source: io::Error| ClientError::Connect {
        addr: match opts.bind {
            Some(b) => format!("{addr} from {b}"),
            None => addr.to_string(),
        },
        source,
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    if let Some(src) = opts.bind {
        sock.bind(SocketAddr::new(src, 0)).map_err(err)?;
    }
    let stream = timeout(opts.connect_timeout, sock.connect(addr))
        .await
        .map_err(|_| ClientError::ConnectTimeout {
            addr: addr.to_string(),
            after: opts.connect_timeout,
        })?
        .map_err(err)?;
    stream.set_nodelay(true).map_err(err)?;
    Ok(stream)
}

/// A connection to the relay, TLS or not.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TCP connect, then TLS if `tls` (SNI and certificate check against `host`).
pub async fn connect_stream(
    host: &str,
    port: u16,
    tls: bool,
    opts: &ConnectOptions,
) -> Result<Conn, ClientError> {
    let tcp = connect_tcp(host, port, opts).await?;
    if !tls {
        return Ok(Conn::Plain(tcp));
    }
    let tls_err = |why: String| ClientError::Tls {
        host: authority(host, port),
        why,
    };
    let config = match &opts.tls {
        Some(c) => c.clone(),
        None => tls_config(&[]).map_err(tls_err)?,
    };
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| tls_err(format!("{host:?} is not a valid TLS server name: {e}")))?;
    let stream = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(e.to_string()))?;
    Ok(Conn::Tls(Box::new(stream)))
}

/// The parts of an HTTP response head the tools look at.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Option<usize> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Reads up to the end of the response head. Bytes after it stay in `buf`
/// (after a 101 they are already DERP frames).
pub async fn read_response_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<ResponseHead, ClientError> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ClientError::Protocol(format!(
                "HTTP response head longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return Err(if buf.is_empty() {
                ClientError::Protocol("relay closed the connection without an HTTP response".into())
            } else {
                ClientError::Protocol("relay closed the connection mid-response".into())
            });
        }
    };
    let head = buf.split_to(end);
    parse_response_head(&head)
}

/// Parses `HTTP/1.x CODE REASON` and the header lines.
pub fn parse_response_head(head: &[u8]) -> Result<ResponseHead, ClientError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/"), status) else {
        let shown: String = status_line.chars().take(80).collect();
        return Err(ClientError::Protocol(format!(
            "not an HTTP response: {shown:?}"
        )));
    };
    let reason = parts.next().unwrap_or_default().trim().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(ResponseHead {
        status,
        reason,
        headers,
    })
}

/// Turns a non-101 answer into [`ClientError::Http`], reading what is cheap of
/// the body (the relay's refusals are one short line).
async fn refusal<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
    head: ResponseHead,
) -> ClientError {
    let want = head
        .content_length()
        .unwrap_or(buf.len())
        .min(MAX_ERROR_BODY);
    while buf.len() < want {
        match timeout(Duration::from_secs(1), stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    let body = String::from_utf8_lossy(&buf[..buf.len().min(want)]).into_owned();
    ClientError::Http {
        status: head.status,
        retry_after: head.header("retry-after").map(str::to_owned),
        reason: head.reason,
        body,
    }
}

type WsStream = WebSocketStream<Conn>;

enum ReadSide {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
    Ws(SplitStream<WsStream>),
}

/// Reads DERP frames from either transport. WebSocket messages are only a
/// carrier: a frame may span messages, so every transport reassembles in `buf`.
pub struct FrameReader {
    side: ReadSide,
    buf: BytesMut,
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

fn ws_io_error(e: tokio_tungstenite::tungstenite::Error) -> ClientError {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => ClientError::Io(e),
        E::ConnectionClosed | E::AlreadyClosed => ClientError::Io(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "WebSocket closed",
        )),
        // A relay refusing a key just drops the connection, with no close frame.
        E::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => ClientError::Io(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection closed without a WebSocket close frame",
        )),
        other => ClientError::WebSocket(other.to_string()),
    }
}

enum WriteSide {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
    Ws(SplitSink<WsStream, Message>),
}

/// Writes batches of encoded frames.
pub struct FrameWriter(WriteSide);

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

/// Connects (TCP, TLS if asked) and performs the HTTP upgrade the URL names,
/// leaving a frame stream on which the relay is about to send ServerKey.
pub async fn open(
    url: &RelayUrl,
    opts: &ConnectOptions,
) -> Result<(FrameReader, FrameWriter), ClientError> {
    let conn = connect_stream(&url.host, url.port, url.tls, opts).await?;
    if url.websocket {
        websocket_upgrade(conn, url).await
    } else {
        derp_upgrade(conn, url).await
    }
}

async fn derp_upgrade(
    mut conn: Conn,
    url: &RelayUrl,
) -> Result<(FrameReader, FrameWriter), ClientError> {
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
        url.path,
        url.authority()
    );
    conn.write_all(req.as_bytes()).await?;
    conn.flush().await?;
    let mut buf = BytesMut::with_capacity(4096);
    let head = read_response_head(&mut conn, &mut buf).await?;
    if head.status != 101 {
        return Err(refusal(&mut conn, buf, head).await);
    }
    // Bytes after the head are already DERP frames: `buf` carries them over.
    Ok(match conn {
        Conn::Plain(tcp) => {
            let (rd, wr) = tcp.into_split();
            (
                FrameReader {
                    side: ReadSide::Tcp(rd),
                    buf,
                },
                FrameWriter(WriteSide::Tcp(wr)),
            )
        }
        Conn::Tls(tls) => {
            let (rd, wr) = tokio::io::split(*tls);
            (
                FrameReader {
                    side: ReadSide::Tls(rd),
                    buf,
                },
                FrameWriter(WriteSide::Tls(wr)),
            )
        }
    })
}

async fn websocket_upgrade(
    conn: Conn,
    url: &RelayUrl,
) -> Result<(FrameReader, FrameWriter), ClientError> {
    let mut req = url
        .to_string()
        .into_client_request()
        .map_err(|e| ClientError::WebSocket(e.to_string()))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        http::HeaderValue::from_static("derp"),
    );
    let (ws, _) = client_async(req, conn).await.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(MAX_ERROR_BODY)]).into_owned())
                .unwrap_or_default();
            ClientError::Http {
                status: resp.status().as_u16(),
                reason: resp
                    .status()
                    .canonical_reason()
                    .unwrap_or_default()
                    .to_owned(),
                retry_after: resp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body,
            }
        }
        other => ws_io_error(other),
    })?;
    let (w, r) = ws.split();
    Ok((
        FrameReader {
            side: ReadSide::Ws(r),
            buf: BytesMut::new(),
        },
        FrameWriter(WriteSide::Ws(w)),
    ))
}

/// What the relay said in the handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub server_key: PublicKey,
    /// The opened ServerInfo JSON (`{"version":2}` and optional rate limits).
    pub server_info: Value,
}

impl Handshake {
    /// The receive rate limit the relay advertised, in bytes per second.
    pub fn rate_limit(&self) -> Option<u64> {
        self.server_info
            .get("tokenBucketBytesPerSecond")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
    }
}

/// The DERP handshake on an open frame stream: read ServerKey, send a sealed
/// ClientInfo carrying `info_json`, open ServerInfo. A relay that refuses the
/// key closes the connection instead of answering, which is reported as
/// [`ClientError::Refused`].
pub async fn handshake(
    rd: &mut FrameReader,
    wr: &mut FrameWriter,
    secret: &ClientSecret,
    info_json: &[u8],
) -> Result<Handshake, ClientError> {
    let frame = match rd.next_frame().await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(ClientError::ClosedBeforeServerKey),
        Err(e) if is_reset(&e) => return Err(ClientError::ClosedBeforeServerKey),
        Err(e) => return Err(e),
    };
    let server_key = match ServerFrame::parse(frame) {
        Ok(ServerFrame::ServerKey(k)) => k,
        Ok(other) => {
            return Err(ClientError::Protocol(format!(
                "relay's first frame is {other:?}, not ServerKey"
            )));
        }
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    };
    let mut buf = BytesMut::new();
    encode_client_info(&mut buf, &secret.seal_client_info(&server_key, info_json));
    wr.send(&mut buf).await?;
    let refused = || ClientError::Refused {
        key: secret.public().to_nodekey_hex(),
    };
    let frame = match rd.next_frame().await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(refused()),
        Err(e) if is_reset(&e) => return Err(refused()),
        Err(e) => return Err(e),
    };
    let sealed = match ServerFrame::parse(frame) {
        Ok(ServerFrame::ServerInfo(p)) => p,
        Ok(other) => {
            return Err(ClientError::Protocol(format!(
                "relay's second frame is {other:?}, not ServerInfo"
            )));
        }
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    };
    let server_info = secret
        .open_server_info(&server_key, &sealed)
        .map_err(|e| ClientError::Protocol(format!("ServerInfo: {e}")))?;
    Ok(Handshake {
        server_key,
        server_info,
    })
}

/// A closing peer sometimes shows up as a reset rather than a clean EOF.
fn is_reset(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(io) if matches!(
        io.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    ))
}

/// A connected, handshaken client.
pub struct Client {
    pub rd: FrameReader,
    pub wr: FrameWriter,
    pub key: PublicKey,
    pub handshake: Handshake,
}

/// [`open`] then [`handshake`] with a minimal ClientInfo.
pub async fn connect(
    url: &RelayUrl,
    opts: &ConnectOptions,
    secret: &ClientSecret,
) -> Result<Client, ClientError> {
    let (mut rd, mut wr) = open(url, opts).await?;
    let handshake = handshake(&mut rd, &mut wr, secret, br#"{"version":2}"#).await?;
    Ok(Client {
        rd,
        wr,
        key: secret.public(),
        handshake,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_default_path_and_port() {
        let u = RelayUrl::parse("https://derp.example.com").unwrap();
        assert_eq!((u.tls, u.websocket, u.port), (true, false, 443));
        assert_eq!(u.path, "/derp");
        assert_eq!(u.to_string(), "https://derp.example.com:443/derp");
        let u = RelayUrl::parse("ws://127.0.0.1:8443/derp").unwrap();
        assert_eq!((u.tls, u.websocket, u.port), (false, true, 8443));
        let u = RelayUrl::parse("wss://[::1]:9/x").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.authority(), "[::1]:9");
        assert_eq!(u.path, "/x");
        assert!(RelayUrl::parse("ftp://x").is_err());
        assert!(RelayUrl::parse("derp.example.com").is_err());
    }

    #[test]
    fn response_heads_parse_and_refusals_read_well() {
        let h = parse_response_head(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\ncontent-length: 5\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.status, 429);
        assert_eq!(h.header("retry-after"), Some("1"));
        assert_eq!(h.content_length(), Some(5));
        assert!(parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let msg = describe_http_refusal(429, "Too Many Requests", Some("1"), "slow down\n");
        assert!(
            msg.contains("429") && msg.contains("rate limited") && msg.contains("Retry-After: 1")
        );
    }
}

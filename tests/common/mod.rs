//! Test harness: a real relay on 127.0.0.1:0, and clients over both transports.
//!
//! Data-path clients are Tailscale's own `ts_derp` client (with `ts_keys` key
//! pairs); the upgrade is done by `ts_http_util`, the same code `ts_derp` uses
//! in production. Frame-level tests (malformed input, PeerGone, Ping/Pong) use a
//! raw client built on our `protocol` module over the same transports.
//! Every client binds its own 127.x.y.z source address so per-IP limits on the
//! server see distinct peers.
#![allow(dead_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use derp_relay::Relay;
use derp_relay::config::Config;
use derp_relay::protocol::PublicKey;
use derp_relay::protocol::frame::{self, ServerFrame};
use derp_relay::protocol::handshake::ClientSecret;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use ts_http_util::Client as _;
use ts_keys::NodeKeyPair;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestRelay {
    pub relay: Option<Relay>,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl TestRelay {
    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("relay running")
    }

    pub async fn shutdown(&mut self) -> usize {
        self.relay.take().expect("relay running").shutdown().await
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.shared.draining.store(true, Ordering::SeqCst);
            // Stopping the tree closes every connection; the runtime's end does the rest.
            tokio::spawn(async move {
                r.shutdown().await;
            });
        }
    }
}

pub fn test_config() -> Config {
    Config {
        addr: "127.0.0.1:0".into(),
        // Many relays run at once: each gets its own ephemeral STUN port, never 3478.
        stun_addr: "127.0.0.1:0".into(),
        open_relay: true,
        ..Config::default()
    }
}

pub async fn start_relay(tweak: impl FnOnce(&mut Config)) -> TestRelay {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config();
    config.data_dir = dir.path().to_path_buf();
    tweak(&mut config);
    let relay = Relay::start(config).await.expect("relay starts");
    let addr = relay.local_addr();
    TestRelay {
        relay: Some(relay),
        addr,
        _dir: dir,
    }
}

/// A fresh loopback source address per call: 127.0.x.y, never 127.0.0.1.
pub fn next_source_ip() -> IpAddr {
    static N: AtomicU32 = AtomicU32::new(256);
    let n = N.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(
        127,
        (n >> 16) as u8 % 254 + 1,
        (n >> 8) as u8,
        n as u8,
    ))
}

pub async fn tcp_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    let stream = s.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// HTTP/1.1 `Upgrade: DERP` exactly as `ts_derp` does it (via `ts_http_util`).
pub async fn derp_upgrade(addr: SocketAddr) -> io::Result<ts_http_util::Upgraded> {
    derp_upgrade_from(addr, next_source_ip()).await
}

/// [`derp_upgrade`] from a chosen source address (for tests that need two
/// connections from one client address).
pub async fn derp_upgrade_from(
    addr: SocketAddr,
    src: IpAddr,
) -> io::Result<ts_http_util::Upgraded> {
    let tcp = tcp_from(src, addr).await?;
    let url = url::Url::parse(&format!("http://{addr}/derp")).map_err(io::Error::other)?;
    let http = ts_http_util::http1::connect::<ts_http_util::EmptyBody>(tcp)
        .await
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
    let req = ts_http_util::make_upgrade_req(&url, "DERP", None)
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
    let resp = http
        .send(req)
        .await
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
    if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(io::Error::other(format!(
            "upgrade refused: {}",
            resp.status()
        )));
    }
    ts_http_util::do_upgrade(resp)
        .await
        .map_err(io::Error::other)
}

/// A WebSocket (`derp` subprotocol) as a byte stream: each write is one binary
/// message, reads flatten messages. This is the adapter that lets `ts_derp`
/// run over WebSocket.
pub struct WsIo<S = TcpStream> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

pub async fn ws_connect(addr: SocketAddr) -> io::Result<WsIo> {
    let tcp = tcp_from(next_source_ip(), addr).await?;
    ws_over(tcp, &format!("ws://{addr}/derp"), &addr.to_string()).await
}

/// The WebSocket upgrade (`derp` subprotocol) over a stream the caller
/// opened: TCP, or TLS for `wss://`.
pub async fn ws_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    url: &str,
    host: &str,
) -> io::Result<WsIo<S>> {
    let tcp = stream;
    let req = http::Request::builder()
        .uri(url)
        .header("Host", host)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .header("Sec-WebSocket-Protocol", "derp")
        .body(())
        .map_err(io::Error::other)?;
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .map_err(io::Error::other)?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.as_bytes().to_vec());
    if proto.as_deref() != Some(b"derp") {
        return Err(io::Error::other("server did not select subprotocol derp"));
    }
    Ok(WsIo {
        ws,
        pending: Bytes::new(),
    })
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// The next WebSocket close frame's code, skipping data (for shutdown tests).
    pub async fn close_code(&mut self) -> Option<u16> {
        use futures_util::StreamExt;
        while let Some(m) = self.ws.next().await {
            if let Ok(Message::Close(c)) = m {
                return c.map(|c| c.code.into());
            }
            if m.is_err() {
                return None;
            }
        }
        None
    }

    pub fn inner(&mut self) -> &mut WebSocketStream<S> {
        &mut self.ws
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io::Error::other)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Derp,
    Ws,
}

pub const BOTH: [Via; 2] = [Via::Derp, Via::Ws];

pub type BoxIo = Box<dyn AsyncReadWrite>;
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

pub async fn connect_io(addr: SocketAddr, via: Via) -> io::Result<BoxIo> {
    Ok(match via {
        Via::Derp => Box::new(derp_upgrade(addr).await?),
        Via::Ws => Box::new(ws_connect(addr).await?),
    })
}

pub fn public(kp: &NodeKeyPair) -> PublicKey {
    PublicKey(*kp.public.to_crypto_box().as_bytes())
}

/// Tailscale's client, connected and handshaken over `via`.
pub async fn ts_client(addr: SocketAddr, via: Via, kp: &NodeKeyPair) -> ts_derp::Client<BoxIo> {
    let io = connect_io(addr, via).await.expect("connect");
    tokio::time::timeout(WAIT, ts_derp::Client::handshake(io, kp))
        .await
        .expect("handshake in time")
        .expect("handshake succeeds")
}

pub async fn recv_ts(c: &ts_derp::Client<BoxIo>) -> (PublicKey, Vec<u8>) {
    let (k, p) = tokio::time::timeout(WAIT, c.recv_one())
        .await
        .expect("packet in time")
        .expect("recv");
    (
        PublicKey(*k.to_crypto_box().as_bytes()),
        p.as_ref().to_vec(),
    )
}

/// A frame-level client built on our protocol module.
pub struct RawClient {
    pub io: BoxIo,
    pub buf: BytesMut,
    pub secret: ClientSecret,
    pub server: PublicKey,
}

impl RawClient {
    pub fn key(&self) -> PublicKey {
        self.secret.public()
    }

    /// Connects and reads ServerKey, without sending ClientInfo.
    pub async fn start(addr: SocketAddr, via: Via) -> RawClient {
        let io = connect_io(addr, via).await.expect("connect");
        let mut c = RawClient {
            io,
            buf: BytesMut::new(),
            secret: ClientSecret::generate(),
            server: PublicKey([0; 32]),
        };
        match c.recv().await {
            Some(ServerFrame::ServerKey(k)) => c.server = k,
            other => panic!("expected ServerKey, got {other:?}"),
        }
        c
    }

    pub async fn connect(addr: SocketAddr, via: Via) -> RawClient {
        let mut c = Self::start(addr, via).await;
        let sealed = c
            .secret
            .seal_client_info(&c.server, br#"{"version":2,"CanAckPings":true}"#);
        let mut out = BytesMut::new();
        frame::encode_client_info(&mut out, &sealed);
        c.send_raw(&out).await.expect("send ClientInfo");
        match c.recv().await {
            Some(ServerFrame::ServerInfo(p)) => {
                c.secret
                    .open_server_info(&c.server, &p)
                    .expect("ServerInfo opens");
            }
            other => panic!("expected ServerInfo, got {other:?}"),
        }
        c
    }

    pub async fn send_raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.io.write_all(b).await?;
        self.io.flush().await
    }

    pub async fn send_packet(&mut self, dst: &PublicKey, data: &[u8]) {
        let mut out = BytesMut::new();
        frame::encode_send_packet(&mut out, dst, data);
        self.send_raw(&out).await.expect("send");
    }

    /// Next frame, or None at end of stream or error. Panics after [`WAIT`].
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        tokio::time::timeout(WAIT, self.recv_inner())
            .await
            .expect("frame or close in time")
    }

    async fn recv_inner(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some(f) =
                frame::decode_frame(&mut self.buf, frame::server_frame_limit).expect("valid frame")
            {
                return Some(ServerFrame::parse(f).expect("parses"));
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Next frame that is not a KeepAlive.
    pub async fn recv_skip_keepalive(&mut self) -> Option<ServerFrame> {
        loop {
            match self.recv().await {
                Some(ServerFrame::KeepAlive) => continue,
                other => return other,
            }
        }
    }

    /// True if the server closes the connection (rather than sending anything
    /// but KeepAlives) within [`WAIT`].
    pub async fn closed(&mut self) -> bool {
        self.recv_skip_keepalive().await.is_none()
    }
}

/// Polls `cond` until it holds or [`WAIT`] passes.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn dropped(relay: &Relay, reason: derp_relay::metrics::DropReason) -> u64 {
    relay.metrics().dropped(reason).get()
}

pub fn refused(relay: &Relay, reason: derp_relay::metrics::RefuseReason) -> u64 {
    relay.metrics().refused_count(reason)
}

/// Like [`ts_client`], but returns the handshake error (e.g. refused by the ACL).
pub async fn try_ts_client(
    addr: SocketAddr,
    via: Via,
    kp: &NodeKeyPair,
) -> Result<ts_derp::Client<BoxIo>, String> {
    let io = connect_io(addr, via).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(WAIT, ts_derp::Client::handshake(io, kp)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// Base64 form of a ts_keys key pair's public key, as the ACL file wants it.
pub fn b64(kp: &NodeKeyPair) -> String {
    public(kp).to_base64()
}

/// Writes an allowed-keys file atomically (temp + rename), as a careful editor does.
pub fn write_keys(path: &std::path::Path, keys: &[&NodeKeyPair]) {
    let text: String = keys.iter().map(|k| format!("{}\n", b64(k))).collect();
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Crashes a long-lived actor through its test hook and waits until the
/// supervisor has started a new one.
pub async fn crash_and_await_restart<M: ractor::Message>(
    what: &str,
    current: impl Fn() -> Option<ractor::ActorRef<M>>,
    crash: M,
) {
    let first = current().expect("actor running");
    first.cast(crash).expect("crash message delivered");
    let first = first.get_id();
    eventually(what, || current().is_some_and(|r| r.get_id() != first)).await;
}

/// Sends one raw HTTP/1.1 request from `src` and reads the whole response
/// (the request should say `Connection: close`).
pub async fn http_exchange(addr: SocketAddr, src: IpAddr, request: &str) -> String {
    let mut s = tcp_from(src, addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("send request");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read response");
    String::from_utf8_lossy(&out).into_owned()
}

/// Kills the relay if the test fails before it does.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the relay's log until it says where it listens.
pub fn read_listen_addr(stderr: std::process::ChildStderr) -> std::net::SocketAddr {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in lines.by_ref().map_while(Result::ok) {
            if !sent && let Some(i) = line.find("addr=") {
                let rest = &line[i + 5..];
                let end = rest.find(' ').unwrap_or(rest.len());
                if let Ok(a) = rest[..end].parse() {
                    let _ = tx.send(a);
                    sent = true;
                }
            }
        }
    });
    rx.recv_timeout(WAIT)
        .expect("relay printed its listen address")
}

/// A WebSocket client that has completed the DERP handshake and then reads nothing.
pub async fn ws_connect_handshaken(addr: SocketAddr) -> WsIo {
    let mut ws = ws_connect(addr).await.unwrap();
    let mut hdr = [0u8; 45];
    ws.read_exact(&mut hdr).await.unwrap();
    let server = derp_relay::protocol::PublicKey(hdr[13..45].try_into().unwrap());
    let secret = derp_relay::protocol::handshake::ClientSecret::generate();
    let mut out = bytes::BytesMut::new();
    derp_relay::protocol::frame::encode_client_info(
        &mut out,
        &secret.seal_client_info(&server, b"{}"),
    );
    ws.write_all(&out).await.unwrap();
    ws.flush().await.unwrap();
    ws
}

/// A masked client WebSocket frame as RFC 6455 lays it out (for tests that
/// send what libraries do not: fragments, pings between them, bad frames).
pub fn ws_client_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, mask: [u8; 4], payload: &[u8]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

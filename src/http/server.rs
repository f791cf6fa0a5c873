//! The accept loop. We own it (rather than `warp::serve`) because this is where
//! the header read timeout, the per-address rate limit and the per-address
//! bound on unauthenticated connections apply to every request before routing,
//! where running out of descriptors is handled, and where "stop accepting"
//! happens on shutdown. It is also where a connection becomes HTTP: the
//! PROXY protocol header (from a trusted balancer) and the TLS handshake come
//! first, inside the same header timeout and pending limit as the request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout_at;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tower_service::Service;
use warp::reply::Response;

use super::PeerAddr;
use super::client_addr::{ClientIpSource, FrontGate, PendingCell, PendingLimit, bucket};
use super::proxy_protocol::{self, Prefixed, ProxyRefusal, TrustedProxies};
use super::rate_limit::{IpRateLimit, SWEEP_EVERY};
use crate::conn::ConnDeps;
use crate::reasons::RefuseReason;
use crate::state::Shared;
use crate::stream::ReadAhead;

/// Largest HTTP request head we buffer. A DERP upgrade's head is a few hundred
/// bytes; hyper's default (about 400 KiB) would let each stranger hold that much.
const MAX_REQUEST_HEAD: usize = 16 << 10;
/// At most one "out of descriptors" log line per this long.
const EMFILE_LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener and what it serves.
pub struct Front {
    pub listener: TcpListener,
    /// TLS on this listener, with the certificate slot behind it.
    pub tls: Option<TlsAcceptor>,
    pub role: Role,
}

/// What a listener answers.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// `/derp` and every other endpoint.
    Relay,
    /// The plain-HTTP port: `/generate_204` answered (captive-portal checks,
    /// `CanPort80`), everything else redirected to https on this port.
    Port80 { https_port: u16 },
}

pub async fn serve(front: Front, deps: Arc<ConnDeps>, stop: watch::Receiver<bool>) {
    let cfg = &deps.state.config;
    let source = ClientIpSource::choose(
        cfg.trust_proxy,
        cfg.client_ip_header.as_deref(),
        ClientIpSource::on_fly(),
    );
    let gate = Arc::new(FrontGate {
        source,
        pending: PendingLimit::new(cfg.max_pending_per_ip, cfg.ipv6_prefix),
    });
    match front.role {
        Role::Relay => {
            tracing::info!(client_address = %gate.source.describe(), "client address source");
            let routes = super::routes::routes(deps.clone(), gate.clone());
            accept_loop(front, warp::service(routes), deps, gate, stop).await
        }
        Role::Port80 { https_port } => {
            let svc = super::port80::Port80 { https_port };
            accept_loop(front, svc, deps, gate, stop).await
        }
    }
}

async fn accept_loop<S>(
    front: Front,
    svc: S,
    deps: Arc<ConnDeps>,
    gate: Arc<FrontGate>,
    mut stop: watch::Receiver<bool>,
) where
    S: Service<hyper::Request<hyper::body::Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let Front { listener, tls, .. } = front;
    let shared = deps.state.clone();
    let cfg = &shared.config;
    let live = shared.live();
    let limit = Arc::new(IpRateLimit::new(live.rate_limit, live.rate_burst));
    let sweeper = {
        let limit = limit.clone();
        // SIGHUP reload: the rate limit follows the live settings.
        let mut live = shared.watch_live();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = t.tick() => limit.sweep(),
                    changed = live.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let l = live.borrow_and_update().clone();
                        limit.reconfigure(l.rate_limit, l.rate_burst);
                    }
                }
            }
        })
    };
    // Validated at start; an empty list turns the PROXY protocol off.
    let trusted = Arc::new(TrustedProxies::new(
        cfg.trusted_proxies().unwrap_or_default(),
    ));
    let conn_cfg = ConnSettings {
        v6_prefix: cfg.ipv6_prefix,
        header_timeout: cfg.header_timeout,
    };
    let mut spare = SpareFd::open();
    let mut emfile = EmfileLog::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) if is_out_of_descriptors(&e) => {
                    emfile.note(&shared);
                    // Give the waiting client an answer instead of leaving it
                    // in the backlog: free the spare descriptor, accept, say
                    // 503, close, and take the spare back.
                    spare.release();
                    if let Ok((s, _)) = listener.accept().await {
                        refuse_raw(s, "503 Service Unavailable", "relay is out of file descriptors\n").await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    spare = SpareFd::open();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Without a trusted proxy the TCP peer is the client: it is counted as
        // pending from its first byte, so connections that never send a
        // request (or never start TLS) count too. Taken here, in accept
        // order, not in the connection's task. A balancer's client is known
        // only from its PROXY header; behind an HTTP proxy, only from the request.
        let mut cell = PendingCell::default();
        if gate.source == ClientIpSource::Peer && !trusted.trusts(peer.ip()) {
            match gate.pending.try_acquire(peer.ip()) {
                Some(g) => cell = PendingCell::new(g),
                None => {
                    shared.metrics.refused(RefuseReason::PendingLimit);
                    if tls.is_none() {
                        tokio::spawn(refuse_raw(
                            stream,
                            "429 Too Many Requests",
                            "too many unauthenticated connections from your address\n",
                        ));
                    }
                    continue;
                }
            }
        }
        let conn = Accepted {
            svc: svc.clone(),
            limit: limit.clone(),
            shared: shared.clone(),
            gate: gate.clone(),
            trusted: trusted.clone(),
            tls: tls.clone(),
            cfg: conn_cfg,
        };
        tokio::spawn(conn.run(stream, peer, cell));
    }
    sweeper.abort();
    tracing::info!("stopped accepting connections");
}

#[derive(Clone, Copy)]
struct ConnSettings {
    v6_prefix: u8,
    header_timeout: Duration,
}

/// One accepted TCP connection and what it is checked against.
struct Accepted<S> {
    svc: S,
    limit: Arc<IpRateLimit>,
    shared: Arc<Shared>,
    gate: Arc<FrontGate>,
    trusted: Arc<TrustedProxies>,
    tls: Option<TlsAcceptor>,
    cfg: ConnSettings,
}

impl<S> Accepted<S>
where
    S: Service<hyper::Request<hyper::body::Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    /// PROXY header, pending slot, TLS, then HTTP. One deadline, the header
    /// timeout from accept, covers the PROXY header, the TLS handshake and
    /// the first request head: a stranger who stalls at any step is cut off
    /// as one who stalls in HTTP is.
    async fn run(self, stream: TcpStream, peer: SocketAddr, mut cell: PendingCell) {
        let deadline = tokio::time::Instant::now() + self.cfg.header_timeout;
        let metrics = &self.shared.metrics;
        let from_balancer = self.trusted.trusts(peer.ip());
        let (io, client) = match timeout_at(
            deadline,
            proxy_protocol::accept(stream, peer, &self.trusted),
        )
        .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                if !matches!(e, ProxyRefusal::Io { .. }) {
                    metrics.refused(RefuseReason::ProxyProtocol);
                }
                tracing::debug!(error = %e, "connection refused before HTTP");
                return;
            }
            Err(_) => {
                metrics.refused(RefuseReason::ProxyProtocol);
                tracing::debug!(%peer, "no PROXY header within the header timeout");
                return;
            }
        };
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        if from_balancer && self.gate.source == ClientIpSource::Peer {
            match self.gate.pending.try_acquire(client.ip()) {
                Some(g) => cell = PendingCell::new(g),
                None => return self.refuse_pending(io).await,
            }
        }
        let io = match &self.tls {
            None => Either::Left(io),
            // rustls reads the socket 4 KiB at a time; on a busy connection
            // ReadAhead turns that into one large read per many records, and
            // an idle one holds no buffer.
            Some(acceptor) => match timeout_at(deadline, acceptor.accept(ReadAhead::new(io))).await
            {
                Ok(Ok(s)) => Either::Right(Box::new(s)),
                Ok(Err(e)) => {
                    metrics.refused(RefuseReason::Tls);
                    tracing::debug!(%client, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.refused(RefuseReason::Tls);
                    tracing::debug!(%client, "TLS handshake not done within the header timeout");
                    return;
                }
            },
        };
        let head_timeout = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(1));
        self.serve_http(io, client, cell, head_timeout).await;
    }

    async fn refuse_pending<W: AsyncWrite + Unpin>(&self, io: W) {
        self.shared.metrics.refused(RefuseReason::PendingLimit);
        // Plain text would only confuse a TLS client: it just sees the close.
        if self.tls.is_none() {
            refuse_raw(
                io,
                "429 Too Many Requests",
                "too many unauthenticated connections from your address\n",
            )
            .await;
        }
    }

    async fn serve_http(
        self,
        io: FrontIo,
        client: SocketAddr,
        cell: PendingCell,
        head_timeout: Duration,
    ) {
        let Accepted {
            svc,
            limit,
            shared,
            gate,
            cfg,
            ..
        } = self;
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let ip = gate.source.client_ip(client.ip(), req.headers());
                // Mesh peers reconnect on their own backoff; a region's
                // links must not be rate limited into a partition.
                let limited = if shared.clients.remote.is_peer_ip(&ip) {
                    None
                } else {
                    limit.check(bucket(ip, cfg.v6_prefix)).err()
                };
                if limited.is_some() {
                    shared.metrics.refused(RefuseReason::RateLimit);
                }
                req.extensions_mut()
                    .insert(PeerAddr(SocketAddr::new(ip, client.port())));
                req.extensions_mut().insert(cell.clone());
                let mut s = svc.clone();
                let routed = limited.is_none().then(|| s.call(req));
                async move {
                    match (routed, limited) {
                        (Some(fut), _) => fut.await,
                        (None, wait) => {
                            Ok(too_many_requests(wait.unwrap_or(Duration::from_secs(1))))
                        }
                    }
                }
            });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            .max_buf_size(MAX_REQUEST_HEAD)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!(%client, error = %e, "http connection ended with error");
        }
    }
}

/// A served connection: plain or TLS, over the (possibly prefixed) TCP stream.
type FrontIo = Either<Prefixed, Box<tokio_rustls::server::TlsStream<ReadAhead<Prefixed>>>>;

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// One descriptor held back so that, when the process runs out, a waiting
/// client can still be accepted and told so.
struct SpareFd(Option<std::fs::File>);

impl SpareFd {
    fn open() -> Self {
        SpareFd(std::fs::File::open("/dev/null").ok())
    }

    fn release(&mut self) {
        self.0 = None;
    }
}

#[derive(Default)]
struct EmfileLog {
    last: Option<Instant>,
    since: u64,
}

impl EmfileLog {
    fn note(&mut self, shared: &Shared) {
        shared.metrics.refused(RefuseReason::Descriptors);
        self.since += 1;
        if self.last.is_none_or(|t| t.elapsed() >= EMFILE_LOG_EVERY) {
            let limit = crate::limits::nofile_limit().map_or("unknown".into(), |l| l.to_string());
            tracing::error!(
                refused = self.since,
                nofile_limit = %limit,
                "out of file descriptors: refusing new connections with 503; raise the open-files limit (ulimit -n, LimitNOFILE) or lower --max-clients"
            );
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// Answers a connection we will not serve with a minimal HTTP response, then closes it.
async fn refuse_raw<W: AsyncWrite + Unpin>(mut s: W, status: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = s.write_all(msg.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await;
}

fn too_many_requests(wait: Duration) -> Response {
    let mut r = super::reply::text(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests from your address\n",
    );
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

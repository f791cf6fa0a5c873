//! The accept loop. We own it (rather than `warp::serve`) because this is where
//! the header read timeout, the per-address rate limit and the per-address
//! bound on unauthenticated connections apply to every request before routing,
//! where running out of descriptors is handled, and where "stop accepting"
//! happens on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_service::Service;

use super::PeerAddr;
use super::client_addr::{ClientIpSource, FrontGate, PendingCell, PendingLimit, bucket};
use super::rate_limit::{IpRateLimit, SWEEP_EVERY};
use crate::conn::ConnDeps;
use crate::reasons::RefuseReason;
use crate::state::Shared;

/// Largest HTTP request head we buffer. A DERP upgrade's head is a few hundred
/// bytes; hyper's default (about 400 KiB) would let each stranger hold that much.
const MAX_REQUEST_HEAD: usize = 16 << 10;
/// At most one "out of descriptors" log line per this long.
const EMFILE_LOG_EVERY: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, deps: Arc<ConnDeps>, mut stop: watch::Receiver<bool>) {
    let shared = deps.state.clone();
    let cfg = &shared.config;
    let source = ClientIpSource::choose(
        cfg.trust_proxy,
        cfg.client_ip_header.as_deref(),
        ClientIpSource::on_fly(),
    );
    tracing::info!(client_address = %source.describe(), "client address source");
    let gate = Arc::new(FrontGate {
        source,
        pending: PendingLimit::new(cfg.max_pending_per_ip, cfg.ipv6_prefix),
    });
    let routes = super::routes::routes(deps.clone(), gate.clone());
    let svc = warp::service(routes);
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
    let v6_prefix = cfg.ipv6_prefix;
    let header_timeout = cfg.header_timeout;
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
        // pending from its first byte, so connections that never send a request
        // count too. Behind a proxy the client is known only from the request.
        let cell = if gate.source == ClientIpSource::Peer {
            match gate.pending.try_acquire(peer.ip()) {
                Some(g) => PendingCell::new(g),
                None => {
                    shared.metrics.refused(RefuseReason::PendingLimit);
                    tokio::spawn(refuse_raw(
                        stream,
                        "429 Too Many Requests",
                        "too many unauthenticated connections from your address\n",
                    ));
                    continue;
                }
            }
        } else {
            PendingCell::default()
        };
        let svc = svc.clone();
        let limit = limit.clone();
        let shared = shared.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let ip = gate.source.client_ip(peer.ip(), req.headers());
                    // Mesh peers reconnect on their own backoff; a region's
                    // links must not be rate limited into a partition.
                    let limited = if shared.clients.remote.is_peer_ip(&ip) {
                        None
                    } else {
                        limit.check(bucket(ip, v6_prefix)).err()
                    };
                    if limited.is_some() {
                        shared.metrics.refused(RefuseReason::RateLimit);
                    }
                    req.extensions_mut()
                        .insert(PeerAddr(SocketAddr::new(ip, peer.port())));
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
                },
            );
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "http connection ended with error");
            }
        });
    }
    sweeper.abort();
    tracing::info!("stopped accepting connections");
}

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
async fn refuse_raw(mut s: TcpStream, status: &str, body: &str) {
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

fn too_many_requests(wait: Duration) -> warp::reply::Response {
    let mut r = super::reply::text(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests from your address\n",
    );
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

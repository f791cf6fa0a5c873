//! The accept loop. We own it (rather than `warp::serve`) because this is where
//! the header read timeout and the per-address rate limit apply to every
//! request before routing, and where "stop accepting" happens on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_service::Service;

use super::PeerAddr;
use super::rate_limit::{IpRateLimit, SWEEP_EVERY, client_ip};
use crate::metrics::RefuseReason;
use crate::relay::Shared;

/// A client must finish sending its request headers within this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let routes = super::routes::routes(shared.clone());
    let svc = warp::service(routes);
    let limit = Arc::new(IpRateLimit::new(
        shared.config.rate_limit,
        shared.config.rate_burst,
    ));
    let sweeper = {
        let limit = limit.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(SWEEP_EVERY);
            loop {
                t.tick().await;
                limit.sweep();
            }
        })
    };
    let trust_proxy = shared.config.trust_proxy;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Usually EMFILE/ENFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        let limit = limit.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let ip = client_ip(peer.ip(), req.headers(), trust_proxy);
                    let limited = limit.check(ip).err();
                    if limited.is_some() {
                        shared.metrics.refused(RefuseReason::RateLimit);
                    }
                    req.extensions_mut()
                        .insert(PeerAddr(SocketAddr::new(ip, peer.port())));
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
                .header_read_timeout(HEADER_READ_TIMEOUT)
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

fn too_many_requests(wait: Duration) -> warp::reply::Response {
    let mut r = super::routes::text(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests from your address\n",
    );
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

//! Metrics actor: owns the `/metrics` listener (Prometheus text format) and
//! the process-level collectors.
//!
//! The counters themselves live in [`Metrics`](crate::metrics::Metrics) and
//! are updated in place where events happen; this actor never receives a
//! message per packet. The listener binds 127.0.0.1 (`--metrics-port`)
//! unless the operator names an address (`--metrics-addr`) for a scraper in
//! another container or pod; never the public relay port: metrics reveal
//! traffic patterns and are for the operator alone.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, TextEncoder};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::state::Shared;

pub enum MetricsMsg {
    /// Lets tests prove a metrics crash is survived.
    #[cfg(feature = "test-hooks")]
    CrashForTest,
}

pub struct MetricsActor;

pub struct MetricsState {
    server: Option<JoinHandle<()>>,
}

impl Drop for MetricsState {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

/// Renders every registered metric in the Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let mut buf = Vec::new();
    // Encoding collected families into a Vec cannot fail for the text format.
    let _ = TextEncoder::new().encode(&shared.metrics.registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

impl Actor for MetricsActor {
    type Msg = MetricsMsg;
    type State = MetricsState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        _me: ActorRef<MetricsMsg>,
        shared: Arc<Shared>,
    ) -> Result<MetricsState, ActorProcessingErr> {
        // Validated at start; an error here cannot happen.
        let Ok(Some(addr)) = shared.config.metrics_listen() else {
            return Ok(MetricsState { server: None });
        };
        let setting = if shared.config.metrics_addr.is_some() {
            "metrics_addr"
        } else {
            "metrics_port"
        };
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // A restarted actor rebinds the port its predecessor just released.
        sock.set_reuseaddr(true)?;
        sock.bind(addr)
            .map_err(|e| format!("{setting}: cannot listen on {addr}: {e}"))?;
        let listener = sock.listen(64)?;
        tracing::info!(%addr, "serving /metrics");
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let shared = shared.clone();
                            async move {
                                let mut resp = hyper::Response::new(String::new());
                                if req.uri().path() != "/metrics" {
                                    *resp.status_mut() = StatusCode::NOT_FOUND;
                                } else {
                                    *resp.body_mut() = render(&shared);
                                    resp.headers_mut().insert(
                                        http::header::CONTENT_TYPE,
                                        HeaderValue::from_static(
                                            "text/plain; version=0.0.4; charset=utf-8",
                                        ),
                                    );
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(MetricsState {
            server: Some(server),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<MetricsMsg>,
        msg: MetricsMsg,
        _st: &mut MetricsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            #[cfg(feature = "test-hooks")]
            MetricsMsg::CrashForTest => panic!("metrics crash requested by a test"),
        }
    }
}

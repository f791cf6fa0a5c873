//! The HTTP side of `--verify-client-url`: one POST per question, over a
//! fresh connection (plain or TLS with the Mozilla roots), the whole
//! exchange bounded by the verify timeout. The formats and the cache live in
//! `admission::verify`; this is only the bytes on the wire.
//!
//! A fresh connection per question keeps no pool to go stale behind a load
//! balancer; the answer cache is what keeps reconnect storms from turning
//! into as many requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::ClientConfig;

use crate::admission::verify::{Answer, AskError, VerifyTransport};
use crate::client::{self, ConnectOptions};
use crate::config::verify_url_parts;

/// Largest answer body read; `{"Allow":true}` is 14 bytes.
const MAX_ANSWER: usize = 16 << 10;

pub struct HttpVerify {
    tls: Option<Arc<ClientConfig>>,
}

impl HttpVerify {
    pub fn new() -> Self {
        // Built once; without it https URLs fail each question with the reason.
        let tls = client::tls_config(&[])
            .inspect_err(|e| tracing::error!(error = %e, "verify URL: no TLS client configuration"))
            .ok();
        HttpVerify { tls }
    }
}

impl Default for HttpVerify {
    fn default() -> Self {
        Self::new()
    }
}

impl VerifyTransport for HttpVerify {
    fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + 'static>> {
        let url = url.to_owned();
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, post(url, body, tls, timeout)).await {
                Ok(r) => r,
                Err(_) => Err(AskError::Timeout),
            }
        })
    }
}

async fn post(
    url: String,
    body: Vec<u8>,
    tls_config: Option<Arc<ClientConfig>>,
    timeout: Duration,
) -> Answer {
    let failed = |e: &dyn std::fmt::Display| AskError::Failed(format!("{url}: {e}"));
    let (tls, host, port, path) = verify_url_parts(&url).map_err(|e| failed(&e))?;
    if tls && tls_config.is_none() {
        return Err(failed(&"no TLS client configuration"));
    }
    let opts = ConnectOptions {
        tls: tls_config,
        connect_timeout: timeout,
        ..ConnectOptions::default()
    };
    let stream = client::connect_stream(&host, port, tls, &opts)
        .await
        .map_err(|e| failed(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    // Drives the connection; it ends with the exchange or with the timeout
    // that drops this whole future.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::post(path)
        .header(http::header::HOST, client::authority(&host, port))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("derp-relay/", env!("CARGO_PKG_VERSION")),
        )
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| failed(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| failed(&e))?;
    let status = resp.status().as_u16();
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| failed(&format!("reading the answer: {e}")))?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

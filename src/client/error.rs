//! Why talking to a relay failed. One error type serves every step (connect,
//! TLS, upgrade, handshake, frames) so a caller sees a precise cause an
//! operator can act on — a 429, a refused key, a TLS failure — rather than
//! "connection failed". Both transports report alike: the WebSocket framing
//! is our own, so a dropped connection is the same error over either.

use std::io;
use std::time::Duration;

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

pub(super) fn describe_http_refusal(
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

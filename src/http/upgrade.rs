//! `/derp`: decides which transport a request asks for, answers `101`, and
//! hands the upgraded stream to the connection's handshake.
//!
//! warp has no filter for a raw `Upgrade: DERP`, so both upgrades are done the
//! same way: take hyper's `OnUpgrade` from the request, reply `101` with the
//! right headers, and await the raw stream in a task. The WebSocket frames
//! that follow are read and written by `conn::preauth` and `conn::ws`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use warp::reply::Response;

use super::PeerAddr;
use super::client_addr::FrontGate;
use super::client_addr::{PendingCell, PendingGuard};
use super::reply::text;
use crate::conn::preauth::PreAuth;
use crate::conn::{self, ConnDeps};
use crate::reasons::{RefuseReason, Transport};

use crate::state::ClientSlot;

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub fn handle(
    deps: Arc<ConnDeps>,
    method: Method,
    headers: HeaderMap,
    on_upgrade: Option<OnUpgrade>,
    peer: Option<PeerAddr>,
    cell: Option<PendingCell>,
    gate: Arc<FrontGate>,
) -> Response {
    let shared = &deps.state;
    if method != Method::GET && method != Method::POST {
        // ts_derp upgrades with POST, Tailscale's Go client with GET.
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let transport = if header_has_token(&headers, header::UPGRADE, "derp") {
        Transport::Derp
    } else if header_has_token(&headers, header::UPGRADE, "websocket") {
        if !header_has_token(&headers, header::SEC_WEBSOCKET_PROTOCOL, "derp") {
            return text(
                StatusCode::BAD_REQUEST,
                "WebSocket clients must request subprotocol \"derp\" (Sec-WebSocket-Protocol: derp)\n",
            );
        }
        Transport::WebSocket
    } else {
        return text(
            StatusCode::UPGRADE_REQUIRED,
            "DERP requires connection upgrade\n",
        );
    };
    let (Some(on_upgrade), Some(PeerAddr(remote))) = (on_upgrade, peer) else {
        return text(
            StatusCode::UPGRADE_REQUIRED,
            "DERP requires an HTTP/1.1 connection upgrade\n",
        );
    };
    if shared.is_draining() {
        shared.metrics.refused(RefuseReason::ShuttingDown);
        return text(StatusCode::SERVICE_UNAVAILABLE, "relay is shutting down\n");
    }
    // The connection stays counted against its address until the handshake
    // is done: the accept loop's slot if it has one, else one taken here for
    // the address a trusted proxy reported.
    let pending = match cell.and_then(|c| c.take()) {
        Some(g) => Some(g),
        None => match gate.pending.try_acquire(remote.ip()) {
            Some(g) => g,
            None => {
                shared.metrics.refused(RefuseReason::PendingLimit);
                return text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many unauthenticated connections from your address\n",
                );
            }
        },
    };
    // A mesh peer's link is not a client: from a peer's address it passes a
    // full relay without a slot, and the handshake must then prove the mesh
    // key (anyone else is refused there, as `cap`).
    let slot = match shared.try_client_slot() {
        Some(s) => Some(s),
        None if shared.clients.remote.is_peer_ip(&remote.ip()) => None,
        None => {
            shared.metrics.refused(RefuseReason::Cap);
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "relay is at its client limit\n",
            );
        }
    };

    let mut resp = Response::new("".into());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    match transport {
        Transport::Derp => {
            h.insert(header::UPGRADE, HeaderValue::from_static("DERP"));
            h.insert("derp-version", HeaderValue::from_static("2"));
            if let Ok(v) = HeaderValue::from_str(&hex::encode(shared.secret.public().as_bytes())) {
                h.insert("derp-public-key", v);
            }
        }
        Transport::WebSocket => {
            let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
                return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
            };
            if headers
                .get(header::SEC_WEBSOCKET_VERSION)
                .map(|v| v.as_bytes())
                != Some(b"13")
            {
                return text(
                    StatusCode::BAD_REQUEST,
                    "unsupported Sec-WebSocket-Version (want 13)\n",
                );
            }
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            h.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static("derp"),
            );
        }
    }
    tokio::spawn(run_upgraded(
        on_upgrade,
        deps.clone(),
        remote,
        transport,
        slot,
        pending,
    ));
    resp
}

async fn run_upgraded(
    on_upgrade: OnUpgrade,
    deps: Arc<ConnDeps>,
    remote: SocketAddr,
    transport: Transport,
    slot: Option<ClientSlot>,
    pending: Option<PendingGuard>,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(target: "derp_relay::core", %remote, error = %e, "upgrade failed");
            return;
        }
    };
    let io = TokioIo::new(upgraded);
    let io = match transport {
        Transport::Derp => PreAuth::derp(io),
        Transport::WebSocket => PreAuth::websocket(io),
    };
    conn::accept(io, deps, remote, transport, slot, pending).await;
}

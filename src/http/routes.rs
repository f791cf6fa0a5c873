//! Every HTTP endpoint: `/derp` (both upgrades), the latency probes, captive
//! portal check, `/healthz`, and a small index page.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use hyper::upgrade::OnUpgrade;
use warp::Filter;
use warp::reply::Response;

use super::PeerAddr;
use super::client_addr::FrontGate;
use super::client_addr::PendingCell;
use super::reply::text;
use super::upgrade;
use crate::conn::ConnDeps;
use crate::state::Shared;
use subtle::ConstantTimeEq;

pub fn routes(
    deps: Arc<ConnDeps>,
    gate: Arc<FrontGate>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let shared = deps.state.clone();
    let with_shared = {
        let s = shared.clone();
        warp::any().map(move || s.clone())
    };
    let derp = warp::path("derp")
        .and(warp::path::end())
        .and(warp::any().map(move || deps.clone()))
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::ext::optional::<PendingCell>())
        .and(warp::any().map(move || gate.clone()))
        .map(upgrade::handle);
    let probe = warp::path("derp")
        .and(warp::path("probe").or(warp::path("latency-check")).unify())
        .and(warp::path::end())
        .and(warp::method())
        .map(probe);
    let gen204 = warp::path("generate_204")
        .and(warp::path::end())
        .and(warp::header::headers_cloned())
        .map(generate_204);
    let healthz = warp::path("healthz")
        .and(warp::path::end())
        .and(with_shared.clone())
        .and(warp::header::optional::<String>("authorization"))
        .map(healthz);
    let index = warp::path::end().map(index);
    derp.or(probe)
        .unify()
        .or(gen204)
        .unify()
        .or(healthz)
        .unify()
        .or(index)
        .unify()
        .recover(|_| async { Ok::<_, Infallible>(text(StatusCode::NOT_FOUND, "not found\n")) })
        .unify()
}

/// Latency probes for clients without UDP: must be as cheap as possible.
fn probe(method: Method) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let mut r = Response::new("".into());
    r.headers_mut().insert(
        http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

/// Captive portal detection, with Tailscale's challenge/response header.
pub(super) fn generate_204(headers: HeaderMap) -> Response {
    let mut r = Response::new("".into());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate, no-transform, max-age=0"),
    );
    let challenge = headers
        .get("x-tailscale-challenge")
        .and_then(|v| v.to_str().ok());
    if let Some(c) = challenge.filter(|c| valid_challenge(c))
        && let Ok(v) = HeaderValue::from_str(&format!("response {c}"))
    {
        r.headers_mut().insert("x-tailscale-response", v);
    }
    r
}

fn valid_challenge(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
}

/// `/healthz`: `ok` (or `draining`, 503) for anyone; the detailed JSON only
/// with `Authorization: Bearer <metrics_token>`, compared in constant time.
fn healthz(shared: Arc<Shared>, auth: Option<String>) -> Response {
    let (status, word) = if shared.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ok")
    };
    // The live token: a SIGHUP reload rotates it.
    let live = shared.live();
    let (Some(token), Some(auth)) = (live.metrics_token.as_deref(), auth) else {
        return text(
            status,
            if status == StatusCode::OK {
                "ok\n"
            } else {
                "draining\n"
            },
        );
    };
    // RFC 7235: the scheme is case-insensitive.
    let presented = match auth.trim().split_once(char::is_whitespace) {
        Some((scheme, cred)) if scheme.eq_ignore_ascii_case("bearer") => cred.trim().as_bytes(),
        _ => b"",
    };
    if !bool::from(presented.ct_eq(token.as_bytes())) {
        return text(StatusCode::UNAUTHORIZED, "unauthorized\n");
    }
    let m = &shared.metrics;
    let acl = shared.acl().map(|a| {
        let st = shared.acl_status();
        serde_json::json!({
            "keys": a.len(),
            "last_reload": st.last_reload.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "last_error": st.last_error,
        })
    });
    let tofu_bindings = shared
        .bindings
        .lock()
        .map(|b| b.len())
        .unwrap_or_else(|p| p.into_inner().len());
    let body = serde_json::json!({
        "status": word,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "clients": shared.clients.len(),
        "max_clients": shared.config.max_clients,
        "packets_routed": m.packets_routed.get(),
        "packets_dropped": m.total_dropped(),
        "bytes_received": m.bytes_received.get(),
        "bytes_sent": m.bytes_sent.get(),
        "rss_bytes": rss_bytes(),
        "acl": acl,
        "tofu_bindings": tofu_bindings,
        "mesh": mesh_detail(&shared),
        // Not the URL itself: it may carry a secret in its query.
        "verify_client": live.verify.as_ref().map(|v| serde_json::json!({
            "fail_open": v.fail_open,
            "cached_answers": shared.verifier.cached(),
        })),
    });
    let mut r = Response::new(format!("{body}\n").into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Each mesh link with its state, or null when this node is not meshed.
fn mesh_detail(shared: &Shared) -> serde_json::Value {
    if shared.mesh_key.is_none() {
        return serde_json::Value::Null;
    }
    let remote = &shared.clients.remote;
    let peers: Vec<_> = remote
        .links()
        .iter()
        .map(|l| {
            serde_json::json!({
                "peer": l.name,
                "dial": l.dial,
                "state": l.state().as_str(),
                "peer_key": l.peer_key().map(|k| k.to_nodekey_hex()),
                "keys": l.key_count(),
                "sessions": l.sessions.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    serde_json::json!({
        "peers": peers,
        "remote_keys": remote.len(),
        "watchers": shared.clients.watcher_count(),
    })
}

/// Resident memory of this process, from /proc (Linux).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096))
}

fn index() -> Response {
    let mut r = Response::new(
        "<!doctype html><title>derp-relay</title><h1>derp-relay</h1>\
         <p>This is a DERP relay for Tailscale-compatible clients. \
         Clients connect to <code>/derp</code>.</p>\n"
            .into(),
    );
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

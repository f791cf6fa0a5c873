//! Every HTTP endpoint: `/derp` (both upgrades), the latency probes, captive
//! portal check, `/healthz`, and a small index page.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use hyper::upgrade::OnUpgrade;
use warp::Filter;
use warp::reply::Response;

use super::PeerAddr;
use super::upgrade;
use crate::relay::Shared;

pub fn routes(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_shared = {
        let s = shared.clone();
        warp::any().map(move || s.clone())
    };
    let derp = warp::path("derp")
        .and(warp::path::end())
        .and(with_shared.clone())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::ext::optional::<PeerAddr>())
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

pub fn text(status: StatusCode, body: &'static str) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
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
fn generate_204(headers: HeaderMap) -> Response {
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

fn healthz(shared: Arc<Shared>) -> Response {
    if shared.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        text(StatusCode::OK, "ok\n")
    }
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

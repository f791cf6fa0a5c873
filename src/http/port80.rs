//! The optional plain-HTTP listener (`--http-addr`, e.g. `:80`). Tailscale
//! clients use port 80 only for the captive-portal check (`CanPort80` in the
//! DERP map), so that is the one thing answered in the clear; every other
//! request is sent to https on the relay's TLS port, so nothing else is ever
//! served unencrypted.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::reply::text;

/// The service behind the plain-HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct Port80 {
    /// Where clients reach https; omitted from the redirect when it is 443
    /// (what the relay uses, as derper does).
    pub https_port: u16,
}

impl<B> tower_service::Service<http::Request<B>> for Port80 {
    type Response = Response;
    type Error = Infallible;
    type Future = Ready<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        ready(Ok(self.answer(&req)))
    }
}

impl Port80 {
    fn answer<B>(&self, req: &http::Request<B>) -> Response {
        if req.uri().path() == "/generate_204" {
            return super::routes::generate_204(req.headers().clone());
        }
        // The host the client asked for (absolute-form target first, then
        // Host), without its port: the redirect names the TLS port instead.
        let authority = req.uri().authority().cloned().or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
        });
        let Some(authority) = authority else {
            return text(
                StatusCode::BAD_REQUEST,
                "a Host header is needed to redirect to https\n",
            );
        };
        let port = match self.https_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{}{port}{target}", authority.host());
        let Ok(location) = HeaderValue::from_str(&location) else {
            return text(
                StatusCode::BAD_REQUEST,
                "request target cannot be redirected\n",
            );
        };
        // 308 keeps the method: a POST /derp from ts_derp stays a POST.
        let mut r = text(StatusCode::PERMANENT_REDIRECT, "use https\n");
        r.headers_mut().insert(header::LOCATION, location);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(https_port: u16, req: http::Request<()>) -> Response {
        Port80 { https_port }.answer(&req)
    }

    #[test]
    fn redirects_to_the_tls_port_keeping_the_target() {
        let req = http::Request::get("/derp?x=1")
            .header("host", "derp.example.com:80")
            .body(())
            .unwrap();
        let r = answer(443, req);
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()["location"], "https://derp.example.com/derp?x=1");
        let req = http::Request::get("http://[2001:db8::1]/healthz")
            .body(())
            .unwrap();
        let r = answer(8443, req);
        assert_eq!(
            r.headers()["location"],
            "https://[2001:db8::1]:8443/healthz"
        );
        let r = answer(443, http::Request::get("/").body(()).unwrap());
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn captive_portal_check_is_answered_in_the_clear() {
        let req = http::Request::get("/generate_204")
            .header("x-tailscale-challenge", "abc")
            .body(())
            .unwrap();
        let r = answer(443, req);
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(r.headers()["x-tailscale-response"], "response abc");
    }
}

//! Small plain-text replies shared by the routes and the accept loop.

use http::{HeaderValue, StatusCode};
use warp::reply::Response;

/// A plain-text reply with `status`.
pub fn text(status: StatusCode, body: &'static str) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

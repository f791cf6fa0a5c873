//! `derp-relay healthcheck`: one HTTP GET of `/healthz`, judged strictly.
//!
//! The runtime image has no shell and no curl, so the container's own health
//! check has to be the binary. It passes only on status 200 with body `ok`:
//! a draining relay answers 503 `draining` and must count as unhealthy, and a
//! 200 from something else on the port (a proxy's default page) must too.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use derp_relay::client::{self, ClientError, ConnectOptions};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

use super::{ms, parse_duration};

/// The most of a response this check reads; `/healthz` says two words.
const MAX_BODY: usize = 64 << 10;

#[derive(clap::Args)]
pub struct Args {
    /// Health endpoint to check (http:// or https://).
    #[arg(long, default_value = "http://127.0.0.1:8443/healthz")]
    url: String,
    /// Give up after this long, e.g. `5s`.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Extra CA certificates (PEM) to trust for https, e.g. a private CA.
    #[arg(long, value_name = "PATH", conflicts_with = "insecure")]
    ca_file: Option<std::path::PathBuf>,
    /// Accept any TLS certificate (a relay on --tls-self-signed, or a check
    /// against 127.0.0.1 where the certificate names the public host).
    #[arg(long)]
    insecure: bool,
}

/// Where to send the request.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

fn parse_url(text: &str) -> Result<Target, String> {
    let uri: http::Uri = text
        .trim()
        .parse()
        .map_err(|e| format!("bad URL {text:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("bad URL {text:?}: use http:// or https://")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("bad URL {text:?}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(Target {
        tls,
        port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        host,
    })
}

pub async fn run(args: Args) -> Result<(), String> {
    let target = parse_url(&args.url)?;
    let started = Instant::now();
    let tls = match (target.tls, args.insecure, &args.ca_file) {
        (false, _, _) => None,
        (true, true, _) => Some(client::insecure_tls_config()?),
        (true, false, Some(p)) => Some(client::tls_config(&client::load_pem_certs(p)?)?),
        (true, false, None) => None,
    };
    let (status, reason, body) =
        tokio::time::timeout(args.timeout, fetch(&target, tls, args.timeout))
            .await
            .map_err(|_| {
                format!(
                    "no answer from {} within {}",
                    args.url,
                    humantime::format_duration(args.timeout)
                )
            })?
            .map_err(|e| e.to_string())?;
    let body = body.trim();
    verdict(status, &reason, body)?;
    println!(
        "ok: {} answered 200 \"ok\" in {}",
        args.url,
        ms(started.elapsed())
    );
    Ok(())
}

/// Pass only on 200 with body `ok`; otherwise say what came back.
fn verdict(status: u16, reason: &str, body: &str) -> Result<(), String> {
    let shown: String = body.chars().take(100).collect();
    match (status, body) {
        (200, "ok") => Ok(()),
        (200, _) => Err(format!("HTTP 200 but the body is {shown:?}, want \"ok\"")),
        (503, "draining") => Err("HTTP 503 draining: the relay is shutting down".into()),
        _ => Err(format!("HTTP {status} {reason}: {shown:?}")),
    }
}

async fn fetch(
    t: &Target,
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    limit: Duration,
) -> Result<(u16, String, String), ClientError> {
    let opts = ConnectOptions {
        connect_timeout: limit,
        tls,
        ..ConnectOptions::default()
    };
    let mut conn = client::connect_stream(&t.host, t.port, t.tls, &opts).await?;
    // `Connection: close` lets the body end at EOF whatever framing is used.
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derp-relay-healthcheck/{}\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n",
        t.path,
        client::authority(&t.host, t.port),
        env!("CARGO_PKG_VERSION"),
    );
    conn.write_all(req.as_bytes()).await?;
    conn.flush().await?;
    let mut buf = BytesMut::with_capacity(1024);
    let head = client::read_response_head(&mut conn, &mut buf).await?;
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = head
        .header("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok());
    read_body(&mut conn, &mut buf, length).await?;
    let raw = if chunked {
        dechunk(&buf)?
    } else {
        let end = length.unwrap_or(buf.len()).min(buf.len());
        buf[..end].to_vec()
    };
    Ok((
        head.status,
        head.reason,
        String::from_utf8_lossy(&raw).into_owned(),
    ))
}

/// Reads until `length` bytes are in (or EOF), at most [`MAX_BODY`]. A TLS
/// peer that closes without close_notify is still an end of body.
async fn read_body<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    length: Option<usize>,
) -> Result<(), ClientError> {
    let want = length.unwrap_or(MAX_BODY).min(MAX_BODY);
    while buf.len() < want {
        buf.reserve(4096);
        match s.read_buf(buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Decodes a chunked body (RFC 9112 §7.1), ignoring extensions and trailers.
fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, ClientError> {
    let bad = || ClientError::Protocol("malformed chunked body".into());
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = String::from_utf8_lossy(&b[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad())?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size {
            return Err(bad());
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).ok_or_else(bad)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_default_port_and_path() {
        let t = parse_url("http://127.0.0.1:8443/healthz").unwrap();
        assert_eq!((t.tls, t.port, t.path.as_str()), (false, 8443, "/healthz"));
        let t = parse_url("https://[::1]").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (true, "::1", 443));
        assert!(parse_url("ws://x/healthz").is_err());
    }

    #[test]
    fn only_200_ok_passes() {
        assert!(verdict(200, "OK", "ok").is_ok());
        assert!(
            verdict(200, "OK", "hello")
                .unwrap_err()
                .contains("want \"ok\"")
        );
        assert!(
            verdict(503, "Service Unavailable", "draining")
                .unwrap_err()
                .contains("draining")
        );
        assert!(
            verdict(404, "Not Found", "not found")
                .unwrap_err()
                .contains("404")
        );
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk(b"2\r\nok\r\n0\r\n\r\n").unwrap(), b"ok");
        assert_eq!(
            dechunk(b"1;x=y\r\no\r\n1\r\nk\r\n0\r\n\r\n").unwrap(),
            b"ok"
        );
        assert!(dechunk(b"zz\r\n").is_err());
    }
}

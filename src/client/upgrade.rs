//! The HTTP/1.1 upgrade that turns a connection into a DERP frame stream, for
//! both transports, written by hand so bytes after the 101 are kept as the
//! first frames: `Upgrade: DERP`, or WebSocket with the `derp` subprotocol. It
//! exists so a refusal is reported as the relay gave it — status, reason,
//! Retry-After and the start of the body — and so healthcheck can reuse the
//! response-head reader.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::either::Either;

use super::error::ClientError;
use super::frames::{FrameReader, FrameWriter, PongOwed, ReadSide, WriteSide, WsOut};
use super::net::{Conn, ConnectOptions, connect_stream_via};
use super::url::RelayUrl;
use crate::protocol::ws::WsDecoder;

/// Response headers longer than this are not from a relay.
const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// How much of an error response body is kept for the message.
const MAX_ERROR_BODY: usize = 512;

/// The parts of an HTTP response head the tools look at.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Option<usize> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Reads up to the end of the response head. Bytes after it stay in `buf`
/// (after a 101 they are already DERP frames).
pub async fn read_response_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<ResponseHead, ClientError> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ClientError::Protocol(format!(
                "HTTP response head longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return Err(if buf.is_empty() {
                ClientError::Protocol("relay closed the connection without an HTTP response".into())
            } else {
                ClientError::Protocol("relay closed the connection mid-response".into())
            });
        }
    };
    let head = buf.split_to(end);
    parse_response_head(&head)
}

/// Parses `HTTP/1.x CODE REASON` and the header lines.
pub fn parse_response_head(head: &[u8]) -> Result<ResponseHead, ClientError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/"), status) else {
        let shown: String = status_line.chars().take(80).collect();
        return Err(ClientError::Protocol(format!(
            "not an HTTP response: {shown:?}"
        )));
    };
    let reason = parts.next().unwrap_or_default().trim().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(ResponseHead {
        status,
        reason,
        headers,
    })
}

/// Turns a non-101 answer into [`ClientError::Http`], reading what is cheap of
/// the body (the relay's refusals are one short line).
async fn refusal<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
    head: ResponseHead,
) -> ClientError {
    let want = head
        .content_length()
        .unwrap_or(buf.len())
        .min(MAX_ERROR_BODY);
    while buf.len() < want {
        match timeout(Duration::from_secs(1), stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    let body = String::from_utf8_lossy(&buf[..buf.len().min(want)]).into_owned();
    ClientError::Http {
        status: head.status,
        retry_after: head.header("retry-after").map(str::to_owned),
        reason: head.reason,
        body,
    }
}

/// Connects (TCP, TLS if asked) and performs the HTTP upgrade the URL names,
/// leaving a frame stream on which the relay is about to send ServerKey.
pub async fn open(
    url: &RelayUrl,
    opts: &ConnectOptions,
) -> Result<(FrameReader, FrameWriter), ClientError> {
    open_via(url, &url.host, opts).await
}

/// [`open`], with the TCP connection going to `dial` rather than the URL's
/// host (which still names the relay in `Host` and TLS).
pub async fn open_via(
    url: &RelayUrl,
    dial: &str,
    opts: &ConnectOptions,
) -> Result<(FrameReader, FrameWriter), ClientError> {
    let conn = connect_stream_via(dial, &url.host, url.port, url.tls, opts).await?;
    upgrade(conn, url).await
}

async fn upgrade(
    mut conn: Conn,
    url: &RelayUrl,
) -> Result<(FrameReader, FrameWriter), ClientError> {
    let ws_key = url.websocket.then(generate_key);
    let req = match &ws_key {
        None => format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
            url.path,
            url.authority()
        ),
        Some(key) => format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: derp\r\n\r\n",
            url.path,
            url.authority()
        ),
    };
    conn.write_all(req.as_bytes()).await?;
    conn.flush().await?;
    let mut buf = BytesMut::with_capacity(4096);
    let head = read_response_head(&mut conn, &mut buf).await?;
    if head.status != 101 {
        return Err(refusal(&mut conn, buf, head).await);
    }
    if let Some(key) = &ws_key {
        check_websocket_accept(&head, key)?;
    }
    // Bytes after the head are already frames (DERP, or WebSocket frames
    // carrying DERP): `buf` carries them over.
    let (ws_in, ws_out) = match ws_key {
        None => (None, None),
        Some(_) => {
            let pongs = Arc::<PongOwed>::default();
            (
                Some((WsDecoder::from_server(), pongs.clone())),
                Some(WsOut::new(pongs)),
            )
        }
    };
    let (rd, wr) = match conn {
        Either::Left(tcp) => {
            let (rd, wr) = tcp.into_split();
            (ReadSide::Tcp(rd), WriteSide::Tcp(wr))
        }
        Either::Right(tls) => {
            let (rd, wr) = tokio::io::split(*tls);
            (ReadSide::Tls(rd), WriteSide::Tls(wr))
        }
    };
    Ok((
        FrameReader::new(rd, buf, ws_in),
        FrameWriter::new(wr, ws_out),
    ))
}

/// A 101 to a WebSocket request must prove it read our key (RFC 6455 §4.1)
/// and, if it names a subprotocol, name ours.
fn check_websocket_accept(head: &ResponseHead, key: &str) -> Result<(), ClientError> {
    let upgrade = head.header("upgrade").unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(ClientError::WebSocket(format!(
            "101 with Upgrade: {upgrade:?}, not websocket"
        )));
    }
    if head.header("sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err(ClientError::WebSocket(
            "Sec-WebSocket-Accept does not match the key sent".into(),
        ));
    }
    match head.header("sec-websocket-protocol") {
        None | Some("derp") => Ok(()),
        Some(other) => Err(ClientError::WebSocket(format!(
            "relay chose subprotocol {other:?}, not derp"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::error::describe_http_refusal;

    #[test]
    fn response_heads_parse_and_refusals_read_well() {
        let h = parse_response_head(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\ncontent-length: 5\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.status, 429);
        assert_eq!(h.header("retry-after"), Some("1"));
        assert_eq!(h.content_length(), Some(5));
        assert!(parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let msg = describe_http_refusal(429, "Too Many Requests", Some("1"), "slow down\n");
        assert!(
            msg.contains("429") && msg.contains("rate limited") && msg.contains("Retry-After: 1")
        );
    }
}

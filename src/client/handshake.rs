//! The DERP handshake on an open frame stream (ServerKey, sealed ClientInfo,
//! ServerInfo) and [`Client`], a connection that has passed it. It exists so
//! every tool tells a relay that refused its key apart from one that closed
//! early or spoke out of turn, and so "open, then handshake" is one call.

use std::io;

use bytes::BytesMut;
use serde_json::Value;

use super::error::ClientError;
use super::frames::{FrameReader, FrameWriter};
use super::net::ConnectOptions;
use super::upgrade::open;
use super::url::RelayUrl;
use crate::protocol::PublicKey;
use crate::protocol::frame::{ServerFrame, encode_client_info};
use crate::protocol::handshake::ClientSecret;

/// What the relay said in the handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub server_key: PublicKey,
    /// The opened ServerInfo JSON (`{"version":2}` and optional rate limits).
    pub server_info: Value,
}

impl Handshake {
    /// The receive rate limit the relay advertised, in bytes per second.
    pub fn rate_limit(&self) -> Option<u64> {
        self.server_info
            .get("tokenBucketBytesPerSecond")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
    }
}

/// The DERP handshake on an open frame stream: read ServerKey, send a sealed
/// ClientInfo carrying `info_json`, open ServerInfo. A relay that refuses the
/// key closes the connection instead of answering, which is reported as
/// [`ClientError::Refused`].
pub async fn handshake(
    rd: &mut FrameReader,
    wr: &mut FrameWriter,
    secret: &ClientSecret,
    info_json: &[u8],
) -> Result<Handshake, ClientError> {
    let frame = match rd.next_frame().await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(ClientError::ClosedBeforeServerKey),
        Err(e) if is_reset(&e) => return Err(ClientError::ClosedBeforeServerKey),
        Err(e) => return Err(e),
    };
    let server_key = match ServerFrame::parse(frame) {
        Ok(ServerFrame::ServerKey(k)) => k,
        Ok(other) => {
            return Err(ClientError::Protocol(format!(
                "relay's first frame is {other:?}, not ServerKey"
            )));
        }
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    };
    let session = secret.session(&server_key);
    let mut buf = BytesMut::new();
    encode_client_info(&mut buf, &secret.seal_client_info_with(&session, info_json));
    wr.send(&mut buf).await?;
    let refused = || ClientError::Refused {
        key: secret.public().to_nodekey_hex(),
    };
    let frame = match rd.next_frame().await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(refused()),
        Err(e) if is_reset(&e) => return Err(refused()),
        Err(e) => return Err(e),
    };
    let sealed = match ServerFrame::parse(frame) {
        Ok(ServerFrame::ServerInfo(p)) => p,
        Ok(other) => {
            return Err(ClientError::Protocol(format!(
                "relay's second frame is {other:?}, not ServerInfo"
            )));
        }
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    };
    let server_info = secret
        .open_server_info_with(&session, &sealed)
        .map_err(|e| ClientError::Protocol(format!("ServerInfo: {e}")))?;
    Ok(Handshake {
        server_key,
        server_info,
    })
}

/// A closing peer sometimes shows up as a reset rather than a clean EOF.
fn is_reset(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(io) if matches!(
        io.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    ))
}

/// A connected, handshaken client.
pub struct Client {
    pub rd: FrameReader,
    pub wr: FrameWriter,
    pub key: PublicKey,
    pub handshake: Handshake,
}

/// [`open`] then [`handshake`] with a minimal ClientInfo.
pub async fn connect(
    url: &RelayUrl,
    opts: &ConnectOptions,
    secret: &ClientSecret,
) -> Result<Client, ClientError> {
    let (mut rd, mut wr) = open(url, opts).await?;
    let handshake = handshake(&mut rd, &mut wr, secret, br#"{"version":2}"#).await?;
    Ok(Client {
        rd,
        wr,
        key: secret.public(),
        handshake,
    })
}

//! From an upgraded stream to a registered client: the DERP handshake
//! (ServerKey out, ClientInfo in, bounded as DESIGN.md §2.6 asks), then the
//! connection actor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use ractor::Actor;

use super::ConnDeps;
use super::actor::{ConnArgs, ConnectionActor};
use super::preauth::PreAuth;
use crate::admission::UrlVerdict;
use crate::protocol::frame::{self, FrameType};
use crate::protocol::handshake::{Session, server_info_json};
use crate::protocol::{ClientInfo, FrameError, PublicKey};
use crate::reasons::{RefuseReason, Transport};
use crate::state::{ClientSlot, Shared};

/// Why a handshake did not produce a client.
#[derive(Debug, thiserror::Error)]
enum HandshakeFailure {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Crypto(#[from] crate::protocol::HandshakeError),
    #[error("connection closed before ClientInfo")]
    Eof,
    #[error("deadline passed")]
    Timeout,
}

/// Runs the DERP handshake on a freshly upgraded connection and, if the client
/// proves its key and is admitted, starts its connection actor.
pub async fn accept(
    mut io: PreAuth,
    deps: Arc<ConnDeps>,
    remote: SocketAddr,
    transport: Transport,
    slot: Option<ClientSlot>,
    pending: impl Send,
) {
    let shared = deps.state.clone();
    let started = Instant::now();
    let deadline = shared.config.handshake_timeout;
    let hs = tokio::time::timeout(deadline, handshake(&mut io, &shared)).await;
    // The box opened: the client is no longer a stranger.
    drop(pending);
    let (key, info, session, buf) = match hs.unwrap_or(Err(HandshakeFailure::Timeout)) {
        Ok(v) => v,
        Err(e) => {
            shared.metrics.refused(RefuseReason::BadHandshake);
            tracing::debug!(target: "derp_relay::core", %remote, error = %e, "handshake failed");
            io.close().await;
            return;
        }
    };
    let (reader, writer) = io.into_conn();
    // A mesh peer (its ClientInfo carries the region's mesh key) is trusted
    // before every admission check and never asked about; the registry
    // skips `admit` for it and the re-check skips its handle.
    let url = if info.is_mesh_peer(shared.mesh_key.as_ref()) {
        UrlVerdict::NotAsked
    } else {
        match shared.verify_client(&key, remote.ip()).await {
            None => UrlVerdict::NotAsked,
            Some(c) => c.verdict,
        }
    };
    let sealed = session.seal(&server_info_json(None));
    let mut server_info = BytesMut::new();
    frame::encode_server_info(&mut server_info, &sealed);

    let args = ConnArgs {
        deps: deps.clone(),
        key,
        info,
        remote,
        transport,
        reader,
        writer,
        read_buf: buf,
        server_info,
        slot,
        url,
    };
    let Some(root) = deps.supervisor.get().cloned() else {
        return; // not started yet; cannot happen once serving
    };
    match Actor::spawn_linked(None, ConnectionActor, args, root).await {
        Ok(_) => {
            shared.metrics.connections_accepted.inc();
            shared
                .metrics
                .handshake_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Err(e) => {
            // Refusals were counted by the actor; the socket closed with its args.
            tracing::debug!(target: "derp_relay::core", %remote, %key, error = %e, "client not registered");
        }
    }
}

async fn handshake(
    io: &mut PreAuth,
    shared: &Shared,
) -> Result<(PublicKey, ClientInfo, Session, BytesMut), HandshakeFailure> {
    let mut out = BytesMut::new();
    frame::encode_server_key(&mut out, &shared.secret.public());
    io.write(&out).await?;

    // Only ClientInfo is acceptable first; any other type fails on its header.
    let limit = |t: u8| {
        if t == FrameType::ClientInfo as u8 {
            frame::client_frame_limit(t)
        } else {
            0
        }
    };
    let mut buf = BytesMut::new();
    loop {
        if let Some(f) = frame::decode_frame(&mut buf, limit)? {
            if f.frame_type != FrameType::ClientInfo as u8 {
                return Err(FrameError::WrongType {
                    expected: FrameType::ClientInfo as u8,
                    got: f.frame_type,
                }
                .into());
            }
            let (key, info, session) = shared.secret.open_client_info(&f.payload)?;
            // Whatever the client pipelined after ClientInfo stays in `buf`.
            return Ok((key, info, session, buf));
        }
        // Grow only by what arrives: the announced length is a claim, not a
        // reason to allocate.
        let need = frame::bytes_needed(&buf);
        if io.read_some(&mut buf, need).await? == 0 {
            return Err(HandshakeFailure::Eof);
        }
    }
}

//! The server side of the mesh on one connection: what a mesh peer (a relay
//! of this region that presented the mesh key) may send besides packets.
//! WatchConns subscribes it to presence updates, ForwardPacket hands over a
//! packet for a local client, ClosePeer closes a local client. From anyone
//! else these frames close the connection.

use std::sync::Arc;

use bytes::Bytes;

use super::ConnDeps;
use crate::protocol::frame;
use crate::protocol::{ClientFrame, PublicKey};
use crate::reasons::{CloseReason, DropReason};
use crate::routing::ClientHandle;

/// Per-connection memory of the last forwarded (src, dst, conn) noted for
/// PeerGone, so a steady flow takes no map write per packet.
#[derive(Default)]
pub(super) struct MeshIn {
    last: Option<(PublicKey, PublicKey, u64)>,
}

/// Handles WatchConns and ClosePeer, and refuses every mesh frame from a
/// client that is not a mesh peer; `Err` closes the connection. A mesh
/// peer's ForwardPacket is batched by the reader itself.
pub(super) fn handle(
    f: ClientFrame,
    h: &Arc<ClientHandle>,
    deps: &ConnDeps,
) -> Result<(), CloseReason> {
    if !h.is_mesh_peer() {
        tracing::info!(target: "derp_relay::mesh", key = %h.key, remote = %h.remote, "mesh frame from a non-mesh client; closing");
        return Err(CloseReason::MeshFrameFromClient);
    }
    let shared = &deps.state;
    match f {
        ClientFrame::WatchConns => deps.registrar.watch(h.clone()),
        ClientFrame::ClosePeer(k) => {
            let conns = shared.clients.connections_of(&k);
            tracing::info!(target: "derp_relay::mesh", peer = %h.key, key = %k, connections = conns.len(), "ClosePeer from mesh peer");
            for c in conns.iter().filter(|c| !c.is_mesh_peer()) {
                c.close(CloseReason::ClosePeer);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Counts a forwarded packet the reader queued itself (the batched path in
/// `conn::reader`) and keeps the receiver bookkeeping for region-wide PeerGone.
pub(super) fn forwarded_in(
    via: PublicKey,
    src: PublicKey,
    dst: PublicKey,
    conn: u64,
    len: u64,
    deps: &ConnDeps,
    st: &mut MeshIn,
) {
    let shared = &deps.state;
    shared.metrics.mesh.packets_in.inc();
    shared.metrics.mesh.bytes_in.inc_by(len);
    if st.last != Some((src, dst, conn)) {
        shared.clients.remote.note_receiver(&src, via, dst, conn);
        st.last = Some((src, dst, conn));
    }
}

/// Routes a forwarded packet the batched path could not queue at once (its
/// destination's queue was full), evicting as usual.
pub(super) fn forward_in(
    via: PublicKey,
    src: PublicKey,
    dst: PublicKey,
    packet: Bytes,
    deps: &ConnDeps,
    st: &mut MeshIn,
) {
    let shared = &deps.state;
    let len = packet.len() as u64;
    let disco = frame::is_disco(&packet);
    // Local only: a forwarded packet is never forwarded again (one hop).
    match shared.clients.route_local(src, &dst, packet, disco) {
        Ok((conn, head_drop)) => {
            if let Some(r) = head_drop {
                shared.metrics.dropped(r).inc();
            }
            forwarded_in(via, src, dst, conn, len, deps, st);
        }
        Err(r) => dropped_in(r, src, dst, deps),
    }
}

/// Counts a forwarded packet that could not be delivered here.
pub(super) fn dropped_in(r: DropReason, src: PublicKey, dst: PublicKey, deps: &ConnDeps) {
    deps.state.metrics.dropped(r).inc();
    if r == DropReason::UnknownDestOnFwd {
        tracing::trace!(target: "derp_relay::mesh", %src, %dst, "forwarded packet for a key not here");
    }
}

/// Writes a watcher's pending presence updates as PeerPresent/PeerGone.
pub(super) fn encode_updates(w: &crate::routing::WatchQueue, out: &mut bytes::BytesMut) {
    use crate::protocol::PeerGoneReason;
    use crate::routing::Presence;
    for (k, p) in w.drain() {
        match p {
            Presence::Present { addr, flags } => {
                frame::encode_peer_present(out, &k, Some(addr), flags)
            }
            Presence::Gone => frame::encode_peer_gone(out, &k, PeerGoneReason::Disconnected),
        }
    }
}

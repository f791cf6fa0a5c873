//! Registry: who is connected, under which key, and where to put their packets.
//!
//! The routing table ([`Clients`]) is a concurrent map read directly by every
//! connection's reader on the hot path; the [`RegistryActor`] is its single
//! writer. Registration, duplicate keys, PeerGone bookkeeping, evictions and the
//! shutdown broadcast all go through the actor's mailbox, never packets.
//!
//! Duplicate keys follow Tailscale's server: the newest connection for a key is
//! the active one (packets go to it); older ones stay open and are read from.
//! If an older one sends, it becomes active again ("last writer is active").

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::Actors;
use super::tofu::TofuMsg;
use crate::admission::UrlVerdict;
use crate::metrics::Metrics;
use crate::protocol::{PeerGoneReason, PublicKey};
use crate::reasons::{CloseReason, DropReason, RefuseReason};
use crate::routing::{ClientHandle, Clients, Control, Presence};
use crate::state::Shared;

/// Control messages for the registry. Never one per packet.
pub enum RegistryMsg {
    /// A client proved its key. The registry applies admission (ACL,
    /// `--tofu-lock`, shutdown) and registers it, or replies why not.
    Register(
        Arc<ClientHandle>,
        UrlVerdict,
        RpcReplyPort<Result<(), RefuseReason>>,
    ),
    /// A connection ended.
    Deregister(Arc<ClientHandle>),
    /// An inactive duplicate sent a packet.
    Activity(Arc<ClientHandle>),
    /// Disconnect these keys (e.g. removed from the ACL).
    Evict(Vec<PublicKey>, CloseReason),
    /// A mesh peer sent WatchConns: flood it with every local key, then keep
    /// it told.
    Watch(Arc<ClientHandle>),
    /// Time to send every client a KeepAlive.
    KeepAliveTick,
    /// Time to close clients whose socket write has been blocked past the
    /// write timeout (clients that stopped reading).
    WriteDeadlineTick,
    /// Lets tests prove that a registry crash is survived.
    #[cfg(feature = "test-hooks")]
    CrashForTest,
}

pub struct RegistryActor;

pub struct RegistryState {
    shared: Arc<Shared>,
    actors: Arc<Actors>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
}

impl Actor for RegistryActor {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = (Arc<Shared>, Arc<Actors>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (shared, actors): (Arc<Shared>, Arc<Actors>),
    ) -> Result<Self::State, ActorProcessingErr> {
        let args = RegistryState {
            actors,
            clients: shared.clients.clone(),
            metrics: shared.metrics.clone(),
            shared,
        };
        // One shared ticker for every client instead of a timer per connection.
        myself.send_interval(args.shared.config.ping_interval, || {
            RegistryMsg::KeepAliveTick
        });
        let sweep = (args.shared.config.write_timeout / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        myself.send_interval(sweep, || RegistryMsg::WriteDeadlineTick);
        // After a restart the table is intact (it is shared, not ours), but
        // connections that ended while we were down may have missed deregistering.
        let mut stale = Vec::new();
        args.clients.for_each(|h| {
            if h.is_closed() {
                stale.push(h.clone());
            }
        });
        for h in stale {
            deregister(&args, &h);
        }
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Register(h, url, reply) => {
                // Mesh peers proved the region's key: no ACL, no TOFU, no
                // verify URL.
                let label = match h.is_mesh_peer() {
                    true if st.shared.is_draining() => Err(RefuseReason::ShuttingDown),
                    true => Ok(None),
                    false => st.shared.admit(&h.key, url),
                };
                let label = match label {
                    Ok(l) => l,
                    Err(r) => {
                        let _ = reply.send(Err(r));
                        return Ok(());
                    }
                };
                if !h.is_mesh_peer()
                    && let Some(t) = st.actors.tofu.get()
                {
                    let _ = t.cast(TofuMsg::Seen {
                        key: h.key,
                        label,
                        addr: h.remote,
                    });
                }
                st.metrics.clients(h.transport).inc();
                if st.clients.insert(h.clone()) {
                    st.metrics.duplicate_keys.inc();
                    tracing::info!(target: "derp_relay::core", key = %h.key, conn = h.conn_id, "duplicate connection for key; newest is active");
                }
                let _ = reply.send(Ok(()));
                // Every new connection is announced, duplicates too (as derper).
                let behind = st.clients.tell_watchers(
                    h.key,
                    Presence::Present {
                        addr: h.remote,
                        flags: h.presence_flags(),
                    },
                );
                close_behind(behind);
            }
            RegistryMsg::Watch(h) => {
                if h.key == st.shared.secret.public() {
                    // A node meshing with itself: nothing to tell.
                    return Ok(());
                }
                if h.is_closed() || !h.start_watching(st.shared.config.mesh_watch_max) {
                    return Ok(());
                }
                st.metrics.mesh.watchers.inc();
                tracing::info!(target: "derp_relay::mesh", peer = %h.key, remote = %h.remote, keys = st.clients.keys(), "mesh peer watching; sending the flood");
                if !st.clients.add_watcher(h.clone()) {
                    close_behind(vec![h]);
                }
            }
            RegistryMsg::Deregister(h) => deregister(st, &h),
            RegistryMsg::Activity(h) => st.clients.activate(&h),
            RegistryMsg::Evict(keys, why) => {
                for k in keys {
                    for h in st.clients.connections_of(&k) {
                        // Mesh peers are admitted by the mesh key, not the ACL.
                        if why == CloseReason::AclRemoved && h.is_mesh_peer() {
                            continue;
                        }
                        h.close(why);
                    }
                }
            }
            RegistryMsg::WriteDeadlineTick => {
                let now = st.shared.now_ms();
                let limit = st.shared.config.write_timeout.as_millis() as u64;
                st.clients.for_each(|h| {
                    // Peers get derper's 30 s: a flood is large, and cutting
                    // a link costs the whole region a re-flood.
                    let limit = if h.is_mesh_peer() {
                        limit.max(MESH_WRITE_TIMEOUT_MS)
                    } else {
                        limit
                    };
                    if h.write_blocked_for(now).is_some_and(|t| t > limit) {
                        h.end_write(); // close once, not every tick
                        let lost = h.write_packets.swap(0, Ordering::Relaxed);
                        st.metrics.dropped(DropReason::WriteError).inc_by(lost);
                        tracing::debug!(target: "derp_relay::core", key = %h.key, "write timed out; client is not reading");
                        h.close(CloseReason::WriteTimeout);
                    }
                });
            }
            RegistryMsg::KeepAliveTick => st.clients.for_each(|h| {
                h.queue.push_control(Control::KeepAlive);
            }),
            #[cfg(feature = "test-hooks")]
            RegistryMsg::CrashForTest => panic!("registry crash requested by a test"),
        }
        Ok(())
    }
}

/// Write timeout floor for mesh peers (derper uses 30 s for them).
const MESH_WRITE_TIMEOUT_MS: u64 = 30_000;

/// Watchers too far behind to catch up: they reconnect and get a new flood.
fn close_behind(behind: Vec<Arc<ClientHandle>>) {
    for w in behind {
        tracing::warn!(target: "derp_relay::mesh", peer = %w.key, "mesh watcher fell too far behind; closing it");
        w.close(CloseReason::MeshWatchOverflow);
    }
}

fn deregister(st: &RegistryState, h: &Arc<ClientHandle>) {
    let mut sent_to = h.take_sent_to();
    let before = st.clients.len();
    let key_gone = st.clients.remove(h);
    if st.clients.len() == before {
        return; // already removed (a restart sweep and a late message can race)
    }
    st.metrics.clients(h.transport).dec();
    if h.set_preferred(false) {
        st.metrics.clients_home.dec();
    }
    if st.clients.remove_watcher(h.conn_id) {
        st.metrics.mesh.watchers.dec();
    }
    if !key_gone {
        return;
    }
    close_behind(st.clients.tell_watchers(h.key, Presence::Gone));
    // Still connected to another node: its receivers hear when it leaves there.
    if st.clients.remote.adopt_receivers(&h.key, &mut sent_to) {
        return;
    }
    // Tell everyone this client delivered packets to that it is gone, so they
    // drop their route through this relay.
    for (dst, dst_conn) in sent_to {
        if let Some(d) = st.clients.active(&dst)
            && d.conn_id == dst_conn
        {
            d.queue
                .push_control(Control::PeerGone(h.key, PeerGoneReason::Disconnected));
        }
    }
}

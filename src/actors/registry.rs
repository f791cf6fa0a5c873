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
use crate::routing::{ClientHandle, Clients, Control};
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
                let label = match st.shared.admit(&h.key, url) {
                    Ok(l) => l,
                    Err(r) => {
                        let _ = reply.send(Err(r));
                        return Ok(());
                    }
                };
                if let Some(t) = st.actors.tofu.get() {
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
            }
            RegistryMsg::Deregister(h) => deregister(st, &h),
            RegistryMsg::Activity(h) => st.clients.activate(&h),
            RegistryMsg::Evict(keys, why) => {
                for k in keys {
                    for h in st.clients.connections_of(&k) {
                        h.close(why);
                    }
                }
            }
            RegistryMsg::WriteDeadlineTick => {
                let now = st.shared.now_ms();
                let limit = st.shared.config.write_timeout.as_millis() as u64;
                st.clients.for_each(|h| {
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

fn deregister(st: &RegistryState, h: &Arc<ClientHandle>) {
    let sent_to = h.take_sent_to();
    let before = st.clients.len();
    let key_gone = st.clients.remove(h);
    if st.clients.len() == before {
        return; // already removed (a restart sweep and a late message can race)
    }
    st.metrics.clients(h.transport).dec();
    if h.set_preferred(false) {
        st.metrics.clients_home.dec();
    }
    if !key_gone {
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

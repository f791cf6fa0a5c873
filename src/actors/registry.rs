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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::connection::ConnMsg;
use super::send_queue::{Control, SendQueue};
use super::tofu::TofuMsg;
use crate::metrics::{DropReason, Metrics, RefuseReason, Transport};
use crate::protocol::{PeerGoneReason, PublicKey};
use crate::relay::Shared;

/// Receivers remembered per sender for PeerGone. A client that sprays packets
/// at more peers than this simply stops being remembered for new ones.
const MAX_SENT_TO: usize = 4096;

/// One client connection as the rest of the relay sees it.
pub struct ClientHandle {
    pub key: PublicKey,
    /// Unique per connection, so a reconnect under the same key is a new identity.
    pub conn_id: u64,
    pub transport: Transport,
    pub remote: SocketAddr,
    pub queue: SendQueue,
    pub actor: ActorRef<ConnMsg>,
    active: AtomicBool,
    activity_requested: AtomicBool,
    preferred: AtomicBool,
    /// When the write in progress began (relay-relative ms), 0 when none is.
    write_started_ms: AtomicU64,
    /// Packets in the write in progress, counted as dropped if it never ends.
    write_packets: AtomicU64,
    /// Keys (and their connection) this client delivered packets to, told
    /// PeerGone when this client leaves.
    sent_to: Mutex<HashMap<PublicKey, u64>>,
}

impl ClientHandle {
    pub fn new(
        key: PublicKey,
        conn_id: u64,
        transport: Transport,
        remote: SocketAddr,
        queue_depth: usize,
        actor: ActorRef<ConnMsg>,
    ) -> Self {
        ClientHandle {
            key,
            conn_id,
            transport,
            remote,
            queue: SendQueue::new(queue_depth),
            actor,
            active: AtomicBool::new(false),
            activity_requested: AtomicBool::new(false),
            preferred: AtomicBool::new(false),
            write_started_ms: AtomicU64::new(0),
            write_packets: AtomicU64::new(0),
            sent_to: Mutex::new(HashMap::new()),
        }
    }

    /// Marks a socket write as started at `now_ms` (never 0) with `packets` in it.
    pub fn begin_write(&self, now_ms: u64, packets: u64) {
        self.write_packets.store(packets, Ordering::Relaxed);
        self.write_started_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn end_write(&self) {
        self.write_started_ms.store(0, Ordering::Relaxed);
    }

    /// How long the write in progress has been blocked, if one is.
    fn write_blocked_for(&self, now_ms: u64) -> Option<u64> {
        match self.write_started_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(now_ms.saturating_sub(t)),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// True once per inactive spell, so an inactive duplicate that keeps sending
    /// asks the registry to reactivate it once, not once per packet.
    pub fn should_request_activity(&self) -> bool {
        !self.is_active() && !self.activity_requested.swap(true, Ordering::Relaxed)
    }

    fn set_active(&self, v: bool) {
        self.active.store(v, Ordering::Relaxed);
        self.activity_requested.store(false, Ordering::Relaxed);
    }

    /// Records NotePreferred; returns the previous value.
    pub fn set_preferred(&self, v: bool) -> bool {
        self.preferred.swap(v, Ordering::Relaxed)
    }

    pub fn note_sent_to(&self, dst: PublicKey, dst_conn: u64) {
        let mut m = self.sent_to.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < MAX_SENT_TO || m.contains_key(&dst) {
            m.insert(dst, dst_conn);
        }
    }

    fn take_sent_to(&self) -> HashMap<PublicKey, u64> {
        std::mem::take(&mut *self.sent_to.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

struct KeySlot {
    active: Arc<ClientHandle>,
    /// Older connections for the same key, oldest first.
    others: Vec<Arc<ClientHandle>>,
}

/// The routing table: key → connection. Read by everyone, written only by the
/// registry actor.
#[derive(Default)]
pub struct Clients {
    map: DashMap<PublicKey, KeySlot>,
    connections: AtomicUsize,
}

impl Clients {
    /// Hot path: queues `data` from `src` for `dst`'s active connection.
    /// Returns the destination's connection id and, if the queue was full, the
    /// reason for the packet that made room.
    pub fn route(
        &self,
        src: PublicKey,
        dst: &PublicKey,
        data: Bytes,
        disco: bool,
    ) -> Result<(u64, Option<DropReason>), DropReason> {
        let slot = self.map.get(dst).ok_or(DropReason::UnknownDest)?;
        let h = &slot.active;
        match h.queue.push_packet(src, data, disco) {
            Ok(()) => Ok((h.conn_id, None)),
            Err(DropReason::QueueHead) => Ok((h.conn_id, Some(DropReason::QueueHead))),
            Err(r) => Err(r),
        }
    }

    /// Connections currently registered, duplicates included.
    pub fn len(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct keys connected.
    pub fn keys(&self) -> usize {
        self.map.len()
    }

    pub fn is_connected(&self, key: &PublicKey) -> bool {
        self.map.contains_key(key)
    }

    /// The active connection for `key`, if any.
    pub fn active(&self, key: &PublicKey) -> Option<Arc<ClientHandle>> {
        self.map.get(key).map(|s| s.active.clone())
    }

    fn for_each(&self, mut f: impl FnMut(&Arc<ClientHandle>)) {
        for slot in self.map.iter() {
            f(&slot.active);
            slot.others.iter().for_each(&mut f);
        }
    }

    /// Adds `h` as the active connection for its key; returns true if the key
    /// was already connected.
    fn insert(&self, h: Arc<ClientHandle>) -> bool {
        self.connections.fetch_add(1, Ordering::Relaxed);
        h.set_active(true);
        match self.map.entry(h.key) {
            dashmap::Entry::Occupied(mut e) => {
                let slot = e.get_mut();
                let old = std::mem::replace(&mut slot.active, h);
                old.set_active(false);
                slot.others.push(old);
                true
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(KeySlot {
                    active: h,
                    others: Vec::new(),
                });
                false
            }
        }
    }

    /// Removes `h`; returns true if no connection for its key remains.
    fn remove(&self, h: &ClientHandle) -> bool {
        let dashmap::Entry::Occupied(mut e) = self.map.entry(h.key) else {
            return false;
        };
        let slot = e.get_mut();
        let found = if slot.active.conn_id == h.conn_id {
            // The most recent remaining connection takes over.
            match slot.others.pop() {
                Some(next) => {
                    next.set_active(true);
                    slot.active = next;
                }
                None => {
                    e.remove();
                    self.connections.fetch_sub(1, Ordering::Relaxed);
                    return true;
                }
            }
            true
        } else if let Some(i) = slot.others.iter().position(|o| o.conn_id == h.conn_id) {
            slot.others.remove(i);
            true
        } else {
            false
        };
        if found {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
        false
    }

    /// Makes `h` the active connection for its key (last writer is active).
    fn activate(&self, h: &Arc<ClientHandle>) {
        if let Some(mut slot) = self.map.get_mut(&h.key)
            && let Some(i) = slot.others.iter().position(|o| o.conn_id == h.conn_id)
        {
            let me = slot.others.remove(i);
            me.set_active(true);
            let old = std::mem::replace(&mut slot.active, me);
            old.set_active(false);
            slot.others.push(old);
        }
    }
}

/// Control messages for the registry. Never one per packet.
pub enum RegistryMsg {
    /// A client proved its key. The registry applies admission (ACL,
    /// `--tofu-lock`, shutdown) and registers it, or replies why not.
    Register(Arc<ClientHandle>, RpcReplyPort<Result<(), RefuseReason>>),
    /// A connection ended.
    Deregister(Arc<ClientHandle>),
    /// An inactive duplicate sent a packet.
    Activity(Arc<ClientHandle>),
    /// Disconnect these keys (e.g. removed from the ACL).
    Evict(Vec<PublicKey>, &'static str),
    /// Time to send every client a KeepAlive.
    KeepAliveTick,
    /// Time to close clients whose socket write has been blocked past the
    /// write timeout (clients that stopped reading).
    WriteDeadlineTick,
    /// The relay is stopping: tell every connection to go elsewhere. Replies
    /// with how many were told.
    GoingAway(RpcReplyPort<usize>),
    /// Lets tests prove that a registry crash is survived.
    CrashForTest,
}

pub struct RegistryActor;

pub struct RegistryState {
    shared: Arc<Shared>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
}

impl Actor for RegistryActor {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        shared: Arc<Shared>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let args = RegistryState {
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
            if h.actor.get_status() > ractor::ActorStatus::Running {
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
            RegistryMsg::Register(h, reply) => {
                let label = match st.shared.admit(&h.key) {
                    Ok(l) => l,
                    Err(r) => {
                        let _ = reply.send(Err(r));
                        return Ok(());
                    }
                };
                if let Some(t) = st.shared.tofu.get() {
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
                    if let Some(slot) = st.clients.map.get(&k) {
                        for h in std::iter::once(&slot.active).chain(slot.others.iter()) {
                            let _ = h.actor.cast(ConnMsg::Close(why));
                        }
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
                        let _ = h.actor.cast(ConnMsg::Close("write_timeout"));
                    }
                });
            }
            RegistryMsg::KeepAliveTick => st.clients.for_each(|h| {
                h.queue.push_control(Control::KeepAlive);
            }),
            RegistryMsg::GoingAway(reply) => {
                let mut n = 0;
                st.clients.for_each(|h| {
                    n += 1;
                    let _ = h.actor.cast(ConnMsg::GoingAway);
                });
                let _ = reply.send(n);
            }
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

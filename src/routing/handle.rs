//! One client connection as the data plane sees it: its key and queue, read by
//! every sender, and a few flags, each written by one party only (noted per
//! field group).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;

use super::send_queue::SendQueue;
use super::watch::WatchQueue;
use crate::protocol::PublicKey;
use crate::reasons::{CloseReason, DropReason, Transport};

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
    /// Ends the connection; set by its owner, so routing needs no actor types.
    closer: Box<dyn Fn(CloseReason) + Send + Sync>,
    /// Set once the connection's owner has torn it down.
    closed: AtomicBool,
    active: AtomicBool,
    activity_requested: AtomicBool,
    preferred: AtomicBool,
    /// When the write in progress began (relay-relative ms), 0 when none is.
    write_started_ms: AtomicU64,
    /// Packets in the write in progress, counted as dropped if it never ends.
    pub write_packets: AtomicU64,
    /// Keys (and their connection) this client delivered packets to, told
    /// PeerGone when this client leaves.
    sent_to: Mutex<HashMap<PublicKey, u64>>,
    /// PeerPresent flags (regular, mesh peer, prober); set once before
    /// registration by the connection's owner.
    presence_flags: AtomicU8,
    /// Set when this mesh peer sent WatchConns; its writer drains it.
    watch: OnceLock<Box<WatchQueue>>,
}

impl ClientHandle {
    pub fn new(
        key: PublicKey,
        conn_id: u64,
        transport: Transport,
        remote: SocketAddr,
        queue_depth: usize,
        closer: Box<dyn Fn(CloseReason) + Send + Sync>,
    ) -> Self {
        ClientHandle {
            key,
            conn_id,
            transport,
            remote,
            queue: SendQueue::new(queue_depth),
            closer,
            closed: AtomicBool::new(false),
            active: AtomicBool::new(false),
            activity_requested: AtomicBool::new(false),
            preferred: AtomicBool::new(false),
            write_started_ms: AtomicU64::new(0),
            write_packets: AtomicU64::new(0),
            sent_to: Mutex::new(HashMap::new()),
            presence_flags: AtomicU8::new(crate::protocol::frame::PEER_PRESENT_IS_REGULAR),
            watch: OnceLock::new(),
        }
    }

    /// Asks the connection's owner to close it for `why`.
    pub fn close(&self, why: CloseReason) {
        (self.closer)(why);
    }

    /// Called by the owner when the connection is gone.
    pub fn mark_closed(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Marks a socket write as started at `now_ms` (never 0) with `packets` in it.
    pub fn begin_write(&self, now_ms: u64, packets: u64) {
        self.write_packets.store(packets, Ordering::Relaxed);
        self.write_started_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn end_write(&self) {
        self.write_started_ms.store(0, Ordering::Relaxed);
    }

    /// Queues a packet for this client, evicting the oldest if the queue is
    /// full: the connection id and, if it was full, the reason for the packet
    /// that made room.
    pub fn push(
        &self,
        src: PublicKey,
        data: Bytes,
        disco: bool,
    ) -> Result<(u64, Option<DropReason>), DropReason> {
        self.pushed(self.queue.push_packet(src, data, disco))
    }

    /// As [`Self::push`], but a full queue first makes the sender wait for
    /// the writer to take its batch, at most `wait`
    /// ([`SendQueue::push_when_room`]). No wait for a writer whose write has
    /// been stuck that long: a receiver that has stopped reading must not
    /// hold its senders back, so only one that drains at least `queue_depth`
    /// packets per `wait` ever slows a sender.
    pub async fn push_when_room(
        &self,
        src: PublicKey,
        data: Bytes,
        disco: bool,
        wait: std::time::Duration,
        now_ms: u64,
    ) -> Result<(u64, Option<DropReason>), DropReason> {
        let stuck = self
            .write_blocked_for(now_ms)
            .is_some_and(|ms| u128::from(ms) >= wait.as_millis());
        if stuck {
            return self.push(src, data, disco);
        }
        let deadline = tokio::time::Instant::now() + wait;
        self.pushed(self.queue.push_when_room(src, data, disco, deadline).await)
    }

    fn pushed(&self, r: Result<(), DropReason>) -> Result<(u64, Option<DropReason>), DropReason> {
        match r {
            Ok(()) => Ok((self.conn_id, None)),
            Err(DropReason::QueueHead) => Ok((self.conn_id, Some(DropReason::QueueHead))),
            Err(r) => Err(r),
        }
    }

    /// How long the write in progress has been blocked, if one is.
    pub fn write_blocked_for(&self, now_ms: u64) -> Option<u64> {
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

    pub(super) fn set_active(&self, v: bool) {
        self.active.store(v, Ordering::Relaxed);
        self.activity_requested.store(false, Ordering::Relaxed);
    }

    /// Records NotePreferred; returns the previous value.
    pub fn set_preferred(&self, v: bool) -> bool {
        self.preferred.swap(v, Ordering::Relaxed)
    }

    /// Records what the client is, for PeerPresent and the mesh rules.
    pub fn set_role(&self, mesh_peer: bool, prober: bool) {
        use crate::protocol::frame::*;
        let f = match (mesh_peer, prober) {
            (true, _) => PEER_PRESENT_IS_MESH_PEER,
            (false, true) => PEER_PRESENT_IS_PROBER,
            _ => PEER_PRESENT_IS_REGULAR,
        };
        self.presence_flags.store(f, Ordering::Relaxed);
    }

    /// A relay of this region that presented the mesh key.
    pub fn is_mesh_peer(&self) -> bool {
        self.presence_flags() & crate::protocol::frame::PEER_PRESENT_IS_MESH_PEER != 0
    }

    pub fn presence_flags(&self) -> u8 {
        self.presence_flags.load(Ordering::Relaxed)
    }

    /// Makes this connection a watcher; false if it already was one.
    pub fn start_watching(&self, max_pending: usize) -> bool {
        self.watch
            .set(Box::new(WatchQueue::new(max_pending)))
            .is_ok()
    }

    /// The presence updates pending for this watcher, if it watches.
    pub fn watch(&self) -> Option<&WatchQueue> {
        self.watch.get().map(|b| &**b)
    }

    pub fn note_sent_to(&self, dst: PublicKey, dst_conn: u64) {
        let mut m = self.sent_to.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < MAX_SENT_TO || m.contains_key(&dst) {
            m.insert(dst, dst_conn);
        }
    }

    pub fn take_sent_to(&self) -> HashMap<PublicKey, u64> {
        std::mem::take(&mut *self.sent_to.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

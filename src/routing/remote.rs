//! The mesh half of the routing table: which client keys are connected to
//! another relay of the region, and the link each one is reached through.
//!
//! Mesh links learn keys from their peer's PeerPresent/PeerGone and write them
//! here; senders read it when a destination is not connected locally and push
//! the packet onto that link's bounded [`ForwardQueue`] — a map read and a
//! queue push, like a local delivery, never an actor message. The first link
//! that announced a key stays preferred until it withdraws it (derper's rule).
//!
//! For region-wide PeerGone it also remembers, per remote key, which local
//! clients received packets forwarded from it: they are told the key left only
//! once no node of the region has it any more.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::protocol::PublicKey;
use crate::reasons::{DropReason, MeshPeerState};

/// Local receivers remembered per remote sender for PeerGone (as for local
/// senders: past this a sender is simply not remembered for new receivers).
const MAX_RECEIVERS: usize = 4096;

/// One packet waiting for a mesh link: source, destination, payload.
pub type Forward = (PublicKey, PublicKey, Bytes);

/// A link to one peer relay, as the data plane sees it: its queue, its state
/// and the keys it announced. Created and driven by the mesh actors.
pub struct MeshLink {
    /// Unique per link, so a re-created link is a new identity.
    pub id: u64,
    /// The peer as configured (`host:port`, or the DNS name).
    pub name: String,
    /// Where it is dialled.
    pub dial: String,
    /// `dial` when it is an address.
    dial_ip: Option<IpAddr>,
    pub queue: ForwardQueue,
    state: AtomicU8,
    /// Keys learned through this link; written by its task only.
    keys: Mutex<HashSet<PublicKey>>,
    /// The peer's server key, once a handshake told it.
    peer_key: Mutex<Option<PublicKey>>,
    /// Sessions that reached `Connected`.
    pub sessions: AtomicU64,
    /// What a host name in `dial` last resolved to: the peer's own links to
    /// us come from there, so they are exempt from per-address limits too.
    resolved: Mutex<Vec<IpAddr>>,
}

impl MeshLink {
    pub fn new(id: u64, name: String, dial: String, queue_depth: usize) -> Self {
        MeshLink {
            id,
            name,
            dial_ip: dial.parse::<IpAddr>().ok().map(|ip| ip.to_canonical()),
            dial,
            queue: ForwardQueue::new(queue_depth),
            state: AtomicU8::new(MeshPeerState::Connecting as u8),
            keys: Mutex::new(HashSet::new()),
            peer_key: Mutex::new(None),
            sessions: AtomicU64::new(0),
            resolved: Mutex::new(Vec::new()),
        }
    }

    /// True if the peer's own connections to us come from `ip`: the
    /// address it is dialled at, or what its host name last resolved to.
    pub fn is_at(&self, ip: &IpAddr) -> bool {
        match self.dial_ip {
            Some(d) => d == *ip,
            None => self
                .resolved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(ip),
        }
    }

    /// Records what the host name in `dial` resolved to.
    pub fn set_resolved(&self, ips: impl IntoIterator<Item = IpAddr>) {
        *self.resolved.lock().unwrap_or_else(|p| p.into_inner()) =
            ips.into_iter().map(|ip| ip.to_canonical()).collect();
    }

    pub fn state(&self) -> MeshPeerState {
        MeshPeerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Sets the state; returns the previous one (for the state gauges).
    pub fn swap_state(&self, s: MeshPeerState) -> MeshPeerState {
        MeshPeerState::from_u8(self.state.swap(s as u8, Ordering::Relaxed))
    }

    pub fn peer_key(&self) -> Option<PublicKey> {
        *self.peer_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_peer_key(&self, k: PublicKey) {
        *self.peer_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(k);
    }

    /// Keys this link currently announces.
    pub fn key_count(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashSet<PublicKey>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A link's bounded queue of packets to forward. Like a client's
/// [`SendQueue`](super::SendQueue): senders push under a short lock, the
/// link's writer swaps the whole queue out per batch, a full queue drops its
/// oldest packet. Closed while the link is down.
pub struct ForwardQueue {
    depth: usize,
    inner: Mutex<FwdInner>,
    wake: Notify,
    /// Senders waiting for room ([`Self::push_when_room`]); told when the
    /// writer takes a batch or the queue closes.
    room: Notify,
}

#[derive(Default)]
struct FwdInner {
    pending: VecDeque<Forward>,
    open: bool,
}

impl ForwardQueue {
    pub fn new(depth: usize) -> Self {
        ForwardQueue {
            depth: depth.max(1),
            inner: Mutex::new(FwdInner::default()),
            wake: Notify::new(),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FwdInner> {
        // Each operation is one push/pop/swap: poisoning leaves nothing torn.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a packet. `Ok(Some(MeshQueue))` when the oldest queued packet
    /// was dropped to make room; `Err` when the link is down.
    pub fn push(&self, f: Forward) -> Result<Option<DropReason>, DropReason> {
        let evicted = {
            let mut g = self.lock();
            if !g.open {
                return Err(DropReason::MeshQueue);
            }
            let evicted = g.pending.len() >= self.depth;
            if evicted {
                g.pending.pop_front();
            }
            g.pending.push_back(f);
            evicted
        };
        self.wake.notify_one();
        Ok(evicted.then_some(DropReason::MeshQueue))
    }

    /// Queues a packet without evicting: a full queue hands it back
    /// (`Err(Some)`) so the sender can wait for room
    /// ([`Self::push_when_room`]); a link that is down drops it (`Err(None)`).
    pub fn try_push(&self, f: Forward) -> Result<(), Option<Forward>> {
        {
            let mut g = self.lock();
            if !g.open {
                return Err(None);
            }
            if g.pending.len() >= self.depth {
                return Err(Some(f));
            }
            g.pending.push_back(f);
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Queues a packet once the link writer has taken its current batch,
    /// waiting at most `wait`; then evicts the oldest as [`Self::push`] does.
    /// A full queue means the link's TCP stream is the bottleneck: waiting
    /// passes that back to the sender's TCP stream (derper blocks its sender
    /// on the mesh write for the same reason) instead of reading packets
    /// only to drop them.
    pub async fn push_when_room(
        &self,
        f: Forward,
        wait: std::time::Duration,
    ) -> Result<Option<DropReason>, DropReason> {
        let deadline = tokio::time::Instant::now() + wait;
        let waited =
            super::send_queue::wait_for_room(&self.room, deadline, f, |f| match self.try_push(f) {
                Ok(()) => Ok(Ok(None)),
                Err(None) => Ok(Err(DropReason::MeshQueue)),
                Err(Some(back)) => {
                    self.wake.notify_one();
                    Err(back)
                }
            })
            .await;
        match waited {
            Ok(r) => r,
            Err(f) => self.push(f),
        }
    }

    /// Starts accepting packets (the link is up).
    pub fn open(&self) {
        self.lock().open = true;
    }

    /// Refuses further packets and returns how many queued ones are lost.
    pub fn close(&self) -> usize {
        let n = {
            let mut g = self.lock();
            g.open = false;
            let n = g.pending.len();
            g.pending.clear();
            n
        };
        self.wake.notify_one();
        self.room.notify_waiters();
        n
    }

    /// Waits for packets and moves them all into `out` (empty, reused);
    /// false once the queue is closed.
    pub async fn next_batch(&self, out: &mut VecDeque<Forward>) -> bool {
        loop {
            {
                let mut g = self.lock();
                if !g.open {
                    return false;
                }
                if !g.pending.is_empty() {
                    std::mem::swap(&mut g.pending, out);
                    drop(g);
                    self.room.notify_waiters();
                    return true;
                }
            }
            // notify_one keeps a permit when no one waits: no lost wake-up.
            self.wake.notified().await;
        }
    }
}

#[derive(Default)]
struct RemoteSlot {
    /// Links announcing the key, first announced first (preferred).
    links: Vec<std::sync::Arc<MeshLink>>,
}

/// Remote keys → mesh links. Written by the link tasks, read by senders.
#[derive(Default)]
pub struct RemoteKeys {
    /// Read per packet to a remote key: foldhash, as the local table.
    map: DashMap<PublicKey, RemoteSlot, foldhash::fast::RandomState>,
    /// Per remote sender, the local receivers of packets forwarded from it
    /// (with their connection id), told PeerGone when it leaves the region.
    /// Apart from `map`: a forwarded packet can arrive (on the peer's link
    /// to us) before the PeerPresent for its sender (on ours to the peer).
    receivers: DashMap<PublicKey, Receivers, foldhash::fast::RandomState>,
    links: RwLock<Vec<std::sync::Arc<MeshLink>>>,
}

/// Local receivers of one remote sender, and the peer (server key) its
/// packets came from.
#[derive(Default)]
struct Receivers {
    via: Option<PublicKey>,
    to: HashMap<PublicKey, u64>,
}

/// What [`RemoteKeys::try_forward`] did with a packet.
pub enum TryForward {
    Queued,
    /// The link's queue is full: the packet back, to queue when there is room.
    Full(std::sync::Arc<MeshLink>, Forward),
    /// The link is down: dropped.
    Down,
    /// No peer announced the destination: the payload back.
    Unknown(Bytes),
}

/// Receivers to tell that a key left the region (key, [(receiver, conn)]).
pub type Departed = (PublicKey, HashMap<PublicKey, u64>);

impl RemoteKeys {
    /// Hot path: queues a packet for `dst` on its preferred link, or `None`
    /// if no peer announced `dst`.
    pub fn forward(
        &self,
        src: PublicKey,
        dst: &PublicKey,
        data: Bytes,
    ) -> Option<Result<Option<DropReason>, DropReason>> {
        let slot = self.map.get(dst)?;
        let link = slot.links.first()?;
        Some(link.queue.push((src, *dst, data)))
    }

    /// [`Self::forward`] without evicting; see [`ForwardQueue::try_push`].
    pub fn try_forward(&self, src: PublicKey, dst: &PublicKey, data: Bytes) -> TryForward {
        let Some(link) = self.map.get(dst).and_then(|s| s.links.first().cloned()) else {
            return TryForward::Unknown(data);
        };
        match link.queue.try_push((src, *dst, data)) {
            Ok(()) => TryForward::Queued,
            Err(None) => TryForward::Down,
            Err(Some(f)) => TryForward::Full(link, f),
        }
    }

    /// Distinct keys reachable through peers.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn is_known(&self, key: &PublicKey) -> bool {
        self.map.contains_key(key)
    }

    /// The links currently set up (for `/healthz`).
    pub fn links(&self) -> Vec<std::sync::Arc<MeshLink>> {
        self.links.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn add_link(&self, l: std::sync::Arc<MeshLink>) {
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(l);
    }

    pub fn remove_link(&self, id: u64) {
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|l| l.id != id);
    }

    /// True for an address a mesh peer connects from (see
    /// [`MeshLink::is_at`]): its connections are not held to per-address
    /// limits.
    pub fn is_peer_ip(&self, ip: &IpAddr) -> bool {
        let ip = ip.to_canonical();
        let links = self.links.read().unwrap_or_else(|p| p.into_inner());
        links.iter().any(|l| l.is_at(&ip))
    }

    /// PeerPresent: `key` is reachable through `link`. True if the key was
    /// not known through any link before.
    pub fn present(&self, key: PublicKey, link: &std::sync::Arc<MeshLink>) -> bool {
        let mut slot = self.map.entry(key).or_default();
        let new_key = slot.links.is_empty();
        if !slot.links.iter().any(|l| l.id == link.id) {
            slot.links.push(link.clone());
            link.keys().insert(key);
        }
        new_key
    }

    /// PeerGone: `link` no longer reaches `key`. Returns the receivers to
    /// tell if no link reaches it any more.
    pub fn gone(&self, key: &PublicKey, link: &MeshLink) -> Option<Departed> {
        link.keys().remove(key);
        if !self.map.contains_key(key) {
            // Never announced to us: the peer coalesced a short visit's
            // PeerPresent away. Whoever got its packets is still told.
            return self.receivers.remove(key).map(|(k, r)| (k, r.to));
        }
        self.withdraw(key, link.id)
    }

    fn withdraw(&self, key: &PublicKey, link_id: u64) -> Option<Departed> {
        let dashmap::Entry::Occupied(mut e) = self.map.entry(*key) else {
            return None;
        };
        e.get_mut().links.retain(|l| l.id != link_id);
        if !e.get().links.is_empty() {
            return None;
        }
        e.remove();
        let receivers = self
            .receivers
            .remove(key)
            .map(|(_, r)| r.to)
            .unwrap_or_default();
        Some((*key, receivers))
    }

    /// The link is down: every key learned through it is withdrawn (they are
    /// relearned from the next flood). Returns the keys that left the region.
    pub fn link_down(&self, link: &MeshLink) -> Vec<Departed> {
        let keys: Vec<PublicKey> = link.keys().drain().collect();
        let mut gone: Vec<Departed> = keys
            .iter()
            .filter_map(|k| self.withdraw(k, link.id))
            .collect();
        // Senders whose packets came from this peer but whose PeerPresent
        // never reached us (the peer died first): gone with the peer.
        if let Some(peer) = link.peer_key() {
            let orphans: Vec<PublicKey> = self
                .receivers
                .iter()
                .filter(|e| e.via == Some(peer) && !self.map.contains_key(e.key()))
                .map(|e| *e.key())
                .collect();
            gone.extend(
                orphans
                    .into_iter()
                    .filter_map(|k| self.receivers.remove(&k).map(|(k, r)| (k, r.to))),
            );
        }
        gone
    }

    /// A packet forwarded from remote `src` was delivered to local `dst`
    /// (connection `conn`): remember `dst` for PeerGone when `src` leaves.
    /// `via` is the server key of the peer that forwarded it.
    pub fn note_receiver(&self, src: &PublicKey, via: PublicKey, dst: PublicKey, conn: u64) {
        let mut r = self.receivers.entry(*src).or_default();
        r.via = Some(via);
        if r.to.len() < MAX_RECEIVERS || r.to.contains_key(&dst) {
            r.to.insert(dst, conn);
        }
    }

    /// A key's last local connection closed. If a peer still has it, its
    /// local receivers are kept for when it leaves there (true); otherwise
    /// the caller tells them now (false).
    pub fn adopt_receivers(
        &self,
        key: &PublicKey,
        receivers: &mut HashMap<PublicKey, u64>,
    ) -> bool {
        // The slot's shard lock is held throughout, so a concurrent
        // withdrawal either sees these receivers or makes this return false.
        let Some(slot) = self.map.get(key) else {
            return false;
        };
        let mut r = self.receivers.entry(*key).or_default();
        if r.via.is_none() {
            r.via = slot.links.first().and_then(|l| l.peer_key());
        }
        for (k, c) in receivers.drain() {
            if r.to.len() >= MAX_RECEIVERS {
                break;
            }
            r.to.insert(k, c);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn k(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn link(id: u64) -> Arc<MeshLink> {
        let l = Arc::new(MeshLink::new(id, format!("peer{id}"), "x".into(), 2));
        l.queue.open();
        l
    }

    #[test]
    fn first_announcer_is_preferred_until_it_withdraws() {
        let r = RemoteKeys::default();
        let (a, b) = (link(1), link(2));
        assert!(r.present(k(9), &a));
        assert!(!r.present(k(9), &b));
        r.forward(k(1), &k(9), Bytes::from_static(b"x"))
            .unwrap()
            .unwrap();
        assert_eq!(a.queue.lock().pending.len(), 1);
        assert!(r.gone(&k(9), &a).is_none(), "b still has it");
        r.forward(k(1), &k(9), Bytes::from_static(b"y"))
            .unwrap()
            .unwrap();
        assert_eq!(b.queue.lock().pending.len(), 1);
        r.note_receiver(&k(9), k(100), k(5), 7);
        let (key, receivers) = r.link_down(&b).pop().unwrap();
        assert_eq!(key, k(9));
        assert_eq!(receivers.get(&k(5)), Some(&7));
        assert!(r.forward(k(1), &k(9), Bytes::new()).is_none());
    }

    #[test]
    fn full_link_queue_drops_oldest_and_closed_refuses() {
        let l = link(1);
        let f = |b: &'static [u8]| (k(1), k(2), Bytes::from_static(b));
        assert_eq!(l.queue.push(f(b"a")), Ok(None));
        assert_eq!(l.queue.push(f(b"b")), Ok(None));
        assert_eq!(l.queue.push(f(b"c")), Ok(Some(DropReason::MeshQueue)));
        assert_eq!(l.queue.close(), 2);
        assert_eq!(l.queue.push(f(b"d")), Err(DropReason::MeshQueue));
    }

    /// A sender waiting (long enough never to time out here) for room.
    fn wait_for_room(
        l: &Arc<MeshLink>,
        f: Forward,
    ) -> tokio::task::JoinHandle<Result<Option<DropReason>, DropReason>> {
        let l = l.clone();
        tokio::spawn(async move {
            l.queue
                .push_when_room(f, std::time::Duration::from_secs(30))
                .await
        })
    }

    #[tokio::test]
    async fn a_full_queue_waits_for_the_writer_then_evicts_at_the_deadline() {
        let l = link(1);
        let f = |b: &'static [u8]| (k(1), k(2), Bytes::from_static(b));
        l.queue.push(f(b"a")).unwrap();
        l.queue.push(f(b"b")).unwrap();
        let waiter = wait_for_room(&l, f(b"c"));
        // The writer takes its batch: the waiter gets in without evicting.
        let mut out = VecDeque::new();
        assert!(l.queue.next_batch(&mut out).await);
        assert_eq!(out.len(), 2);
        assert_eq!(waiter.await.unwrap(), Ok(None));
        assert_eq!(&l.queue.lock().pending[0].2[..], b"c");

        // Nobody drains: the deadline passes and the oldest goes.
        l.queue.push(f(b"d")).unwrap();
        let r = l
            .queue
            .push_when_room(f(b"e"), std::time::Duration::from_millis(20))
            .await;
        assert_eq!(r, Ok(Some(DropReason::MeshQueue)));
        let left: Vec<_> = l.queue.lock().pending.iter().map(|f| f.2.clone()).collect();
        assert_eq!(left, [Bytes::from_static(b"d"), Bytes::from_static(b"e")]);

        // A link that goes down while a sender waits drops the packet.
        let waiter = wait_for_room(&l, f(b"f"));
        tokio::task::yield_now().await;
        l.queue.close();
        assert_eq!(waiter.await.unwrap(), Err(DropReason::MeshQueue));
    }
}

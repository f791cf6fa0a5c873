//! The routing table: public key → the connection packets for it go to,
//! with duplicate connections per key modelled explicitly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dashmap::DashMap;

use super::handle::ClientHandle;
use super::remote::{Departed, RemoteKeys};
use super::send_queue::Control;
use super::watch::Presence;
use crate::protocol::{PeerGoneReason, PublicKey};
use crate::reasons::DropReason;

struct KeySlot {
    active: Arc<ClientHandle>,
    /// Older connections for the same key, oldest first.
    others: Vec<Arc<ClientHandle>>,
}

/// The routing table: key → connection. Read by everyone, written only by the
/// registry actor (the `pub` writers below are for it alone).
#[derive(Default)]
pub struct Clients {
    /// Keys are X25519 public keys: foldhash (randomly seeded per process)
    /// rather than SipHash, which was 2.5 % of the relay's CPU under load.
    map: DashMap<PublicKey, KeySlot, foldhash::fast::RandomState>,
    connections: AtomicUsize,
    /// Keys connected to other relays of the region (mesh).
    pub remote: RemoteKeys,
    /// Mesh peers that sent WatchConns; kept here (not in the registry's
    /// state) so a registry restart keeps them.
    watchers: Mutex<Vec<Arc<ClientHandle>>>,
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
        let Some(slot) = self.map.get(dst) else {
            // Not here: a mesh peer may have it. Connection id 0 is never a
            // real one, so PeerGone bookkeeping for it stays inert.
            return match self.remote.forward(src, dst, data) {
                Some(Ok(evicted)) => Ok((0, evicted)),
                Some(Err(r)) => Err(r),
                None => Err(DropReason::UnknownDest),
            };
        };
        slot.active.push(src, data, disco)
    }

    /// A packet a mesh peer forwarded: local delivery only, never forwarded
    /// again (one hop, so no loops).
    pub fn route_local(
        &self,
        src: PublicKey,
        dst: &PublicKey,
        data: Bytes,
        disco: bool,
    ) -> Result<(u64, Option<DropReason>), DropReason> {
        let slot = self.map.get(dst).ok_or(DropReason::UnknownDestOnFwd)?;
        slot.active.push(src, data, disco)
    }

    /// Runs `f` on `dst`'s local active connection with `data` while the
    /// table entry is held, so the hot path need not clone the handle per
    /// packet; hands `data` back when the key is not local (for [`Self::route`],
    /// which may forward it to a mesh peer).
    pub fn with_active<R>(
        &self,
        dst: &PublicKey,
        data: Bytes,
        f: impl FnOnce(&Arc<ClientHandle>, Bytes) -> R,
    ) -> Result<R, Bytes> {
        match self.map.get(dst) {
            Some(slot) => Ok(f(&slot.active, data)),
            None => Err(data),
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

    pub fn for_each(&self, mut f: impl FnMut(&Arc<ClientHandle>)) {
        for slot in self.map.iter() {
            f(&slot.active);
            slot.others.iter().for_each(&mut f);
        }
    }

    /// Every connection of `key`, active first.
    pub fn connections_of(&self, key: &PublicKey) -> Vec<Arc<ClientHandle>> {
        self.map
            .get(key)
            .map(|s| {
                std::iter::once(&s.active)
                    .chain(s.others.iter())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Adds a watcher (a mesh peer that sent WatchConns) and queues the
    /// flood: PeerPresent for every key connected here. The registry calls
    /// this, so no registration can slip between the flood and the updates.
    pub fn add_watcher(&self, w: Arc<ClientHandle>) -> bool {
        let Some(q) = w.watch() else { return false };
        let mut ok = true;
        for slot in self.map.iter() {
            let h = &slot.active;
            if h.key == w.key {
                continue;
            }
            ok &= q
                .push(
                    h.key,
                    Presence::Present {
                        addr: h.remote,
                        flags: h.presence_flags(),
                    },
                )
                .0;
        }
        w.queue.push_control(Control::MeshUpdates);
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(w);
        ok
    }

    pub fn remove_watcher(&self, conn_id: u64) -> bool {
        let mut ws = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let before = ws.len();
        ws.retain(|w| w.conn_id != conn_id);
        ws.len() != before
    }

    /// Tells every watcher about `key`; returns the watchers that fell too
    /// far behind (to be closed).
    pub fn tell_watchers(&self, key: PublicKey, p: Presence) -> Vec<Arc<ClientHandle>> {
        let ws = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let mut behind = Vec::new();
        for w in ws.iter() {
            // A peer is not told about its own link to us.
            if w.key == key {
                continue;
            }
            if let Some(q) = w.watch() {
                let (ok, was_empty) = q.push(key, p);
                if was_empty {
                    w.queue.push_control(Control::MeshUpdates);
                }
                if !ok {
                    behind.push(w.clone());
                }
            }
        }
        behind
    }

    pub fn watcher_count(&self) -> usize {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Region-wide PeerGone: a key left the last node that had it. Each
    /// receiver still on the connection that got its packets is told.
    pub fn tell_departed(&self, key: &PublicKey, receivers: HashMap<PublicKey, u64>) {
        if self.is_connected(key) {
            return; // it is (again) connected here
        }
        for (dst, dst_conn) in receivers {
            if let Some(d) = self.active(&dst)
                && d.conn_id == dst_conn
            {
                d.queue
                    .push_control(Control::PeerGone(*key, PeerGoneReason::Disconnected));
            }
        }
    }

    /// [`tell_departed`](Self::tell_departed) for each key a link withdrew.
    pub fn tell_all_departed(&self, gone: Vec<Departed>) {
        for (k, r) in gone {
            self.tell_departed(&k, r);
        }
    }

    /// Adds `h` as the active connection for its key; returns true if the key
    /// was already connected.
    pub fn insert(&self, h: Arc<ClientHandle>) -> bool {
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
    pub fn remove(&self, h: &ClientHandle) -> bool {
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
    pub fn activate(&self, h: &Arc<ClientHandle>) {
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

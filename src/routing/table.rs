//! The routing table: public key → the connection packets for it go to,
//! with duplicate connections per key modelled explicitly.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;

use super::handle::ClientHandle;
use crate::protocol::PublicKey;
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

    /// Runs `f` on `dst`'s active connection while the table entry is held,
    /// so the hot path need not clone the handle per packet.
    pub fn with_active<R>(
        &self,
        dst: &PublicKey,
        f: impl FnOnce(&Arc<ClientHandle>) -> R,
    ) -> Option<R> {
        self.map.get(dst).map(|slot| f(&slot.active))
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

//! Presence updates for a watching mesh peer (WatchConns): which local keys
//! came and went, coalesced per key so a churning client costs one pending
//! entry, not one per connect. The registry (the table's single writer)
//! pushes; the watcher's writer drains and encodes PeerPresent/PeerGone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use crate::protocol::PublicKey;

/// The latest news about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Connected here, from `addr`, with PeerPresent `flags`.
    Present { addr: SocketAddr, flags: u8 },
    /// Its last connection here closed.
    Gone,
}

/// One watcher's pending updates, bounded by `max` distinct keys (0 = no
/// bound): past it the watcher is too far behind to catch up by updates and is
/// cut off; it reconnects and gets a fresh flood.
pub struct WatchQueue {
    max: usize,
    pending: Mutex<HashMap<PublicKey, Presence>>,
}

impl WatchQueue {
    pub fn new(max: usize) -> Self {
        WatchQueue {
            max,
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PublicKey, Presence>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the latest news for `key`; false when the bound is exceeded.
    /// The second return is true if the queue was empty (the writer needs a wake-up).
    pub fn push(&self, key: PublicKey, p: Presence) -> (bool, bool) {
        let mut g = self.lock();
        let was_empty = g.is_empty();
        g.insert(key, p);
        (self.max == 0 || g.len() <= self.max, was_empty)
    }

    /// Takes everything pending.
    pub fn drain(&self) -> HashMap<PublicKey, Presence> {
        std::mem::take(&mut *self.lock())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_coalesce_per_key_and_bound_counts_keys() {
        let q = WatchQueue::new(2);
        let a = "127.0.0.1:1".parse().unwrap();
        let k = |b| PublicKey([b; 32]);
        assert_eq!(
            q.push(k(1), Presence::Present { addr: a, flags: 1 }),
            (true, true)
        );
        assert_eq!(q.push(k(1), Presence::Gone), (true, false));
        assert!(q.push(k(2), Presence::Gone).0);
        assert!(!q.push(k(3), Presence::Gone).0);
        let d = q.drain();
        assert_eq!(d.get(&k(1)), Some(&Presence::Gone));
        assert!(q.is_empty());
    }
}

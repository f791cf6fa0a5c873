//! The bounded per-client send queue: the only thing a sender touches to hand a
//! packet to another client.
//!
//! Senders push under a short mutex and wake the writer through a `Notify`; the
//! writer swaps the whole queue out in one go, so a batch costs one lock and one
//! socket write. Packets and disco packets have separate bounds (as upstream), so
//! NAT traversal is not starved by data; control frames (Pong, PeerGone,
//! KeepAlive) have their own small bound. A full queue drops its oldest packet.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::protocol::{PeerGoneReason, PublicKey};
use crate::reasons::{CloseReason, DropReason};

/// Control frames kept per client before the oldest is dropped; they are tiny
/// and only pile up when a client stops reading.
const CONTROL_DEPTH: usize = 64;

/// A control frame for the writer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Pong([u8; 8]),
    PeerGone(PublicKey, PeerGoneReason),
    KeepAlive,
    /// Mesh presence updates are waiting in the handle's watch queue.
    MeshUpdates,
    /// The reader found a protocol violation: the writer tells the client why
    /// (a WebSocket close code) and ends the connection. Handed to the writer
    /// because it owns the write half; nothing queued after it is sent.
    Abort(CloseReason),
}

/// What the writer takes out of the queue in one go.
#[derive(Default)]
pub struct Batch {
    pub control: VecDeque<Control>,
    pub disco: VecDeque<(PublicKey, Bytes)>,
    pub packets: VecDeque<(PublicKey, Bytes)>,
    /// The relay is stopping: send what is here, say goodbye, close.
    pub going_away: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.disco.is_empty() && self.packets.is_empty()
    }

    pub fn packet_count(&self) -> usize {
        self.disco.len() + self.packets.len()
    }

    fn clear(&mut self) {
        self.control.clear();
        self.disco.clear();
        self.packets.clear();
    }
}

pub struct SendQueue {
    depth: usize,
    inner: Mutex<Inner>,
    wake: Notify,
}

#[derive(Default)]
struct Inner {
    pending: Batch,
    closed: bool,
}

impl SendQueue {
    pub fn new(depth: usize) -> Self {
        SendQueue {
            depth: depth.max(1),
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the deques inconsistent
        // (each operation is a single push/pop), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a packet from `src`. On a full queue the oldest packet is dropped
    /// to make room and its drop reason returned; on a closed queue the packet
    /// itself is dropped.
    pub fn push_packet(&self, src: PublicKey, data: Bytes, disco: bool) -> Result<(), DropReason> {
        let evicted = {
            let mut g = self.lock();
            if g.closed {
                return Err(DropReason::GoneDisconnected);
            }
            let q = if disco {
                &mut g.pending.disco
            } else {
                &mut g.pending.packets
            };
            let evicted = q.len() >= self.depth;
            if evicted {
                q.pop_front();
            }
            q.push_back((src, data));
            evicted
        };
        self.wake.notify_one();
        if evicted {
            Err(DropReason::QueueHead)
        } else {
            Ok(())
        }
    }

    /// Queues a packet without waking the writer and without evicting: a
    /// reader routing a whole read's worth of packets wakes each writer once
    /// at the end ([`Self::wake`]), so a batch costs one wakeup and one write.
    /// A full queue hands the packet back (`QueueHead`) for the caller to let
    /// the writer drain and retry; a closed one too (`GoneDisconnected`).
    pub fn try_push_packet(
        &self,
        src: PublicKey,
        data: Bytes,
        disco: bool,
    ) -> Result<(), (DropReason, Bytes)> {
        let mut g = self.lock();
        if g.closed {
            return Err((DropReason::GoneDisconnected, data));
        }
        let q = if disco {
            &mut g.pending.disco
        } else {
            &mut g.pending.packets
        };
        if q.len() >= self.depth {
            return Err((DropReason::QueueHead, data));
        }
        q.push_back((src, data));
        Ok(())
    }

    /// Wakes the writer for what [`Self::try_push_packet`] queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Queues a control frame; returns false if the queue is closed.
    pub fn push_control(&self, c: Control) -> bool {
        {
            let mut g = self.lock();
            if g.closed {
                return false;
            }
            if g.pending.control.len() >= CONTROL_DEPTH {
                g.pending.control.pop_front();
            }
            g.pending.control.push_back(c);
        }
        self.wake.notify_one();
        true
    }

    /// Asks the writer to flush what is queued, say goodbye and close.
    pub fn going_away(&self) {
        self.lock().pending.going_away = true;
        self.wake.notify_one();
    }

    /// Refuses further pushes and returns how many packets were still queued
    /// (they will never be sent).
    pub fn close(&self) -> usize {
        let mut g = self.lock();
        g.closed = true;
        let n = g.pending.packet_count();
        g.pending.clear();
        n
    }

    /// Waits until something is queued, then moves all of it into `batch`
    /// (which must be empty; its allocations are reused).
    pub async fn next_batch(&self, batch: &mut Batch) {
        loop {
            {
                let mut g = self.lock();
                let p = &mut g.pending;
                if !p.is_empty() || p.going_away {
                    std::mem::swap(&mut p.control, &mut batch.control);
                    std::mem::swap(&mut p.disco, &mut batch.disco);
                    std::mem::swap(&mut p.packets, &mut batch.packets);
                    batch.going_away = p.going_away;
                    return;
                }
            }
            // notify_one stores a permit if no one waits, so a push between the
            // check above and this await is not lost.
            self.wake.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    #[tokio::test]
    async fn full_queue_drops_oldest() {
        let q = SendQueue::new(2);
        assert_eq!(q.push_packet(k(1), Bytes::from_static(b"a"), false), Ok(()));
        assert_eq!(q.push_packet(k(1), Bytes::from_static(b"b"), false), Ok(()));
        assert_eq!(
            q.push_packet(k(1), Bytes::from_static(b"c"), false),
            Err(DropReason::QueueHead)
        );
        // Disco has its own bound.
        assert_eq!(q.push_packet(k(1), Bytes::from_static(b"d"), true), Ok(()));
        let mut b = Batch::default();
        q.next_batch(&mut b).await;
        let data: Vec<_> = b.packets.iter().map(|(_, d)| d.clone()).collect();
        assert_eq!(
            data,
            vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")]
        );
        assert_eq!(b.disco.len(), 1);
    }

    #[tokio::test]
    async fn writer_wakes_for_pushes_made_before_it_waits() {
        let q = std::sync::Arc::new(SendQueue::new(4));
        let q2 = q.clone();
        let t = tokio::spawn(async move {
            let mut b = Batch::default();
            q2.next_batch(&mut b).await;
            b.control.len()
        });
        assert!(q.push_control(Control::KeepAlive));
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(5), t)
                .await
                .unwrap()
                .unwrap(),
            1
        );
    }

    #[tokio::test]
    async fn quiet_push_refuses_when_full_and_wakes_on_request() {
        let q = std::sync::Arc::new(SendQueue::new(1));
        assert_eq!(
            q.try_push_packet(k(1), Bytes::from_static(b"a"), false),
            Ok(())
        );
        assert_eq!(
            q.try_push_packet(k(1), Bytes::from_static(b"b"), false),
            Err((DropReason::QueueHead, Bytes::from_static(b"b")))
        );
        let q2 = q.clone();
        let t = tokio::spawn(async move {
            let mut b = Batch::default();
            q2.next_batch(&mut b).await;
            b.packets.len()
        });
        q.wake();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "the full queue kept its packet rather than evicting");
        q.close();
        assert_eq!(
            q.try_push_packet(k(1), Bytes::new(), false),
            Err((DropReason::GoneDisconnected, Bytes::new()))
        );
    }

    #[tokio::test]
    async fn closed_queue_refuses() {
        let q = SendQueue::new(4);
        q.push_packet(k(1), Bytes::new(), false).unwrap();
        assert_eq!(q.close(), 1);
        assert_eq!(
            q.push_packet(k(1), Bytes::new(), false),
            Err(DropReason::GoneDisconnected)
        );
        assert!(!q.push_control(Control::KeepAlive));
    }
}

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
    /// A WebSocket pong answering a client's ping, with its payload.
    WsPong(Bytes),
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

    /// Disco packets and data packets have separate bounds.
    fn lane(&mut self, disco: bool) -> &mut VecDeque<(PublicKey, Bytes)> {
        if disco {
            &mut self.disco
        } else {
            &mut self.packets
        }
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
    /// Senders waiting for room ([`Self::push_when_room`]).
    room: Notify,
}

#[derive(Default)]
struct Inner {
    pending: Batch,
    closed: bool,
    /// A sender waits on `room`: the writer tells it when it takes a batch.
    /// A flag under the lock the writer already holds, so the writer does
    /// not touch `room` (its own lock) when no one waits, which is almost
    /// always.
    room_wanted: bool,
    /// A sender's wait for room ran out since the writer last took a batch:
    /// further senders evict at once until it takes one, so a receiver that
    /// is not draining costs its senders one wait per batch it takes, not
    /// one per packet.
    gave_up: bool,
}

impl Inner {
    /// Queues without evicting: a closed queue (`GoneDisconnected`) or a full
    /// lane (`QueueHead`) hands the packet back.
    fn try_push(
        &mut self,
        depth: usize,
        src: PublicKey,
        data: Bytes,
        disco: bool,
    ) -> Result<(), (DropReason, Bytes)> {
        if self.closed {
            return Err((DropReason::GoneDisconnected, data));
        }
        let q = self.pending.lane(disco);
        if q.len() >= depth {
            return Err((DropReason::QueueHead, data));
        }
        q.push_back((src, data));
        Ok(())
    }

    /// Queues, dropping the lane's oldest packet if it is full
    /// (`Ok(true)`); a closed queue drops this one.
    fn push(
        &mut self,
        depth: usize,
        src: PublicKey,
        data: Bytes,
        disco: bool,
    ) -> Result<bool, DropReason> {
        match self.try_push(depth, src, data, disco) {
            Ok(()) => Ok(false),
            Err((DropReason::QueueHead, data)) => {
                let q = self.pending.lane(disco);
                q.pop_front();
                q.push_back((src, data));
                Ok(true)
            }
            Err((r, _)) => Err(r),
        }
    }
}

/// Offers `value` to `attempt` until it takes it (`Ok`), again each time
/// `room` is notified, until `deadline`; then hands `value` back. The waiter
/// is registered before each attempt, so a notification between the attempt
/// and the wait is not lost. Shared by the client and mesh queues.
pub(super) async fn wait_for_room<V, T>(
    room: &Notify,
    deadline: tokio::time::Instant,
    mut value: V,
    mut attempt: impl FnMut(V) -> Result<T, V>,
) -> Result<T, V> {
    loop {
        let notified = room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        value = match attempt(value) {
            Ok(done) => return Ok(done),
            Err(back) => back,
        };
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(value);
        }
    }
}

impl SendQueue {
    pub fn new(depth: usize) -> Self {
        SendQueue {
            depth: depth.max(1),
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            room: Notify::new(),
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
        let evicted = self.lock().push(self.depth, src, data, disco)?;
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
        self.lock().try_push(self.depth, src, data, disco)
    }

    /// Queues a packet once the writer has taken its current batch, waiting
    /// until `deadline` at most; then evicts the oldest as
    /// [`Self::push_packet`] does (at once, if a wait already ran out since
    /// the writer last took a batch). While a sender waits it reads nothing
    /// more, so a receiver that drains a little slower than its senders send
    /// slows them through their TCP windows, as a forwarder would, instead of
    /// having the relay read packets only to drop them.
    pub async fn push_when_room(
        &self,
        src: PublicKey,
        data: Bytes,
        disco: bool,
        deadline: tokio::time::Instant,
    ) -> Result<(), DropReason> {
        let waited = wait_for_room(&self.room, deadline, data, |data| {
            let mut g = self.lock();
            let r = match g.try_push(self.depth, src, data, disco) {
                Ok(()) => Ok(false),
                // A wait already ran out since the writer last took a batch.
                Err((DropReason::QueueHead, data)) if g.gave_up => {
                    g.push(self.depth, src, data, disco)
                }
                Err((DropReason::QueueHead, data)) => {
                    g.room_wanted = true;
                    drop(g);
                    self.wake.notify_one();
                    return Err(data);
                }
                Err((r, _)) => Err(r),
            };
            Ok(r)
        })
        .await;
        let evicted = match waited {
            Ok(r) => r,
            Err(data) => {
                let mut g = self.lock();
                g.gave_up = true;
                g.push(self.depth, src, data, disco)
            }
        };
        self.wake.notify_one();
        match evicted? {
            true => Err(DropReason::QueueHead),
            false => Ok(()),
        }
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
        let n = {
            let mut g = self.lock();
            g.closed = true;
            let n = g.pending.packet_count();
            g.pending.clear();
            n
        };
        self.room.notify_waiters();
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
                    let wanted = std::mem::take(&mut g.room_wanted);
                    g.gave_up = false;
                    drop(g);
                    if wanted {
                        self.room.notify_waiters();
                    }
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

    fn deadline(ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_millis(ms)
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waits_for_the_writer_then_gives_up_once_per_batch() {
        let q = std::sync::Arc::new(SendQueue::new(1));
        let p = |b: &'static [u8]| Bytes::from_static(b);
        q.push_packet(k(1), p(b"a"), false).unwrap();
        // The writer takes its batch while the sender waits: no eviction.
        let q2 = q.clone();
        let taker = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            let mut b = Batch::default();
            q2.next_batch(&mut b).await;
            b.packets.len()
        });
        assert_eq!(
            q.push_when_room(k(1), p(b"b"), false, deadline(10)).await,
            Ok(())
        );
        assert_eq!(taker.await.unwrap(), 1);
        // No writer: the wait runs out and the oldest is evicted...
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            q.push_when_room(k(1), p(b"c"), false, deadline(10)).await,
            Err(DropReason::QueueHead)
        );
        assert!(t0.elapsed() >= std::time::Duration::from_millis(10));
        // ...and the next sender does not wait again until a batch is taken.
        let t1 = tokio::time::Instant::now();
        assert_eq!(
            q.push_when_room(k(1), p(b"d"), false, deadline(10)).await,
            Err(DropReason::QueueHead)
        );
        assert_eq!(t1.elapsed(), std::time::Duration::ZERO);
        let mut b = Batch::default();
        q.next_batch(&mut b).await;
        assert_eq!(b.packets[0].1, p(b"d"));
        // A closed queue releases its waiters.
        q.push_packet(k(1), p(b"e"), false).unwrap();
        let q3 = q.clone();
        let waiter = tokio::spawn(async move {
            let t = tokio::time::Instant::now();
            let r = q3
                .push_when_room(k(1), Bytes::from_static(b"f"), false, deadline(60_000))
                .await;
            (r, t.elapsed())
        });
        tokio::task::yield_now().await;
        q.close();
        // Released by the close, not by its deadline (the paused clock would
        // have jumped to it, with the same result).
        let (r, waited) = waiter.await.unwrap();
        assert_eq!(r, Err(DropReason::GoneDisconnected));
        assert_eq!(waited, std::time::Duration::ZERO);
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

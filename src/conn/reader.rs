//! The reader task: decodes the client's frames and routes packets straight
//! into the destination's queue through the shared routing table. No actor
//! message per packet; counters are published once per read.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;

use super::ConnDeps;
use super::pace::Bucket;
use super::transport::ConnReader;
use crate::metrics::Metrics;
use crate::protocol::frame::{self, FrameType};
use crate::protocol::{ClientFrame, FrameError, PeerGoneReason, PublicKey};
use crate::reasons::{CloseReason, DropReason};
use crate::routing::{ClientHandle, Control, TryForward};
use crate::state::Shared;

/// Smallest read reservation; idle clients settle here, busy ones grow.
const MIN_READ: usize = 1024;
const MAX_READ: usize = 64 << 10;
/// Distinct destinations remembered per read before their writers are woken
/// early; bounds the list for a sender spraying many peers.
const MAX_WAKES: usize = 16;
/// Longest a sender waits for room on a full mesh link queue before the
/// oldest packet is evicted: well above the time the link writer takes to
/// write out a full queue, well below anything a client would notice as a
/// stall if the link is stuck until its write timeout cuts it.
const MESH_ROOM_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
/// PeerGone(NotHere) answers per sender: burst, then one per second.
const NOT_HERE_BURST: f64 = 3.0;

/// Token bucket for PeerGone(NotHere) answers, refilled at 1/s.
struct NotHereLimit {
    tokens: f64,
    at: Instant,
}

impl NotHereLimit {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64()).min(NOT_HERE_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Destination writers to wake once the current read's frames are routed.
/// Dropping it wakes them too, so no exit path leaves packets unannounced.
#[derive(Default)]
struct Wakes(Vec<Arc<ClientHandle>>);

impl Wakes {
    fn add(&mut self, d: &Arc<ClientHandle>) {
        if self.0.iter().any(|w| w.conn_id == d.conn_id) {
            return;
        }
        if self.0.len() >= MAX_WAKES {
            self.wake_all();
        }
        self.0.push(d.clone());
    }

    /// Queues a packet for `d` without waking its writer, which is noted
    /// here and woken once this read's frames are routed.
    fn queue(
        &mut self,
        d: &Arc<ClientHandle>,
        src: PublicKey,
        p: Bytes,
        disco: bool,
    ) -> (u64, Result<(), (DropReason, Bytes)>) {
        let r = d.queue.try_push_packet(src, p, disco);
        if !matches!(r, Err((DropReason::GoneDisconnected, _))) {
            self.add(d);
        }
        (d.conn_id, r)
    }

    /// Wakes and forgets every writer noted; true if there was one.
    fn wake_all(&mut self) -> bool {
        let any = !self.0.is_empty();
        for w in self.0.drain(..) {
            w.queue.wake();
        }
        any
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.wake_all();
    }
}

/// Packets and bytes counted locally and published once per read: one
/// shared atomic add per read instead of per packet.
#[derive(Default)]
struct Tally {
    routed: u64,
    received: u64,
}

impl Tally {
    fn publish(&mut self, m: &Metrics) {
        m.packets_routed.inc_by(self.routed);
        m.bytes_received.inc_by(self.received);
        *self = Tally::default();
    }
}

/// A queued packet's connection id, counting the older packet it evicted.
fn settle(
    m: &Metrics,
    r: Result<(u64, Option<DropReason>), DropReason>,
) -> Result<u64, DropReason> {
    r.map(|(id, evicted)| {
        if let Some(e) = evicted {
            m.dropped(e).inc();
        }
        id
    })
}

/// A read's byte count, or why the connection ends.
fn read_result(
    r: std::io::Result<usize>,
    rd: &ConnReader,
    h: &ClientHandle,
) -> Result<usize, CloseReason> {
    match r {
        Ok(0) => Err(CloseReason::Eof),
        Ok(n) => Ok(n),
        Err(e) => {
            tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "read failed");
            Err(rd.close_reason(&e))
        }
    }
}

/// Lets the writers this read woke run (they wait in this worker's run
/// queue); if the destination is still full, waits for its writer to take its
/// batch (bounded: see [`ClientHandle::push_when_room`]), then queues,
/// evicting the oldest if still full.
async fn route_when_room(
    shared: &Shared,
    src: PublicKey,
    dst: PublicKey,
    packet: Bytes,
    disco: bool,
) -> (PublicKey, Result<(u64, Option<DropReason>), DropReason>) {
    tokio::task::yield_now().await;
    let wait = shared.config.queue_wait;
    let h = match shared.clients.active(&dst) {
        Some(h) if !wait.is_zero() => h,
        _ => return (dst, shared.clients.route(src, &dst, packet, disco)),
    };
    let now = shared.now_ms();
    (dst, h.push_when_room(src, packet, disco, wait, now).await)
}

/// What a reader keeps from one read to the next, busy or idle.
struct ReadState {
    hint: usize,
    /// The last destination recorded for PeerGone, to skip the lock when a
    /// client keeps sending to the same peer.
    last_dst: Option<(PublicKey, u64)>,
    not_here: NotHereLimit,
    bucket: Bucket,
    /// Mesh peers' ForwardPacket state; allocated on a peer's first one, so
    /// ordinary clients do not carry it.
    mesh_in: Option<Box<super::mesh::MeshIn>>,
}

impl ReadState {
    fn mesh_in(&mut self) -> &mut super::mesh::MeshIn {
        self.mesh_in.get_or_insert_with(Box::default)
    }
}

/// How a busy stretch of reads ended.
enum Busy {
    /// Nothing buffered and reads are small again: wait in the idle state.
    Idle,
    Closed(CloseReason),
}

/// Alternates between the idle wait and busy stretches. The busy part runs
/// boxed, allocated only while the client is sending: a task's state is as
/// large as its largest await point, and the per-frame locals of the busy
/// loop would otherwise be carried by every idle client (most clients, most
/// of the time). A plain fn returning an async block, as `write_loop`: an
/// `async fn` would hold its arguments twice.
#[allow(clippy::manual_async_fn)]
pub(super) fn read_loop(
    mut rd: ConnReader,
    mut buf: BytesMut,
    h: Arc<ClientHandle>,
    deps: Arc<ConnDeps>,
) -> impl Future<Output = CloseReason> {
    async move {
        let mut st = ReadState {
            hint: MIN_READ,
            last_dst: None,
            not_here: NotHereLimit {
                tokens: NOT_HERE_BURST,
                at: Instant::now(),
            },
            bucket: Bucket::new(),
            mesh_in: None,
        };
        loop {
            // Bytes left over from the handshake are handled before any read.
            if let Busy::Closed(why) =
                Box::pin(read_frames(&mut rd, &mut buf, &h, &deps, &mut st)).await
            {
                return why;
            }
            #[cfg(feature = "test-hooks")]
            super::test_hooks::check(&h, super::test_hooks::Part::Reader);
            match read_result(rd.read_first(&mut buf).await, &rd, &h) {
                Ok(n) => pace(n, &h, &deps, &mut st.bucket).await,
                Err(why) => return why,
            }
        }
    }
}

/// Holds the reader back when the client is over its bandwidth limit.
async fn pace(n: usize, h: &ClientHandle, deps: &ConnDeps, bucket: &mut Bucket) {
    if deps.rate_limited
        && !h.is_mesh_peer()
        && let Some(limit) = deps.client_rate.get()
    {
        let wait = bucket.charge(n as u64, limit, Instant::now());
        if !wait.is_zero() {
            let m = &deps.state.metrics;
            m.client_rate_paced_reads.inc();
            m.client_rate_paced_seconds.inc_by(wait.as_secs_f64());
            // Boxed: a timer in the task's own state would make every idle
            // client's task bigger for a rare wait.
            Box::pin(tokio::time::sleep(wait)).await;
        }
    }
}

async fn read_frames(
    rd: &mut ConnReader,
    buf: &mut BytesMut,
    h: &Arc<ClientHandle>,
    deps: &ConnDeps,
    st: &mut ReadState,
) -> Busy {
    let shared = &deps.state;
    let m = &shared.metrics;
    let mut tally = Tally::default();
    // Writers this read's packets went to, woken once when the read's
    // frames are all routed rather than once per packet.
    let mut wakes = Wakes::default();
    loop {
        loop {
            let f = match frame::decode_frame(buf, frame::client_frame_limit) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    if let FrameError::TooLarge { frame_type, .. } = e
                        && frame_type == FrameType::SendPacket as u8
                    {
                        m.dropped(DropReason::TooLarge).inc();
                    }
                    tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "bad frame");
                    return Busy::Closed(CloseReason::BadFrame);
                }
            };
            let f = match ClientFrame::parse(f) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "bad frame");
                    return Busy::Closed(CloseReason::BadFrame);
                }
            };
            match f {
                ClientFrame::SendPacket { mut dst, packet } => {
                    tally.received += packet.len() as u64;
                    if h.should_request_activity() {
                        deps.registrar.activity(h.clone());
                    }
                    let disco = frame::is_disco(&packet);
                    let src = h.key;
                    let first = shared
                        .clients
                        .with_active(&dst, packet, |d, p| wakes.queue(d, src, p, disco));
                    let outcome = match first {
                        Ok((id, Ok(()))) => Ok(id),
                        Ok((_, Err((DropReason::QueueHead, packet)))) => {
                            // Full: let its writer drain what this read queued
                            // before evicting anything.
                            wakes.wake_all();
                            tally.publish(m);
                            // Boxed: whatever is live across this await is kept
                            // in the reader's state.
                            let (back, r) =
                                Box::pin(route_when_room(shared, src, dst, packet, disco)).await;
                            dst = back;
                            settle(m, r)
                        }
                        Ok((_, Err((r, _)))) => Err(r),
                        // Not a local key: a mesh peer may have it.
                        Err(packet) => match shared.clients.remote.try_forward(src, &dst, packet) {
                            TryForward::Queued => Ok(0),
                            TryForward::Full(link, f) => {
                                // The link writer is behind its TCP stream:
                                // wait for it (bounded) instead of reading
                                // more only to evict. Local writers noted so
                                // far are not held up meanwhile.
                                wakes.wake_all();
                                tally.publish(m);
                                let r =
                                    Box::pin(link.queue.push_when_room(f, MESH_ROOM_WAIT)).await;
                                settle(m, r.map(|evicted| (0, evicted)))
                            }
                            TryForward::Down => Err(DropReason::MeshQueue),
                            TryForward::Unknown(_) => Err(DropReason::UnknownDest),
                        },
                    };
                    match outcome {
                        Ok(dst_conn) => {
                            tally.routed += 1;
                            if st.last_dst != Some((dst, dst_conn)) {
                                h.note_sent_to(dst, dst_conn);
                                st.last_dst = Some((dst, dst_conn));
                            }
                        }
                        Err(r) => {
                            m.dropped(r).inc();
                            if r == DropReason::UnknownDest && disco && st.not_here.take() {
                                h.queue
                                    .push_control(Control::PeerGone(dst, PeerGoneReason::NotHere));
                            }
                        }
                    }
                }
                ClientFrame::Ping(data) => {
                    h.queue.push_control(Control::Pong(data));
                }
                ClientFrame::NotePreferred(p) => {
                    let was = h.set_preferred(p);
                    if p && !was {
                        m.clients_home.inc();
                    } else if !p && was {
                        m.clients_home.dec();
                    }
                }
                ClientFrame::Pong(_) | ClientFrame::Unknown(_) => {}
                // One mesh link carries a whole region's traffic for this
                // node's clients: batch it like SendPacket (quiet pushes, one
                // wake per writer per read, let a full writer drain before
                // evicting), or one read's packets overflow the queues.
                ClientFrame::ForwardPacket { src, dst, packet } if h.is_mesh_peer() => {
                    let len = packet.len() as u64;
                    let disco = frame::is_disco(&packet);
                    let queued = shared
                        .clients
                        .with_active(&dst, packet, |d, p| wakes.queue(d, src, p, disco));
                    let via = h.key;
                    match queued {
                        Ok((id, Ok(()))) => {
                            super::mesh::forwarded_in(via, src, dst, id, len, deps, st.mesh_in());
                        }
                        Ok((_, Err((DropReason::QueueHead, packet)))) => {
                            wakes.wake_all();
                            // Boxed, as route_after_yield, so idle readers do
                            // not carry this arm's locals.
                            Box::pin(async {
                                tokio::task::yield_now().await;
                                super::mesh::forward_in(via, src, dst, packet, deps, st.mesh_in());
                            })
                            .await;
                        }
                        Ok((_, Err((r, _)))) => m.dropped(r).inc(),
                        // Not local, and never forwarded again (one hop).
                        Err(_) => {
                            super::mesh::dropped_in(DropReason::UnknownDestOnFwd, src, dst, deps);
                        }
                    }
                }
                // Mesh peers only; anyone else is closed (see conn::mesh).
                f @ (ClientFrame::WatchConns
                | ClientFrame::ClosePeer(_)
                | ClientFrame::ForwardPacket { .. }) => {
                    if let Err(why) = super::mesh::handle(f, h, deps) {
                        return Busy::Closed(why);
                    }
                }
            }
        }
        let batch = tally.routed;
        tally.publish(m);
        if wakes.wake_all() && (batch > 1 || h.is_mesh_peer()) {
            // Let the writers just woken (in this worker's run queue) write
            // this read's batch before the next read adds to it.
            tokio::task::yield_now().await;
        }
        let hint = st.hint;
        if buf.is_empty() && buf.capacity() > 4 * hint {
            *buf = BytesMut::new();
        }
        #[cfg(feature = "test-hooks")]
        super::test_hooks::check(h, super::test_hooks::Part::Reader);
        let want = frame::bytes_needed(buf).max(hint);
        // Leave for the idle wait only when nothing is pending, reads are
        // small, and the socket has nothing right now: a client sending
        // steadily stays here (one message per read on WebSocket keeps the
        // hint at its minimum), and the busy state is not rebuilt per read.
        let read = if buf.is_empty() && hint == MIN_READ {
            let now = rd.read_some(buf, want, &h.queue).now_or_never();
            let Some(read) = now else {
                // Hold no buffer while waiting. Most clients are idle most
                // of the time, and this is most of what one costs.
                *buf = BytesMut::new();
                rd.release();
                return Busy::Idle;
            };
            read
        } else {
            rd.read_some(buf, want, &h.queue).await
        };
        let n = match read_result(read, rd, h) {
            Ok(n) => n,
            Err(why) => return Busy::Closed(why),
        };
        pace(n, h, deps, &mut st.bucket).await;
        if n >= want {
            st.hint = (hint * 2).min(MAX_READ);
        } else if n < hint / 4 {
            st.hint = (hint / 2).max(MIN_READ);
        }
    }
}

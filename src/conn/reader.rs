//! The reader task: decodes the client's frames and routes packets straight
//! into the destination's queue through the shared routing table. No actor
//! message per packet; counters are published once per read.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::ConnDeps;
use super::pace::Bucket;
use super::transport::ConnReader;
use crate::protocol::frame::{self, FrameType};
use crate::protocol::{ClientFrame, FrameError, PeerGoneReason, PublicKey};
use crate::reasons::{CloseReason, DropReason};
use crate::routing::{ClientHandle, Control, TryForward};

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

/// Lets the writers this read woke run (they wait in this worker's run
/// queue), then queues as usual, evicting the oldest if still full.
async fn route_after_yield(
    clients: &crate::routing::Clients,
    src: PublicKey,
    dst: PublicKey,
    packet: bytes::Bytes,
    disco: bool,
) -> (PublicKey, Result<(u64, Option<DropReason>), DropReason>) {
    tokio::task::yield_now().await;
    let r = clients.route(src, &dst, packet, disco);
    (dst, r)
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
            match rd.read_first(&mut buf).await {
                Ok(0) => return CloseReason::Eof,
                Ok(n) => pace(n, &h, &deps, &mut st.bucket).await,
                Err(e) => {
                    tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "read failed");
                    return rd.close_reason(&e);
                }
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
    // Counted locally and published once per read: one shared atomic add per
    // read instead of per packet.
    let mut routed = 0u64;
    let mut received = 0u64;
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
                    received += packet.len() as u64;
                    if h.should_request_activity() {
                        deps.registrar.activity(h.clone());
                    }
                    let disco = frame::is_disco(&packet);
                    let src = h.key;
                    let mut routed_to = match shared.clients.with_active(&dst, packet, |d, p| {
                        let r = d.queue.try_push_packet(src, p, disco);
                        if !matches!(r, Err((DropReason::GoneDisconnected, _))) {
                            wakes.add(d);
                        }
                        (d.conn_id, r)
                    }) {
                        Ok(r) => r,
                        // Not a local key: a mesh peer may have it. A full
                        // link queue is handled as a full local one below:
                        // let its writer drain before evicting.
                        Err(packet) => match shared.clients.remote.try_forward(src, &dst, packet) {
                            TryForward::Queued => (0, Ok(())),
                            TryForward::Full(link, f) => {
                                // The link writer is behind its TCP stream:
                                // wait for it (bounded) instead of reading
                                // more only to evict. Local writers noted so
                                // far are not held up meanwhile.
                                wakes.wake_all();
                                m.packets_routed.inc_by(routed);
                                m.bytes_received.inc_by(received);
                                (routed, received) = (0, 0);
                                let r =
                                    Box::pin(link.queue.push_when_room(f, MESH_ROOM_WAIT)).await;
                                match r {
                                    Ok(evicted) => {
                                        if let Some(r) = evicted {
                                            m.dropped(r).inc();
                                        }
                                        (0, Ok(()))
                                    }
                                    Err(r) => (0, Err((r, bytes::Bytes::new()))),
                                }
                            }
                            TryForward::Down => {
                                (0, Err((DropReason::MeshQueue, bytes::Bytes::new())))
                            }
                            TryForward::Unknown(_) => {
                                (0, Err((DropReason::UnknownDest, bytes::Bytes::new())))
                            }
                        },
                    };
                    if let (_, Err((DropReason::QueueHead, packet))) = routed_to {
                        // Full: let its writer drain what this read queued
                        // (it waits in this worker's run queue) before
                        // evicting anything; then queue as usual.
                        wakes.wake_all();
                        m.packets_routed.inc_by(routed);
                        m.bytes_received.inc_by(received);
                        (routed, received) = (0, 0);
                        // Boxed: whatever is live across this await is kept
                        // in every reader task's state, idle ones included.
                        let (back, r) =
                            Box::pin(route_after_yield(&shared.clients, src, dst, packet, disco))
                                .await;
                        dst = back;
                        routed_to = match r {
                            Ok((id, head_drop)) => {
                                if let Some(r) = head_drop {
                                    m.dropped(r).inc();
                                }
                                (id, Ok(()))
                            }
                            Err(r) => (0, Err((r, bytes::Bytes::new()))),
                        };
                    }
                    let outcome = match routed_to {
                        (id, Ok(())) => Ok(id),
                        (_, Err((r, _))) => Err(r),
                    };
                    match outcome {
                        Ok(dst_conn) => {
                            routed += 1;
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
                    let queued = shared.clients.with_active(&dst, packet, |d, p| {
                        let r = d.queue.try_push_packet(src, p, disco);
                        if !matches!(r, Err((DropReason::GoneDisconnected, _))) {
                            wakes.add(d);
                        }
                        (d.conn_id, r)
                    });
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
                        // Not local: the one-hop path counts it as not here.
                        Err(packet) => {
                            super::mesh::forward_in(via, src, dst, packet, deps, st.mesh_in());
                        }
                    }
                }
                // Mesh peers only; anyone else is closed (see conn::mesh).
                f @ (ClientFrame::WatchConns
                | ClientFrame::ClosePeer(_)
                | ClientFrame::ForwardPacket { .. }) => {
                    if let Err(why) = super::mesh::handle(f, h, deps, st.mesh_in()) {
                        return Busy::Closed(why);
                    }
                }
            }
        }
        m.packets_routed.inc_by(routed);
        m.bytes_received.inc_by(received);
        if wakes.wake_all() && (routed > 1 || h.is_mesh_peer()) {
            // Let the writers just woken (in this worker's run queue) write
            // this read's batch before the next read adds to it.
            tokio::task::yield_now().await;
        }
        (routed, received) = (0, 0);
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
        let may_idle = buf.is_empty() && hint == MIN_READ;
        let read = {
            let mut read = std::pin::pin!(rd.read_some(buf, want));
            match std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending if may_idle => None,
                std::task::Poll::Pending => Some(read.await),
            }
        };
        let Some(read) = read else {
            // Hold no buffer while waiting. Most clients are idle most of
            // the time, and this is most of what one costs.
            *buf = BytesMut::new();
            return Busy::Idle;
        };
        match read {
            Ok(0) => return Busy::Closed(CloseReason::Eof),
            Ok(n) => {
                pace(n, h, deps, &mut st.bucket).await;
                if n >= want {
                    st.hint = (hint * 2).min(MAX_READ);
                } else if n < hint / 4 {
                    st.hint = (hint / 2).max(MIN_READ);
                }
            }
            Err(e) => {
                tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "read failed");
                return Busy::Closed(rd.close_reason(&e));
            }
        }
    }
}

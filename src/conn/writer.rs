//! The writer task: drains this client's queue and writes each batch with
//! one write (or one WebSocket message).

use std::sync::Arc;

use bytes::BytesMut;

use super::transport::ConnWriter;
use crate::protocol::frame;
use crate::reasons::{CloseReason, DropReason};
use crate::routing::{Batch, ClientHandle, Control};
use crate::state::Shared;

/// Write buffers larger than this are released after a batch rather than kept.
const KEEP_WRITE_BUF: usize = 256 << 10;
/// Restarting frame: when to come back and for how long to keep trying.
const RECONNECT_IN_MS: u32 = 1_000;
const TRY_FOR_MS: u32 = 30_000;

// A plain fn returning an async block: an `async fn` keeps its arguments
// twice in its state (as arguments and as the locals they are moved into),
// 112 bytes in every writer task.
#[allow(clippy::manual_async_fn)]
pub(super) fn write_loop(
    mut wr: ConnWriter,
    mut out: BytesMut,
    h: Arc<ClientHandle>,
    shared: Arc<Shared>,
) -> impl Future<Output = CloseReason> {
    async move {
        let why = write_frames(&mut wr, &mut out, &h, &shared).await;
        if why != CloseReason::GoingAway {
            wr.close().await;
        }
        why
    }
}

async fn write_frames(
    wr: &mut ConnWriter,
    out: &mut BytesMut,
    h: &ClientHandle,
    shared: &Shared,
) -> CloseReason {
    // Write deadlines are enforced by the registry's shared sweeper, which
    // closes a connection whose write has been in progress too long (see
    // `ClientHandle::begin_write`); no timer per write or per connection.
    let m = &shared.metrics;
    let start = wr.batch_start();
    if start > 0 {
        // ServerInfo was encoded before the transport was known to need room
        // in front; one small copy per connection.
        let mut first = BytesMut::with_capacity(start + out.len());
        first.resize(start, 0);
        first.extend_from_slice(out);
        *out = first;
    }
    h.begin_write(shared.now_ms(), 0);
    let first = wr.write_batch(out, false).await;
    h.end_write();
    if first.is_err() {
        return CloseReason::WriteError;
    }
    let mut batch = Batch::default();
    loop {
        h.queue.next_batch(&mut batch).await;
        out.resize(start, 0);
        #[cfg(feature = "test-hooks")]
        super::test_hooks::check(h, super::test_hooks::Part::Writer);
        let mut ping = false;
        let mut abort = None;
        for c in batch.control.drain(..) {
            match c {
                Control::Pong(d) => frame::encode_pong(out, d),
                Control::WsPong(p) => wr.queue_pong(&p),
                Control::PeerGone(k, r) => frame::encode_peer_gone(out, &k, r),
                Control::KeepAlive => {
                    frame::encode_keepalive(out);
                    ping = true;
                }
                // Drained below, whether or not this marker survived.
                Control::MeshUpdates => {}
                Control::Abort(why) => {
                    abort = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = abort {
            // Outside the loop, so the task's state does not keep the drain
            // iterator and a Control across this await (leaving the loop
            // dropped what followed the Abort). Boxed, as goodbye below:
            // rare, and an idle writer task would carry its state.
            h.begin_write(shared.now_ms(), 0);
            Box::pin(wr.abort(why)).await;
            h.end_write();
            return why;
        }
        if let Some(w) = h.watch() {
            super::mesh::encode_updates(w, out);
        }
        let packets = batch.packet_count() as u64;
        let mut bytes = 0u64;
        for (src, data) in batch.disco.drain(..).chain(batch.packets.drain(..)) {
            bytes += data.len() as u64;
            frame::encode_recv_packet(out, &src, &data);
        }
        if out.len() > start || wr.has_control() {
            h.begin_write(shared.now_ms(), packets);
            let res = wr.write_batch(out, ping).await;
            h.end_write();
            if let Err(e) = res {
                m.dropped(DropReason::WriteError).inc_by(packets);
                tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "write failed");
                return CloseReason::WriteError;
            }
            m.bytes_sent.inc_by(bytes);
            out.clear();
            if out.capacity() > KEEP_WRITE_BUF {
                *out = BytesMut::new();
            }
        }
        if batch.going_away {
            h.begin_write(shared.now_ms(), 0);
            let _ = Box::pin(wr.goodbye(RECONNECT_IN_MS, TRY_FOR_MS)).await;
            h.end_write();
            return CloseReason::GoingAway;
        }
    }
}

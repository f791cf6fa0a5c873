//! One client connection: the handshake, then an actor that owns the
//! connection's two tasks.
//!
//! The reader task decodes frames and routes packets straight into the
//! destination's [`SendQueue`](super::send_queue::SendQueue) via the shared
//! routing table. The writer task drains this client's own queue and writes
//! whole batches. The actor itself only handles control messages (GoingAway,
//! Close); when it ends for any reason, including a panic, dropping its state
//! aborts both tasks, closes the socket and deregisters the client, so a fault
//! costs exactly one connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use super::preauth::PreAuth;
use super::registry::{ClientHandle, RegistryMsg};
use super::send_queue::{Batch, Control};
use super::transport::{ConnReader, ConnWriter};
use crate::http::client_addr::PendingGuard;
use crate::metrics::{DropReason, RefuseReason, Transport};
use crate::protocol::frame::{self, FrameType};
use crate::protocol::handshake::server_info_json;
use crate::protocol::{ClientFrame, ClientInfo, FrameError, PeerGoneReason, PublicKey};
use crate::relay::{ClientSlot, Shared};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Smallest read reservation; idle clients settle here, busy ones grow.
const MIN_READ: usize = 1024;
const MAX_READ: usize = 64 << 10;
/// Packets routed in a row after which the reader lets writers run; well under
/// the default queue depth, so a one-to-one flow does not overflow it.
const YIELD_AFTER: u64 = 16;
/// Write buffers larger than this are released after a batch rather than kept.
const KEEP_WRITE_BUF: usize = 256 << 10;
/// PeerGone(NotHere) answers per sender: burst, then one per second.
const NOT_HERE_BURST: f64 = 3.0;
/// Restarting frame: when to come back and for how long to keep trying.
const RECONNECT_IN_MS: u32 = 1_000;
const TRY_FOR_MS: u32 = 30_000;

/// Control messages for a connection actor.
#[derive(Debug)]
pub enum ConnMsg {
    /// The relay is stopping: flush, say goodbye, close.
    GoingAway,
    /// Close now, for the given reason (logged and counted).
    Close(&'static str),
    /// Lets tests prove that a panicking connection is contained.
    CrashForTest,
}

/// Why a handshake did not produce a client.
#[derive(Debug, thiserror::Error)]
enum HandshakeFailure {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Crypto(#[from] crate::protocol::HandshakeError),
    #[error("connection closed before ClientInfo")]
    Eof,
    #[error("deadline passed")]
    Timeout,
}

/// Runs the DERP handshake on a freshly upgraded connection and, if the client
/// proves its key and is admitted, starts its connection actor.
pub async fn accept(
    mut io: PreAuth,
    ws_config: WebSocketConfig,
    shared: Arc<Shared>,
    remote: SocketAddr,
    transport: Transport,
    slot: ClientSlot,
    pending: Option<PendingGuard>,
) {
    let started = Instant::now();
    let deadline = shared.config.handshake_timeout;
    let hs = tokio::time::timeout(deadline, handshake(&mut io, &shared)).await;
    // The box opened: the client is no longer a stranger.
    drop(pending);
    let (key, info, buf) = match hs.unwrap_or(Err(HandshakeFailure::Timeout)) {
        Ok(v) => v,
        Err(e) => {
            shared.metrics.refused(RefuseReason::BadHandshake);
            tracing::debug!(target: "derp_relay::core", %remote, error = %e, "handshake failed");
            io.close().await;
            return;
        }
    };
    let (reader, writer) = match io.into_conn(ws_config).await {
        Ok(rw) => rw,
        Err(e) => {
            shared.metrics.refused(RefuseReason::BadHandshake);
            tracing::debug!(target: "derp_relay::core", %remote, error = %e, "handshake failed");
            return;
        }
    };
    let sealed = shared
        .secret
        .seal_server_info(&key, &server_info_json(None));
    let mut server_info = BytesMut::new();
    frame::encode_server_info(&mut server_info, &sealed);

    let args = ConnArgs {
        shared: shared.clone(),
        key,
        info,
        remote,
        transport,
        reader,
        writer,
        read_buf: buf,
        server_info,
        slot,
    };
    let Some(root) = shared.root_cell() else {
        return; // not started yet; cannot happen once serving
    };
    match Actor::spawn_linked(None, ConnectionActor, args, root).await {
        Ok(_) => {
            shared.metrics.connections_accepted.inc();
            shared
                .metrics
                .handshake_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Err(e) => {
            // Refusals were counted by the actor; the socket closed with its args.
            tracing::debug!(target: "derp_relay::core", %remote, %key, error = %e, "client not registered");
        }
    }
}

async fn handshake(
    io: &mut PreAuth,
    shared: &Shared,
) -> Result<(PublicKey, ClientInfo, BytesMut), HandshakeFailure> {
    let mut out = BytesMut::new();
    frame::encode_server_key(&mut out, &shared.secret.public());
    io.write(&out).await?;

    // Only ClientInfo is acceptable first; any other type fails on its header.
    let limit = |t: u8| {
        if t == FrameType::ClientInfo as u8 {
            frame::client_frame_limit(t)
        } else {
            0
        }
    };
    let mut buf = BytesMut::new();
    loop {
        if let Some(f) = frame::decode_frame(&mut buf, limit)? {
            if f.frame_type != FrameType::ClientInfo as u8 {
                return Err(FrameError::WrongType {
                    expected: FrameType::ClientInfo as u8,
                    got: f.frame_type,
                }
                .into());
            }
            let (key, info) = shared.secret.open_client_info(&f.payload)?;
            // Whatever the client pipelined after ClientInfo stays in `buf`.
            return Ok((key, info, buf));
        }
        // Grow only by what arrives: the announced length is a claim, not a
        // reason to allocate.
        let need = frame::bytes_needed(&buf);
        if io.read_some(&mut buf, need).await? == 0 {
            return Err(HandshakeFailure::Eof);
        }
    }
}

pub struct ConnectionActor;

pub struct ConnArgs {
    shared: Arc<Shared>,
    key: PublicKey,
    info: ClientInfo,
    remote: SocketAddr,
    transport: Transport,
    reader: ConnReader,
    writer: ConnWriter,
    read_buf: BytesMut,
    server_info: BytesMut,
    slot: ClientSlot,
}

pub struct ConnState {
    handle: Arc<ClientHandle>,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    _slot: ClientSlot,
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        let lost = self.handle.queue.close();
        self.shared
            .metrics
            .dropped(DropReason::GoneDisconnected)
            .inc_by(lost as u64);
        if let Some(reg) = self.shared.registry.get() {
            let _ = reg.cast(RegistryMsg::Deregister(self.handle.clone()));
        }
        tracing::debug!(target: "derp_relay::core", key = %self.handle.key, conn = self.handle.conn_id, "client disconnected");
    }
}

impl Actor for ConnectionActor {
    type Msg = ConnMsg;
    type State = ConnState;
    type Arguments = ConnArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ConnMsg>,
        mut a: ConnArgs,
    ) -> Result<ConnState, ActorProcessingErr> {
        let shared = a.shared;
        let handle = Arc::new(ClientHandle::new(
            a.key,
            shared.next_conn_id(),
            a.transport,
            a.remote,
            shared.config.queue_depth,
            myself.clone(),
        ));
        let registry = shared.registry.get().ok_or("registry is not running")?;
        if let Err(reason) =
            ractor::call_t!(registry, RegistryMsg::Register, 5_000, handle.clone())?
        {
            shared.metrics.refused(reason);
            tracing::info!(target: "derp_relay::admission", key = %a.key, remote = %a.remote, reason = reason.as_str(), "client refused");
            a.writer.refuse(reason.as_str()).await;
            return Err(reason.as_str().into());
        }
        tracing::debug!(
            target: "derp_relay::core",
            key = %a.key, conn = handle.conn_id, remote = %a.remote,
            transport = a.transport.as_str(), version = a.info.version,
            "client connected"
        );
        let writer = tokio::spawn(write_loop(
            a.writer,
            a.server_info,
            handle.clone(),
            shared.clone(),
        ));
        let reader = tokio::spawn(read_loop(
            a.reader,
            a.read_buf,
            handle.clone(),
            shared.clone(),
        ));
        Ok(ConnState {
            handle,
            shared,
            reader,
            writer,
            _slot: a.slot,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ConnMsg>,
        msg: ConnMsg,
        st: &mut ConnState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConnMsg::GoingAway => st.handle.queue.going_away(),
            ConnMsg::Close(why) => {
                st.shared
                    .metrics
                    .disconnects
                    .with_label_values(&[why])
                    .inc();
                myself.stop(Some(why.to_string()));
            }
            ConnMsg::CrashForTest => panic!("connection crash requested by a test"),
        }
        Ok(())
    }
}

/// Tells the actor its connection is over; the actor's teardown does the rest.
fn finish(handle: &ClientHandle, why: &'static str) {
    let _ = handle.actor.cast(ConnMsg::Close(why));
}

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

async fn read_loop(
    mut rd: ConnReader,
    mut buf: BytesMut,
    h: Arc<ClientHandle>,
    shared: Arc<Shared>,
) {
    let why = read_frames(&mut rd, &mut buf, &h, &shared).await;
    finish(&h, why);
}

async fn read_frames(
    rd: &mut ConnReader,
    buf: &mut BytesMut,
    h: &Arc<ClientHandle>,
    shared: &Shared,
) -> &'static str {
    let m = &shared.metrics;
    let mut hint = MIN_READ;
    // The last destination recorded for PeerGone, to skip the lock when a
    // client keeps sending to the same peer.
    let mut last_dst: Option<(PublicKey, u64)> = None;
    let mut not_here = NotHereLimit {
        tokens: NOT_HERE_BURST,
        at: Instant::now(),
    };
    // Counted locally and published once per read: one shared atomic add per
    // read instead of per packet.
    let mut routed = 0u64;
    let mut received = 0u64;
    loop {
        loop {
            if routed >= YIELD_AFTER {
                m.packets_routed.inc_by(routed);
                m.bytes_received.inc_by(received);
                (routed, received) = (0, 0);
                // Writers this reader woke wait in this worker's run queue (tokio
                // runs a woken task after the waker yields). Without a yield a
                // busy sender routes packet after packet while their queues
                // overflow.
                tokio::task::yield_now().await;
            }
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
                    return "bad_frame";
                }
            };
            let f = match ClientFrame::parse(f) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "bad frame");
                    return "bad_frame";
                }
            };
            match f {
                ClientFrame::SendPacket { dst, packet } => {
                    received += packet.len() as u64;
                    if h.should_request_activity()
                        && let Some(reg) = shared.registry.get()
                    {
                        let _ = reg.cast(RegistryMsg::Activity(h.clone()));
                    }
                    let disco = frame::is_disco(&packet);
                    match shared.clients.route(h.key, &dst, packet, disco) {
                        Ok((dst_conn, head_drop)) => {
                            routed += 1;
                            if let Some(r) = head_drop {
                                m.dropped(r).inc();
                            }
                            if last_dst != Some((dst, dst_conn)) {
                                h.note_sent_to(dst, dst_conn);
                                last_dst = Some((dst, dst_conn));
                            }
                        }
                        Err(r) => {
                            m.dropped(r).inc();
                            if r == DropReason::UnknownDest && disco && not_here.take() {
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
                // Mesh frames from a client that did not present the mesh key.
                ClientFrame::WatchConns
                | ClientFrame::ClosePeer(_)
                | ClientFrame::ForwardPacket { .. } => {
                    tracing::info!(target: "derp_relay::core", key = %h.key, "mesh frame from a non-mesh client");
                    return "mesh_frame_from_client";
                }
            }
        }
        m.packets_routed.inc_by(routed);
        m.bytes_received.inc_by(received);
        (routed, received) = (0, 0);
        let idle = buf.is_empty() && hint == MIN_READ;
        if buf.is_empty() && (idle || buf.capacity() > 4 * hint) {
            // Nothing pending: hold no buffer while waiting. Most clients are
            // idle most of the time, and this is most of what one costs.
            *buf = BytesMut::new();
        }
        let want = frame::bytes_needed(buf).max(hint);
        let read = if idle {
            rd.read_first(buf).await
        } else {
            rd.read_some(buf, want).await
        };
        match read {
            Ok(0) => return "eof",
            Ok(n) => {
                if n >= want {
                    hint = (hint * 2).min(MAX_READ);
                } else if n < hint / 4 {
                    hint = (hint / 2).max(MIN_READ);
                }
            }
            Err(e) => {
                tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "read failed");
                return "read_error";
            }
        }
    }
}

async fn write_loop(
    mut wr: ConnWriter,
    mut out: BytesMut,
    h: Arc<ClientHandle>,
    shared: Arc<Shared>,
) {
    let why = write_frames(&mut wr, &mut out, &h, &shared).await;
    if why != "going_away" {
        wr.close().await;
    }
    finish(&h, why);
}

async fn write_frames(
    wr: &mut ConnWriter,
    out: &mut BytesMut,
    h: &ClientHandle,
    shared: &Shared,
) -> &'static str {
    // Write deadlines are enforced by the registry's shared sweeper, which
    // closes a connection whose write has been in progress too long (see
    // `ClientHandle::begin_write`); no timer per write or per connection.
    let m = &shared.metrics;
    h.begin_write(shared.now_ms(), 0);
    let first = wr.write_batch(out, false).await;
    h.end_write();
    if first.is_err() {
        return "write_error";
    }
    let mut batch = Batch::default();
    loop {
        h.queue.next_batch(&mut batch).await;
        let mut ping = false;
        for c in batch.control.drain(..) {
            match c {
                Control::Pong(d) => frame::encode_pong(out, d),
                Control::PeerGone(k, r) => frame::encode_peer_gone(out, &k, r),
                Control::KeepAlive => {
                    frame::encode_keepalive(out);
                    ping = true;
                }
            }
        }
        let packets = batch.packet_count() as u64;
        let mut bytes = 0u64;
        for (src, data) in batch.disco.drain(..).chain(batch.packets.drain(..)) {
            bytes += data.len() as u64;
            frame::encode_recv_packet(out, &src, &data);
        }
        if !out.is_empty() {
            h.begin_write(shared.now_ms(), packets);
            let res = wr.write_batch(out, ping).await;
            h.end_write();
            if let Err(e) = res {
                m.dropped(DropReason::WriteError).inc_by(packets);
                tracing::debug!(target: "derp_relay::core", key = %h.key, error = %e, "write failed");
                return "write_error";
            }
            m.bytes_sent.inc_by(bytes);
            out.clear();
            if out.capacity() > KEEP_WRITE_BUF {
                *out = BytesMut::new();
            }
        }
        if batch.going_away {
            h.begin_write(shared.now_ms(), 0);
            let _ = wr.goodbye(RECONNECT_IN_MS, TRY_FOR_MS).await;
            h.end_write();
            return "going_away";
        }
    }
}

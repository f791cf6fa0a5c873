//! One mesh link: a DERP client to a peer relay that presents this node's own
//! server key and the mesh key, sends WatchConns, and turns the peer's
//! PeerPresent/PeerGone into the routing table's mesh half; packets queued for
//! the peer go out as ForwardPacket. It reconnects with jittered, capped
//! exponential backoff and stops for good if the peer turns out to be this
//! node (same server key).
//!
//! The actor only owns the task that does this; if the task panics the actor
//! fails and the mesh actor starts a new link. However it ends, the link's
//! keys are withdrawn and its queue closed (drops counted).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand_core::RngCore;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::ClientConfig;

use super::Target;
use crate::client::{self, ClientError, ConnectOptions, RelayUrl};
use crate::config::MeshSettings;
use crate::protocol::frame::{self, ServerFrame};
use crate::protocol::handshake::{ClientSecret, mesh_client_info_json};
use crate::reasons::{DropReason, MeshPeerState};
use crate::routing::MeshLink;
use crate::state::Shared;

/// First retry delay; doubled per failure up to `mesh_backoff_max`.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// A session that lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// Dial, upgrade and handshake must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence after which the peer is presumed gone (the Go client's read
/// deadline; servers send KeepAlive every 60 s at most).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// What every link shares.
pub struct LinkCtx {
    pub shared: Arc<Shared>,
    secret: ClientSecret,
    info_json: Vec<u8>,
    tls: Option<Arc<ClientConfig>>,
    /// Source address for dialling: the listen address when it is a
    /// specific one, so peers see the address discovery gave them.
    bind: Option<IpAddr>,
}

impl LinkCtx {
    pub fn new(shared: Arc<Shared>, s: &MeshSettings) -> Result<Self, String> {
        let c = &shared.config;
        let tls = match (c.mesh_tls, c.mesh_tls_insecure) {
            (false, _) => None,
            (true, false) => Some(client::tls_config(&[])?),
            (true, true) => Some(client::insecure_tls_config()?),
        };
        let bind = c
            .listen_addr()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        Ok(LinkCtx {
            secret: shared.secret.as_client(),
            info_json: mesh_client_info_json(&s.key),
            tls,
            bind,
            shared,
        })
    }
}

pub enum LinkMsg {
    /// The link's task panicked: fail, so the mesh actor starts a new link.
    Crashed,
}

pub struct LinkArgs {
    pub ctx: Arc<LinkCtx>,
    pub link: Arc<MeshLink>,
    pub target: Target,
}

pub struct LinkActor;

pub struct LinkState {
    task: JoinHandle<()>,
    link: Arc<MeshLink>,
    ctx: Arc<LinkCtx>,
}

impl Drop for LinkState {
    fn drop(&mut self) {
        self.task.abort();
        end_session(&self.link, &self.ctx);
        self.ctx.shared.metrics.mesh.peers(self.link.state()).dec();
    }
}

impl Actor for LinkActor {
    type Msg = LinkMsg;
    type State = LinkState;
    type Arguments = LinkArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LinkMsg>,
        a: LinkArgs,
    ) -> Result<LinkState, ActorProcessingErr> {
        let task = std::panic::AssertUnwindSafe(run(a.link.clone(), a.ctx.clone(), a.target))
            .catch_unwind()
            .map(move |r| {
                if r.is_err() {
                    let _ = myself.cast(LinkMsg::Crashed);
                }
            });
        Ok(LinkState {
            task: tokio::spawn(task),
            link: a.link,
            ctx: a.ctx,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<LinkMsg>,
        msg: LinkMsg,
        st: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LinkMsg::Crashed => Err(format!("mesh link to {} panicked", st.link.name).into()),
        }
    }
}

fn set_state(link: &MeshLink, ctx: &LinkCtx, s: MeshPeerState) {
    let old = link.swap_state(s);
    if old != s {
        let m = &ctx.shared.metrics.mesh;
        m.peers(old).dec();
        m.peers(s).inc();
    }
}

/// After a session (or when the link goes away): no more packets for it,
/// and every key it announced withdrawn, with region-wide PeerGone for keys
/// no node has any more.
fn end_session(link: &MeshLink, ctx: &LinkCtx) {
    let clients = &ctx.shared.clients;
    let lost = link.queue.close();
    ctx.shared
        .metrics
        .dropped(DropReason::MeshQueue)
        .inc_by(lost as u64);
    let departed = clients.remote.link_down(link);
    clients.tell_all_departed(departed);
    ctx.shared
        .metrics
        .mesh
        .remote_keys
        .set(clients.remote.len() as i64);
}

/// How a session ended without an error.
enum End {
    /// The peer closed the connection.
    Closed,
    /// The peer is this node.
    Myself,
}

/// Jittered exponential backoff: a delay in [d/2, d] for d = start·2^n, capped.
fn backoff(failures: u32, max: Duration) -> Duration {
    let d = BACKOFF_START
        .saturating_mul(1u32 << failures.min(20))
        .min(max);
    let half = d / 2;
    let jitter = rand_core::OsRng.next_u64() % (half.as_micros() as u64 + 1);
    half + Duration::from_micros(jitter)
}

async fn run(link: Arc<MeshLink>, ctx: Arc<LinkCtx>, target: Target) {
    let mut failures = 0u32;
    loop {
        set_state(&link, &ctx, MeshPeerState::Connecting);
        let started = Instant::now();
        let res = session(&link, &ctx, &target).await;
        end_session(&link, &ctx);
        match res {
            Ok(End::Myself) => {
                set_state(&link, &ctx, MeshPeerState::Myself);
                tracing::info!(target: "derp_relay::mesh", peer = %link.name, "mesh peer is this node; not linking to it");
                return;
            }
            Ok(End::Closed) => {
                tracing::info!(target: "derp_relay::mesh", peer = %link.name, "mesh peer closed the link")
            }
            Err(e) if failures == 0 => {
                tracing::warn!(target: "derp_relay::mesh", peer = %link.name, error = %e, "mesh link down; reconnecting")
            }
            Err(e) => {
                tracing::debug!(target: "derp_relay::mesh", peer = %link.name, error = %e, attempt = failures + 1, "mesh link attempt failed")
            }
        }
        if link.state() == MeshPeerState::Connected && started.elapsed() >= HEALTHY_SESSION {
            failures = 0;
        }
        set_state(&link, &ctx, MeshPeerState::Backoff);
        tokio::time::sleep(backoff(failures, ctx.shared.config.mesh_backoff_max)).await;
        failures = failures.saturating_add(1);
        ctx.shared.metrics.mesh.reconnects.inc();
    }
}

async fn session(link: &Arc<MeshLink>, ctx: &LinkCtx, t: &Target) -> Result<End, ClientError> {
    let url = RelayUrl {
        websocket: false,
        tls: ctx.tls.is_some(),
        host: t.host.clone(),
        port: t.port,
        path: "/derp".into(),
    };
    let opts = ConnectOptions {
        bind: ctx.bind.filter(|b| {
            t.dial
                .parse::<IpAddr>()
                .is_ok_and(|d| d.is_ipv4() == b.is_ipv4())
        }),
        tls: ctx.tls.clone(),
        connect_timeout: CONNECT_TIMEOUT,
    };
    if t.dial.parse::<IpAddr>().is_err() {
        // A host name: remember its addresses before dialling, so the peer's
        // own link to us (from one of them) is not held to per-IP limits. A
        // failed lookup is reported by the connect below.
        if let Ok(addrs) = tokio::net::lookup_host((t.dial.as_str(), t.port)).await {
            link.set_resolved(addrs.map(|a| a.ip()));
        }
    }
    let connect = async {
        let (mut rd, mut wr) = client::open_via(&url, &t.dial, &opts).await?;
        let hs = client::handshake(&mut rd, &mut wr, &ctx.secret, &ctx.info_json).await?;
        Ok::<_, ClientError>((rd, wr, hs))
    };
    let (mut rd, mut wr, hs) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            ClientError::Protocol(format!(
                "no handshake within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })??;
    let me = ctx.shared.secret.public();
    if hs.server_key == me {
        return Ok(End::Myself);
    }
    link.set_peer_key(hs.server_key);
    let mut out = BytesMut::new();
    frame::encode_watch_conns(&mut out);
    wr.send(&mut out).await?;
    link.queue.open();
    link.sessions.fetch_add(1, Ordering::Relaxed);
    set_state(link, ctx, MeshPeerState::Connected);
    tracing::info!(target: "derp_relay::mesh", peer = %link.name, peer_key = %hs.server_key, "mesh link up; watching");

    let m = &ctx.shared.metrics;
    let writer = async {
        let mut batch = VecDeque::new();
        while link.queue.next_batch(&mut batch).await {
            let n = batch.len() as u64;
            let mut bytes = 0u64;
            for (src, dst, p) in batch.drain(..) {
                bytes += p.len() as u64;
                frame::encode_forward_packet(&mut out, &src, &dst, &p);
            }
            if let Err(e) = wr.send(&mut out).await {
                m.dropped(DropReason::WriteError).inc_by(n);
                return Err(e);
            }
            m.mesh.packets_out.inc_by(n);
            m.mesh.bytes_out.inc_by(bytes);
        }
        Ok(End::Closed)
    };
    let clients = &ctx.shared.clients;
    let reader = async {
        loop {
            let f = match tokio::time::timeout(READ_TIMEOUT, rd.next_frame()).await {
                Err(_) => {
                    return Err(ClientError::Protocol(format!(
                        "peer silent for {}s",
                        READ_TIMEOUT.as_secs()
                    )));
                }
                Ok(r) => match r? {
                    Some(f) => f,
                    None => return Ok(End::Closed),
                },
            };
            match ServerFrame::parse(f) {
                Ok(ServerFrame::PeerPresent { key, .. }) if key != me => {
                    clients.remote.present(key, link);
                }
                Ok(ServerFrame::PeerGone { key, .. }) => {
                    if let Some((k, receivers)) = clients.remote.gone(&key, link) {
                        clients.tell_departed(&k, receivers);
                    }
                }
                Ok(_) => continue,
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            m.mesh.remote_keys.set(clients.remote.len() as i64);
        }
    };
    tokio::select! {
        r = reader => r,
        w = writer => w,
    }
}

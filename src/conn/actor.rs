//! The connection actor: owns one client's reader and writer tasks and
//! handles its control messages (GoingAway, Close).
//!
//! When it ends for any reason, including a panic in its handler, dropping its
//! state aborts both tasks, closes the socket and deregisters the client; a
//! panic inside either task is caught by [`guarded`] and closes the connection
//! the same way. A fault costs exactly one connection.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use super::reader::read_loop;
use super::transport::{ConnReader, ConnWriter, ws_close_code};
use super::writer::write_loop;
use super::{ConnDeps, ConnMsg};
use crate::admission::UrlVerdict;
use crate::protocol::{ClientInfo, PublicKey};
use crate::reasons::{CloseReason, DropReason, Transport};
use crate::routing::{ClientHandle, Control};
use crate::state::ClientSlot;

pub struct ConnectionActor;

pub struct ConnArgs {
    pub(super) deps: Arc<ConnDeps>,
    pub(super) key: PublicKey,
    pub(super) info: ClientInfo,
    pub(super) remote: SocketAddr,
    pub(super) transport: Transport,
    pub(super) reader: ConnReader,
    pub(super) writer: ConnWriter,
    pub(super) read_buf: BytesMut,
    pub(super) server_info: BytesMut,
    pub(super) slot: Option<ClientSlot>,
    /// The verify URL's verdict, asked before the actor started.
    pub(super) url: UrlVerdict,
}

pub struct ConnState {
    handle: Arc<ClientHandle>,
    deps: Arc<ConnDeps>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    _slot: Option<ClientSlot>,
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        let lost = self.handle.queue.close();
        self.handle.mark_closed();
        #[cfg(feature = "test-hooks")]
        super::test_hooks::ended(&self.handle);
        self.deps
            .state
            .metrics
            .dropped(DropReason::GoneDisconnected)
            .inc_by(lost as u64);
        self.deps.registrar.deregister(self.handle.clone());
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
        let deps = a.deps;
        let shared = deps.state.clone();
        let me = myself.clone();
        let handle = Arc::new(ClientHandle::new(
            a.key,
            shared.next_conn_id(),
            a.transport,
            a.remote,
            shared.config.queue_depth,
            Box::new(move |why| {
                let _ = me.cast(ConnMsg::Close(why));
            }),
        ));
        let mesh_key = shared.mesh_key.as_ref();
        let mesh_peer = a.info.is_mesh_peer(mesh_key);
        handle.set_role(mesh_peer, a.info.is_prober);
        let verdict = if !mesh_peer && a.slot.is_none() {
            // Let past the client cap for being a peer's address, but no peer.
            Err(crate::reasons::RefuseReason::Cap)
        } else if !mesh_peer && a.info.presents_mesh_key() {
            // A well-formed key that is not ours: a misconfigured peer (or a
            // guess). Refused, so it shows up instead of half-working.
            Err(crate::reasons::RefuseReason::MeshKey)
        } else {
            deps.registrar.register(handle.clone(), a.url).await?
        };
        if mesh_peer {
            tracing::info!(target: "derp_relay::mesh", peer = %a.key, remote = %a.remote, "mesh peer connected");
        }
        if let Err(reason) = verdict {
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
        let writer = tokio::spawn(guarded(
            handle.clone(),
            write_loop(a.writer, a.server_info, handle.clone(), shared.clone()),
        ));
        let reader = tokio::spawn(guarded(
            handle.clone(),
            hand_over_violations(
                read_loop(a.reader, a.read_buf, handle.clone(), deps.clone()),
                handle.clone(),
            ),
        ));
        #[cfg(feature = "test-hooks")]
        super::test_hooks::started(&handle, myself.clone());
        Ok(ConnState {
            handle,
            deps,
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
                st.deps
                    .state
                    .metrics
                    .disconnects
                    .with_label_values(&[why.as_str()])
                    .inc();
                tracing::debug!(target: "derp_relay::core", key = %st.handle.key, cause = why.as_str(), "closing connection");
                myself.stop(Some(why.as_str().into()));
            }
            #[cfg(feature = "test-hooks")]
            ConnMsg::CrashForTest => panic!("connection crash requested by a test"),
        }
        Ok(())
    }
}

/// A WebSocket client that broke the protocol is told why with a close code,
/// which only the writer can send: the reader hands the reason over and
/// waits to be aborted, so the writer's close frame is not cut off by the
/// connection ending first. The write-timeout sweeper bounds how long that
/// takes when the client does not read.
fn hand_over_violations(
    read: impl Future<Output = CloseReason>,
    h: Arc<ClientHandle>,
) -> impl Future<Output = CloseReason> {
    read.then(move |why| {
        let handed = h.transport == Transport::WebSocket
            && ws_close_code(why).is_some()
            && h.queue.push_control(Control::Abort(why));
        async move {
            if handed {
                std::future::pending::<()>().await;
            }
            why
        }
    })
}

/// Runs one of a connection's tasks; however it ends, including by a panic,
/// the connection is closed (the first reason given wins).
fn guarded(
    h: Arc<ClientHandle>,
    task: impl Future<Output = CloseReason>,
) -> impl Future<Output = ()> {
    // Combinators rather than an `async fn`: an async wrapper keeps the task
    // future twice in its state (argument and awaited copy), which doubled
    // the size of every connection's two tasks (+1 KiB per idle client).
    std::panic::AssertUnwindSafe(task)
        .catch_unwind()
        .map(move |r| {
            let why = r.unwrap_or_else(|_| {
                tracing::error!(target: "derp_relay::core", key = %h.key, "connection task panicked; closing this connection");
                CloseReason::Panic
            });
            h.close(why);
        })
}

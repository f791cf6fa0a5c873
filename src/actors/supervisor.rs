//! RootSupervisor: starts the long-lived actors, restarts the ones that crash
//! (within a budget), supervises connection actors, and drives shutdown.
//!
//! Long-lived actors keep their state where a restart can find it (the
//! registry's routing table is shared, not owned by the actor), so a restart
//! costs no client its connection. Connection actors are supervised but never
//! restarted: a crash closes that one connection and the client reconnects.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::watch;

use super::registry::{RegistryActor, RegistryArgs, RegistryMsg};
use crate::relay::Shared;

/// Restarts allowed within [`RESTART_WINDOW`] before the relay gives up.
const RESTART_BUDGET: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

pub enum RootMsg {
    /// Broadcast GoingAway to every client; replies with how many were told.
    GoingAway(RpcReplyPort<usize>),
}

pub struct RootSupervisor;

pub struct RootArgs {
    pub shared: Arc<Shared>,
    /// Set when the restart budget is spent; `main` exits on it.
    pub fatal: watch::Sender<Option<String>>,
}

pub struct RootState {
    shared: Arc<Shared>,
    fatal: watch::Sender<Option<String>>,
    registry: ActorId,
    restarts: VecDeque<Instant>,
}

async fn spawn_registry(
    shared: &Arc<Shared>,
    root: ActorCell,
) -> Result<ActorRef<RegistryMsg>, ActorProcessingErr> {
    let args = RegistryArgs {
        clients: shared.clients.clone(),
        metrics: shared.metrics.clone(),
        ping_interval: shared.config.ping_interval,
        draining: shared.draining.clone(),
    };
    let (r, _) = Actor::spawn_linked(None, RegistryActor, args, root).await?;
    shared.set_registry(Some(r.clone()));
    Ok(r)
}

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMsg>,
        a: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let registry = spawn_registry(&a.shared, myself.get_cell()).await?;
        Ok(RootState {
            shared: a.shared,
            fatal: a.fatal,
            registry: registry.get_id(),
            restarts: VecDeque::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RootMsg>,
        msg: RootMsg,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::GoingAway(reply) => {
                let n = match st.shared.registry() {
                    Some(r) => ractor::call_t!(r, RegistryMsg::GoingAway, 5_000).unwrap_or(0),
                    None => 0,
                };
                let _ = reply.send(n);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        evt: SupervisionEvent,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        if cell.get_id() != st.registry {
            // A connection actor. Its teardown already closed the socket and
            // deregistered the client; a panic is counted here.
            if let Some(err) = failure {
                st.shared.metrics.connection_panics.inc();
                tracing::error!(target: "derp_relay::core", error = %err, "connection actor panicked; connection closed");
            }
            return Ok(());
        }
        if st.shared.is_draining() && failure.is_none() {
            return Ok(());
        }
        tracing::error!(actor = "registry", error = ?failure, "actor stopped unexpectedly; restarting");
        let now = Instant::now();
        st.restarts
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if st.restarts.len() >= RESTART_BUDGET {
            let why = format!(
                "registry crashed {} times within {}s; giving up",
                st.restarts.len() + 1,
                RESTART_WINDOW.as_secs()
            );
            tracing::error!("{why}");
            let _ = st.fatal.send(Some(why));
            return Ok(());
        }
        st.restarts.push_back(now);
        st.shared
            .metrics
            .actor_restarts
            .with_label_values(&["registry"])
            .inc();
        let r = spawn_registry(&st.shared, myself.get_cell()).await?;
        st.registry = r.get_id();
        Ok(())
    }
}

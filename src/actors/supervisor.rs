//! RootSupervisor: starts the long-lived actors, restarts the ones that crash
//! (within a budget), supervises connection actors, and drives shutdown.
//!
//! Long-lived actors keep their state where a restart can find it: the routing
//! table and TOFU bindings live in `Shared`, the ACL is re-read from its file.
//! A restart therefore costs no client its connection. Connection actors are
//! supervised but never restarted: a crash closes that one connection and the
//! client reconnects.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::watch;

use super::Actors;
use super::acl::AclActor;
use super::mesh::{MeshActor, MeshArgs, Resolver};
use super::metrics::MetricsActor;
use super::registry::RegistryActor;
use super::tofu::TofuActor;
use crate::state::Shared;

/// Restarts allowed within [`RESTART_WINDOW`] before the relay gives up.
const RESTART_BUDGET: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The long-lived children, in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child {
    Metrics,
    Tofu,
    Acl,
    Registry,
    Mesh,
}

impl Child {
    fn name(self) -> &'static str {
        match self {
            Child::Metrics => "metrics",
            Child::Tofu => "tofu",
            Child::Acl => "acl",
            Child::Registry => "registry",
            Child::Mesh => "mesh",
        }
    }
}

pub enum RootMsg {
    /// Broadcast GoingAway to every client; replies with how many were told.
    GoingAway(RpcReplyPort<usize>),
    /// Start a crashed child again (retried if its start fails, e.g. while
    /// the port its predecessor held is still being released).
    Restart(Child),
}

/// Delay before retrying a child whose restart failed.
const RETRY_AFTER: Duration = Duration::from_millis(200);

pub struct RootSupervisor;

pub struct RootArgs {
    pub shared: Arc<Shared>,
    pub actors: Arc<Actors>,
    /// Set when the restart budget is spent; `main` exits on it.
    pub fatal: watch::Sender<Option<String>>,
    /// The mesh, when this node has peers to link to.
    pub mesh: Option<MeshSetup>,
}

/// What the mesh actor is started (and restarted) with.
#[derive(Clone)]
pub struct MeshSetup {
    pub settings: crate::config::MeshSettings,
    pub resolver: Arc<dyn Resolver>,
}

pub struct RootState {
    shared: Arc<Shared>,
    actors: Arc<Actors>,
    fatal: watch::Sender<Option<String>>,
    mesh: Option<MeshSetup>,
    children: HashMap<ActorId, Child>,
    restarts: VecDeque<Instant>,
}

async fn spawn_child(
    shared: &Arc<Shared>,
    actors: &Arc<Actors>,
    mesh: Option<&MeshSetup>,
    which: Child,
    root: ActorCell,
) -> Result<Option<ActorId>, ActorProcessingErr> {
    Ok(match which {
        Child::Mesh => match mesh {
            Some(m) => {
                let args = MeshArgs {
                    shared: shared.clone(),
                    settings: m.settings.clone(),
                    resolver: m.resolver.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, MeshActor, args, root).await?;
                actors.mesh.set(Some(r.clone()));
                Some(r.get_id())
            }
            None => None,
        },
        Child::Registry => {
            let (r, _) =
                Actor::spawn_linked(None, RegistryActor, (shared.clone(), actors.clone()), root)
                    .await?;
            actors.registry.set(Some(r.clone()));
            Some(r.get_id())
        }
        Child::Metrics => {
            let (r, _) = Actor::spawn_linked(None, MetricsActor, shared.clone(), root).await?;
            actors.metrics.set(Some(r.clone()));
            Some(r.get_id())
        }
        Child::Tofu => {
            let (r, _) = Actor::spawn_linked(None, TofuActor, shared.clone(), root).await?;
            actors.tofu.set(Some(r.clone()));
            Some(r.get_id())
        }
        // The live path: a restart after a SIGHUP re-point watches the new file.
        Child::Acl => match &shared.live().allowed_keys_file {
            Some(path) => {
                let args = (shared.clone(), actors.clone(), path.clone());
                let (r, _) = Actor::spawn_linked(None, AclActor, args, root).await?;
                actors.acl.set(Some(r.clone()));
                Some(r.get_id())
            }
            None => None, // open relay: nothing to watch
        },
    })
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
        let mut children = HashMap::new();
        for which in [
            Child::Metrics,
            Child::Tofu,
            Child::Acl,
            Child::Registry,
            Child::Mesh,
        ] {
            if let Some(id) = spawn_child(
                &a.shared,
                &a.actors,
                a.mesh.as_ref(),
                which,
                myself.get_cell(),
            )
            .await?
            {
                children.insert(id, which);
            }
        }
        Ok(RootState {
            shared: a.shared,
            actors: a.actors,
            fatal: a.fatal,
            mesh: a.mesh,
            children,
            restarts: VecDeque::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        msg: RootMsg,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Restart(which) => {
                if st.shared.is_draining() {
                    return Ok(());
                }
                match spawn_child(
                    &st.shared,
                    &st.actors,
                    st.mesh.as_ref(),
                    which,
                    myself.get_cell(),
                )
                .await
                {
                    Ok(Some(id)) => {
                        st.children.insert(id, which);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(actor = which.name(), error = %e, "restart failed; retrying");
                        if st.spend_restart(which) {
                            myself.send_after(RETRY_AFTER, move || RootMsg::Restart(which));
                        }
                    }
                }
            }
            RootMsg::GoingAway(reply) => {
                // Straight onto every connection's queue: each writer flushes
                // what is queued, says goodbye and closes; the relay awaits
                // the count of live connections reaching zero.
                let mut n = 0;
                st.shared.clients.for_each(|h| {
                    n += 1;
                    h.queue.going_away();
                });
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
        let Some(which) = st.children.remove(&cell.get_id()) else {
            // A connection actor. Its teardown already closed the socket and
            // deregistered the client; a panic is counted here.
            if let Some(err) = failure {
                st.shared.metrics.connection_panics.inc();
                tracing::error!(target: "derp_relay::core", error = %err, "connection actor panicked; connection closed");
            }
            return Ok(());
        };
        if st.shared.is_draining() && failure.is_none() {
            return Ok(());
        }
        tracing::error!(actor = which.name(), error = ?failure, "actor stopped unexpectedly; restarting");
        if st.spend_restart(which) {
            // Via the mailbox, so a failing start is retried rather than
            // failing the supervisor itself.
            let _ = myself.cast(RootMsg::Restart(which));
        }
        Ok(())
    }
}

impl RootState {
    /// Counts a restart against the budget; false (and the relay told to
    /// stop) once the budget is spent.
    fn spend_restart(&mut self, which: Child) -> bool {
        let now = Instant::now();
        self.restarts
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if self.restarts.len() >= RESTART_BUDGET {
            let why = format!(
                "{} actor restarts within {}s (last: {}); giving up and stopping",
                self.restarts.len() + 1,
                RESTART_WINDOW.as_secs(),
                which.name()
            );
            tracing::error!("{why}");
            let _ = self.fatal.send(Some(why));
            return false;
        }
        self.restarts.push_back(now);
        self.shared
            .metrics
            .actor_restarts
            .with_label_values(&[which.name()])
            .inc();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_child_has_its_restart_series() {
        for c in [Child::Metrics, Child::Tofu, Child::Acl, Child::Registry] {
            assert!(
                crate::reasons::RESTARTABLE_ACTORS.contains(&c.name()),
                "{} missing from RESTARTABLE_ACTORS",
                c.name()
            );
        }
    }
}

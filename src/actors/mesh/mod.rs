//! The mesh actor: this node's links to the other relays of its region.
//!
//! It owns one [`link::LinkActor`] per peer and keeps that set equal to what
//! discovery says: the static `--mesh-with` list plus, with `--mesh-dns`,
//! every address the name resolves to (re-resolved every
//! `mesh_dns_interval`, through a [`Resolver`] that is the system's in
//! production and may be a stand-in in tests). Links that appear are started,
//! links that disappear are stopped (their keys withdrawn), and a link that
//! crashes is started again without touching any client.
//!
//! Nothing here carries packets: links push and pull on the routing table's
//! mesh half directly (DESIGN.md §2.1).

pub mod link;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::config::MeshSettings;
use crate::reasons::MeshPeerState;
use crate::routing::MeshLink;
use crate::state::Shared;
use link::{LinkActor, LinkArgs, LinkCtx};

/// Delay before a crashed link is started again.
const RESTART_AFTER: Duration = Duration::from_secs(1);

/// A resolution's future.
pub type Resolving = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;

/// How `--mesh-dns` names become addresses.
pub trait Resolver: Send + Sync {
    fn resolve(&self, name: &str, port: u16) -> Resolving;
}

/// The system resolver (getaddrinfo through tokio): A and AAAA records.
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, name: &str, port: u16) -> Resolving {
        let name = name.to_owned();
        Box::pin(async move {
            let mut ips: Vec<IpAddr> = tokio::net::lookup_host((name.as_str(), port))
                .await?
                .map(|a| a.ip().to_canonical())
                .collect();
            ips.sort();
            ips.dedup();
            Ok(ips)
        })
    }
}

/// One peer to keep a link to: named `host` (Host header, TLS name),
/// dialled at `dial`, on `port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub dial: String,
}

impl Target {
    fn name(&self) -> String {
        let host = crate::client::authority(&self.host, self.port);
        if self.dial == self.host {
            host
        } else {
            format!("{host}/{}", self.dial)
        }
    }
}

pub enum MeshMsg {
    /// Time to resolve `--mesh-dns` again.
    Resolve,
    /// What the name resolved to (or why it did not).
    Resolved(Result<Vec<IpAddr>, String>),
    /// Start a crashed link again, if discovery still wants it.
    Restart(Target),
}

pub struct MeshArgs {
    pub shared: Arc<Shared>,
    pub settings: MeshSettings,
    pub resolver: Arc<dyn Resolver>,
}

pub struct MeshActor;

struct Entry {
    actor: ActorRef<link::LinkMsg>,
    link: Arc<MeshLink>,
}

pub struct MeshState {
    shared: Arc<Shared>,
    settings: MeshSettings,
    resolver: Arc<dyn Resolver>,
    ctx: Arc<LinkCtx>,
    links: HashMap<Target, Entry>,
    by_actor: HashMap<ActorId, Target>,
    dns: HashSet<Target>,
    resolving: bool,
}

impl Actor for MeshActor {
    type Msg = MeshMsg;
    type State = MeshState;
    type Arguments = MeshArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MeshMsg>,
        a: MeshArgs,
    ) -> Result<MeshState, ActorProcessingErr> {
        let ctx = Arc::new(LinkCtx::new(a.shared.clone(), &a.settings)?);
        let mut st = MeshState {
            shared: a.shared,
            settings: a.settings,
            resolver: a.resolver,
            ctx,
            links: HashMap::new(),
            by_actor: HashMap::new(),
            dns: HashSet::new(),
            resolving: false,
        };
        if st.settings.dns.is_some() {
            let _ = myself.cast(MeshMsg::Resolve);
            myself.send_interval(st.shared.config.mesh_dns_interval, || MeshMsg::Resolve);
        }
        tracing::info!(
            target: "derp_relay::mesh",
            static_peers = st.settings.peers.len(),
            dns = ?st.settings.dns.as_ref().map(|(n, p)| format!("{n}:{p}")),
            "mesh starting"
        );
        st.reconcile(&myself).await;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<MeshMsg>,
        msg: MeshMsg,
        st: &mut MeshState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MeshMsg::Resolve => {
                let Some((name, port)) = st.settings.dns.clone() else {
                    return Ok(());
                };
                if st.resolving {
                    return Ok(()); // a slow resolver: do not pile lookups up
                }
                st.resolving = true;
                let fut = st.resolver.resolve(&name, port);
                let me = myself.clone();
                let limit = st
                    .shared
                    .config
                    .mesh_dns_interval
                    .max(Duration::from_secs(1));
                tokio::spawn(async move {
                    let r = match tokio::time::timeout(limit, fut).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer within {}s", limit.as_secs())),
                    };
                    let _ = me.cast(MeshMsg::Resolved(r));
                });
            }
            MeshMsg::Resolved(r) => {
                st.resolving = false;
                let Some((name, port)) = st.settings.dns.clone() else {
                    return Ok(());
                };
                match r {
                    Ok(ips) => {
                        let next: HashSet<Target> = ips
                            .into_iter()
                            .map(|ip| Target {
                                host: name.clone(),
                                port,
                                dial: ip.to_string(),
                            })
                            .collect();
                        if next != st.dns {
                            tracing::info!(target: "derp_relay::mesh", name = %name, peers = next.len(), "mesh DNS changed");
                            st.dns = next;
                            st.reconcile(&myself).await;
                        }
                    }
                    // Keep the last good answer: a DNS hiccup must not tear
                    // the region apart.
                    Err(e) => {
                        tracing::warn!(target: "derp_relay::mesh", name = %name, error = %e, "mesh DNS lookup failed; keeping the current peers")
                    }
                }
            }
            MeshMsg::Restart(t) => {
                if st.wanted().contains(&t) && !st.links.contains_key(&t) {
                    st.start_link(&myself, t).await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<MeshMsg>,
        evt: SupervisionEvent,
        st: &mut MeshState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        let Some(t) = st.by_actor.remove(&cell.get_id()) else {
            return Ok(());
        };
        // Only a link still in the table ended on its own: stopped ones were
        // removed first.
        if st
            .links
            .get(&t)
            .is_some_and(|e| e.actor.get_id() == cell.get_id())
        {
            if let Some(e) = st.links.remove(&t) {
                st.shared.clients.remote.remove_link(e.link.id);
            }
            tracing::error!(target: "derp_relay::mesh", peer = %t.name(), error = ?failure, "mesh link stopped unexpectedly; restarting it");
            st.shared
                .metrics
                .actor_restarts
                .with_label_values(&["mesh_link"])
                .inc();
            myself.send_after(RESTART_AFTER, move || MeshMsg::Restart(t));
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<MeshMsg>,
        st: &mut MeshState,
    ) -> Result<(), ActorProcessingErr> {
        for (_, e) in st.links.drain() {
            e.actor.stop(Some("mesh stopping".into()));
            st.shared.clients.remote.remove_link(e.link.id);
        }
        Ok(())
    }
}

impl MeshState {
    fn wanted(&self) -> HashSet<Target> {
        let mut w: HashSet<Target> = self
            .settings
            .peers
            .iter()
            .map(|p| Target {
                host: p.host.clone(),
                port: p.port,
                dial: p.dial.clone(),
            })
            .collect();
        w.extend(self.dns.iter().cloned());
        w
    }

    /// Starts and stops links until they match discovery.
    async fn reconcile(&mut self, myself: &ActorRef<MeshMsg>) {
        let wanted = self.wanted();
        let gone: Vec<Target> = self
            .links
            .keys()
            .filter(|t| !wanted.contains(*t))
            .cloned()
            .collect();
        for t in gone {
            if let Some(e) = self.links.remove(&t) {
                tracing::info!(target: "derp_relay::mesh", peer = %t.name(), "mesh peer gone from discovery; stopping its link");
                self.by_actor.remove(&e.actor.get_id());
                self.shared.clients.remote.remove_link(e.link.id);
                e.actor.stop(Some("peer gone from discovery".into()));
            }
        }
        for t in wanted {
            if !self.links.contains_key(&t) {
                self.start_link(myself, t).await;
            }
        }
    }

    async fn start_link(&mut self, myself: &ActorRef<MeshMsg>, t: Target) {
        let link = Arc::new(MeshLink::new(
            self.shared.next_conn_id(),
            t.name(),
            t.dial.clone(),
            self.shared.config.mesh_queue_depth,
        ));
        self.shared
            .metrics
            .mesh
            .peers(MeshPeerState::Connecting)
            .inc();
        let args = LinkArgs {
            ctx: self.ctx.clone(),
            link: link.clone(),
            target: t.clone(),
        };
        match Actor::spawn_linked(None, LinkActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.shared.clients.remote.add_link(link.clone());
                self.by_actor.insert(actor.get_id(), t.clone());
                self.links.insert(t, Entry { actor, link });
            }
            Err(e) => {
                self.shared.metrics.mesh.peers(link.state()).dec();
                tracing::error!(target: "derp_relay::mesh", peer = %t.name(), error = %e, "mesh link did not start; retrying");
                myself.send_after(RESTART_AFTER, move || MeshMsg::Restart(t));
            }
        }
    }
}

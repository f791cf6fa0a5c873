//! Assembling a running relay: shared state, the supervisor tree and the HTTP
//! front, with one handle to stop it. `main` and the integration tests both
//! start the relay through [`Relay::start`]. This is the one place that knows
//! every part; each part is handed only what it uses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::actors::Actors;
use crate::actors::supervisor::{RootArgs, RootMsg, RootSupervisor};
use crate::actors::tofu::TofuMsg;
use crate::admission::allowed_keys::AllowedKeys;
use crate::admission::bindings::{self, Bindings};
use crate::admission::server_key::load_or_create_key;
use crate::config::Config;
use crate::conn::ConnDeps;
use crate::conn::pace::ClientRate;
use crate::metrics::Metrics;
use crate::state::Shared;

/// A running relay.
pub struct Relay {
    pub shared: Arc<Shared>,
    /// The long-lived actors in force (tests reach them to inject faults).
    pub actors: Arc<Actors>,
    /// The per-client bandwidth limit every connection reads; a reload sets it.
    pub client_rate: Arc<ClientRate>,
    addr: SocketAddr,
    root: ActorRef<RootMsg>,
    stop_accepting: watch::Sender<bool>,
    accept_task: tokio::task::JoinHandle<()>,
    stun: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    fatal: watch::Receiver<Option<String>>,
}

impl Relay {
    /// Validates, starts the supervisor tree, then binds and serves.
    pub async fn start(mut config: Config) -> Result<Relay, String> {
        crate::limits::fit_clients_to_descriptors(&mut config);
        let listen = config.listen_addr().map_err(|e| e.0)?;
        let acl = match &config.allowed_keys_file {
            Some(p) => Some(AllowedKeys::load(p)?),
            None => None,
        };
        let bpath = config.bindings_path();
        let stale = bindings::remove_stale_temp_files(&bpath);
        if stale > 0 {
            tracing::info!(
                files = stale,
                "removed temporary files left by an interrupted bindings write"
            );
        }
        let bindings = Bindings::load(&bpath)?;
        let secret = load_or_create_key(&config.server_key_path())?;
        let shared = Arc::new(Shared::new(config, secret, acl, bindings));
        let actors = Arc::new(Actors::default());
        let client_rate = Arc::new(ClientRate::new(
            shared.config.client_bytes_per_sec,
            shared.config.client_burst_bytes,
        ));
        let deps = Arc::new(ConnDeps {
            state: shared.clone(),
            registrar: actors.clone(),
            supervisor: Default::default(),
            client_rate: client_rate.clone(),
            rate_limited: true,
        });

        let (fatal_tx, fatal) = watch::channel(None);
        let (root, _) = Actor::spawn(
            None,
            RootSupervisor,
            RootArgs {
                shared: shared.clone(),
                actors: actors.clone(),
                fatal: fatal_tx,
            },
        )
        .await
        .map_err(|e| format!("starting supervisor: {e}"))?;
        let _ = deps.supervisor.set(root.get_cell());

        let listener = bind(listen).map_err(|e| format!("addr: cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let stun_socket = match bind_stun(&shared.config).await {
            Ok(s) => s,
            Err(e) => {
                root.stop(Some("start failed".into()));
                return Err(e);
            }
        };
        let (stop_accepting, stop_rx) = watch::channel(false);
        let stun = match stun_socket {
            Some((socket, stun_addr)) => {
                tracing::info!(udp = %stun_addr, "STUN listening");
                let task = tokio::spawn(crate::edge::stun::serve(
                    socket,
                    shared.metrics.stun.clone(),
                    stop_rx.clone(),
                ));
                Some((stun_addr, task))
            }
            None => None,
        };
        let accept_task = tokio::spawn(crate::http::server::serve(listener, deps, stop_rx));
        tracing::info!(%addr, server_key = %shared.secret.public().to_nodekey_hex(), "derp-relay listening");
        Ok(Relay {
            shared,
            actors,
            client_rate,
            addr,
            root,
            stop_accepting,
            accept_task,
            stun,
            fatal,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound STUN UDP address, or `None` with `stun = false`.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun.as_ref().map(|(a, _)| *a)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Resolves when the supervisor gives up (restart budget spent); the
    /// message says why.
    pub async fn failed(&mut self) -> String {
        loop {
            if let Some(why) = self.fatal.borrow().clone() {
                return why;
            }
            if self.fatal.changed().await.is_err() {
                return "supervisor stopped".into();
            }
        }
    }

    /// Graceful stop: refuse new connections, tell every client to go
    /// elsewhere, wait for them to leave (up to `shutdown_timeout`), stop the tree.
    /// Returns how many clients were still connected at the deadline.
    pub async fn shutdown(self) -> usize {
        let deadline = Instant::now() + self.shared.config.shutdown_timeout;
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = self.stop_accepting.send(true);
        let told = ractor::call_t!(self.root, RootMsg::GoingAway, 5_000).unwrap_or(0);
        tracing::info!(
            clients = told,
            "draining: told every client to go elsewhere"
        );
        let _ = tokio::time::timeout_at(deadline.into(), self.shared.all_connections_gone()).await;
        let left = self.shared.clients.len();
        if left > 0 {
            tracing::warn!(
                clients = left,
                "shutdown deadline reached; cutting remaining connections"
            );
        }
        if let Some(t) = self.actors.tofu.get()
            && let Ok(Err(e)) = ractor::call_t!(t, TofuMsg::Flush, 5_000)
        {
            tracing::error!(error = %e, "final TOFU flush failed");
        }
        self.actors.registry.set(None);
        self.root.stop(Some("shutdown".into()));
        let _ = tokio::time::timeout(Duration::from_secs(5), self.accept_task).await;
        if let Some((_, task)) = self.stun {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        left
    }
}

/// Resolves and binds `stun_addr` (when `stun` is on); a failure names the setting.
async fn bind_stun(config: &Config) -> Result<Option<(tokio::net::UdpSocket, SocketAddr)>, String> {
    if !config.stun {
        return Ok(None);
    }
    let target = config.stun_target().map_err(|e| e.0)?;
    // Resolved once, at start: on Fly the name is the Machine's own
    // fly-global-services address, which does not move while it runs.
    let addr = tokio::net::lookup_host(target.as_str())
        .await
        .map_err(|e| format!("stun_addr: cannot resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("stun_addr: {target} resolves to no address"))?;
    let socket = crate::edge::stun::bind(addr)
        .await
        .map_err(|e| format!("stun_addr: cannot listen on UDP {addr}: {e}"))?;
    let bound = socket.local_addr().map_err(|e| e.to_string())?;
    Ok(Some((socket, bound)))
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted relay must be able to rebind while old sockets sit in TIME_WAIT.
    // `[::]` also takes IPv4 clients where net.ipv6.bindv6only is 0 (Linux's default).
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

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
use crate::actors::mesh::{Resolver, SystemResolver};
use crate::actors::supervisor::{MeshSetup, RootArgs, RootMsg, RootSupervisor};
use crate::actors::tofu::TofuMsg;
use crate::admission::allowed_keys::AllowedKeys;
use crate::admission::bindings::{self, Bindings};
use crate::admission::server_key::load_or_create_key;
use crate::config::Config;
use crate::conn::ConnDeps;
use crate::http::server::{Front, Role};
use crate::metrics::Metrics;
use crate::state::Shared;

/// A running relay.
pub struct Relay {
    pub shared: Arc<Shared>,
    /// The long-lived actors in force (tests reach them to inject faults).
    pub actors: Arc<Actors>,
    addr: SocketAddr,
    root: ActorRef<RootMsg>,
    stop_accepting: watch::Sender<bool>,
    accept_task: tokio::task::JoinHandle<()>,
    stun: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    edge: EdgeTasks,
    fatal: watch::Receiver<Option<String>>,
    _trimmer: crate::memory::Trimmer,
    /// Re-asks the verify URL about connected keys.
    verify_recheck: tokio::task::JoinHandle<()>,
    /// The configuration as loaded at start (before fitting to the
    /// descriptor limit): restart-only settings are compared with it.
    started: Config,
    /// The configuration last applied (start, then each good reload).
    applied: std::sync::Mutex<Config>,
}

/// What a SIGHUP reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Live settings that changed and are now in force.
    pub applied: Vec<String>,
    /// Settings that changed in the file but need a restart; left as they were.
    pub restart_only: Vec<String>,
}

impl Relay {
    /// Validates, starts the supervisor tree, then binds and serves.
    pub async fn start(config: Config) -> Result<Relay, String> {
        Self::start_with(config, Arc::new(SystemResolver)).await
    }

    /// [`start`](Self::start) with `--mesh-dns` answered by `resolver`
    /// (tests stand in for DNS; production uses the system resolver).
    pub async fn start_with(
        mut config: Config,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Relay, String> {
        // As the operator wrote it, before any fitting: what a reload compares with.
        let loaded = config.clone();
        let mesh = config.mesh().map_err(|e| e.0)?;
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
        let verify = Arc::new(crate::edge::verify_url::HttpVerify::new());
        let mut shared = Shared::new(config, secret, acl, bindings, verify);
        shared.mesh_key = mesh.as_ref().map(|m| m.key);
        let shared = Arc::new(shared);
        let mesh = mesh
            .filter(|m| !m.peers.is_empty() || m.dns.is_some())
            .map(|settings| MeshSetup { settings, resolver });
        let actors = Arc::new(Actors::default());
        let deps = Arc::new(ConnDeps {
            state: shared.clone(),
            registrar: actors.clone(),
            supervisor: Default::default(),
        });

        let (fatal_tx, fatal) = watch::channel(None);
        let (root, _) = Actor::spawn(
            None,
            RootSupervisor,
            RootArgs {
                shared: shared.clone(),
                actors: actors.clone(),
                fatal: fatal_tx,
                mesh,
            },
        )
        .await
        .map_err(|e| format!("starting supervisor: {e}"))?;
        let _ = deps.supervisor.set(root.get_cell());

        let tls = match crate::edge::tls::TlsFront::from_config(&shared.config, &shared.metrics.tls)
        {
            Ok(t) => t,
            Err(e) => {
                root.stop(Some("start failed".into()));
                return Err(e);
            }
        };
        let listener = bind(listen).map_err(|e| format!("addr: cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let port80 = match shared.config.http_listen_addr() {
            Ok(Some(a)) => match bind(a) {
                Ok(l) => Some(l),
                Err(e) => {
                    root.stop(Some("start failed".into()));
                    return Err(format!("http_addr: cannot listen on {a}: {e}"));
                }
            },
            Ok(None) => None,
            Err(e) => {
                root.stop(Some("start failed".into()));
                return Err(e.0);
            }
        };
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
        let mut edge = EdgeTasks::default();
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.server_config.clone()));
        if let Some(t) = tls {
            match t.watch(shared.metrics.tls.clone(), stop_rx.clone()) {
                Ok(task) => edge.tls_watch = task,
                Err(e) => {
                    root.stop(Some("start failed".into()));
                    return Err(e);
                }
            }
        }
        if let Some(l) = port80 {
            let a = l.local_addr().map_err(|e| e.to_string())?;
            tracing::info!(http = %a, "plain HTTP listening (generate_204, redirects to https)");
            let front = Front {
                listener: l,
                tls: None,
                // As derper: https on 443, the DERPPort clients use with port 80,
                // whatever port the relay listens on behind a port mapping.
                role: Role::Port80 { https_port: 443 },
            };
            let task = tokio::spawn(crate::http::server::serve(
                front,
                deps.clone(),
                stop_rx.clone(),
            ));
            edge.port80 = Some((a, task));
        }
        let tls_on = acceptor.is_some();
        let front = Front {
            listener,
            tls: acceptor,
            role: Role::Relay,
        };
        let accept_task = tokio::spawn(crate::http::server::serve(front, deps, stop_rx));
        let verify_recheck = tokio::spawn(crate::actors::verify::recheck_loop(
            shared.clone(),
            actors.clone(),
        ));
        let started = loaded.clone();
        let applied = std::sync::Mutex::new(loaded);
        tracing::info!(%addr, tls = tls_on, server_key = %shared.secret.public().to_nodekey_hex(), "derp-relay listening");
        Ok(Relay {
            shared,
            actors,
            addr,
            root,
            stop_accepting,
            accept_task,
            stun,
            edge,
            fatal,
            _trimmer: crate::memory::Trimmer::start(),
            verify_recheck,
            started,
            applied,
        })
    }

    /// The bound plain-HTTP (`http_addr`) address, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.edge.port80.as_ref().map(|(a, _)| *a)
    }

    /// Applies a re-read configuration (SIGHUP): every live setting
    /// ([`crate::config::LIVE_KEYS`]) takes effect; restart-only settings
    /// that differ from the running ones are reported and left alone. A
    /// configuration that cannot be applied (a new allowed-keys file that
    /// does not parse) changes nothing and says why.
    pub fn reload(&self, new: Config) -> Result<ReloadReport, String> {
        let shared = &self.shared;
        let restart_only = self.started.restart_only_changes(&new);
        let mut live = new.live();
        let old_live = shared.live();
        if restart_only.iter().any(|k| k == "allowed_keys_file") {
            // Turning the ACL on or off is a restart: keep the file in force.
            live.allowed_keys_file = old_live.allowed_keys_file.clone();
        }
        let repoint = match (&old_live.allowed_keys_file, &live.allowed_keys_file) {
            (Some(old), Some(new)) if old != new => {
                if let Err(e) = AllowedKeys::load(new) {
                    self.reload_failed();
                    return Err(format!("allowed_keys_file: {e}"));
                }
                Some(new.clone())
            }
            _ => None,
        };
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let changed = changed_live_keys(&applied, &new, &restart_only);
        shared.set_live(live);
        if let Some(path) = repoint
            && let Some(acl) = self.actors.acl.get()
        {
            let _ = acl.cast(crate::actors::acl::AclMsg::Repoint(path));
        }
        *applied = new;
        shared
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .inc();
        Ok(ReloadReport {
            applied: changed,
            restart_only,
        })
    }

    /// Counts a reload whose file was rejected before it reached [`Relay::reload`].
    pub fn reload_failed(&self) {
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&["failed"])
            .inc();
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
        self.verify_recheck.abort();
        self.actors.registry.set(None);
        self.root.stop(Some("shutdown".into()));
        let _ = tokio::time::timeout(Duration::from_secs(5), self.accept_task).await;
        if let Some((_, task)) = self.stun {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        for task in self.edge.tasks() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        left
    }
}

/// The port-80 listener and the certificate watcher, when configured; both
/// end on the stop-accepting signal.
#[derive(Default)]
struct EdgeTasks {
    port80: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    tls_watch: Option<tokio::task::JoinHandle<()>>,
}

impl EdgeTasks {
    fn tasks(self) -> impl Iterator<Item = tokio::task::JoinHandle<()>> {
        self.port80
            .map(|(_, t)| t)
            .into_iter()
            .chain(self.tls_watch)
    }
}

/// The live settings whose values differ between `old` and `new`.
fn changed_live_keys(old: &Config, new: &Config, restart_only: &[String]) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    crate::config::LIVE_KEYS
        .iter()
        .filter(|k| a.get(**k) != b.get(**k) && !restart_only.iter().any(|r| r == *k))
        .map(|k| k.to_string())
        .collect()
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

//! Assembling a running relay: shared state, the supervisor tree and the HTTP
//! front, with one handle to stop it. `main` and the integration tests both
//! start the relay through [`Relay::start`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorRef};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::actors::acl::{AclMsg, AclStatus, AllowedKeys};
use crate::actors::metrics::MetricsMsg;
use crate::actors::registry::{Clients, RegistryMsg};
use crate::actors::supervisor::{RootArgs, RootMsg, RootSupervisor};
use crate::actors::tofu::{Bindings, TofuMsg};
use crate::config::Config;
use crate::metrics::{Metrics, RefuseReason};
use crate::protocol::{PublicKey, ServerSecret};

/// Where to find a long-lived actor that may be restarted: read on the control
/// path (never per packet), swapped by the supervisor.
pub struct ActorSlot<M: ractor::Message>(RwLock<Option<ActorRef<M>>>);

impl<M: ractor::Message> Default for ActorSlot<M> {
    fn default() -> Self {
        ActorSlot(RwLock::new(None))
    }
}

impl<M: ractor::Message> ActorSlot<M> {
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, r: Option<ActorRef<M>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = r;
    }
}

/// State every part of the relay reads. Written only where noted.
pub struct Shared {
    pub config: Config,
    pub secret: ServerSecret,
    pub metrics: Arc<Metrics>,
    pub clients: Arc<Clients>,
    /// Set once when a graceful stop begins: refuse new clients, /healthz says draining.
    pub draining: Arc<AtomicBool>,
    /// The current long-lived actors; a restart swaps in the new one.
    pub registry: ActorSlot<RegistryMsg>,
    pub tofu: ActorSlot<TofuMsg>,
    pub acl_actor: ActorSlot<AclMsg>,
    pub metrics_actor: ActorSlot<MetricsMsg>,
    /// The allowed-keys set in force (`None` on an open relay). Swapped whole by the ACL actor.
    acl: RwLock<Option<Arc<AllowedKeys>>>,
    acl_status: RwLock<AclStatus>,
    /// TOFU bindings; the TOFU actor writes them to disk.
    pub bindings: std::sync::Mutex<Bindings>,
    root: OnceLock<ActorCell>,
    conn_ids: AtomicU64,
    /// Upgraded connections in handshake or registered, for `max_clients`.
    slots: AtomicUsize,
    pub started: Instant,
}

impl Shared {
    pub fn new(
        config: Config,
        secret: ServerSecret,
        acl: Option<AllowedKeys>,
        bindings: Bindings,
    ) -> Self {
        let metrics = Metrics::new();
        metrics.max_clients.set(config.max_clients as i64);
        metrics
            .acl_keys
            .set(acl.as_ref().map_or(0, |a| a.len() as i64));
        metrics.tofu_bindings.set(bindings.len() as i64);
        Shared {
            tofu: ActorSlot::default(),
            acl_actor: ActorSlot::default(),
            metrics_actor: ActorSlot::default(),
            acl: RwLock::new(acl.map(Arc::new)),
            acl_status: RwLock::new(AclStatus {
                last_reload: Some(std::time::SystemTime::now()),
                last_error: None,
            }),
            bindings: std::sync::Mutex::new(bindings),
            config,
            secret,
            metrics: Arc::new(metrics),
            clients: Arc::new(Clients::default()),
            draining: Arc::new(AtomicBool::new(false)),
            registry: ActorSlot::default(),
            root: OnceLock::new(),
            conn_ids: AtomicU64::new(1),
            slots: AtomicUsize::new(0),
            started: Instant::now(),
        }
    }

    /// The allowed-keys set in force, or `None` on an open relay.
    pub fn acl(&self) -> Option<Arc<AllowedKeys>> {
        self.acl.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_acl(&self, a: Arc<AllowedKeys>) {
        *self.acl.write().unwrap_or_else(|p| p.into_inner()) = Some(a);
    }

    pub fn acl_status(&self) -> AclStatus {
        self.acl_status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_acl_status(&self, s: AclStatus) {
        *self.acl_status.write().unwrap_or_else(|p| p.into_inner()) = s;
    }

    pub(crate) fn root_cell(&self) -> Option<ActorCell> {
        self.root.get().cloned()
    }

    /// Milliseconds since the relay started, plus one so it is never 0.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Reserves room for one more client under `max_clients` (0 = no cap).
    pub fn try_client_slot(self: &Arc<Self>) -> Option<ClientSlot> {
        let cap = self.config.max_clients;
        let prev = self.slots.fetch_add(1, Ordering::AcqRel);
        if cap != 0 && prev >= cap {
            self.slots.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ClientSlot(self.clone()))
    }

    /// Admission of a proven key: the ACL (if any), then `--tofu-lock`.
    /// Returns the key's ACL label. Called by the registry as it registers the
    /// client, so an ACL reload cannot slip between check and registration.
    pub fn admit(&self, key: &PublicKey) -> Result<Option<String>, RefuseReason> {
        if self.is_draining() {
            return Err(RefuseReason::ShuttingDown);
        }
        let acl = self.acl();
        let in_acl = acl.as_deref().is_some_and(|a| a.contains(key));
        if acl.is_some() && !in_acl {
            return Err(RefuseReason::Acl);
        }
        if self.config.tofu_lock && !in_acl {
            let bound = self
                .bindings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(key);
            if !bound {
                return Err(RefuseReason::TofuLock);
            }
        }
        Ok(acl.and_then(|a| a.label(key).map(str::to_owned)))
    }
}

/// One unit of `max_clients`, released when the connection ends however it ends.
pub struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.slots.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Loads the server key from `path`, or creates it (mode 0600) if absent.
/// A key file that exists but does not parse is an error, never replaced.
pub fn load_or_create_key(path: &Path) -> Result<ServerSecret, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            ServerSecret::from_key_file(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            let key = ServerSecret::generate();
            write_private(path, key.to_key_file().as_bytes())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "created new server key");
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// A running relay.
pub struct Relay {
    pub shared: Arc<Shared>,
    addr: SocketAddr,
    root: ActorRef<RootMsg>,
    stop_accepting: watch::Sender<bool>,
    accept_task: tokio::task::JoinHandle<()>,
    stun: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    fatal: watch::Receiver<Option<String>>,
}

impl Relay {
    /// Validates, starts the supervisor tree, then binds and serves.
    pub async fn start(config: Config) -> Result<Relay, String> {
        let listen = config.listen_addr().map_err(|e| e.0)?;
        let acl = match &config.allowed_keys_file {
            Some(p) => Some(AllowedKeys::load(p)?),
            None => None,
        };
        let bindings = Bindings::load(&config.bindings_path())?;
        let secret = load_or_create_key(&config.server_key_path())?;
        let shared = Arc::new(Shared::new(config, secret, acl, bindings));

        let (fatal_tx, fatal) = watch::channel(None);
        let (root, _) = Actor::spawn(
            None,
            RootSupervisor,
            RootArgs {
                shared: shared.clone(),
                fatal: fatal_tx,
            },
        )
        .await
        .map_err(|e| format!("starting supervisor: {e}"))?;
        let _ = shared.root.set(root.get_cell());

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
        let accept_task = tokio::spawn(crate::http::server::serve(
            listener,
            shared.clone(),
            stop_rx,
        ));
        tracing::info!(%addr, server_key = %shared.secret.public().to_nodekey_hex(), "derp-relay listening");
        Ok(Relay {
            shared,
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
        while !self.shared.clients.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.shared.clients.len();
        if left > 0 {
            tracing::warn!(
                clients = left,
                "shutdown deadline reached; cutting remaining connections"
            );
        }
        if let Some(t) = self.shared.tofu.get()
            && let Ok(Err(e)) = ractor::call_t!(t, TofuMsg::Flush, 5_000)
        {
            tracing::error!(error = %e, "final TOFU flush failed");
        }
        self.shared.registry.set(None);
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

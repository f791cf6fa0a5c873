//! What the running relay shares: its settings and identity, the routing
//! table, admission state (allowed keys, bindings), counters, and the
//! draining flag. Nothing here knows the actors or the HTTP front; each part
//! is handed what it uses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::admission::allowed_keys::{AclStatus, AllowedKeys};
use crate::admission::bindings::Bindings;
use crate::admission::verify::{AskPolicy, Checked, UrlVerdict, Verifier, VerifyTransport};
use crate::config::{Config, LiveSettings};
use crate::metrics::Metrics;
use crate::protocol::{PublicKey, ServerSecret};
use crate::reasons::RefuseReason;
use crate::routing::Clients;

/// State every part of the relay reads. Written only where noted.
pub struct Shared {
    /// The settings as started. Restart-only ones are read here; the ones
    /// SIGHUP may change are read through [`Shared::live`].
    pub config: Config,
    /// The live settings, swapped whole on reload.
    live: watch::Sender<Arc<LiveSettings>>,
    /// `--verify-client-url`'s client and answer cache.
    pub verifier: Verifier,
    /// When the last "no usable answer" warning was logged (`now_ms`).
    verify_warned_ms: AtomicU64,
    pub secret: ServerSecret,
    /// The region's shared mesh key, when this node is part of a mesh.
    pub mesh_key: Option<[u8; 32]>,
    pub metrics: Arc<Metrics>,
    pub clients: Arc<Clients>,
    /// Set once when a graceful stop begins: refuse new clients, /healthz says draining.
    pub draining: Arc<AtomicBool>,
    /// The allowed-keys set in force (`None` on an open relay). Swapped whole by the ACL actor.
    acl: RwLock<Option<Arc<AllowedKeys>>>,
    acl_status: RwLock<AclStatus>,
    /// TOFU bindings; the TOFU actor writes them to disk.
    pub bindings: std::sync::Mutex<Bindings>,
    conn_ids: AtomicU64,
    /// Upgraded connections in handshake or registered, for `max_clients`;
    /// a drain waits for it to reach zero.
    slots: watch::Sender<usize>,
    pub started: Instant,
}

impl Shared {
    pub fn new(
        config: Config,
        secret: ServerSecret,
        acl: Option<AllowedKeys>,
        bindings: Bindings,
        verify: Arc<dyn VerifyTransport>,
    ) -> Self {
        let metrics = Metrics::new();
        metrics.max_clients.set(config.max_clients as i64);
        metrics
            .acl_keys
            .set(acl.as_ref().map_or(0, |a| a.len() as i64));
        // The file was just read whole (an open relay has nothing to fail).
        metrics.acl_last_reload_success.set(1);
        if acl.is_some() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            metrics.acl_last_reload_success_timestamp.set(now);
        }
        metrics.tofu_bindings.set(bindings.len() as i64);
        Shared {
            acl: RwLock::new(acl.map(Arc::new)),
            acl_status: RwLock::new(AclStatus {
                last_reload: Some(std::time::SystemTime::now()),
                last_error: None,
            }),
            bindings: std::sync::Mutex::new(bindings),
            live: watch::Sender::new(Arc::new(config.live())),
            verifier: Verifier::new(verify),
            verify_warned_ms: AtomicU64::new(0),
            config,
            secret,
            mesh_key: None,
            metrics: Arc::new(metrics),
            clients: Arc::new(Clients::default()),
            draining: Arc::new(AtomicBool::new(false)),
            conn_ids: AtomicU64::new(1),
            slots: watch::Sender::new(0),
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
        let taken = self.slots.send_if_modified(|n| {
            if cap != 0 && *n >= cap {
                return false;
            }
            *n += 1;
            true
        });
        taken.then(|| ClientSlot(self.clone()))
    }

    /// Resolves once no connection holds a client slot.
    pub async fn all_connections_gone(&self) {
        let mut rx = self.slots.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// The live settings in force now.
    pub fn live(&self) -> Arc<LiveSettings> {
        self.live.borrow().clone()
    }

    /// Follows the live settings (each change is one whole new value).
    pub fn watch_live(&self) -> watch::Receiver<Arc<LiveSettings>> {
        self.live.subscribe()
    }

    /// Puts new live settings in force. A changed verify URL or policy
    /// forgets the cached answers, which were the old policy's.
    pub fn set_live(&self, new: LiveSettings) {
        if self.live().verify != new.verify {
            self.verifier.clear_cache();
        }
        self.live.send_replace(Arc::new(new));
    }

    /// The verify URL's verdict on `key` from `source`, asked only when
    /// `admit` will weigh it (a URL is set, the key is not listed). Runs in
    /// the connection's own task: handshakes wait on their own answers only.
    pub async fn verify_client(
        &self,
        key: &PublicKey,
        source: std::net::IpAddr,
    ) -> Option<Checked> {
        let live = self.live();
        let v = live.verify.as_ref()?;
        let acl = self.acl();
        if !crate::admission::should_ask_url(key, acl.as_deref(), true) {
            return None;
        }
        let policy = AskPolicy {
            url: &v.url,
            timeout: v.timeout,
            fail_open: v.fail_open,
            cache_ttl: v.cache_ttl,
            cache_size: v.cache_size,
        };
        let checked = self.verifier.check(policy, key, source).await;
        self.metrics.verify(checked.result).inc();
        let fail_open = checked.verdict == (UrlVerdict::Unavailable { fail_open: true });
        if fail_open {
            self.metrics.verify_fail_open.inc();
        }
        if let Some(e) = &checked.error {
            // While the service is down every connecting client fails the
            // same way: one warning a second, the rest at debug.
            let now = self.now_ms();
            let last = self.verify_warned_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= 1_000
                && self
                    .verify_warned_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(target: "derp_relay::admission", %key, %source, error = %e, fail_open, "verify URL gave no usable answer (further ones this second at debug)");
            } else {
                tracing::debug!(target: "derp_relay::admission", %key, %source, error = %e, fail_open, "verify URL gave no usable answer");
            }
        }
        Some(checked)
    }

    /// Admission of a proven key (order in [`crate::admission::admit`]),
    /// given the verify URL's verdict asked beforehand. Returns the key's
    /// ACL label. Called by the registry as it registers the client, so an
    /// ACL reload cannot slip between check and registration.
    pub fn admit(
        &self,
        key: &PublicKey,
        url: UrlVerdict,
    ) -> Result<Option<Arc<str>>, RefuseReason> {
        if self.is_draining() {
            return Err(RefuseReason::ShuttingDown);
        }
        let acl = self.acl();
        let live = self.live();
        crate::admission::admit(
            key,
            acl.as_deref(),
            live.verify.is_some(),
            url,
            live.tofu_lock,
            |k| {
                self.bindings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(k)
            },
        )
    }
}

/// One unit of `max_clients`, released when the connection ends however it ends.
pub struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.slots.send_modify(|n| *n = n.saturating_sub(1));
    }
}

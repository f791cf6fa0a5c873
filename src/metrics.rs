//! Every number the relay keeps about itself, as Prometheus collectors.
//!
//! Hot-path counters are plain atomics updated in place by whoever observes the
//! event; nothing sends an actor a message per packet. The label children used
//! on the hot path are resolved once here, so an increment is one atomic add.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub use crate::reasons::{
    CloseReason, DropReason, MeshPeerState, RefuseReason, Transport, VerifyResult,
};
use crate::reasons::{RELOAD_RESULTS, RESTARTABLE_ACTORS};

/// What became of one datagram on the STUN socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunResult {
    /// A Tailscale Binding Request, answered.
    Ok,
    /// Anything else (not STUN, not a Binding Request, not Tailscale's shape): ignored.
    Invalid,
    /// A valid request whose answer could not be sent.
    SendError,
    /// Receiving from the socket failed (e.g. an ICMP error reported on it).
    RecvError,
}

impl StunResult {
    pub const ALL: [StunResult; 4] = [
        StunResult::Ok,
        StunResult::Invalid,
        StunResult::SendError,
        StunResult::RecvError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StunResult::Ok => "ok",
            StunResult::Invalid => "invalid",
            StunResult::SendError => "send_error",
            StunResult::RecvError => "recv_error",
        }
    }
}

/// The STUN socket's counters, one child per result resolved up front so a
/// datagram costs one atomic add and every series exists from the start.
#[derive(Clone)]
pub struct StunCounters([IntCounter; StunResult::ALL.len()]);

impl StunCounters {
    pub fn get(&self, r: StunResult) -> &IntCounter {
        &self.0[r as usize]
    }
}

/// The mesh's counters (links are counted by state; packets both ways).
pub struct MeshMetrics {
    peers: [IntGauge; MeshPeerState::ALL.len()],
    /// ForwardPacket frames written to peers.
    pub packets_out: IntCounter,
    /// ForwardPacket frames received from peers and delivered here.
    pub packets_in: IntCounter,
    pub bytes_out: IntCounter,
    pub bytes_in: IntCounter,
    /// Keys learned from peers (a key announced by two peers counts once).
    pub remote_keys: IntGauge,
    pub reconnects: IntCounter,
    /// Mesh peers watching this node (WatchConns).
    pub watchers: IntGauge,
}

impl MeshMetrics {
    pub fn peers(&self, s: MeshPeerState) -> &IntGauge {
        &self.peers[s as usize]
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub mesh: MeshMetrics,
    pub stun: StunCounters,
    pub packets_routed: IntCounter,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    dropped: [IntCounter; DropReason::ALL.len()],
    pub dropped_vec: IntCounterVec,
    clients_derp: IntGauge,
    clients_ws: IntGauge,
    pub clients_home: IntGauge,
    pub connections_accepted: IntCounter,
    refused: IntCounterVec,
    pub handshake_seconds: Histogram,
    pub duplicate_keys: IntCounter,
    pub disconnects: IntCounterVec,
    pub actor_restarts: IntCounterVec,
    pub connection_panics: IntCounter,
    pub acl_reloads: IntCounterVec,
    pub acl_keys: IntGauge,
    /// 1 while the allowed-keys set in force is the file as it now reads;
    /// 0 after a reload was rejected (the last good set stays).
    pub acl_last_reload_success: IntGauge,
    pub acl_last_reload_success_timestamp: IntGauge,
    verify_checks: [IntCounter; VerifyResult::ALL.len()],
    pub verify_fail_open: IntCounter,
    pub config_reloads: IntCounterVec,
    pub tofu_bindings: IntGauge,
    pub tofu_write_failures: IntCounter,
    pub tofu_evictions: IntCounterVec,
    pub max_clients: IntGauge,
    pub tls: TlsCounters,
}

/// The built-in TLS certificate's figures: when the one served expires, and
/// how its reloads went (both results exist from the start).
#[derive(Clone)]
pub struct TlsCounters {
    /// Unix time the served certificate's `notAfter`; 0 without TLS.
    pub cert_expiry: IntGauge,
    pub reloads_ok: IntCounter,
    pub reloads_failed: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            // Names are fixed and distinct, so registration cannot collide.
            let _ = registry.register(c);
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            reg(Box::new(c.clone()));
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            reg(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            reg(Box::new(g.clone()));
            g
        };
        let build = IntGaugeVec::new(
            Opts::new(
                "derp_build_info",
                "Always 1; labels say which build is running.",
            ),
            &["version"],
        )
        .unwrap_or_else(|e| panic!("metric derp_build_info: {e}"));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        reg(Box::new(build));
        // process_resident_memory_bytes, process_open_fds, CPU seconds, ...
        reg(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let dropped_vec = counter_vec(
            "derp_packets_dropped_total",
            "Packets not delivered, by reason.",
            &["reason"],
        );
        let dropped = DropReason::ALL.map(|r| dropped_vec.with_label_values(&[r.as_str()]));
        let clients = IntGaugeVec::new(
            Opts::new("derp_clients_active", "Connected clients, by transport."),
            &["transport"],
        )
        .unwrap_or_else(|e| panic!("metric derp_clients_active: {e}"));
        reg(Box::new(clients.clone()));
        let clients_home = IntGauge::new(
            "derp_clients_home",
            "Connected clients that say this relay is their home (NotePreferred).",
        )
        .unwrap_or_else(|e| panic!("metric derp_clients_home: {e}"));
        reg(Box::new(clients_home.clone()));
        let handshake_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "derp_handshake_duration_seconds",
                "Time from upgrade to admitted client.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric derp_handshake_duration_seconds: {e}"));
        reg(Box::new(handshake_seconds.clone()));
        let refused = counter_vec(
            "derp_connections_refused_total",
            "Connection attempts refused, by reason.",
            &["reason"],
        );
        let stun = counter_vec(
            "derp_stun_requests_total",
            "Datagrams on the STUN socket, by result (ok, invalid, send_error, recv_error).",
            &["result"],
        );
        let stun = StunCounters(StunResult::ALL.map(|r| stun.with_label_values(&[r.as_str()])));
        let mesh_peers = IntGaugeVec::new(
            Opts::new(
                "derp_mesh_peers",
                "Mesh links to other relays of the region, by state.",
            ),
            &["state"],
        )
        .unwrap_or_else(|e| panic!("metric derp_mesh_peers: {e}"));
        reg(Box::new(mesh_peers.clone()));
        let fwd_packets = counter_vec(
            "derp_mesh_forwarded_packets_total",
            "Packets forwarded between mesh peers, by direction (out: to a peer; in: from one).",
            &["direction"],
        );
        let fwd_bytes = counter_vec(
            "derp_mesh_forwarded_bytes_total",
            "Packet payload bytes forwarded between mesh peers, by direction.",
            &["direction"],
        );
        let mesh = MeshMetrics {
            peers: MeshPeerState::ALL.map(|s| mesh_peers.with_label_values(&[s.as_str()])),
            packets_out: fwd_packets.with_label_values(&["out"]),
            packets_in: fwd_packets.with_label_values(&["in"]),
            bytes_out: fwd_bytes.with_label_values(&["out"]),
            bytes_in: fwd_bytes.with_label_values(&["in"]),
            remote_keys: gauge(
                "derp_mesh_remote_keys",
                "Client keys reachable through mesh peers.",
            ),
            reconnects: counter(
                "derp_mesh_link_reconnects_total",
                "Mesh link connection attempts after the first, over all peers.",
            ),
            watchers: gauge(
                "derp_mesh_watchers",
                "Mesh peers subscribed to this node's presence updates.",
            ),
        };
        // Every known label value exists from the start, at 0: a dashboard
        // panel or an alert on a fresh relay then matches a series instead of
        // nothing (`rate()` of a missing series is no data, not 0).
        for r in RefuseReason::ALL {
            refused.with_label_values(&[r.as_str()]);
        }
        let disconnects = counter_vec(
            "derp_disconnects_total",
            "Client connections that ended, by cause.",
            &["cause"],
        );
        for c in CloseReason::ALL {
            disconnects.with_label_values(&[c.as_str()]);
        }
        let actor_restarts = counter_vec(
            "derp_actor_restarts_total",
            "Long-lived actors restarted by the supervisor, by actor.",
            &["actor"],
        );
        for a in RESTARTABLE_ACTORS {
            actor_restarts.with_label_values(&[a]);
        }
        let acl_reloads = counter_vec(
            "derp_acl_reloads_total",
            "Allowed-keys file reloads, by result (ok, failed).",
            &["result"],
        );
        let config_reloads = counter_vec(
            "derp_config_reloads_total",
            "Config file reloads on SIGHUP, by result (ok, failed).",
            &["result"],
        );
        for r in RELOAD_RESULTS {
            acl_reloads.with_label_values(&[r]);
            config_reloads.with_label_values(&[r]);
        }
        let verify = counter_vec(
            "derp_verify_client_checks_total",
            "Questions to --verify-client-url, by result (allow, deny, cached_allow, cached_deny, timeout, error).",
            &["result"],
        );
        let verify_checks = VerifyResult::ALL.map(|r| verify.with_label_values(&[r.as_str()]));
        Metrics {
            mesh,
            stun,
            packets_routed: counter(
                "derp_packets_routed_total",
                "Packets queued to their destination.",
            ),
            bytes_received: counter(
                "derp_received_bytes_total",
                "Packet payload bytes received from clients.",
            ),
            bytes_sent: counter(
                "derp_sent_bytes_total",
                "Packet payload bytes written to clients.",
            ),
            dropped,
            dropped_vec,
            clients_derp: clients.with_label_values(&[Transport::Derp.as_str()]),
            clients_ws: clients.with_label_values(&[Transport::WebSocket.as_str()]),
            clients_home,
            connections_accepted: counter(
                "derp_connections_accepted_total",
                "Clients that completed the handshake and were admitted.",
            ),
            refused,
            handshake_seconds,
            duplicate_keys: counter(
                "derp_duplicate_key_connections_total",
                "Connections for a key that was already connected.",
            ),
            disconnects,
            actor_restarts,
            connection_panics: counter(
                "derp_connection_panics_total",
                "Connection actors that panicked (the connection was closed).",
            ),
            acl_reloads,
            acl_keys: gauge("derp_acl_keys", "Keys in the allowed-keys set in force."),
            acl_last_reload_success: gauge(
                "derp_acl_last_reload_success",
                "1 if the last read of the allowed-keys file succeeded, 0 if it was rejected (the last good set stays in force).",
            ),
            acl_last_reload_success_timestamp: gauge(
                "derp_acl_last_reload_success_timestamp_seconds",
                "Unix time of the last successful read of the allowed-keys file (0 on an open relay).",
            ),
            verify_checks,
            verify_fail_open: counter(
                "derp_verify_client_fail_open_total",
                "Clients admitted without an answer from --verify-client-url because --verify-client-url-fail-open is on.",
            ),
            config_reloads,
            tofu_bindings: gauge("derp_tofu_bindings", "Keys with a TOFU binding."),
            tofu_evictions: {
                let v = counter_vec(
                    "derp_tofu_evictions_total",
                    "TOFU bindings forgotten, by reason (cap: over --tofu-max-bindings; expired: not seen for --tofu-expire).",
                    &["reason"],
                );
                for r in crate::admission::bindings::EvictReason::ALL {
                    v.with_label_values(&[r.as_str()]);
                }
                v
            },
            tofu_write_failures: counter(
                "derp_tofu_write_failures_total",
                "Failed writes of the TOFU bindings file.",
            ),
            max_clients: gauge("derp_max_clients", "The configured client cap (0 = none)."),
            tls: {
                let reloads = counter_vec(
                    "derp_tls_reloads_total",
                    "Reloads of the TLS certificate files, by result (ok, failed: the old pair stays).",
                    &["result"],
                );
                TlsCounters {
                    cert_expiry: gauge(
                        "derp_tls_cert_expiry_timestamp_seconds",
                        "Unix time at which the served TLS certificate expires (0 = no built-in TLS).",
                    ),
                    reloads_ok: reloads.with_label_values(&["ok"]),
                    reloads_failed: reloads.with_label_values(&["failed"]),
                }
            },
            registry,
        }
    }

    pub fn dropped(&self, reason: DropReason) -> &IntCounter {
        &self.dropped[reason as usize]
    }

    pub fn refused(&self, reason: RefuseReason) {
        self.refused.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn refused_count(&self, reason: RefuseReason) -> u64 {
        self.refused.with_label_values(&[reason.as_str()]).get()
    }

    pub fn verify(&self, r: VerifyResult) -> &IntCounter {
        &self.verify_checks[r as usize]
    }

    /// Records an allowed-keys read: a success sets the gauge to 1 and the
    /// timestamp to now; a failure sets the gauge to 0 and leaves the
    /// timestamp at the last success.
    pub fn acl_read(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.acl_reloads.with_label_values(&[result]).inc();
        self.acl_last_reload_success.set(ok as i64);
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            self.acl_last_reload_success_timestamp.set(now);
        }
    }

    pub fn total_dropped(&self) -> u64 {
        self.dropped.iter().map(|c| c.get()).sum()
    }

    pub fn clients(&self, t: Transport) -> &IntGauge {
        match t {
            Transport::Derp => &self.clients_derp,
            Transport::WebSocket => &self.clients_ws,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

//! Configuration: built-in defaults < TOML file (`--config`) < environment
//! (`DERP_RELAY_*`) < command-line flags, merged with figment.
//!
//! Every value is validated before anything starts, and a bad one is reported as
//! one line naming the setting, where it came from (flag, env var, or file:line)
//! and what is wrong, so an operator can fix it without reading code.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The relay's settings after merging every source.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listen address; `:8443` means every interface.
    pub addr: String,
    /// Upgraded connections allowed at once; 0 = no cap.
    pub max_clients: usize,
    /// How often each client gets a KeepAlive (and a WebSocket ping).
    #[serde(with = "duration_text")]
    pub ping_interval: Duration,
    /// Where the server key (and later the TOFU bindings) live.
    pub data_dir: PathBuf,
    /// Admit any key. Without it an allowed-keys file is required (see README).
    pub open_relay: bool,
    pub log_format: LogFormat,
    /// Packets queued per client (and again for disco packets) before the oldest is dropped.
    pub queue_depth: usize,
    /// How long a sender may wait for a full queue's writer to take its batch
    /// before the oldest packet is dropped; zero drops at once (derper).
    #[serde(with = "duration_text")]
    pub queue_wait: Duration,
    /// A client whose socket does not take a batch within this long is disconnected.
    #[serde(with = "duration_text")]
    pub write_timeout: Duration,
    /// Deadline for the DERP handshake after the upgrade.
    #[serde(with = "duration_text")]
    pub handshake_timeout: Duration,
    /// How long a graceful stop may take before remaining connections are cut.
    #[serde(with = "duration_text")]
    pub shutdown_timeout: Duration,
    /// Allowed client keys, one per line; reloaded live when it changes.
    pub allowed_keys_file: Option<PathBuf>,
    /// Trust-on-first-use bindings; default `<data_dir>/tofu-bindings.json`.
    pub bindings_file: Option<PathBuf>,
    /// Admit only keys that already have a TOFU binding (or are in the ACL).
    pub tofu_lock: bool,
    /// HTTP requests per second allowed per client address; 0 = no limit.
    pub rate_limit: u32,
    /// Requests a client address may make in a burst above `rate_limit`.
    pub rate_burst: u32,
    /// Take the client address from `Fly-Client-IP` / `X-Forwarded-For`.
    pub trust_proxy: bool,
    /// Serve Prometheus `/metrics` on 127.0.0.1:PORT; 0 = off.
    pub metrics_port: u16,
    /// Bearer token for the detailed `/healthz`; unset = no detail.
    pub metrics_token: Option<String>,
    /// With `trust_proxy`: the one header that carries the client address
    /// (e.g. `Fly-Client-IP`, `CF-Connecting-IP`). Unset: `Fly-Client-IP` on
    /// Fly.io (recognised from its environment), else the rightmost
    /// `X-Forwarded-For` entry.
    pub client_ip_header: Option<String>,
    /// IPv6 clients share one rate-limit and pending bucket per prefix of this length.
    pub ipv6_prefix: u8,
    /// Connections one address may hold before its handshake completes; 0 = no limit.
    pub max_pending_per_ip: u32,
    /// A client must send its whole HTTP request head within this long.
    #[serde(with = "duration_text")]
    pub header_timeout: Duration,
    /// TOFU bindings kept at most; the longest-unseen are evicted first. 0 = no cap.
    pub tofu_max_bindings: usize,
    /// Forget TOFU bindings not seen for this long; 0s = never.
    #[serde(with = "duration_text")]
    pub tofu_expire: Duration,
    /// Answer STUN Binding Requests (Tailscale's netcheck) on UDP `stun_addr`.
    pub stun: bool,
    /// UDP address for STUN; `:3478` means every interface. A host name is
    /// resolved at start (Fly needs `fly-global-services:3478`).
    pub stun_addr: String,
    // Per-client bandwidth limit (perf branch).
    /// Bytes per second each client may send (derper's
    /// `PerClientRateLimitBytesPerSec`), paced by delaying reads; 0 = off.
    /// Mesh peers are exempt.
    pub client_bytes_per_sec: u64,
    /// Bytes a client may send at once above `client_bytes_per_sec`; raised to
    /// at least 65 568 (one largest frame).
    pub client_burst_bytes: u64,
    /// File holding the region's shared mesh key (64 hex digits, derper's format).
    pub mesh_key_file: Option<PathBuf>,
    /// The mesh key itself, for platforms that inject secrets as environment
    /// variables (`DERP_RELAY_MESH_KEY`); `mesh_key_file` wins if both are set.
    pub mesh_key: Option<String>,
    /// Static mesh peers, derper's syntax: `host[:port][/dialhost],...`.
    pub mesh_with: String,
    /// Mesh peers = every A/AAAA record of this name (`NAME[:port]`), re-resolved
    /// every `mesh_dns_interval`.
    pub mesh_dns: Option<String>,
    #[serde(with = "duration_text")]
    pub mesh_dns_interval: Duration,
    /// Dial mesh peers over https (verified) instead of http.
    pub mesh_tls: bool,
    /// With `mesh_tls`: accept any certificate (self-signed peers).
    pub mesh_tls_insecure: bool,
    /// Packets queued per mesh link before the oldest is dropped.
    pub mesh_queue_depth: usize,
    /// Longest wait between a failed mesh link's reconnect attempts.
    #[serde(with = "duration_text")]
    pub mesh_backoff_max: Duration,
    /// Presence updates pending for one watching peer before it is cut off
    /// (it reconnects and gets a fresh flood); 0 = no limit.
    pub mesh_watch_max: usize,
    // --- built-in TLS, port 80, PROXY protocol (see README "TLS") ---
    /// PEM certificate chain served on `addr`; with `tls_key_file`. Reloaded live.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Serve a self-signed certificate for this host name (made once in
    /// `data_dir`): development and "insecure endpoint" setups only.
    pub tls_self_signed: Option<String>,
    /// Plain-HTTP listener (e.g. `:80`): answers `/generate_204`, redirects
    /// everything else to https. Needs TLS on `addr`.
    pub http_addr: Option<String>,
    /// Addresses/CIDRs of TCP balancers that send a PROXY protocol (v1 or v2)
    /// header; they must send one, everyone else must not. Empty = off.
    #[serde(deserialize_with = "list_or_commas")]
    pub proxy_protocol: Vec<String>,
    // ---- operator settings (issue 13): metrics address, log level, verify URL ----
    /// Serve Prometheus `/metrics` on this address (e.g. `0.0.0.0:9090`,
    /// `:9090`); unset = `metrics_port` on loopback.
    pub metrics_addr: Option<String>,
    /// Log filter (`info`, `debug`, `info,derp_relay::admission=debug`);
    /// unset = `RUST_LOG`, else `info`. Reloaded on SIGHUP.
    pub log_level: Option<String>,
    /// Ask this URL whether a key may connect (derper's `--verify-client-url`).
    pub verify_client_url: Option<String>,
    /// How long to wait for the verify URL's answer.
    #[serde(with = "duration_text")]
    pub verify_client_timeout: Duration,
    /// Admit a client when the verify URL cannot be asked (down, slow, bad answer).
    pub verify_client_url_fail_open: bool,
    /// How long an answer from the verify URL is reused; 0s = ask every time.
    #[serde(with = "duration_text")]
    pub verify_client_cache_ttl: Duration,
    /// Answers kept at most in that cache; 0 = no cache.
    pub verify_client_cache_size: usize,
    /// How often connected keys are asked again (a refused key is
    /// disconnected); 0s = only at connect.
    #[serde(with = "duration_text")]
    pub verify_client_recheck: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: ":8443".into(),
            max_clients: 10_000,
            ping_interval: Duration::from_secs(30),
            data_dir: PathBuf::from("data"),
            open_relay: false,
            log_format: LogFormat::Text,
            queue_depth: 32,
            queue_wait: Duration::from_millis(10),
            write_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            allowed_keys_file: None,
            bindings_file: None,
            tofu_lock: false,
            rate_limit: 5,
            rate_burst: 10,
            trust_proxy: false,
            metrics_port: 0,
            metrics_token: None,
            client_ip_header: None,
            ipv6_prefix: 64,
            max_pending_per_ip: 32,
            header_timeout: Duration::from_secs(10),
            tofu_max_bindings: 100_000,
            tofu_expire: Duration::ZERO,
            stun: true,
            stun_addr: ":3478".into(),
            client_bytes_per_sec: 0,
            client_burst_bytes: 0,
            mesh_key_file: None,
            mesh_key: None,
            mesh_with: String::new(),
            mesh_dns: None,
            mesh_dns_interval: Duration::from_secs(15),
            mesh_tls: false,
            mesh_tls_insecure: false,
            mesh_queue_depth: 4096,
            mesh_backoff_max: Duration::from_secs(5),
            mesh_watch_max: 200_000,
            tls_cert_file: None,
            tls_key_file: None,
            tls_self_signed: None,
            http_addr: None,
            proxy_protocol: Vec::new(),
            metrics_addr: None,
            log_level: None,
            verify_client_url: None,
            verify_client_timeout: Duration::from_secs(2),
            verify_client_url_fail_open: false,
            verify_client_cache_ttl: Duration::from_secs(30),
            verify_client_cache_size: 10_000,
            verify_client_recheck: Duration::from_secs(60),
        }
    }
}

/// Flags of the `run` form of the binary. Every one is optional so that only the
/// flags actually given override lower layers.
#[derive(Debug, Default, Clone, Args, Serialize)]
pub struct Flags {
    /// TOML config file (every key is documented in config/derp-relay.toml).
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. `:8443`, `0.0.0.0:8443`, `[::]:8443`, `127.0.0.1:0`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Maximum concurrent clients (0 = unlimited).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_clients: Option<usize>,
    /// KeepAlive interval, e.g. `30s`, `2m`.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_interval: Option<String>,
    /// Directory for the server key and bindings.
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Admit every client key (no allowed-keys file).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub open_relay: bool,
    /// Log format.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Per-client send queue depth in packets (plus as many for disco packets).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<usize>,
    /// Longest wait of a sender for a full client queue's writer, e.g. `10ms`
    /// (`0s`: drop the oldest at once).
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_wait: Option<String>,
    /// Per-batch socket write timeout, e.g. `2s`.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_timeout: Option<String>,
    /// Handshake deadline, e.g. `10s`.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout: Option<String>,
    /// Graceful shutdown deadline, e.g. `30s`.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<String>,
    /// Allowed-keys file (one base64 or nodekey:hex key per line), reloaded live.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_keys_file: Option<PathBuf>,
    /// TOFU bindings file [default: <data-dir>/tofu-bindings.json].
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bindings_file: Option<PathBuf>,
    /// Admit only keys with a TOFU binding (or in the allowed-keys file).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tofu_lock: bool,
    /// HTTP requests per second per client address (0 = off).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Burst of requests per client address above --rate-limit.
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// Trust Fly-Client-IP / X-Forwarded-For for the client address (only behind a proxy you run).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub trust_proxy: bool,
    /// Serve Prometheus metrics on 127.0.0.1:PORT (0 = off).
    #[arg(long, value_name = "PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<u16>,
    /// Bearer token that unlocks the detailed /healthz (prefer the env var DERP_RELAY_METRICS_TOKEN).
    #[arg(long, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<String>,
    /// With --trust-proxy: take the client address from this header only (default: Fly-Client-IP on Fly.io, else rightmost X-Forwarded-For).
    #[arg(long, value_name = "HEADER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip_header: Option<String>,
    /// IPv6 clients share rate-limit buckets per prefix of this many bits.
    #[arg(long, value_name = "BITS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<u8>,
    /// Unauthenticated connections one address may hold at once (0 = off).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_per_ip: Option<u32>,
    /// Deadline for a client's HTTP request head.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<String>,
    /// TOFU bindings kept at most, longest-unseen evicted first (0 = no cap).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tofu_max_bindings: Option<usize>,
    /// Forget TOFU bindings not seen for this long (0s = never).
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tofu_expire: Option<String>,
    /// Answer STUN on UDP --stun-addr [default: true]; `--stun=false` turns it off.
    // An explicit value, unlike the other switches, because the default is on.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stun: Option<bool>,
    /// STUN UDP address, e.g. `:3478`, `0.0.0.0:3478`, `fly-global-services:3478`.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stun_addr: Option<String>,
    /// Bytes per second each client may send, paced by delaying its reads (0 = off; mesh peers exempt).
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_bytes_per_sec: Option<u64>,
    /// Burst in bytes above --client-bytes-per-sec (at least 65568 is used).
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_burst_bytes: Option<u64>,
    /// Shared mesh key file, 64 hex digits (derper's --mesh-psk-file format).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_key_file: Option<PathBuf>,
    /// Mesh key as text (prefer DERP_RELAY_MESH_KEY or --mesh-key-file: flags show in `ps`).
    #[arg(long, value_name = "HEX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_key: Option<String>,
    /// Static mesh peers: `host[:port][/dialhost],...` (the node's own address may be listed).
    #[arg(long, value_name = "PEERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_with: Option<String>,
    /// Mesh peers from DNS: every A/AAAA record of NAME[:port], re-resolved periodically.
    #[arg(long, value_name = "NAME[:PORT]")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_dns: Option<String>,
    /// How often --mesh-dns is re-resolved, e.g. `15s`.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_dns_interval: Option<String>,
    /// Dial mesh peers over https (certificate verified).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mesh_tls: bool,
    /// With --mesh-tls: do not verify the peers' certificates (self-signed).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mesh_tls_insecure: bool,
    /// Packets queued per mesh link before the oldest is dropped.
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_queue_depth: Option<usize>,
    /// Cap on the wait between mesh link reconnect attempts, e.g. `5s`.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_backoff_max: Option<String>,
    /// Presence updates pending per watching peer before it is cut off (0 = no limit).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_watch_max: Option<usize>,
    /// PEM certificate chain to serve TLS with on --addr (reloaded when the file changes).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for --tls-cert-file.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Serve TLS with a self-signed certificate for HOSTNAME, kept in --data-dir (development only).
    #[arg(long, value_name = "HOSTNAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_self_signed: Option<String>,
    /// Plain-HTTP listener, e.g. `:80`: /generate_204 answered, all else redirected to https.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Accept PROXY protocol v1/v2 from these addresses/CIDRs only, e.g. `10.0.0.0/8,fd00::/8`.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub proxy_protocol: Vec<String>,
    // ---- operator settings (issue 13) ----
    /// Serve Prometheus metrics on ADDR, e.g. `0.0.0.0:9090` (instead of --metrics-port's loopback).
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// Log filter, e.g. `info`, `debug`, `info,derp_relay::admission=debug` [default: RUST_LOG, else info].
    #[arg(long, value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Ask this URL whether a client key may connect (derper/headscale protocol).
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_client_url: Option<String>,
    /// Deadline for the verify URL's answer, e.g. `2s`.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_client_timeout: Option<String>,
    /// Admit clients when the verify URL cannot be asked (default: refuse them).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub verify_client_url_fail_open: bool,
    /// Reuse a verify answer for this long (0s = ask every time).
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_client_cache_ttl: Option<String>,
    /// Verify answers cached at most (0 = no cache).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_client_cache_size: Option<usize>,
    /// Ask the verify URL again about connected keys this often (0s = only at connect).
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_client_recheck: Option<String>,
}

/// A configuration problem, already phrased for the operator.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

pub const ENV_PREFIX: &str = "DERP_RELAY_";

impl Config {
    /// Merges defaults, the config file, the environment and `flags`, then validates.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let known = Self::keys();
        for (name, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
            if let Some(key) = name.strip_prefix(ENV_PREFIX)
                && !known.contains(&key.to_ascii_lowercase())
            {
                // Not an error: Kubernetes injects DERP_RELAY_SERVICE_HOST,
                // DERP_RELAY_PORT, ... for a Service named derp-relay.
                eprintln!("derp-relay: ignoring environment variable {name}: not a setting");
            }
        }
        Self::load_from(flags, Env::prefixed(ENV_PREFIX))
    }

    /// Every setting's name, as in the config file.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    fn load_from(flags: &Flags, env: Env) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &flags.config {
            // Read it ourselves first: figment treats a missing file as empty.
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
            if let Err(e) = text.parse::<toml::Table>() {
                let line = e
                    .span()
                    .map(|s| line_of_offset(&text, s.start))
                    .unwrap_or(0);
                return Err(ConfigError(format!(
                    "{}:{line}: {}",
                    path.display(),
                    e.message()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig
            .merge(env.only(&Self::keys().iter().map(String::as_str).collect::<Vec<_>>()))
            .merge(Serialized::defaults(flags));
        let config: Config = fig
            .extract()
            .map_err(|e| describe_figment_error(e, flags))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.stun_target()?;
        self.validate_edge()?;
        match (&self.allowed_keys_file, self.open_relay) {
            (Some(_), true) => {
                return Err(ConfigError(
                    "open_relay and allowed_keys_file are both set: choose one. \
                     --allowed-keys-file admits only listed keys; --open-relay admits anyone"
                        .into(),
                ));
            }
            (None, false) if self.verify_client_url.is_none() => {
                return Err(ConfigError(
                    "no admission policy: pass --allowed-keys-file PATH to admit only listed keys, \
                     --verify-client-url URL to ask an admission service (e.g. headscale), \
                     or --open-relay to admit anyone (see README, \"Admission\")"
                        .into(),
                ));
            }
            _ => {}
        }
        self.validate_operator_settings()?;
        if self.rate_limit > 0 && self.rate_burst == 0 {
            return Err(ConfigError(
                "rate_burst: must be at least 1 when rate_limit is on".into(),
            ));
        }
        if self
            .metrics_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ConfigError("metrics_token: must not be empty".into()));
        }
        if self.ipv6_prefix == 0 || self.ipv6_prefix > 128 {
            return Err(ConfigError("ipv6_prefix: must be between 1 and 128".into()));
        }
        if let Some(h) = &self.client_ip_header
            && http::HeaderName::from_bytes(h.trim().as_bytes()).is_err()
        {
            return Err(ConfigError(format!(
                "client_ip_header: {h:?} is not an HTTP header name"
            )));
        }
        if self.queue_depth == 0 {
            return Err(ConfigError("queue_depth: must be at least 1".into()));
        }
        self.mesh()?;
        for (name, d) in [
            ("ping_interval", self.ping_interval),
            ("write_timeout", self.write_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("header_timeout", self.header_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError(format!("{name}: must be longer than 0s")));
            }
        }
        Ok(())
    }

    /// Checks of the issue-13 settings (metrics address, log filter, verify URL).
    fn validate_operator_settings(&self) -> Result<(), ConfigError> {
        self.metrics_listen()?;
        if let Some(f) = &self.log_level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(f.trim())
        {
            return Err(ConfigError(format!(
                "log_level: {f:?} is not a log filter like \"info\" or \"info,derp_relay=debug\": {e}"
            )));
        }
        if let Some(u) = &self.verify_client_url {
            if self.open_relay {
                return Err(ConfigError(
                    "open_relay and verify_client_url are both set: choose one. \
                     --verify-client-url asks a service about every key; --open-relay admits anyone"
                        .into(),
                ));
            }
            verify_url_parts(u)?;
            if self.verify_client_timeout.is_zero() {
                return Err(ConfigError(
                    "verify_client_timeout: must be longer than 0s".into(),
                ));
            }
        }
        Ok(())
    }

    /// Where `/metrics` listens: `metrics_addr`, else 127.0.0.1:`metrics_port`;
    /// `None` when both are off.
    pub fn metrics_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match (&self.metrics_addr, self.metrics_port) {
            (Some(_), p) if p != 0 => Err(ConfigError(
                "metrics_addr and metrics_port are both set: choose one \
                 (metrics_port N is short for metrics_addr 127.0.0.1:N)"
                    .into(),
            )),
            (Some(a), _) => parse_listen(a)
                .map(Some)
                .map_err(|e| ConfigError(format!("metrics_addr: {e}"))),
            (None, 0) => Ok(None),
            (None, p) => Ok(Some(SocketAddr::from(([127, 0, 0, 1], p)))),
        }
    }

    /// The settings that SIGHUP applies to the running relay.
    pub fn live(&self) -> LiveSettings {
        LiveSettings {
            rate_limit: self.rate_limit,
            rate_burst: self.rate_burst,
            tofu_lock: self.tofu_lock,
            tofu_max_bindings: self.tofu_max_bindings,
            tofu_expire: self.tofu_expire,
            metrics_token: self.metrics_token.clone(),
            allowed_keys_file: self.allowed_keys_file.clone(),
            verify: self.verify_client_url.as_ref().map(|url| VerifySettings {
                url: url.trim().to_owned(),
                timeout: self.verify_client_timeout,
                fail_open: self.verify_client_url_fail_open,
                cache_ttl: self.verify_client_cache_ttl,
                cache_size: self.verify_client_cache_size,
                recheck: self.verify_client_recheck,
            }),
        }
    }

    /// Settings that differ between `self` (in force) and `new` but take a
    /// restart to apply, by config-file name. `allowed_keys_file` is live
    /// only while both name a file: turning the ACL on or off changes the
    /// admission policy chosen at start.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<String> {
        let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(newv))) =
            (serde_json::to_value(self), serde_json::to_value(new))
        else {
            return Vec::new();
        };
        let acl_switch = self.allowed_keys_file.is_some() != new.allowed_keys_file.is_some();
        let mut keys: Vec<String> = old
            .iter()
            .filter(|(k, v)| newv.get(k.as_str()) != Some(v))
            .map(|(k, _)| k.clone())
            .filter(|k| {
                !LIVE_KEYS.contains(&k.as_str()) || (k == "allowed_keys_file" && acl_switch)
            })
            .collect();
        keys.sort();
        keys
    }

    /// The listen address as a socket address (`:PORT` listens on every interface).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_listen_setting("addr", self.addr.trim(), ":8443")
    }

    /// The STUN address as `host:port` for resolving at start: `:PORT` is
    /// every interface, as for `addr`; a host name is checked here only for shape.
    pub fn stun_target(&self) -> Result<String, ConfigError> {
        let a = self.stun_addr.trim();
        if let Some(port) = a.strip_prefix(':') {
            return port
                .parse::<u16>()
                .map(|p| SocketAddr::from((Ipv6Addr::UNSPECIFIED, p)).to_string())
                .map_err(|e| ConfigError(format!("stun_addr: {a:?} has no valid port: {e}")));
        }
        if a.parse::<SocketAddr>().is_ok() {
            return Ok(a.to_owned());
        }
        match a.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty() && !host.contains(':') && port.parse::<u16>().is_ok() =>
            {
                Ok(a.to_owned())
            }
            _ => Err(ConfigError(format!(
                "stun_addr: {a:?} is not a UDP address like \":3478\", \"0.0.0.0:3478\" \
                 or \"fly-global-services:3478\""
            ))),
        }
    }

    /// The mesh settings, checked: peers without a key (or a key without
    /// peers) is an error naming the setting. `None` when no mesh is set up.
    pub fn mesh(&self) -> Result<Option<MeshSettings>, ConfigError> {
        let key = self.mesh_key_bytes()?;
        let port = self.listen_addr()?.port();
        let mut peers = Vec::new();
        for entry in self
            .mesh_with
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            peers.push(
                MeshPeerSpec::parse(entry, port)
                    .map_err(|e| ConfigError(format!("mesh_with: {entry:?}: {e}")))?,
            );
        }
        let dns = match self.mesh_dns.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(d) => Some(
                parse_host_port(d, port)
                    .map_err(|e| ConfigError(format!("mesh_dns: {d:?}: {e}")))?,
            ),
        };
        let wanted = !peers.is_empty() || dns.is_some();
        match (key, wanted) {
            (None, false) => Ok(None),
            (None, true) => Err(ConfigError(format!(
                "{}: mesh peers need the shared mesh key: set mesh_key_file \
                 (--mesh-key-file) or DERP_RELAY_MESH_KEY",
                if dns.is_some() {
                    "mesh_dns"
                } else {
                    "mesh_with"
                }
            ))),
            (Some(key), _) => {
                if self.mesh_queue_depth == 0 {
                    return Err(ConfigError("mesh_queue_depth: must be at least 1".into()));
                }
                if dns.is_some() && self.mesh_dns_interval.is_zero() {
                    return Err(ConfigError(
                        "mesh_dns_interval: must be longer than 0s".into(),
                    ));
                }
                if self.mesh_backoff_max.is_zero() {
                    return Err(ConfigError(
                        "mesh_backoff_max: must be longer than 0s".into(),
                    ));
                }
                Ok(Some(MeshSettings { key, peers, dns }))
            }
        }
    }

    /// The mesh key from `mesh_key_file` or `mesh_key`: 64 hex digits,
    /// surrounding whitespace ignored, either case (as derper reads it).
    pub fn mesh_key_bytes(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        let (text, from) = match (&self.mesh_key_file, &self.mesh_key) {
            (Some(p), _) => (
                std::fs::read_to_string(p)
                    .map_err(|e| ConfigError(format!("mesh_key_file: {}: {e}", p.display())))?,
                format!("mesh_key_file: {}", p.display()),
            ),
            (None, Some(k)) => (k.clone(), "mesh_key".to_owned()),
            (None, None) => return Ok(None),
        };
        let t = text.trim();
        let mut key = [0u8; 32];
        if t.len() != 64 || hex::decode_to_slice(t, &mut key).is_err() {
            return Err(ConfigError(format!(
                "{from}: a mesh key is exactly 64 hex digits (got {} characters); \
                 make one with `openssl rand -hex 32`",
                t.len()
            )));
        }
        Ok(Some(key))
    }

    /// Checks the TLS, port-80 and PROXY protocol settings together.
    fn validate_edge(&self) -> Result<(), ConfigError> {
        match (
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_self_signed,
        ) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(ConfigError(
                    "tls_self_signed and tls_cert_file/tls_key_file are both set: choose one"
                        .into(),
                ));
            }
            (Some(_), None, _) => {
                return Err(ConfigError(
                    "tls_key_file: missing; tls_cert_file needs the matching private key".into(),
                ));
            }
            (None, Some(_), _) => {
                return Err(ConfigError(
                    "tls_cert_file: missing; tls_key_file needs the certificate chain".into(),
                ));
            }
            _ => {}
        }
        if let Some(h) = &self.tls_self_signed
            && (h.trim().is_empty() || h.contains(['/', '\\', ' ', ',']))
        {
            return Err(ConfigError(format!(
                "tls_self_signed: {h:?} is not a host name or IP address"
            )));
        }
        if self.http_listen_addr()?.is_some() && !self.tls_enabled() {
            return Err(ConfigError(
                "http_addr: redirects to https, so it needs TLS on addr \
                 (tls_cert_file + tls_key_file, or tls_self_signed)"
                    .into(),
            ));
        }
        self.trusted_proxies()?;
        Ok(())
    }

    /// Whether `addr` serves TLS itself.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert_file.is_some() || self.tls_self_signed.is_some()
    }

    /// The plain-HTTP listener's address, if there is one.
    pub fn http_listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match self.http_addr.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(a) => parse_listen_setting("http_addr", a, ":80").map(Some),
        }
    }

    /// The balancers allowed (and required) to send a PROXY protocol header.
    pub fn trusted_proxies(&self) -> Result<Vec<Cidr>, ConfigError> {
        self.proxy_protocol
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<Cidr>()
                    .map_err(|e| ConfigError(format!("proxy_protocol: {s:?}: {e}")))
            })
            .collect()
    }

    pub fn server_key_path(&self) -> PathBuf {
        self.data_dir.join("derp.key")
    }

    pub fn bindings_path(&self) -> PathBuf {
        self.bindings_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tofu-bindings.json"))
    }
}

/// The checked mesh settings.
#[derive(Clone)]
pub struct MeshSettings {
    pub key: [u8; 32],
    pub peers: Vec<MeshPeerSpec>,
    /// Name and port to resolve for peers.
    pub dns: Option<(String, u16)>,
}

impl fmt::Debug for MeshSettings {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshSettings")
            .field("peers", &self.peers)
            .field("dns", &self.dns)
            .finish_non_exhaustive()
    }
}

/// One `--mesh-with` entry: `host[:port][/dialhost]`. `host` names the peer
/// (Host header, TLS name); `dial` is where the TCP connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MeshPeerSpec {
    pub host: String,
    pub port: u16,
    pub dial: String,
}

impl MeshPeerSpec {
    pub fn parse(entry: &str, default_port: u16) -> Result<Self, String> {
        let (hostport, dial) = match entry.split_once('/') {
            Some((h, d)) if !d.trim().is_empty() => (h, Some(d.trim())),
            Some(_) => return Err("empty dial host after '/'".into()),
            None => (entry, None),
        };
        let (host, port) = parse_host_port(hostport, default_port)?;
        Ok(MeshPeerSpec {
            dial: dial
                .map(|d| d.trim_start_matches('[').trim_end_matches(']').to_owned())
                .unwrap_or_else(|| host.clone()),
            host,
            port,
        })
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 literal.
fn parse_host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty host".into());
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), default_port));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    if let Some(v6) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return Ok((v6.to_owned(), default_port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number"))?,
        ),
        None => (s, default_port),
    };
    if host.is_empty() || host.contains([':', '/', ' ']) {
        return Err("not a host name".into());
    }
    Ok((host.to_owned(), port))
}

/// A TCP listen address: `:PORT` means every interface.
fn parse_listen_setting(name: &str, a: &str, example: &str) -> Result<SocketAddr, ConfigError> {
    let parsed = if let Some(port) = a.strip_prefix(':') {
        port.parse::<u16>()
            .map(|p| SocketAddr::from((Ipv6Addr::UNSPECIFIED, p)))
            .map_err(|e| e.to_string())
    } else {
        a.parse::<SocketAddr>().map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        ConfigError(format!(
            "{name}: {a:?} is not a listen address like \"{example}\" or \"127.0.0.1{example}\": {e}"
        ))
    })
}

/// An address block, e.g. `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Whether `ip` is inside; an IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net = addr
            .parse::<IpAddr>()
            .map_err(|_| "not an IP address or CIDR like 10.0.0.0/8".to_string())?
            .to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, bits })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

/// A list setting given as a TOML array or, from the environment, as one
/// comma-separated string.
fn list_or_commas<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::List(v) => v,
        Raw::Text(t) => t
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    })
}

/// Settings applied to the running relay when SIGHUP re-reads the config,
/// by config-file name. Everything else is read once at start.
pub const LIVE_KEYS: &[&str] = &[
    "rate_limit",
    "rate_burst",
    "tofu_lock",
    "tofu_max_bindings",
    "tofu_expire",
    "metrics_token",
    "allowed_keys_file",
    "log_level",
    "verify_client_url",
    "verify_client_timeout",
    "verify_client_url_fail_open",
    "verify_client_cache_ttl",
    "verify_client_cache_size",
    "verify_client_recheck",
    "client_bytes_per_sec",
    "client_burst_bytes",
];

/// The part of the configuration that may change while the relay runs. It is
/// swapped whole (a `watch` channel in `Shared`); each reader takes the
/// current value when it needs it, so one reload is seen consistently.
/// `log_level` is applied by `main`, which owns the subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSettings {
    /// HTTP requests per second per client address (0 = off), and the burst.
    pub rate_limit: u32,
    pub rate_burst: u32,
    pub tofu_lock: bool,
    pub tofu_max_bindings: usize,
    pub tofu_expire: Duration,
    /// Unlocks the detailed `/healthz`.
    pub metrics_token: Option<String>,
    /// The allowed-keys file the ACL actor watches.
    pub allowed_keys_file: Option<PathBuf>,
    /// `None`: no verify URL.
    pub verify: Option<VerifySettings>,
    // Per-client bandwidth (`client_bytes_per_sec`, `client_burst_bytes`) is
    // live too, but not here: every read of every client consults it, so it
    // lives in two atomics (`conn::pace::ClientRate`) that `Relay::reload`
    // sets, rather than behind this struct's lock and refcount.
}

/// `--verify-client-url` and its companions, as one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySettings {
    pub url: String,
    pub timeout: Duration,
    pub fail_open: bool,
    pub cache_ttl: Duration,
    pub cache_size: usize,
    pub recheck: Duration,
}

/// A verify URL's scheme (`true` = https), host, port and path; errors name
/// the setting.
pub fn verify_url_parts(u: &str) -> Result<(bool, String, u16, String), ConfigError> {
    let bad = |why: &str| {
        ConfigError(format!(
            "verify_client_url: {u:?} {why} (want e.g. \"https://headscale.example.com/verify\")"
        ))
    };
    let uri: http::Uri = u.trim().parse().map_err(|_| bad("is not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("must start with http:// or https://")),
    };
    let host = uri
        .host()
        .ok_or_else(|| bad("has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    Ok((
        tls,
        host,
        port,
        if path.is_empty() { "/".into() } else { path },
    ))
}

/// `:PORT` (every interface) or `IP:PORT`.
fn parse_listen(a: &str) -> Result<SocketAddr, String> {
    let a = a.trim();
    if let Some(port) = a.strip_prefix(':') {
        return port
            .parse::<u16>()
            .map(|p| SocketAddr::from((Ipv6Addr::UNSPECIFIED, p)))
            .map_err(|e| format!("{a:?} has no valid port: {e}"));
    }
    a.parse::<SocketAddr>()
        .map_err(|e| format!("{a:?} is not an address like \":9090\" or \"0.0.0.0:9090\": {e}"))
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Finds the line where `key` is assigned in a TOML file, for error messages.
fn line_of_key(path: &Path, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

fn describe_figment_error(e: figment::Error, flags: &Flags) -> ConfigError {
    let key = e.path.join(".");
    let source = match e.metadata.as_ref() {
        Some(md) => match &md.source {
            Some(figment::Source::File(p)) => match line_of_key(p, &key) {
                Some(line) => format!("{}:{line}", p.display()),
                None => p.display().to_string(),
            },
            _ if md.name.contains("environment") || md.name.contains("env") => {
                format!("environment variable {ENV_PREFIX}{}", key.to_uppercase())
            }
            _ if md.name.contains("Flags") || md.name.contains("flags") => {
                format!("flag --{}", key.replace('_', "-"))
            }
            _ => md.name.to_string(),
        },
        None => "configuration".into(),
    };
    let _ = flags;
    let what = e.kind.to_string();
    if key.is_empty() {
        ConfigError(format!("{source}: {what}"))
    } else {
        ConfigError(format!("{key} ({source}): {what}"))
    }
}

/// Durations as text (`30s`, `2m`, `1h 30m`) or as a bare number of seconds.
mod duration_text {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a duration like \"30s\" or \"2m\" ({e})"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn open() -> Flags {
        Flags {
            open_relay: true,
            ..Default::default()
        }
    }

    fn no_env() -> Env {
        Env::prefixed("DERP_RELAY_TEST_UNUSED_PREFIX_")
    }

    #[test]
    fn defaults_need_an_admission_choice() {
        let e = Config::load_from(&Flags::default(), no_env())
            .unwrap_err()
            .0;
        assert!(
            e.contains("--open-relay") && e.contains("--allowed-keys-file"),
            "{e}"
        );
        let both = Flags {
            open_relay: true,
            allowed_keys_file: Some("k".into()),
            ..Default::default()
        };
        let e = Config::load_from(&both, no_env()).unwrap_err().0;
        assert!(e.contains("choose one"), "{e}");
        let c = Config::load_from(&open(), no_env()).unwrap();
        assert_eq!(c.addr, ":8443");
        assert_eq!(c.max_clients, 10_000);
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.listen_addr().unwrap().port(), 8443);
    }

    #[test]
    fn layers_override_in_order() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "max_clients = 5\nping_interval = \"2m\"\naddr = \"127.0.0.1:1\""
        )
        .unwrap();
        let flags = Flags {
            config: Some(f.path().to_path_buf()),
            addr: Some("127.0.0.1:2".into()),
            ..open()
        };
        let c = Config::load_from(&flags, no_env()).unwrap();
        assert_eq!(c.max_clients, 5);
        assert_eq!(c.ping_interval, Duration::from_secs(120));
        assert_eq!(c.addr, "127.0.0.1:2");
    }

    #[test]
    fn file_errors_name_file_and_line() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "# comment\naddr = \"127.0.0.1:1\"\nping_interval = \"soon\""
        )
        .unwrap();
        let flags = Flags {
            config: Some(f.path().to_path_buf()),
            ..open()
        };
        let e = Config::load_from(&flags, no_env()).unwrap_err().0;
        assert!(e.contains(&format!("{}:3", f.path().display())), "{e}");
        assert!(e.contains("ping_interval"), "{e}");

        let mut g = tempfile::NamedTempFile::new().unwrap();
        writeln!(g, "addr = \n").unwrap();
        let flags = Flags {
            config: Some(g.path().to_path_buf()),
            ..open()
        };
        let e = Config::load_from(&flags, no_env()).unwrap_err().0;
        assert!(e.starts_with(&format!("{}:1", g.path().display())), "{e}");

        let mut h = tempfile::NamedTempFile::new().unwrap();
        writeln!(h, "no_such_key = 1").unwrap();
        let flags = Flags {
            config: Some(h.path().to_path_buf()),
            ..open()
        };
        let e = Config::load_from(&flags, no_env()).unwrap_err().0;
        assert!(e.contains("no_such_key"), "{e}");
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let flags = Flags {
            ping_interval: Some("fast".into()),
            ..open()
        };
        let e = Config::load_from(&flags, no_env()).unwrap_err().0;
        assert!(e.contains("--ping-interval"), "{e}");
        let flags = Flags {
            addr: Some("nonsense".into()),
            ..open()
        };
        let e = Config::load_from(&flags, no_env()).unwrap_err().0;
        assert!(e.starts_with("addr:"), "{e}");
    }

    #[test]
    fn stun_addr_forms() {
        let with = |a: &str| Config {
            stun_addr: a.into(),
            ..Config::default()
        };
        assert_eq!(with(":3478").stun_target().unwrap(), "[::]:3478");
        assert_eq!(with("127.0.0.1:0").stun_target().unwrap(), "127.0.0.1:0");
        assert_eq!(with("[::1]:3478").stun_target().unwrap(), "[::1]:3478");
        assert_eq!(
            with("fly-global-services:3478").stun_target().unwrap(),
            "fly-global-services:3478"
        );
        for bad in ["", "3478", ":x", "host:", ":99999", "::1:3478", "host:port"] {
            let e = with(bad).stun_target().unwrap_err().0;
            assert!(e.starts_with("stun_addr:"), "{bad:?}: {e}");
        }
        let c = Config::load_from(&open(), no_env()).unwrap();
        assert!(c.stun);
        assert_eq!(c.stun_addr, ":3478");
        let off = Flags {
            stun: Some(false),
            ..open()
        };
        assert!(!Config::load_from(&off, no_env()).unwrap().stun);
    }

    #[test]
    fn mesh_settings_need_a_key_and_parse_derpers_syntax() {
        let peers = Flags {
            mesh_with: Some("derp-b.example.com,10.0.0.3:8443/10.0.0.3".into()),
            ..open()
        };
        let e = Config::load_from(&peers, no_env()).unwrap_err().0;
        assert!(
            e.starts_with("mesh_with:") && e.contains("mesh_key_file"),
            "{e}"
        );
        let dns = Flags {
            mesh_dns: Some("mesh.internal".into()),
            ..open()
        };
        let e = Config::load_from(&dns, no_env()).unwrap_err().0;
        assert!(e.starts_with("mesh_dns:"), "{e}");
        let bad_key = Flags {
            mesh_key: Some("abc".into()),
            ..peers.clone()
        };
        let e = Config::load_from(&bad_key, no_env()).unwrap_err().0;
        assert!(e.starts_with("mesh_key:") && e.contains("64 hex"), "{e}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "  {}  ", "AB".repeat(32)).unwrap();
        let ok = Flags {
            mesh_key_file: Some(f.path().to_path_buf()),
            ..peers
        };
        let m = Config::load_from(&ok, no_env())
            .unwrap()
            .mesh()
            .unwrap()
            .unwrap();
        assert_eq!(m.key, [0xab; 32], "whitespace trimmed, either case");
        assert_eq!(
            m.peers,
            vec![
                MeshPeerSpec {
                    host: "derp-b.example.com".into(),
                    port: 8443,
                    dial: "derp-b.example.com".into()
                },
                MeshPeerSpec {
                    host: "10.0.0.3".into(),
                    port: 8443,
                    dial: "10.0.0.3".into()
                },
            ]
        );
    }

    #[test]
    fn edge_settings_checked_together() {
        let e = |f: Flags| Config::load_from(&f, no_env()).unwrap_err().0;
        let only_cert = Flags {
            tls_cert_file: Some("c.pem".into()),
            ..open()
        };
        assert!(e(only_cert).starts_with("tls_key_file:"));
        let port80 = Flags {
            http_addr: Some(":80".into()),
            ..open()
        };
        assert!(e(port80).starts_with("http_addr:"));
        let bad_cidr = Flags {
            proxy_protocol: vec!["10.0.0.0/33".into()],
            ..open()
        };
        assert!(e(bad_cidr).starts_with("proxy_protocol:"));
        let ok = Flags {
            tls_self_signed: Some("localhost".into()),
            http_addr: Some("127.0.0.1:0".into()),
            proxy_protocol: vec!["10.0.0.0/8".into(), "::1".into()],
            ..open()
        };
        let c = Config::load_from(&ok, no_env()).unwrap();
        assert!(c.tls_enabled());
        let p = c.trusted_proxies().unwrap();
        assert!(p[0].contains("10.9.8.7".parse().unwrap()));
        assert!(p[0].contains("::ffff:10.9.8.7".parse().unwrap()));
        assert!(!p[0].contains("11.0.0.1".parse().unwrap()));
        assert!(p[1].contains("::1".parse().unwrap()));
        assert!(!p[1].contains("::2".parse().unwrap()));
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
    }

    #[test]
    fn proxy_protocol_from_env_is_a_comma_list() {
        // SAFETY: only this test uses this prefix.
        unsafe { std::env::set_var("DERP_RELAY_PPTEST_PROXY_PROTOCOL", "10.0.0.0/8, 192.0.2.1") };
        let c = Config::load_from(&open(), Env::prefixed("DERP_RELAY_PPTEST_")).unwrap();
        assert_eq!(c.proxy_protocol, ["10.0.0.0/8", "192.0.2.1"]);
    }

    #[test]
    fn unknown_env_vars_are_ignored() {
        // SAFETY: only this test uses this prefix.
        unsafe { std::env::set_var("DERP_RELAY_ENVTEST_SERVICE_HOST", "10.0.0.1") };
        unsafe { std::env::set_var("DERP_RELAY_ENVTEST_PORT", "tcp://10.0.0.1:8443") };
        let c = Config::load_from(&open(), Env::prefixed("DERP_RELAY_ENVTEST_")).unwrap();
        assert_eq!(c.addr, ":8443");
    }

    #[test]
    fn env_errors_name_the_variable() {
        // SAFETY: only this test uses this prefix.
        unsafe { std::env::set_var("DERP_RELAY_CFGTEST_MAX_CLIENTS", "many") };
        let e = Config::load_from(&open(), Env::prefixed("DERP_RELAY_CFGTEST_"))
            .unwrap_err()
            .0;
        assert!(e.contains("MAX_CLIENTS"), "{e}");
    }

    #[test]
    fn operator_settings_validate() {
        let url = |u: &str| Flags {
            verify_client_url: Some(u.into()),
            ..Default::default()
        };
        // A verify URL alone is an admission policy.
        let c = Config::load_from(&url("http://127.0.0.1:8080/verify"), no_env()).unwrap();
        assert_eq!(c.live().verify.unwrap().timeout, Duration::from_secs(2));
        for bad in ["ftp://x/verify", "not a url", "http:///verify"] {
            let e = Config::load_from(&url(bad), no_env()).unwrap_err().0;
            assert!(e.starts_with("verify_client_url:"), "{bad}: {e}");
        }
        let e = Config::load_from(
            &Flags {
                open_relay: true,
                ..url("http://h/verify")
            },
            no_env(),
        )
        .unwrap_err()
        .0;
        assert!(e.contains("choose one"), "{e}");
        assert_eq!(
            verify_url_parts("https://[::1]/v?x=1").unwrap(),
            (true, "::1".into(), 443, "/v?x=1".into())
        );
        let e = Config::load_from(
            &Flags {
                log_level: Some("info,=[".into()),
                ..open()
            },
            no_env(),
        )
        .unwrap_err()
        .0;
        assert!(e.starts_with("log_level:"), "{e}");
        let m = |addr: Option<&str>, port| Config {
            metrics_addr: addr.map(Into::into),
            metrics_port: port,
            ..Config::default()
        };
        assert_eq!(m(None, 0).metrics_listen().unwrap(), None);
        assert_eq!(
            m(None, 9090).metrics_listen().unwrap(),
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(
            m(Some(":9090"), 0).metrics_listen().unwrap(),
            Some("[::]:9090".parse().unwrap())
        );
        assert!(m(Some("0.0.0.0:9090"), 9090).metrics_listen().is_err());
        assert!(
            m(Some("nowhere"), 0)
                .metrics_listen()
                .unwrap_err()
                .0
                .starts_with("metrics_addr:")
        );
    }

    #[test]
    fn restart_only_changes_skip_live_keys() {
        let old = Config {
            allowed_keys_file: Some("a".into()),
            ..Config::default()
        };
        let new = Config {
            rate_limit: 1,
            log_level: Some("debug".into()),
            allowed_keys_file: Some("b".into()),
            max_clients: 3,
            addr: ":1".into(),
            ..old.clone()
        };
        assert_eq!(old.restart_only_changes(&new), ["addr", "max_clients"]);
        // Turning the file off (for open_relay) is a restart.
        let open = Config {
            allowed_keys_file: None,
            open_relay: true,
            ..old.clone()
        };
        assert_eq!(
            old.restart_only_changes(&open),
            ["allowed_keys_file", "open_relay"]
        );
        for k in LIVE_KEYS {
            assert!(Config::keys().contains(&k.to_string()), "{k} is a setting");
        }
    }
}

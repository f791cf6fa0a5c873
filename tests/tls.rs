//! Built-in TLS, as clients see it: Tailscale's `ts_derp` and a WebSocket
//! client over rustls against certificates made here with rcgen, certificate
//! rotation on disk by each way files get replaced, a broken pair kept out,
//! the handshake inside the header timeout and pending limit, the plain
//! port-80 listener, and the operator tools over https/wss.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use derp_relay::metrics::RefuseReason;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use ts_keys::NodeKeyPair;

/// A test CA that issues certificates for `localhost` and 127.0.0.1.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// One issued pair, as PEM for the relay and DER to recognise it on the wire.
struct Pair {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Pki {
            ca: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn issue_with(&self, key: &KeyPair) -> Pair {
        let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(key, &self.ca)
            .unwrap();
        Pair {
            // The chain as cert-manager writes it: leaf, then the issuer.
            cert_pem: format!("{}{}", cert.pem(), self.ca.pem()),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn issue(&self) -> Pair {
        self.issue_with(&KeyPair::generate().unwrap())
    }

    /// Client settings trusting this CA. Without resumption: a resumed
    /// session reports the certificate of the session it resumes, and these
    /// tests look at the one the server serves now.
    fn client(&self) -> Arc<ClientConfig> {
        let ca = CertificateDer::from(self.ca.der().to_vec());
        let mut c = (*derp_relay::client::tls_config(&[ca]).unwrap()).clone();
        c.resumption = tokio_rustls::rustls::client::Resumption::disabled();
        Arc::new(c)
    }
}

/// Where the relay reads its pair from, and how the test replaces it.
struct Files {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Clone, Copy)]
enum Style {
    /// Truncate and rewrite the file itself (the same key renewed).
    InPlace,
    /// Write a temporary file beside it and rename over it.
    Rename,
    /// Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`, `..data` a
    /// symlink to a timestamped directory, swapped by renaming a new link.
    DataSwap,
}

impl Files {
    fn new(style: Style, first: &Pair) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let f = Files { dir, cert, key };
        match style {
            Style::InPlace | Style::Rename => {
                std::fs::write(&f.cert, &first.cert_pem).unwrap();
                std::fs::write(&f.key, &first.key_pem).unwrap();
            }
            Style::DataSwap => {
                f.write_generation(0, first);
                std::os::unix::fs::symlink("..gen0", f.dir.path().join("..data")).unwrap();
                std::os::unix::fs::symlink("..data/tls.crt", &f.cert).unwrap();
                std::os::unix::fs::symlink("..data/tls.key", &f.key).unwrap();
            }
        }
        f
    }

    fn write_generation(&self, n: u32, p: &Pair) {
        let g = self.dir.path().join(format!("..gen{n}"));
        std::fs::create_dir(&g).unwrap();
        std::fs::write(g.join("tls.crt"), &p.cert_pem).unwrap();
        std::fs::write(g.join("tls.key"), &p.key_pem).unwrap();
    }

    fn replace(&self, style: Style, generation: u32, p: &Pair) {
        match style {
            Style::InPlace => {
                std::fs::write(&self.cert, &p.cert_pem).unwrap();
                std::fs::write(&self.key, &p.key_pem).unwrap();
            }
            Style::Rename => {
                for (path, text) in [(&self.key, &p.key_pem), (&self.cert, &p.cert_pem)] {
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, text).unwrap();
                    std::fs::rename(&tmp, path).unwrap();
                }
            }
            Style::DataSwap => {
                self.write_generation(generation, p);
                let d = self.dir.path();
                let tmp = d.join("..data_tmp");
                std::os::unix::fs::symlink(format!("..gen{generation}"), &tmp).unwrap();
                std::fs::rename(&tmp, d.join("..data")).unwrap();
                std::fs::remove_dir_all(d.join(format!("..gen{}", generation - 1))).unwrap();
            }
        }
    }
}

async fn tls_relay(f: &Files, tweak: impl FnOnce(&mut derp_relay::Config)) -> TestRelay {
    let (cert, key) = (f.cert.clone(), f.key.clone());
    start_relay(move |c| {
        c.tls_cert_file = Some(cert);
        c.tls_key_file = Some(key);
        c.rate_limit = 0;
        tweak(c);
    })
    .await
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = tcp_from(next_source_ip(), addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(cfg).connect(name, tcp).await
}

fn served(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref()
        .1
        .peer_certificates()
        .expect("server sent a chain")[0]
        .to_vec()
}

/// `Upgrade: DERP` over TLS exactly as `ts_derp` does it, then its handshake.
async fn ts_over_tls(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    kp: &NodeKeyPair,
) -> ts_derp::Client<BoxIo> {
    let tls = tls_connect(addr, cfg).await.expect("TLS handshake");
    let url = url::Url::parse(&format!("https://127.0.0.1:{}/derp", addr.port())).unwrap();
    let http = ts_http_util::http1::connect::<ts_http_util::EmptyBody>(tls)
        .await
        .expect("http1");
    use ts_http_util::Client as _;
    let resp = http
        .send(ts_http_util::make_upgrade_req(&url, "DERP", None).unwrap())
        .await
        .expect("upgrade request");
    assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    let io: BoxIo = Box::new(ts_http_util::do_upgrade(resp).await.expect("upgraded"));
    tokio::time::timeout(WAIT, ts_derp::Client::handshake(io, kp))
        .await
        .expect("handshake in time")
        .expect("handshake")
}

/// WebSocket (`wss://`) carrying `ts_derp`.
async fn ts_over_wss(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    kp: &NodeKeyPair,
) -> ts_derp::Client<BoxIo> {
    let tls = tls_connect(addr, cfg).await.expect("TLS handshake");
    let ws = ws_over(
        tls,
        &format!("wss://localhost:{}/derp", addr.port()),
        "localhost",
    )
    .await
    .expect("WebSocket upgrade");
    let io: BoxIo = Box::new(ws);
    tokio::time::timeout(WAIT, ts_derp::Client::handshake(io, kp))
        .await
        .expect("handshake in time")
        .expect("handshake")
}

async fn ts_over(
    via: Via,
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    kp: &NodeKeyPair,
) -> ts_derp::Client<BoxIo> {
    match via {
        Via::Derp => ts_over_tls(addr, cfg, kp).await,
        Via::Ws => ts_over_wss(addr, cfg, kp).await,
    }
}

async fn exchange(
    a: &ts_derp::Client<BoxIo>,
    ka: &NodeKeyPair,
    b: &ts_derp::Client<BoxIo>,
    kb: &NodeKeyPair,
    msg: &[u8],
) {
    a.send_one(kb.public, msg).await.expect("send");
    assert_eq!(recv_ts(b).await, (public(ka), msg.to_vec()));
}

#[tokio::test]
async fn ts_derp_over_tls_on_both_transports() {
    let pki = Pki::new();
    let pair = pki.issue();
    let files = Files::new(Style::Rename, &pair);
    let relay = tls_relay(&files, |_| {}).await;
    let cfg = pki.client();
    let m = &relay.relay().metrics().tls;
    assert!(m.cert_expiry.get() > 1_700_000_000, "expiry exported");
    for (va, vb) in [(Via::Derp, Via::Ws), (Via::Ws, Via::Derp)] {
        let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
        let a = ts_over(va, relay.addr, cfg.clone(), &ka).await;
        let b = ts_over(vb, relay.addr, cfg.clone(), &kb).await;
        let big: Vec<u8> = (0..60_000).map(|i| i as u8).collect();
        exchange(&a, &ka, &b, &kb, b"over TLS").await;
        exchange(&b, &kb, &a, &ka, &big).await;
    }
    // ALPN: offered http/1.1 is chosen; a client offering none (ts_derp, Go) is served too.
    let s = tls_connect(relay.addr, cfg.clone()).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(served(&s), pair.der);
    let mut no_alpn = (*cfg).clone();
    no_alpn.alpn_protocols.clear();
    let mut s = tls_connect(relay.addr, Arc::new(no_alpn)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("ok\n"),
        "{out}"
    );
    // Plain HTTP on the TLS port is a failed handshake, counted.
    let before = refused(relay.relay(), RefuseReason::Tls);
    let reply = http_exchange(
        relay.addr,
        next_source_ip(),
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(!reply.contains("200"), "{reply}");
    eventually("plain HTTP counted as a TLS refusal", || {
        refused(relay.relay(), RefuseReason::Tls) > before
    })
    .await;
}

#[tokio::test]
async fn ts_derp_dials_a_self_signed_relay_itself() {
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
    let relay = start_relay(|c| {
        c.tls_self_signed = Some("127.0.0.1".into());
        c.rate_limit = 0;
    })
    .await;
    let server = ts_derp::ServerConnInfo {
        hostname: "127.0.0.1".into(),
        ipv4: ts_derp::IpUsage::FixedAddr(Ipv4Addr::LOCALHOST),
        ipv6: ts_derp::IpUsage::Disable,
        tls_validation_config: ts_derp::TlsValidationConfig::InsecureForTests,
        https_port: relay.addr.port(),
        stun_port: None,
        stun_only: false,
        supports_port_80: false,
    };
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let connect = |kp: NodeKeyPair| {
        let server = server.clone();
        async move {
            tokio::time::timeout(WAIT, ts_derp::Client::connect([&server], &kp))
                .await
                .expect("connect in time")
                .expect("ts_derp connects")
        }
    };
    let a = connect(ka.clone()).await;
    let b = connect(kb.clone()).await;
    a.send_one(kb.public, b"self-signed").await.unwrap();
    let (from, data) = tokio::time::timeout(WAIT, b.recv_one())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((from, data.as_ref()), (ka.public, &b"self-signed"[..]));
}

async fn wait_reloads(relay: &TestRelay, ok: u64, failed: u64) {
    let m = relay.relay().metrics().tls.clone();
    eventually(&format!("{ok} good and {failed} failed reloads"), || {
        m.reloads_ok.get() == ok && m.reloads_failed.get() == failed
    })
    .await;
}

async fn rotation(style: Style) {
    let pki = Pki::new();
    let key = KeyPair::generate().unwrap();
    let first = pki.issue_with(&key);
    let files = Files::new(style, &first);
    let relay = tls_relay(&files, |_| {}).await;
    let cfg = pki.client();
    assert_eq!(
        served(&tls_connect(relay.addr, cfg.clone()).await.unwrap()),
        first.der
    );
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_over_tls(relay.addr, cfg.clone(), &ka).await;
    let b = ts_over_wss(relay.addr, cfg.clone(), &kb).await;

    // In place, the renewal keeps its key (two in-place writes are not atomic
    // as a pair); the other styles bring a new key.
    let second = match style {
        Style::InPlace => pki.issue_with(&key),
        _ => pki.issue(),
    };
    files.replace(style, 1, &second);
    wait_reloads(&relay, 1, 0).await;
    assert_eq!(
        served(&tls_connect(relay.addr, cfg.clone()).await.unwrap()),
        second.der,
        "{style:?}: the next handshake gets the new certificate"
    );
    // Connections made before the swap keep working, with each other and
    // with one made after.
    exchange(&a, &ka, &b, &kb, b"still here").await;
    let kc = NodeKeyPair::random();
    let c = ts_over_tls(relay.addr, cfg.clone(), &kc).await;
    exchange(&c, &kc, &a, &ka, b"new meets old").await;
    exchange(&b, &kb, &c, &kc, b"old meets new").await;
    assert_eq!(relay.relay().metrics().tls.reloads_failed.get(), 0);
}

#[tokio::test]
async fn rotation_by_in_place_write() {
    rotation(Style::InPlace).await;
}

#[tokio::test]
async fn rotation_by_rename() {
    rotation(Style::Rename).await;
}

#[tokio::test]
async fn rotation_by_kubernetes_data_swap() {
    rotation(Style::DataSwap).await;
}

#[tokio::test]
async fn a_broken_pair_keeps_the_old_certificate_and_is_counted() {
    let pki = Pki::new();
    let first = pki.issue();
    let files = Files::new(Style::Rename, &first);
    let relay = tls_relay(&files, |_| {}).await;
    let cfg = pki.client();
    let expiry = relay.relay().metrics().tls.cert_expiry.get();

    let garbage = Pair {
        cert_pem: "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
            .into(),
        key_pem: first.key_pem.clone(),
        der: Vec::new(),
    };
    files.replace(Style::Rename, 1, &garbage);
    wait_reloads(&relay, 0, 1).await;
    assert_eq!(
        served(&tls_connect(relay.addr, cfg.clone()).await.unwrap()),
        first.der
    );

    // A valid certificate with somebody else's key: refused too.
    let other = pki.issue();
    let mismatched = Pair {
        cert_pem: other.cert_pem.clone(),
        key_pem: first.key_pem.clone(),
        der: Vec::new(),
    };
    files.replace(Style::Rename, 2, &mismatched);
    wait_reloads(&relay, 0, 2).await;
    assert_eq!(
        served(&tls_connect(relay.addr, cfg.clone()).await.unwrap()),
        first.der
    );
    assert_eq!(relay.relay().metrics().tls.cert_expiry.get(), expiry);

    // Repaired: served at once.
    files.replace(Style::Rename, 3, &other);
    wait_reloads(&relay, 1, 2).await;
    assert_eq!(
        served(&tls_connect(relay.addr, cfg).await.unwrap()),
        other.der
    );
}

#[tokio::test]
async fn a_stalled_handshake_counts_against_the_header_timeout_and_pending_limit() {
    let pki = Pki::new();
    let files = Files::new(Style::Rename, &pki.issue());
    let relay = tls_relay(&files, |c| {
        c.header_timeout = Duration::from_millis(500);
        c.max_pending_per_ip = 2;
    })
    .await;
    let src = next_source_ip();
    // Two connections that never start TLS hold the address's two slots...
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tcp_from(src, relay.addr).await.unwrap());
    }
    // ...so a third from that address is closed without a handshake.
    let before = refused(relay.relay(), RefuseReason::PendingLimit);
    let mut third = tcp_from(src, relay.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, third.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "third connection closed");
    assert_eq!(
        refused(relay.relay(), RefuseReason::PendingLimit),
        before + 1
    );
    // The stalled ones are cut at the header timeout, counted as TLS refusals.
    for mut s in idle {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("cut in time");
        assert!(matches!(n, Ok(0) | Err(_)));
    }
    eventually("stalled handshakes counted", || {
        refused(relay.relay(), RefuseReason::Tls) >= 2
    })
    .await;
    // And the address may connect again.
    tls_connect_from(src, relay.addr, pki.client()).await;
}

async fn tls_connect_from(src: std::net::IpAddr, addr: SocketAddr, cfg: Arc<ClientConfig>) {
    let tcp = tcp_from(src, addr).await.unwrap();
    TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake after the slots were freed");
}

#[tokio::test]
async fn port_80_answers_generate_204_and_redirects_the_rest() {
    let relay = start_relay(|c| {
        c.tls_self_signed = Some("localhost".into());
        c.http_addr = Some("127.0.0.1:0".into());
    })
    .await;
    let plain = relay.relay().http_addr().expect("http_addr bound");
    let r = http_exchange(
        plain,
        next_source_ip(),
        "GET /generate_204 HTTP/1.1\r\nHost: localhost\r\nX-Tailscale-Challenge: abc123\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("x-tailscale-response: response abc123"),
        "{r}"
    );
    for target in ["/derp", "/healthz?x=1"] {
        let r = http_exchange(
            plain,
            next_source_ip(),
            &format!("POST {target} HTTP/1.1\r\nHost: localhost:80\r\nUpgrade: DERP\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 308"), "{r}");
        // To 443, as derper does: the DERPPort of a node with CanPort80.
        let want = format!("location: https://localhost{target}\r\n");
        assert!(r.to_ascii_lowercase().contains(&want), "{want} in {r}");
    }
}

fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_derp-relay"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DERP_RELAY_") {
            c.env_remove(k);
        }
    }
    c
}

async fn run_tool(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || bin().args(&args).output().expect("run derp-relay"))
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_and_healthcheck_over_https_and_wss_with_insecure() {
    let relay = start_relay(|c| {
        c.tls_self_signed = Some("127.0.0.1".into());
        c.rate_limit = 0;
    })
    .await;
    let port = relay.addr.port();
    for scheme in ["https", "wss"] {
        let url = format!("{scheme}://127.0.0.1:{port}/derp");
        let out = run_tool(vec!["probe".into(), url.clone(), "--insecure".into()]).await;
        assert!(out.status.success(), "{url}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("round trip"),
            "{}",
            text(&out.stdout)
        );
        // Without --insecure a self-signed certificate is refused, and the line says so.
        let out = run_tool(vec![
            "probe".into(),
            url.clone(),
            "--timeout".into(),
            "5s".into(),
        ])
        .await;
        assert!(!out.status.success());
        let why = text(&out.stderr);
        assert!(
            why.contains("TLS") && why.to_lowercase().contains("certificate"),
            "{why}"
        );
    }
    let health = format!("https://127.0.0.1:{port}/healthz");
    let out = run_tool(vec![
        "healthcheck".into(),
        "--url".into(),
        health.clone(),
        "--insecure".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run_tool(vec!["healthcheck".into(), "--url".into(), health]).await;
    assert!(
        !out.status.success(),
        "self-signed refused without --insecure"
    );
}

#[tokio::test]
async fn self_signed_files_live_in_the_data_dir() {
    let relay = start_relay(|c| c.tls_self_signed = Some("dev.test".into())).await;
    let dir = &relay.relay().shared.config.data_dir;
    let key = dir.join("tls-self-signed-dev.test.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(Path::new(&dir.join("tls-self-signed-dev.test.crt")).exists());
}

//! The operator subcommands, run as an operator runs them: the real binary
//! against a real relay process (started with plain flags, no subcommand,
//! which also proves that form still runs the relay), over real sockets.
//! What is checked is the contract scripts and health checkers rely on:
//! exit code 0 only on success, otherwise one line on stderr saying why.

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use derp_relay::admission::allowed_keys::AllowedKeys;
use derp_relay::admission::bindings::Bindings;
use derp_relay::protocol::PublicKey;
use derp_relay::protocol::handshake::ClientSecret;

const WAIT: Duration = Duration::from_secs(15);

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_derp-relay"));
    // The relay reads every DERP_RELAY_* variable; the test's own environment
    // must not leak into it.
    for (k, _) in std::env::vars() {
        if k.starts_with("DERP_RELAY_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "info");
    c
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run derp-relay")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit and exactly one line on stderr.
fn failure_line(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of reason on stderr, got: {err:?}");
    lines[0].to_owned()
}

fn success(o: &Output) -> String {
    assert!(
        o.status.success(),
        "expected success; stderr: {} stdout: {}",
        stderr(o),
        stdout(o)
    );
    stdout(o)
}

/// A relay process started the way an operator does: flags, no subcommand.
struct RelayProc {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl RelayProc {
    fn start(extra: &[&str]) -> RelayProc {
        let dir = tempfile::tempdir().unwrap();
        let mut child = bin()
            .args(["--addr", "127.0.0.1:0", "--stun-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relay");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        // Keep draining stderr for the relay's whole life, or it blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if !sent && let Some(addr) = listen_addr(&line) {
                    let _ = tx.send(addr);
                    sent = true;
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(WAIT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("relay did not log its address: {:?}", log.lock().unwrap());
            }
        };
        RelayProc {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr=127.0.0.1:PORT` field of the relay's "listening" log line.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("addr=")? + 5..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].trim_matches('"').parse().ok()
}

/// Writes a key with `keys generate` and returns its path and public key.
fn generate_key(dir: &Path, name: &str) -> (PathBuf, PublicKey) {
    let path = dir.join(name);
    let out = run(&["keys", "generate", "--out", path.to_str().unwrap()]);
    let text = success(&out);
    let key = PublicKey::parse(text.lines().next().unwrap()).unwrap();
    (path, key)
}

// ------------------------------------------------------------ healthcheck

#[test]
fn healthcheck_passes_on_a_live_relay_and_fails_on_a_closed_port() {
    let relay = RelayProc::start(&["--open-relay"]);
    let out = run(&["healthcheck", "--url", &relay.url("http", "/healthz")]);
    assert!(success(&out).starts_with("ok"));

    // A port nobody listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = run(&[
        "healthcheck",
        "--url",
        &format!("http://127.0.0.1:{port}/healthz"),
    ]);
    let why = failure_line(&out);
    assert!(
        why.starts_with("derp-relay healthcheck:") && why.contains("connect"),
        "{why}"
    );
}

/// A one-shot HTTP server that answers every connection with `response`.
fn fake_server(response: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(response);
        }
    });
    addr
}

#[test]
fn healthcheck_fails_on_draining_or_a_foreign_answer() {
    let draining = fake_server(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\nConnection: close\r\n\r\ndraining\n",
    );
    let why = failure_line(&run(&[
        "healthcheck",
        "--url",
        &format!("http://{draining}/healthz"),
    ]));
    assert!(why.contains("503") && why.contains("draining"), "{why}");

    let other = fake_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nwelcome page",
    );
    let why = failure_line(&run(&[
        "healthcheck",
        "--url",
        &format!("http://{other}/healthz"),
    ]));
    assert!(why.contains("welcome page"), "{why}");

    let chunked = fake_server(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nok\n\r\n0\r\n\r\n",
    );
    success(&run(&[
        "healthcheck",
        "--url",
        &format!("http://{chunked}/healthz"),
    ]));

    // Accepts and never answers: the timeout is the reason.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let why = failure_line(&run(&[
        "healthcheck",
        "--url",
        &format!("http://{addr}/healthz"),
        "--timeout",
        "1s",
    ]));
    assert!(why.contains("within 1s"), "{why}");
    drop(silent);
}

// ------------------------------------------------------------ probe

#[test]
fn probe_relays_a_packet_each_way_over_both_transports() {
    let relay = RelayProc::start(&["--open-relay", "--rate-limit", "0"]);
    for url in [
        relay.url("http", "/derp"),
        relay.url("ws", "/derp"),
        relay.url("http", ""), // the path defaults to /derp
    ] {
        let out = success(&run(&["probe", &url, "--count", "2"]));
        assert!(out.contains("A -> B delivered"), "{url}: {out}");
        assert!(out.contains("B -> A delivered"), "{url}: {out}");
        assert!(out.contains("round trip"), "{url}: {out}");
        assert!(out.contains("handshake"), "{url}: {out}");
        assert_eq!(out.lines().last(), Some("ok"), "{url}: {out}");
    }
}

#[test]
fn probe_with_listed_keys_passes_an_acl_and_is_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    let (a_path, a) = generate_key(dir.path(), "a.key");
    let (b_path, b) = generate_key(dir.path(), "b.key");
    let (c_path, _) = generate_key(dir.path(), "stranger.key");
    let acl = dir.path().join("allowed-keys.txt");
    std::fs::write(
        &acl,
        format!(
            "# probe A\n{}\n# probe B\n{}\n",
            a.to_base64(),
            b.to_nodekey_hex()
        ),
    )
    .unwrap();
    let relay = RelayProc::start(&[
        "--allowed-keys-file",
        acl.to_str().unwrap(),
        "--rate-limit",
        "0",
    ]);
    let (a_path, b_path, c_path) = (
        a_path.to_str().unwrap(),
        b_path.to_str().unwrap(),
        c_path.to_str().unwrap(),
    );
    for scheme in ["http", "ws"] {
        let url = relay.url(scheme, "/derp");
        let out = run(&[
            "probe",
            &url,
            "--key-file",
            a_path,
            "--peer-key-file",
            b_path,
        ]);
        assert!(success(&out).contains(&a.to_nodekey_hex()));

        // Random keys: client A is refused before ServerInfo.
        let why = failure_line(&run(&["probe", &url, "--timeout", "5s"]));
        assert!(
            why.contains("client A") && why.contains("refused"),
            "{scheme}: {why}"
        );

        // A listed A but an unlisted B: B is the one refused.
        let why = failure_line(&run(&[
            "probe",
            &url,
            "--key-file",
            a_path,
            "--peer-key-file",
            c_path,
        ]));
        assert!(
            why.contains("client B") && why.contains("refused"),
            "{scheme}: {why}"
        );
    }
    let why = failure_line(&run(&[
        "probe",
        &relay.url("http", "/derp"),
        "--key-file",
        a_path,
        "--peer-key-file",
        a_path,
    ]));
    assert!(why.contains("same key"), "{why}");
    let log = relay.log.lock().unwrap().join("\n");
    assert!(!log.is_empty());
}

#[test]
fn probe_reports_rate_limiting_as_http_429() {
    let relay = RelayProc::start(&["--open-relay", "--rate-limit", "1", "--rate-burst", "1"]);
    // One request's worth of burst: the probe's second client gets 429.
    let why = failure_line(&run(&["probe", &relay.url("http", "/derp")]));
    assert!(why.contains("429"), "{why}");
    assert!(why.contains("Retry-After"), "{why}");
}

#[test]
fn probe_fails_cleanly_when_nothing_listens() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let why = failure_line(&run(&["probe", &format!("ws://127.0.0.1:{port}/derp")]));
    assert!(why.contains("client A") && why.contains("connect"), "{why}");
    let why = failure_line(&run(&["probe", "ftp://example.com/derp"]));
    assert!(why.contains("scheme"), "{why}");
}

/// A TLS terminator in front of the relay, as nginx or Caddy would be: it
/// decrypts and copies bytes both ways, so both upgrades pass through it.
async fn tls_terminator(
    relay: SocketAddr,
    cert_chain: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    key: tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
) -> SocketAddr {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(relay).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_speaks_tls_and_names_certificate_problems() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let relay = RelayProc::start(&["--open-relay", "--rate-limit", "0"]);
    let front = tls_terminator(
        relay.addr,
        vec![leaf.der().clone(), ca.der().clone()],
        tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .await;

    let probe = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args)
        })
    };
    let ca_arg = ca_file.to_str().unwrap().to_owned();
    for scheme in ["https", "wss"] {
        let url = format!("{scheme}://{front}/derp");
        let out = probe(vec![
            "probe".into(),
            url.clone(),
            "--ca-file".into(),
            ca_arg.clone(),
        ])
        .await
        .unwrap();
        assert!(success(&out).contains("round trip"), "{url}");

        // Without our CA the certificate is not trusted, and the reason says so.
        let out = probe(vec!["probe".into(), url.clone()]).await.unwrap();
        let why = failure_line(&out);
        assert!(
            why.contains("TLS") && why.to_lowercase().contains("certificate"),
            "{url}: {why}"
        );
    }
    // Plain HTTP to a TLS port is a protocol failure, not a hang.
    let out = probe(vec![
        "probe".into(),
        format!("http://{front}/derp"),
        "--timeout".into(),
        "3s".into(),
    ])
    .await
    .unwrap();
    failure_line(&out);
}

// ------------------------------------------------------------ derpmap

#[test]
fn derpmap_prints_a_map_tailscale_and_headscale_read() {
    let out = success(&run(&[
        "derpmap",
        "--hostname",
        "derp.example.com",
        "--region-id",
        "901",
        "--region-code",
        "ams",
        "--region-name",
        "Amsterdam",
        "--ipv4",
        "198.51.100.7",
        "--omit-default-regions",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["omitDefaultRegions"], true, "§11: lower-case o");
    let region = &v["Regions"]["901"];
    assert_eq!(region["RegionID"], 901);
    assert_eq!(region["RegionCode"], "ams");
    assert_eq!(region["RegionName"], "Amsterdam");
    let node = &region["Nodes"][0];
    assert_eq!(node["Name"], "901a");
    assert_eq!(node["RegionID"], 901);
    assert_eq!(node["HostName"], "derp.example.com");
    assert_eq!(node["IPv4"], "198.51.100.7");
    assert_eq!(node["DERPPort"], 443);
    assert_eq!(node["STUNPort"], 3478, "the relay answers STUN on 3478");

    let out = run(&[
        "derpmap",
        "--hostname",
        "derp.example.com",
        "--stun-port",
        "-1",
        "--port",
        "8443",
        "--format",
        "headscale",
    ]);
    assert!(stderr(&out).contains("STUN"), "the STUN note is on stderr");
    let y: serde_norway::Value = serde_norway::from_str(&success(&out)).expect("YAML");
    let node = &y["regions"][900]["nodes"][0];
    assert_eq!(node["hostname"].as_str(), Some("derp.example.com"));
    assert_eq!(node["derpport"].as_u64(), Some(8443));
    assert_eq!(node["stunport"].as_i64(), Some(-1));
    assert_eq!(y["regions"][900]["regionid"].as_u64(), Some(900));

    let why = failure_line(&run(&["derpmap", "--hostname", "https://derp.example.com"]));
    assert!(why.contains("--hostname"), "{why}");
    assert!(
        !run(&["derpmap", "--hostname", "x.example", "--stun-port", "0"])
            .status
            .success()
    );
}

// ------------------------------------------------------------ keys

#[test]
fn keys_generate_writes_a_private_file_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.key");
    let out = success(&run(&["keys", "generate", "--out", path.to_str().unwrap()]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "base64 and nodekey:hex: {out}");
    let b64 = PublicKey::parse(lines[0]).unwrap();
    assert!(lines[1].starts_with("nodekey:"));
    assert_eq!(PublicKey::parse(lines[1]).unwrap(), b64);

    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    let hex_key = text
        .trim()
        .strip_prefix("privkey:")
        .expect("privkey: prefix");
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes).unwrap();
    assert_eq!(ClientSecret::from_bytes(bytes).public(), b64);

    // Both printed forms are valid allowed-keys lines.
    let acl = AllowedKeys::parse(&format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    assert!(acl.contains(&b64));

    let why = failure_line(&run(&["keys", "generate", "--out", path.to_str().unwrap()]));
    assert!(why.contains("refusing to overwrite"), "{why}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "unchanged");

    let again = success(&run(&[
        "keys",
        "public",
        "--key-file",
        path.to_str().unwrap(),
    ]));
    assert_eq!(again, out);
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "hello\n").unwrap();
    let why = failure_line(&run(&[
        "keys",
        "public",
        "--key-file",
        garbage.to_str().unwrap(),
    ]));
    assert!(why.contains("privkey:"), "{why}");
}

#[test]
fn keys_export_turns_bindings_into_an_allowed_keys_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (k1, k2) = (
        ClientSecret::generate().public(),
        ClientSecret::generate().public(),
    );
    let mut b = Bindings::default();
    let addr: SocketAddr = "192.0.2.10:41641".parse().unwrap();
    b.seen(k1, Some("alice-laptop".into()), addr, 1_700_000_000);
    b.seen(k2, None, addr, 1_700_000_000);
    b.write_atomic(&data.join("tofu-bindings.json")).unwrap();

    let out = success(&run(&[
        "keys",
        "export",
        "--data-dir",
        data.to_str().unwrap(),
    ]));
    let acl = AllowedKeys::parse(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(acl.len(), 2);
    assert_eq!(acl.label(&k1), Some("alice-laptop"));
    assert!(acl.contains(&k2));

    let moved = dir.path().join("elsewhere.json");
    std::fs::rename(data.join("tofu-bindings.json"), &moved).unwrap();
    let again = success(&run(&[
        "keys",
        "export",
        "--bindings-file",
        moved.to_str().unwrap(),
    ]));
    assert_eq!(again, out);

    let why = failure_line(&run(&[
        "keys",
        "export",
        "--data-dir",
        data.to_str().unwrap(),
    ]));
    assert!(why.contains("no bindings file"), "{why}");
    std::fs::write(&moved, "{not json").unwrap();
    let why = failure_line(&run(&[
        "keys",
        "export",
        "--bindings-file",
        moved.to_str().unwrap(),
    ]));
    assert!(why.contains("elsewhere.json"), "{why}");
}

// ------------------------------------------------------------ the CLI itself

#[test]
fn relay_flags_and_subcommands_do_not_mix() {
    let out = run(&["--open-relay", "healthcheck"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    // No admission choice: the relay refuses to start and says how to fix it.
    let out = run(&["--addr", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--open-relay"));
}

//! Who may connect: the live-reloaded allowed-keys file, TOFU bindings, the
//! per-address rate limit. Real files in temporary directories, a real relay.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use derp_relay::actors::acl::AclMsg;
use derp_relay::actors::tofu::TofuMsg;
use derp_relay::admission::bindings::Bindings;
use derp_relay::metrics::RefuseReason;
use ts_keys::NodeKeyPair;

async fn acl_relay(dir: &Path, keys: &[&NodeKeyPair]) -> (TestRelay, PathBuf) {
    let path = dir.join("allowed-keys.txt");
    write_keys(&path, keys);
    let p = path.clone();
    let relay = start_relay(move |c| {
        c.open_relay = false;
        c.allowed_keys_file = Some(p);
    })
    .await;
    (relay, path)
}

async fn admitted(relay: &TestRelay, kp: &NodeKeyPair) -> bool {
    try_ts_client(relay.addr, Via::Derp, kp).await.is_ok()
}

/// Waits until the relay's ACL agrees with `allowed` about `kp`.
async fn acl_says(relay: &TestRelay, kp: &NodeKeyPair, allowed: bool) {
    let shared = relay.relay().shared.clone();
    let k = public(kp);
    eventually("ACL reload", || {
        shared.acl().is_some_and(|a| a.contains(&k) == allowed)
    })
    .await;
}

#[tokio::test]
async fn only_listed_keys_are_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stranger) = (NodeKeyPair::random(), NodeKeyPair::random());
    let (relay, _) = acl_relay(dir.path(), &[&ok]).await;
    for via in BOTH {
        assert!(try_ts_client(relay.addr, via, &ok).await.is_ok());
        assert!(
            try_ts_client(relay.addr, via, &stranger).await.is_err(),
            "no ServerInfo for an unlisted key"
        );
    }
    assert_eq!(refused(relay.relay(), RefuseReason::Acl), 2);

    // A refused WebSocket client is told why, with close code 1008.
    let mut ws = ws_connect_handshaken(relay.addr).await;
    assert_eq!(ws.close_code().await, Some(1008));
}

#[tokio::test]
async fn every_reload_style_is_picked_up_and_removal_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let base = NodeKeyPair::random();
    let (relay, path) = acl_relay(dir.path(), &[&base]).await;
    let line = |k: &NodeKeyPair| format!("{}\n", b64(k));

    type Style = fn(&Path, &str);
    let styles: [(&str, Style); 4] = [
        ("in-place write", |p, text| std::fs::write(p, text).unwrap()),
        ("editor temp + rename", |p, text| {
            let tmp = p.with_file_name(".allowed-keys.txt.swp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, p).unwrap();
        }),
        ("mv over", |p, text| {
            let other = p.with_file_name("new-keys.txt");
            std::fs::write(&other, text).unwrap();
            let st = std::process::Command::new("mv")
                .arg(&other)
                .arg(p)
                .status()
                .unwrap();
            assert!(st.success());
        }),
        ("delete then recreate", |p, text| {
            std::fs::remove_file(p).unwrap();
            std::fs::write(p, text).unwrap();
        }),
    ];
    for (name, style) in styles {
        let newcomer = NodeKeyPair::random();
        assert!(!admitted(&relay, &newcomer).await, "{name}: not yet listed");
        style(&path, &(line(&base) + &line(&newcomer)));
        acl_says(&relay, &newcomer, true).await;
        let c = try_ts_client(relay.addr, Via::Ws, &newcomer)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        eventually("registered", || {
            relay
                .relay()
                .shared
                .clients
                .is_connected(&public(&newcomer))
        })
        .await;

        // Removing it disconnects the live connection.
        let started = std::time::Instant::now();
        style(&path, &line(&base));
        let err = tokio::time::timeout(WAIT, c.recv_one())
            .await
            .expect("disconnected in time");
        assert!(
            err.is_err(),
            "{name}: the removed key's connection is closed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{name}: took {:?}",
            started.elapsed()
        );
        assert!(
            !admitted(&relay, &newcomer).await,
            "{name}: removed key refused"
        );
    }

    // sed -i rewrites through a temp file and rename, like many tools.
    let newcomer = NodeKeyPair::random();
    std::fs::write(&path, line(&base) + "# placeholder\n").unwrap();
    let st = std::process::Command::new("sed")
        .arg("-i")
        .arg(format!("s|# placeholder|{}|", b64(&newcomer)))
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    acl_says(&relay, &newcomer, true).await;
    assert!(admitted(&relay, &newcomer).await, "sed -i");
    assert!(
        admitted(&relay, &base).await,
        "base key admitted throughout"
    );
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (NodeKeyPair::random(), NodeKeyPair::random());
    // The layout the kubelet writes for a ConfigMap volume.
    let v1 = d.join("..2026_11_23_01_00_00.000000001");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("allowed-keys.txt"), format!("{}\n", b64(&a))).unwrap();
    std::os::unix::fs::symlink(v1.file_name().unwrap(), d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/allowed-keys.txt", d.join("allowed-keys.txt")).unwrap();
    let p = d.join("allowed-keys.txt");
    let relay = start_relay(move |c| {
        c.open_relay = false;
        c.allowed_keys_file = Some(p);
    })
    .await;
    assert!(admitted(&relay, &a).await);
    assert!(!admitted(&relay, &b).await);

    // The kubelet's update: new timestamped dir, new symlink, atomic rename over ..data.
    let v2 = d.join("..2026_11_23_02_00_00.000000002");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("allowed-keys.txt"), format!("{}\n", b64(&b))).unwrap();
    std::os::unix::fs::symlink(v2.file_name().unwrap(), d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    acl_says(&relay, &b, true).await;
    assert!(admitted(&relay, &b).await);
    assert!(!admitted(&relay, &a).await);
}

#[tokio::test]
async fn a_bad_line_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (NodeKeyPair::random(), NodeKeyPair::random());
    let (relay, path) = acl_relay(dir.path(), &[&a]).await;
    let m = relay.relay().shared.metrics.clone();
    std::fs::write(&path, format!("{}\nnot a key\n{}\n", b64(&b), b64(&a))).unwrap();
    eventually("failed reload counted", || {
        m.acl_reloads.with_label_values(&["failed"]).get() >= 1
    })
    .await;
    let err = relay.relay().shared.acl_status().last_error.unwrap();
    assert!(err.contains("allowed-keys.txt:2:"), "{err}");
    assert!(admitted(&relay, &a).await, "last good set still in force");
    assert!(
        !admitted(&relay, &b).await,
        "nothing from the bad file was taken"
    );
    write_keys(&path, &[&a, &b]);
    acl_says(&relay, &b, true).await;
    assert!(admitted(&relay, &b).await, "next good write is picked up");
}

#[tokio::test]
async fn two_hundred_edits_while_clients_connect_make_no_wrong_admission() {
    let dir = tempfile::tempdir().unwrap();
    let always: Vec<NodeKeyPair> = (0..4).map(|_| NodeKeyPair::random()).collect();
    let never: Vec<NodeKeyPair> = (0..4).map(|_| NodeKeyPair::random()).collect();
    let toggled: Vec<NodeKeyPair> = (0..4).map(|_| NodeKeyPair::random()).collect();
    let initial: Vec<&NodeKeyPair> = always.iter().collect();
    let (relay, path) = acl_relay(dir.path(), &initial).await;

    let editor = {
        let path = path.clone();
        let always: Vec<String> = always.iter().map(b64).collect();
        let toggled: Vec<String> = toggled.iter().map(b64).collect();
        tokio::task::spawn_blocking(move || {
            for i in 0..200usize {
                let mut text = format!("# edit {i}\n");
                for (j, k) in always.iter().enumerate() {
                    text.push_str(&format!("# always {j}\n{k}\n"));
                }
                for (j, k) in toggled.iter().enumerate() {
                    if (i + j) % 2 == 0 {
                        text.push_str(&format!("{k}\n"));
                    }
                }
                if i % 3 == 0 {
                    std::fs::write(&path, text).unwrap();
                } else {
                    let tmp = path.with_extension(format!("tmp{i}"));
                    std::fs::write(&tmp, text).unwrap();
                    std::fs::rename(&tmp, &path).unwrap();
                }
                // Bursts of ten edits, then a pause long enough for a reload,
                // so reloads keep landing while clients connect.
                let pause = if i % 10 == 9 { 300 } else { 5 };
                std::thread::sleep(Duration::from_millis(pause));
            }
        })
    };
    let mut rounds = 0;
    while !editor.is_finished() || rounds < 5 {
        rounds += 1;
        for (i, k) in always.iter().enumerate() {
            let via = if (i + rounds) % 2 == 0 {
                Via::Derp
            } else {
                Via::Ws
            };
            let c = try_ts_client(relay.addr, via, k).await;
            assert!(c.is_ok(), "an always-listed key was refused: {:?}", c.err());
        }
        for k in never.iter().chain(toggled.iter().take(1)) {
            let c = try_ts_client(relay.addr, Via::Derp, k).await;
            if never.iter().any(|n| n.public == k.public) {
                assert!(c.is_err(), "a never-listed key was admitted");
            }
        }
    }
    editor.await.unwrap();
    // Nothing never-listed got in at any point.
    for k in &never {
        assert!(!relay.relay().shared.clients.is_connected(&public(k)));
    }
}

#[tokio::test]
async fn an_acl_or_tofu_crash_is_restarted_and_admission_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (NodeKeyPair::random(), NodeKeyPair::random());
    let (relay, path) = acl_relay(dir.path(), &[&a]).await;
    let shared = relay.relay().shared.clone();

    crash_and_await_restart(
        "ACL restarted",
        || relay.relay().actors.acl.get(),
        AclMsg::CrashForTest,
    )
    .await;
    assert!(admitted(&relay, &a).await);
    write_keys(&path, &[&a, &b]);
    acl_says(&relay, &b, true).await;
    assert!(
        admitted(&relay, &b).await,
        "the restarted ACL actor still watches the file"
    );

    crash_and_await_restart(
        "TOFU restarted",
        || relay.relay().actors.tofu.get(),
        TofuMsg::CrashForTest,
    )
    .await;
    assert!(admitted(&relay, &a).await);
    let bindings = shared.config.bindings_path();
    eventually("bindings written", || {
        Bindings::load(&bindings).is_ok_and(|b| b.len() == 2)
    })
    .await;
    let m = relay.relay().metrics();
    assert_eq!(m.actor_restarts.with_label_values(&["acl"]).get(), 1);
    assert_eq!(m.actor_restarts.with_label_values(&["tofu"]).get(), 1);
}

#[tokio::test]
async fn bindings_survive_restart_and_tofu_lock_admits_only_known_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let (known, newcomer) = (NodeKeyPair::random(), NodeKeyPair::random());
    let d = data.clone();
    let mut relay = start_relay(move |c| c.data_dir = d).await;
    let c = ts_client(relay.addr, Via::Derp, &known).await;
    drop(c);
    eventually("deregistered", || relay.relay().shared.clients.is_empty()).await;
    relay.shutdown().await;

    let b = Bindings::load(&data.join("tofu-bindings.json")).unwrap();
    let entry = b.get(&public(&known)).expect("bound on first use");
    assert_eq!(entry.connections, 1);
    assert!(entry.last_addr.starts_with("127."), "{}", entry.last_addr);

    let d = data.clone();
    let relay = start_relay(move |c| {
        c.data_dir = d;
        c.tofu_lock = true;
    })
    .await;
    assert!(
        admitted(&relay, &known).await,
        "bound key admitted after restart"
    );
    assert!(
        !admitted(&relay, &newcomer).await,
        "--tofu-lock refuses unknown keys"
    );
    assert_eq!(refused(relay.relay(), RefuseReason::TofuLock), 1);
}

#[tokio::test]
async fn a_malformed_bindings_file_stops_the_start_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tofu-bindings.json");
    std::fs::write(&file, "{\"version\": 1,\n \"bindings\": [oops]}").unwrap();
    let mut config = test_config();
    config.data_dir = dir.path().to_path_buf();
    let err = derp_relay::Relay::start(config)
        .await
        .err()
        .expect("start refused");
    assert!(err.contains("tofu-bindings.json:2:"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "{\"version\": 1,\n \"bindings\": [oops]}"
    );
}

#[test]
fn kill_9_during_a_burst_of_binding_writes_leaves_a_parsable_file() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for round in 0..3u64 {
        let mut child = KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_derp-relay"))
                .args([
                    "--open-relay",
                    "--addr",
                    "127.0.0.1:0",
                    "--rate-limit",
                    "0",
                    "--stun-addr",
                    "127.0.0.1:0",
                    "--data-dir",
                ])
                .arg(dir.path())
                .env("RUST_LOG", "info")
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let addr = read_listen_addr(child.0.stderr.take().unwrap());
        let file = dir.path().join("tofu-bindings.json");
        let written_before = Bindings::load(&file).map_or(0, |b| b.len());
        rt.block_on(async {
            // Keep new keys arriving until the relay has written this round's
            // bindings at least once, then a little longer (different each
            // round) so the kill lands at a different point of the write cycle.
            let give_up = tokio::time::Instant::now() + WAIT * 3;
            let mut kill_at = None;
            let mut held = Vec::new();
            loop {
                let now = tokio::time::Instant::now();
                assert!(now < give_up, "round {round}: bindings never written");
                if kill_at.is_some_and(|t| now >= t) {
                    break;
                }
                let futs = (0..20).map(|_| async {
                    let kp = NodeKeyPair::random();
                    try_ts_client(addr, Via::Derp, &kp).await
                });
                held.extend(futures_util::future::join_all(futs).await);
                if kill_at.is_none()
                    && Bindings::load(&file).is_ok_and(|b| b.len() > written_before)
                {
                    kill_at = Some(now + Duration::from_millis(150 + round * 350));
                }
            }
        });
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        let b = Bindings::load(&dir.path().join("tofu-bindings.json")).unwrap_or_else(|e| {
            panic!("round {round}: bindings file does not parse after kill -9: {e}")
        });
        assert!(
            b.len() > written_before,
            "round {round}: nothing written lost after the kill"
        );
    }
}

async fn raw_http(addr: std::net::SocketAddr, src: std::net::IpAddr, extra: &str) -> String {
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
    http_exchange(addr, src, &req).await
}

#[tokio::test]
async fn rate_limit_answers_429_after_the_burst_and_ignores_spoofed_headers() {
    let relay = start_relay(|c| {
        c.rate_limit = 5;
        c.rate_burst = 10;
    })
    .await;
    let ip = next_source_ip();
    let mut statuses = Vec::new();
    for i in 0..12 {
        // A different spoofed X-Forwarded-For each time must not help.
        let r = raw_http(
            relay.addr,
            ip,
            &format!("X-Forwarded-For: 198.51.100.{i}\r\nFly-Client-IP: 203.0.113.{i}\r\n"),
        )
        .await;
        statuses.push(r[9..12].to_string());
        if r.starts_with("HTTP/1.1 429") {
            assert!(r.to_ascii_lowercase().contains("retry-after: 1"), "{r}");
        }
    }
    assert_eq!(
        statuses.iter().filter(|s| *s == "200").count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(&statuses[10..], ["429", "429"], "{statuses:?}");
    // Upgrades count against the same budget.
    let c = tcp_from(ip, relay.addr).await;
    drop(c);
    assert!(refused(relay.relay(), RefuseReason::RateLimit) >= 2);
    // Another address is unaffected.
    assert!(
        raw_http(relay.addr, next_source_ip(), "")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn trust_proxy_limits_by_the_forwarded_address() {
    let relay = start_relay(|c| {
        c.rate_limit = 5;
        c.rate_burst = 2;
        c.trust_proxy = true;
    })
    .await;
    let proxy = next_source_ip();
    for i in 0..6 {
        let r = raw_http(
            relay.addr,
            proxy,
            &format!("X-Forwarded-For: 10.9.9.9, 198.51.100.{i}\r\n"),
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 200"),
            "client {i} behind the proxy has its own budget: {r}"
        );
    }
    let mut last = String::new();
    for _ in 0..3 {
        last = raw_http(relay.addr, proxy, "Fly-Client-IP: 203.0.113.5\r\n").await;
    }
    assert!(last.starts_with("HTTP/1.1 429"), "{last}");
}

//! SIGHUP on a real relay process: after the config file is edited, a live
//! setting takes effect (the rate limit, the log level), a restart-only one
//! is named in one log line and left alone, and a file that does not load
//! changes nothing and says why in one line.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;

/// Every stderr line of the relay, as it comes.
fn lines_of(stderr: std::process::ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next line containing `needle` (lines before it are skipped).
fn wait_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(_) => panic!("no log line containing {needle:?}"),
        }
    }
}

fn hup(child: &std::process::Child) {
    // SAFETY: signalling our own child by its pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0);
}

async fn get(addr: SocketAddr, src: std::net::IpAddr) -> String {
    http_exchange(
        addr,
        src,
        "GET /generate_204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// Whether two requests in a row from one fresh address meet the limit.
async fn second_is_limited(addr: SocketAddr) -> bool {
    let src = next_source_ip();
    let first = get(addr, src).await;
    assert!(first.starts_with("HTTP/1.1 204"), "{first}");
    get(addr, src).await.starts_with("HTTP/1.1 429")
}

#[tokio::test]
async fn sighup_applies_live_settings_and_names_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("derp-relay.toml");
    let base = format!(
        "addr = \"127.0.0.1:0\"\nstun_addr = \"127.0.0.1:0\"\nopen_relay = true\n\
         data_dir = {:?}\nmax_clients = 100\n",
        dir.path().display().to_string()
    );
    std::fs::write(&cfg, format!("{base}rate_limit = 0\n")).unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_derp-relay"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(child.0.stderr.take().unwrap());
    let l = wait_line(&lines, "derp-relay listening");
    let at = l.find("addr=").unwrap() + 5;
    let addr: SocketAddr = l[at..].split(' ').next().unwrap().parse().unwrap();
    assert!(!second_is_limited(addr).await, "rate_limit = 0 is off");

    // A live key (rate limit, log level) and a restart-only one (max_clients).
    std::fs::write(
        &cfg,
        format!(
            "{}rate_limit = 1\nrate_burst = 1\nlog_level = \"debug\"\n",
            base.replace("max_clients = 100", "max_clients = 50")
        ),
    )
    .unwrap();
    hup(&child.0);
    let done = wait_line(&lines, "config reloaded");
    assert!(
        done.contains("rate_limit") && done.contains("log_level"),
        "{done}"
    );
    let restart = wait_line(&lines, "need a restart");
    assert!(restart.contains("max_clients"), "{restart}");
    assert!(!restart.contains("rate_limit"), "{restart}");
    // The limiter picks the change up from the live settings right after
    // the log line; wait for it rather than for a fixed time.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !second_is_limited(addr).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rate limit never applied"
        );
    }
    // debug is now on: a failed handshake is logged at debug.
    drop(RawClient::start(addr, Via::Derp).await);
    wait_line(&lines, "handshake failed");

    // An invalid file: nothing changes, one line says why (file and line).
    std::fs::write(&cfg, format!("{base}rate_limit = \"lots\"\n")).unwrap();
    hup(&child.0);
    let rejected = wait_line(&lines, "config reload rejected, nothing changed");
    assert!(
        rejected.contains(&format!("{}:6", cfg.display())) && rejected.contains("rate_limit"),
        "{rejected}"
    );
    assert!(second_is_limited(addr).await, "the last good limit stays");

    // SAFETY: our own child.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    let st = child.0.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

/// The reload itself, in process: a new allowed-keys path is watched and
/// read at once (keys it lacks are disconnected), a verify URL turned on
/// applies to the next connection, a new file that does not parse changes
/// nothing, and a restart-only change is reported and left.
#[tokio::test]
async fn reload_repoints_the_acl_and_turns_on_the_verify_url() {
    use derp_relay::metrics::{CloseReason, RefuseReason};
    use ts_keys::NodeKeyPair;
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
    let (a, b) = (NodeKeyPair::random(), NodeKeyPair::random());
    write_keys(&first, &[&a, &b]);
    write_keys(&second, &[&a]);
    let r = start_relay(|c| {
        c.open_relay = false;
        c.allowed_keys_file = Some(first.clone());
    })
    .await;
    let relay = r.relay();
    let _ca = ts_client(r.addr, Via::Derp, &a).await;
    let _cb = ts_client(r.addr, Via::Derp, &b).await;

    let mut new = relay.shared.config.clone();
    new.allowed_keys_file = Some(second.clone());
    let report = relay.reload(new.clone()).unwrap();
    assert_eq!(report.applied, ["allowed_keys_file"]);
    let m = relay.metrics();
    let acl_removed = m
        .disconnects
        .with_label_values(&[CloseReason::AclRemoved.as_str()]);
    eventually("b, not in the new file, is disconnected", || {
        acl_removed.get() == 1
    })
    .await;
    eventually("only a is left", || relay.shared.clients.len() == 1).await;

    // A verify URL turned on live: unlisted keys are asked (here: nobody
    // answers, so they are refused); listed ones still pass unasked.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    new.verify_client_url = Some(format!("http://{down}/verify"));
    let report = relay.reload(new.clone()).unwrap();
    assert_eq!(report.applied, ["verify_client_url"]);
    assert!(
        try_ts_client(r.addr, Via::Derp, &NodeKeyPair::random())
            .await
            .is_err()
    );
    assert_eq!(refused(relay, RefuseReason::VerifyUnavailable), 1);
    let _again = ts_client(r.addr, Via::Ws, &a).await;

    // A new allowed-keys file that does not parse: nothing changes.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "not a key\n").unwrap();
    let mut broken = new.clone();
    broken.allowed_keys_file = Some(bad);
    broken.rate_limit = 99;
    let e = relay.reload(broken).unwrap_err();
    assert!(
        e.starts_with("allowed_keys_file:") && e.contains("bad.txt:1"),
        "{e}"
    );
    assert_eq!(
        relay.shared.live().allowed_keys_file.as_deref(),
        Some(&*second)
    );
    assert_eq!(relay.shared.live().rate_limit, new.rate_limit);

    // Restart-only: reported, not applied.
    let mut later = new.clone();
    later.queue_depth = 7;
    later.tofu_lock = true;
    let report = relay.reload(later).unwrap();
    assert!(
        report.restart_only.contains(&"queue_depth".to_string()),
        "{report:?}"
    );
    assert_eq!(report.applied, ["tofu_lock"]);
    assert_eq!(relay.shared.config.queue_depth, 32);
    assert!(relay.shared.live().tofu_lock);

    // The /healthz token rotates without a restart.
    let healthz = |token: &'static str| {
        let addr = r.addr;
        async move {
            http_exchange(
                addr,
                next_source_ip(),
                &format!(
                    "GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
                     Connection: close\r\n\r\n"
                ),
            )
            .await
        }
    };
    assert!(!healthz("rotated").await.contains("\r\n\r\n{"));
    let mut rotated = new.clone();
    rotated.metrics_token = Some("rotated".into());
    assert_eq!(
        relay.reload(rotated).unwrap().applied,
        ["tofu_lock", "metrics_token"]
    );
    assert!(
        healthz("rotated").await.contains("\r\n\r\n{"),
        "detail with the new token"
    );

    let ok = m.config_reloads.with_label_values(&["ok"]).get();
    let failed = m.config_reloads.with_label_values(&["failed"]).get();
    assert_eq!((ok, failed), (4, 1));
}

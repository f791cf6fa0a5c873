//! Faults, limits and stopping: what happens around the data path.

mod common;

use std::time::Duration;

use common::*;
use derp_relay::actors::registry::RegistryMsg;
use derp_relay::conn::test_hooks::{self, Part};
use derp_relay::metrics::RefuseReason;
use derp_relay::protocol::frame::ServerFrame;
use derp_relay::routing::ClientHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ts_keys::NodeKeyPair;

/// A panic in the connection's handler, reader or writer closes that one
/// connection, deregisters it, and leaves the others relaying.
async fn a_panic_costs_exactly_one_connection(inject: impl FnOnce(&ClientHandle)) {
    let relay = start_relay(|_| {}).await;
    let mut victim = RawClient::connect(relay.addr, Via::Derp).await;
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_client(relay.addr, Via::Ws, &ka).await;
    let b = ts_client(relay.addr, Via::Derp, &kb).await;
    let mut waker = RawClient::connect(relay.addr, Via::Ws).await;
    eventually("registered", || relay.relay().shared.clients.len() == 4).await;

    let h = relay
        .relay()
        .shared
        .clients
        .active(&victim.key())
        .expect("victim registered");
    inject(&h);
    // Give the reader and writer a step to take: a packet to the victim
    // wakes its writer, a ping from it wakes its reader.
    waker.send_packet(&victim.key(), b"wake the writer").await;
    victim.send_packet(&waker.key(), b"wake the reader").await;
    // The wake-up packet may arrive before the close (when the writer is healthy).
    loop {
        match victim.recv_skip_keepalive().await {
            None => break,
            Some(ServerFrame::RecvPacket { .. }) => continue,
            Some(other) => panic!("crashed connection sent {other:?}"),
        }
    }
    eventually("victim deregistered", || {
        relay.relay().shared.clients.len() == 3
    })
    .await;
    assert!(h.is_closed(), "torn down, not half alive");

    a.send_one(kb.public, b"still relaying").await.unwrap();
    assert_eq!(recv_ts(&b).await.1, b"still relaying");
}

#[tokio::test]
async fn a_panicking_connection_handler_closes_only_its_connection() {
    a_panic_costs_exactly_one_connection(|h| assert!(test_hooks::crash_handler(h))).await;
}

#[tokio::test]
async fn a_panicking_reader_task_closes_only_its_connection() {
    a_panic_costs_exactly_one_connection(|h| test_hooks::panic_in(h, Part::Reader)).await;
}

#[tokio::test]
async fn a_panicking_writer_task_closes_only_its_connection() {
    a_panic_costs_exactly_one_connection(|h| test_hooks::panic_in(h, Part::Writer)).await;
}

#[tokio::test]
async fn a_registry_crash_is_restarted_without_dropping_clients() {
    let relay = start_relay(|_| {}).await;
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_client(relay.addr, Via::Ws, &ka).await;
    let b = ts_client(relay.addr, Via::Derp, &kb).await;
    let actors = relay.relay().actors.clone();
    crash_and_await_restart(
        "registry restarted",
        || actors.registry.get(),
        RegistryMsg::CrashForTest,
    )
    .await;
    assert_eq!(
        relay
            .relay()
            .metrics()
            .actor_restarts
            .with_label_values(&["registry"])
            .get(),
        1
    );

    a.send_one(kb.public, b"routes survive").await.unwrap();
    assert_eq!(recv_ts(&b).await.1, b"routes survive");
    // Registration still works through the new registry.
    let kc = NodeKeyPair::random();
    let c = ts_client(relay.addr, Via::Derp, &kc).await;
    b.send_one(kc.public, b"new client").await.unwrap();
    assert_eq!(recv_ts(&c).await.1, b"new client");
    // And leaving still deregisters.
    drop(a);
    eventually("a deregistered", || {
        !relay.relay().shared.clients.is_connected(&public(&ka))
    })
    .await;
}

#[tokio::test]
async fn graceful_stop_tells_every_client_to_go_away() {
    let mut relay = start_relay(|_| {}).await;
    let mut derp = RawClient::connect(relay.addr, Via::Derp).await;
    let mut ws = ws_connect_handshaken(relay.addr).await; // watched for its close code
    eventually("both registered", || {
        relay.relay().shared.clients.len() == 2
    })
    .await;

    let stop = tokio::spawn(async move {
        let left = relay.shutdown().await;
        (left, relay)
    });
    match derp.recv_skip_keepalive().await {
        Some(ServerFrame::ServerInfo(_)) | None => panic!("expected Restarting"),
        Some(ServerFrame::Restarting {
            reconnect_in_ms,
            try_for_ms,
        }) => {
            assert!(reconnect_in_ms > 0 && try_for_ms > reconnect_in_ms);
        }
        other => panic!("expected Restarting, got {other:?}"),
    }
    assert!(derp.closed().await, "closed after Restarting");
    assert_eq!(ws.close_code().await, Some(1001));
    let (left, _relay) = stop.await.unwrap();
    assert_eq!(left, 0, "every client left before the deadline");
}

#[tokio::test]
async fn client_cap_refuses_upgrades_with_503() {
    let relay = start_relay(|c| c.max_clients = 1).await;
    let kp = NodeKeyPair::random();
    let _first = ts_client(relay.addr, Via::Derp, &kp).await;
    for via in BOTH {
        let err = connect_io(relay.addr, via).await.err().expect("refused");
        assert!(err.to_string().contains("503"), "{via:?}: {err}");
    }
    assert_eq!(refused(relay.relay(), RefuseReason::Cap), 2);
    drop(_first);
    eventually("slot released", || relay.relay().shared.clients.is_empty()).await;
    // The slot is free again once the first client has gone.
    let mut ok = false;
    for _ in 0..100 {
        if connect_io(relay.addr, Via::Derp).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "a new client fits after the first left");
}

#[tokio::test]
async fn silent_client_is_closed_at_the_handshake_deadline_and_frees_its_slot() {
    let relay = start_relay(|c| {
        c.handshake_timeout = Duration::from_millis(300);
        c.max_clients = 1;
    })
    .await;
    let mut c = RawClient::start(relay.addr, Via::Derp).await; // never sends ClientInfo
    assert!(c.closed().await);
    assert_eq!(refused(relay.relay(), RefuseReason::BadHandshake), 1);
    let kp = NodeKeyPair::random();
    let _ok = ts_client(relay.addr, Via::Ws, &kp).await;
}

async fn http_get(addr: std::net::SocketAddr, req: &str) -> String {
    http_exchange(addr, next_source_ip(), req).await
}

/// Reads only the response head (an upgraded connection stays open).
async fn http_head(addr: std::net::SocketAddr, req: &str) -> String {
    let mut s = tcp_from(next_source_ip(), addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 512];
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the response head");
        out.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http_endpoints() {
    let relay = start_relay(|_| {}).await;
    let a = relay.addr;
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n")
    };

    let r = http_get(a, &get("/derp", "")).await;
    assert!(r.starts_with("HTTP/1.1 426"), "{r}");
    assert!(r.contains("DERP requires connection upgrade"), "{r}");

    let r = http_get(
        a,
        "DELETE /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");

    let r = http_get(a, &get("/derp", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")).await;
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("subprotocol"),
        "{r}"
    );

    for p in ["/derp/probe", "/derp/latency-check"] {
        let r = http_get(a, &get(p, "")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("access-control-allow-origin: *"),
            "{r}"
        );
        let r = http_get(
            a,
            &format!(
                "POST {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            ),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    }

    let r = http_get(
        a,
        &get("/generate_204", "X-Tailscale-Challenge: abc-123.xyz\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("x-tailscale-response: response abc-123.xyz"),
        "{r}"
    );
    let r = http_get(
        a,
        &get("/generate_204", "X-Tailscale-Challenge: bad value!\r\n"),
    )
    .await;
    assert!(
        !r.to_ascii_lowercase().contains("x-tailscale-response"),
        "{r}"
    );

    let r = http_get(a, &get("/healthz", "")).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");

    let r = http_get(a, &get("/", "")).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("derp-relay"),
        "{r}"
    );

    let r = http_head(a, &get("/derp", "Upgrade: DERP\r\nConnection: Upgrade\r\n")).await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
    let lower = r.to_ascii_lowercase();
    assert!(lower.contains("derp-version: 2"), "{r}");
    let key = relay.relay().shared.secret.public();
    assert!(
        lower.contains(&format!("derp-public-key: {}", hex::encode(key.as_bytes()))),
        "{r}"
    );
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let relay = start_relay(|_| {}).await;
    let mut s = tcp_from(next_source_ip(), relay.addr).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the headers: hyper's header timeout (10 s) closes the socket.
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "connection closed by the header timeout");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_write_timeout_and_stalls_no_one() {
    let relay = start_relay(|c| c.write_timeout = Duration::from_millis(500)).await;
    let stuck = RawClient::connect(relay.addr, Via::Derp).await; // never reads again
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_client(relay.addr, Via::Ws, &ka).await;
    let b = ts_client(relay.addr, Via::Derp, &kb).await;
    let stuck_key = ts_keys::NodePublicKey::from_bytes(stuck.key().0);
    let big = vec![1u8; 60_000];
    let shared = relay.relay().shared.clone();
    // Flood until the stuck client's socket buffers are full and it is cut.
    let deadline = std::time::Instant::now() + WAIT;
    while shared.clients.is_connected(&stuck.key()) {
        assert!(
            std::time::Instant::now() < deadline,
            "stuck client never cut"
        );
        for _ in 0..20 {
            a.send_one(stuck_key, &big).await.unwrap();
        }
        // The sender is never held up by the stuck receiver.
        a.send_one(kb.public, b"still flowing").await.unwrap();
        assert_eq!(recv_ts(&b).await.1, b"still flowing");
    }
    assert_eq!(
        relay
            .relay()
            .metrics()
            .disconnects
            .with_label_values(&["write_timeout"])
            .get(),
        1
    );
    assert!(
        relay
            .relay()
            .metrics()
            .dropped(derp_relay::metrics::DropReason::WriteError)
            .get()
            > 0
    );
}

/// Starts the real binary on an ephemeral port.
fn spawn_relay(data: &std::path::Path, extra: &[&str]) -> (KillOnDrop, std::net::SocketAddr) {
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_derp-relay"))
            .args(["--open-relay", "--addr", "127.0.0.1:0"])
            .args(["--stun-addr", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("relay binary starts"),
    );
    let addr = read_listen_addr(child.0.stderr.take().expect("stderr piped"));
    (child, addr)
}

fn signal(child: &KillOnDrop, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, sig) }, 0);
}

async fn wait_exit(child: &mut KillOnDrop, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(st) = child.0.try_wait().expect("wait") {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relay did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, addr) = spawn_relay(dir.path(), &[]);
    let mut c = RawClient::connect(addr, Via::Derp).await;
    signal(&relay, libc::SIGTERM);
    assert!(matches!(
        c.recv_skip_keepalive().await,
        Some(ServerFrame::Restarting { .. })
    ));
    let st = wait_exit(&mut relay, Duration::from_secs(10)).await;
    assert_eq!(st.code(), Some(0));
    let b = derp_relay::admission::bindings::Bindings::load(&dir.path().join("tofu-bindings.json"))
        .unwrap();
    assert!(b.contains(&c.key()), "binding flushed on the way out");
}

#[tokio::test]
async fn a_second_signal_cuts_the_drain_short() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, addr) = spawn_relay(
        dir.path(),
        &["--write-timeout", "60s", "--shutdown-timeout", "60s"],
    );
    // A client that stops reading while flooded keeps the drain from finishing.
    let stuck = RawClient::connect(addr, Via::Derp).await;
    let mut flooder = RawClient::connect(addr, Via::Derp).await;
    let big = vec![3u8; 60_000];
    // Well past what loopback socket buffers hold, so its writer blocks.
    for _ in 0..400 {
        flooder.send_packet(&stuck.key(), &big).await;
    }
    signal(&relay, libc::SIGTERM);
    // The flooder reads and is told; the stuck one holds the drain open.
    assert!(matches!(
        flooder.recv_skip_keepalive().await,
        Some(ServerFrame::Restarting { .. })
    ));
    assert!(relay.0.try_wait().unwrap().is_none(), "still draining");
    signal(&relay, libc::SIGTERM);
    let st = wait_exit(&mut relay, Duration::from_secs(5)).await;
    assert_eq!(st.code(), Some(130));
}

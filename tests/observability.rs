//! What operators see and rely on: /metrics on loopback, /healthz with and
//! without the token, and the graceful drain.

mod common;

use std::time::{Duration, Instant};

use common::*;
use derp_relay::actors::metrics::MetricsMsg;
use derp_relay::protocol::frame::ServerFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ts_keys::NodeKeyPair;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(addr: std::net::SocketAddr, path: &str, extra: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
    let text = http_exchange(addr, next_source_ip(), &req).await;
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample line in Prometheus text output.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_move_with_traffic_and_live_only_on_loopback() {
    let port = free_port();
    let relay = start_relay(|c| c.metrics_port = port).await;
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_client(relay.addr, Via::Derp, &ka).await;
    let b = ts_client(relay.addr, Via::Ws, &kb).await;
    for i in 0..5u8 {
        a.send_one(kb.public, &[i; 100]).await.unwrap();
        recv_ts(&b).await;
    }
    a.send_one(NodeKeyPair::random().public, b"nobody")
        .await
        .unwrap();
    eventually("drop counted", || {
        relay.relay().metrics().total_dropped() == 1
    })
    .await;

    let (status, text) = get(metrics, "/metrics", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&text, "derp_packets_routed_total"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "derp_packets_dropped_total{reason=\"unknown_dest\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "derp_received_bytes_total"), Some(506.0));
    assert_eq!(sample(&text, "derp_sent_bytes_total"), Some(500.0));
    assert_eq!(
        sample(&text, "derp_clients_active{transport=\"derp\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "derp_clients_active{transport=\"websocket\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "derp_connections_accepted_total"), Some(2.0));
    assert_eq!(sample(&text, "derp_max_clients"), Some(10000.0));
    assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|v| v > 0.0));
    assert!(sample(&text, "process_open_fds").is_some_and(|v| v > 0.0));
    assert!(text.contains("derp_build_info{version=\""), "{text}");
    assert!(
        text.contains("derp_handshake_duration_seconds_count 2"),
        "{text}"
    );

    // Not on the public listener, and not on any address but 127.0.0.1.
    assert_eq!(get(relay.addr, "/metrics", "").await.0, 404);
    let elsewhere: std::net::SocketAddr = ([127, 0, 0, 2], port).into();
    assert!(
        tokio::net::TcpStream::connect(elsewhere).await.is_err(),
        "metrics bound to 127.0.0.1 only"
    );

    // The metrics actor survives a crash and serves again.
    crash_and_await_restart(
        "metrics restarted",
        || relay.relay().actors.metrics.get(),
        MetricsMsg::CrashForTest,
    )
    .await;
    let mut ok = false;
    for _ in 0..200 {
        if let Ok(s) = tokio::net::TcpStream::connect(metrics).await {
            drop(s);
            ok = get(metrics, "/metrics", "").await.0 == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "metrics served again after the restart");
}

#[tokio::test]
async fn healthz_detail_needs_the_token() {
    let relay = start_relay(|c| c.metrics_token = Some("s3cret-token".into())).await;
    let (s, body) = get(relay.addr, "/healthz", "").await;
    assert_eq!((s, body.as_str()), (200, "ok\n"));
    let (s, body) = get(relay.addr, "/healthz", "Authorization: Bearer wrong\r\n").await;
    assert_eq!(s, 401);
    assert!(!body.contains("clients"), "{body}");
    let (s, body) = get(
        relay.addr,
        "/healthz",
        "Authorization: Bearer s3cret-token\r\n",
    )
    .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["clients"], 0);
    assert!(v["rss_bytes"].as_u64().unwrap() > 0);
    assert!(v["uptime_seconds"].is_u64());
    assert!(v["version"].is_string());

    // No token configured: never any detail, whatever is presented.
    let open = start_relay(|_| {}).await;
    let (s, body) = get(
        open.addr,
        "/healthz",
        "Authorization: Bearer s3cret-token\r\n",
    )
    .await;
    assert_eq!((s, body.as_str()), (200, "ok\n"));
}

#[tokio::test]
async fn drain_with_a_thousand_clients_tells_everyone_and_meets_the_deadline() {
    const N: usize = 1000;
    let deadline = Duration::from_secs(5);
    let mut relay = start_relay(|c| {
        c.shutdown_timeout = deadline;
        // Only the drain deadline may cut the stuck clients below.
        c.write_timeout = Duration::from_secs(120);
    })
    .await;
    let bindings = relay.relay().shared.config.bindings_path();
    let mut derp = Vec::new();
    let mut ws = Vec::new();
    for i in 0..N / 50 {
        let futs = (0..50).map(|j| async move {
            if (i * 50 + j) % 2 == 0 {
                (Some(RawClient::connect(relay.addr, Via::Derp).await), None)
            } else {
                (None, Some(ws_connect_handshaken(relay.addr).await))
            }
        });
        for (d, w) in futures_util::future::join_all(futs).await {
            derp.extend(d);
            ws.extend(w);
        }
    }
    // Three clients that stop reading while a peer floods them.
    let mut stuck = Vec::new();
    for _ in 0..3 {
        stuck.push(RawClient::connect(relay.addr, Via::Derp).await);
    }
    let mut flooder = RawClient::connect(relay.addr, Via::Derp).await;
    let big = vec![7u8; 60_000];
    for _ in 0..200 {
        for s in &stuck {
            flooder.send_packet(&s.key(), &big).await;
        }
    }
    eventually("all registered", || {
        relay.relay().shared.clients.len() == N + 4
    })
    .await;

    let started = Instant::now();
    let left = relay.shutdown().await;
    let took = started.elapsed();
    assert!(
        took < deadline + Duration::from_secs(3),
        "drain took {took:?}"
    );
    assert!(
        left <= stuck.len(),
        "only the stuck clients may be cut at the deadline ({left})"
    );

    // Every client that reads (now, late, like the ones that were idle) was told.
    let mut told = 0;
    for mut c in derp {
        match c.recv_skip_keepalive().await {
            Some(ServerFrame::Restarting { .. }) => told += 1,
            other => panic!("DERP client got {other:?} instead of Restarting"),
        }
    }
    for mut w in ws {
        assert_eq!(w.close_code().await, Some(1001));
        told += 1;
    }
    assert_eq!(told, N);
    let b = derp_relay::admission::bindings::Bindings::load(&bindings).unwrap();
    assert_eq!(b.len(), N + 4, "bindings flushed on the way out");
}

#[tokio::test]
async fn healthz_says_draining_on_a_kept_alive_connection() {
    let mut relay = start_relay(|c| c.shutdown_timeout = Duration::from_secs(3)).await;
    let mut hold = RawClient::connect(relay.addr, Via::Derp).await; // keeps the drain busy
    let mut s = tcp_from(next_source_ip(), relay.addr).await.unwrap();
    let req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let shared = relay.relay().shared.clone();
    let stop = tokio::spawn(async move { relay.shutdown().await });
    eventually("draining", || shared.is_draining()).await;
    // The client ignores Restarting and stays, so the drain lasts until the deadline.
    let _ = hold.recv_skip_keepalive().await;
    s.write_all(req).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    let r = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("draining"),
        "{r}"
    );
    stop.await.unwrap();
}

/// Metric names in a PromQL expression (histogram suffixes folded).
fn promql_metrics(expr: &str) -> std::collections::BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("derp_") || w.starts_with("process_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

/// The shipped dashboard and alerts query only series a fresh relay already
/// exports: no panel shows "no data" and no alert expression matches nothing
/// until a first refusal, disconnect, reload or restart happens.
#[tokio::test]
async fn every_dashboard_and_alert_metric_is_in_a_fresh_scrape() {
    let port = free_port();
    let relay = start_relay(|c| c.metrics_port = port).await;
    let (status, text) = get(([127, 0, 0, 1], port).into(), "/metrics", "").await;
    assert_eq!(status, 200);
    let mut live = std::collections::BTreeSet::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = l.split(['{', ' ']).next().unwrap();
        live.extend(promql_metrics(name));
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut used = Vec::new();
    let alerts: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    for g in alerts["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let expr = r["expr"].as_str().unwrap();
            used.extend(
                promql_metrics(expr)
                    .into_iter()
                    .map(|m| (m, expr.to_owned())),
            );
        }
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/derp-relay.json")).unwrap(),
    )
    .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            used.extend(
                promql_metrics(expr)
                    .into_iter()
                    .map(|m| (m, expr.to_owned())),
            );
        }
    }
    assert!(used.len() > 10);
    let missing: Vec<String> = used
        .iter()
        .filter(|(m, _)| !live.contains(m))
        .map(|(m, e)| format!("{m} (in {e:?})"))
        .collect();
    assert!(
        missing.is_empty(),
        "not in a fresh scrape: {missing:#?}\n{text}"
    );
    // Every known label value is there at 0 from the start.
    for line in [
        "derp_connections_refused_total{reason=\"acl\"} 0",
        "derp_connections_refused_total{reason=\"verify_denied\"} 0",
        "derp_disconnects_total{cause=\"acl_removed\"} 0",
        "derp_acl_reloads_total{result=\"failed\"} 0",
        "derp_actor_restarts_total{actor=\"registry\"} 0",
        "derp_packets_dropped_total{reason=\"queue_head\"} 0",
        "derp_stun_requests_total{result=\"invalid\"} 0",
        "derp_verify_client_checks_total{result=\"timeout\"} 0",
        "derp_config_reloads_total{result=\"ok\"} 0",
        "derp_acl_last_reload_success 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}\n{text}");
    }
    drop(relay);
}

/// `--metrics-addr` serves on the named address (here another loopback
/// address, standing in for a pod IP) and nowhere else.
#[tokio::test]
async fn metrics_addr_serves_where_it_is_told() {
    let port = free_port();
    let at: std::net::SocketAddr = ([127, 0, 0, 3], port).into();
    let relay = start_relay(|c| c.metrics_addr = Some(at.to_string())).await;
    let (status, text) = get(at, "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(text.contains("derp_build_info"));
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "not on 127.0.0.1 as well"
    );
    // Both forms at once is a mistake the loader names.
    let both = derp_relay::Config {
        metrics_port: 9,
        metrics_addr: Some(at.to_string()),
        ..test_config()
    };
    let e = both.metrics_listen().unwrap_err().0;
    assert!(
        e.contains("metrics_addr") && e.contains("metrics_port"),
        "{e}"
    );
    drop(relay);
}

/// The ACL reload gauge drops to 0 when an edit does not parse (the
/// timestamp stays at the last good read) and returns to 1 with a good one.
#[tokio::test]
async fn acl_reload_gauges_follow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("allowed-keys.txt");
    let (a, b) = (NodeKeyPair::random(), NodeKeyPair::random());
    write_keys(&keys, &[&a]);
    let relay = start_relay(|c| {
        c.open_relay = false;
        c.allowed_keys_file = Some(keys.clone());
    })
    .await;
    let m = relay.relay().metrics();
    assert_eq!(m.acl_last_reload_success.get(), 1);
    let good_at = m.acl_last_reload_success_timestamp.get();
    assert!(good_at > 0);
    let failed = m.acl_reloads.with_label_values(&["failed"]);
    std::fs::write(keys.with_extension("tmp"), "not a key\n").unwrap();
    std::fs::rename(keys.with_extension("tmp"), &keys).unwrap();
    eventually("the bad edit is rejected", || failed.get() == 1).await;
    assert_eq!(m.acl_last_reload_success.get(), 0);
    assert_eq!(m.acl_last_reload_success_timestamp.get(), good_at);
    write_keys(&keys, &[&a, &b]);
    eventually("the good edit is read", || m.acl_keys.get() == 2).await;
    assert_eq!(m.acl_last_reload_success.get(), 1);
    assert!(m.acl_last_reload_success_timestamp.get() >= good_at);
}

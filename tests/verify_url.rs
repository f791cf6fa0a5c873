//! `--verify-client-url` against a real HTTP server this test runs: the
//! request is derper's shape, each answer (allow, deny, slow, down,
//! malformed) has its outcome and its counter, answers are cached, fail-open
//! admits when the service is unreachable, listed keys are never asked, and
//! a connected key the URL later refuses is disconnected.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use derp_relay::metrics::{CloseReason, RefuseReason, VerifyResult};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use ts_keys::NodeKeyPair;

#[derive(Clone, PartialEq, Eq)]
enum Mode {
    Allow,
    Deny,
    /// Never answers (the relay's timeout must fire).
    Hang,
    /// 200 with a body that is not `{"Allow":bool}`.
    Malformed,
    /// Never answers about this `nodekey:` key; allows every other one.
    HangFor(&'static str),
}

/// An admission service: answers by `mode`, records every request body.
struct VerifyServer {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl VerifyServer {
    async fn start(mode: Mode) -> VerifyServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(mode));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (m, r) = (mode.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (m, r) = (m.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (m, r) = (m.clone(), r.clone());
                            async move {
                                use http_body_util::BodyExt;
                                assert_eq!(req.method(), http::Method::POST);
                                assert_eq!(req.uri().path(), "/verify");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                r.lock().unwrap().push(req.clone());
                                let mode = m.lock().unwrap().clone();
                                let text = match mode {
                                    Mode::HangFor(k) if req["NodePublic"] == k => {
                                        std::future::pending().await
                                    }
                                    Mode::Allow | Mode::HangFor(_) => r#"{"Allow":true}"#,
                                    Mode::Deny => r#"{"Allow":false}"#,
                                    Mode::Malformed => "ok",
                                    Mode::Hang => std::future::pending().await,
                                };
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    text.to_string(),
                                ))
                            }
                        },
                    );
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        VerifyServer {
            addr,
            mode,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/verify", self.addr)
    }

    fn set(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    fn asked(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Drop for VerifyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_asking(url: String, tweak: impl FnOnce(&mut derp_relay::Config)) -> TestRelay {
    start_relay(|c| {
        c.open_relay = false;
        c.verify_client_url = Some(url);
        c.verify_client_timeout = Duration::from_millis(300);
        tweak(c);
    })
    .await
}

fn checks(r: &TestRelay, v: VerifyResult) -> u64 {
    r.relay().metrics().verify(v).get()
}

/// A ts_derp client from `src` (so a test can come back from one address).
async fn client_from(
    addr: SocketAddr,
    src: IpAddr,
    kp: &NodeKeyPair,
) -> Result<ts_derp::Client<BoxIo>, String> {
    let io: BoxIo = Box::new(
        derp_upgrade_from(addr, src)
            .await
            .map_err(|e| e.to_string())?,
    );
    match tokio::time::timeout(WAIT, ts_derp::Client::handshake(io, kp)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

#[tokio::test]
async fn allow_admits_and_the_request_is_derpers_shape() {
    let svc = VerifyServer::start(Mode::Allow).await;
    let r = relay_asking(svc.url(), |_| {}).await;
    let kp = NodeKeyPair::random();
    let src = next_source_ip();
    let _c = client_from(r.addr, src, &kp).await.expect("admitted");
    let req = svc.requests.lock().unwrap()[0].clone();
    assert_eq!(
        req,
        serde_json::json!({"NodePublic": public(&kp).to_nodekey_hex(), "Source": src.to_string()})
    );
    assert_eq!(checks(&r, VerifyResult::Allow), 1);
    assert_eq!(r.relay().metrics().connections_accepted.get(), 1);
}

#[tokio::test]
async fn deny_refuses() {
    let svc = VerifyServer::start(Mode::Deny).await;
    let r = relay_asking(svc.url(), |_| {}).await;
    let kp = NodeKeyPair::random();
    assert!(try_ts_client(r.addr, Via::Derp, &kp).await.is_err());
    assert_eq!(refused(r.relay(), RefuseReason::VerifyDenied), 1);
    assert_eq!(checks(&r, VerifyResult::Deny), 1);
    assert_eq!(r.relay().shared.clients.len(), 0);
}

#[tokio::test]
async fn slow_down_and_malformed_fail_closed() {
    // Slow: the service never answers; the 300 ms timeout decides.
    let svc = VerifyServer::start(Mode::Hang).await;
    let r = relay_asking(svc.url(), |_| {}).await;
    assert!(
        try_ts_client(r.addr, Via::Ws, &NodeKeyPair::random())
            .await
            .is_err()
    );
    assert_eq!(checks(&r, VerifyResult::Timeout), 1);
    assert_eq!(refused(r.relay(), RefuseReason::VerifyUnavailable), 1);

    // Malformed: 200 but not {"Allow":bool}.
    svc.set(Mode::Malformed);
    assert!(
        try_ts_client(r.addr, Via::Derp, &NodeKeyPair::random())
            .await
            .is_err()
    );
    assert_eq!(checks(&r, VerifyResult::Error), 1);
    assert_eq!(refused(r.relay(), RefuseReason::VerifyUnavailable), 2);

    // Down: nothing listens on the port (connection refused).
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let r2 = relay_asking(format!("http://{down}/verify"), |_| {}).await;
    assert!(
        try_ts_client(r2.addr, Via::Derp, &NodeKeyPair::random())
            .await
            .is_err()
    );
    assert_eq!(checks(&r2, VerifyResult::Error), 1);
    assert_eq!(refused(r2.relay(), RefuseReason::VerifyUnavailable), 1);
}

#[tokio::test]
async fn fail_open_admits_when_the_service_is_down() {
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let r = relay_asking(format!("http://{down}/verify"), |c| {
        c.verify_client_url_fail_open = true;
    })
    .await;
    let _c = try_ts_client(r.addr, Via::Derp, &NodeKeyPair::random())
        .await
        .expect("admitted without an answer");
    assert_eq!(checks(&r, VerifyResult::Error), 1);
    assert_eq!(r.relay().metrics().verify_fail_open.get(), 1);
    // A definite deny still refuses under fail-open.
    let svc = VerifyServer::start(Mode::Deny).await;
    let r2 = relay_asking(svc.url(), |c| c.verify_client_url_fail_open = true).await;
    assert!(
        try_ts_client(r2.addr, Via::Derp, &NodeKeyPair::random())
            .await
            .is_err()
    );
    assert_eq!(refused(r2.relay(), RefuseReason::VerifyDenied), 1);
}

#[tokio::test]
async fn answers_are_cached_per_key_and_address() {
    let svc = VerifyServer::start(Mode::Allow).await;
    let r = relay_asking(svc.url(), |c| {
        c.verify_client_cache_ttl = Duration::from_secs(600);
        c.metrics_token = Some("t".into());
    })
    .await;
    let kp = NodeKeyPair::random();
    let src = next_source_ip();
    let first = client_from(r.addr, src, &kp).await.expect("admitted");
    drop(first);
    let _again = client_from(r.addr, src, &kp).await.expect("admitted again");
    assert_eq!(
        svc.asked(),
        1,
        "the second connect was answered from the cache"
    );
    assert_eq!(checks(&r, VerifyResult::CachedAllow), 1);
    // Another address is another question.
    let _other = client_from(r.addr, next_source_ip(), &kp)
        .await
        .expect("admitted");
    assert_eq!(svc.asked(), 2);
    let detail = http_exchange(
        r.addr,
        next_source_ip(),
        "GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        detail.contains(r#""verify_client":{"cached_answers":2,"fail_open":false}"#),
        "{detail}"
    );
    assert!(!detail.contains("/verify"), "the URL is not shown");

    // With the cache off every connect asks.
    let r0 = relay_asking(svc.url(), |c| c.verify_client_cache_size = 0).await;
    let src = next_source_ip();
    drop(client_from(r0.addr, src, &kp).await.expect("admitted"));
    let _c = client_from(r0.addr, src, &kp).await.expect("admitted");
    assert_eq!(svc.asked(), 4);
    assert_eq!(checks(&r0, VerifyResult::CachedAllow), 0);
}

#[tokio::test]
async fn listed_keys_are_never_asked() {
    let svc = VerifyServer::start(Mode::Deny).await;
    let listed = NodeKeyPair::random();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("allowed-keys.txt");
    write_keys(&keys, &[&listed]);
    let r = relay_asking(svc.url(), |c| c.allowed_keys_file = Some(keys.clone())).await;
    let _c = try_ts_client(r.addr, Via::Derp, &listed)
        .await
        .expect("a listed key passes without asking");
    assert_eq!(svc.asked(), 0);
    assert!(
        try_ts_client(r.addr, Via::Derp, &NodeKeyPair::random())
            .await
            .is_err()
    );
    assert_eq!(svc.asked(), 1, "an unlisted key is asked about");
    assert_eq!(refused(r.relay(), RefuseReason::VerifyDenied), 1);
}

#[tokio::test]
async fn a_connected_key_the_url_later_refuses_is_evicted() {
    let svc = VerifyServer::start(Mode::Allow).await;
    let r = relay_asking(svc.url(), |c| {
        c.verify_client_cache_ttl = Duration::from_millis(50);
        c.verify_client_recheck = Duration::from_millis(100);
    })
    .await;
    let kp = NodeKeyPair::random();
    let c = try_ts_client(r.addr, Via::Derp, &kp)
        .await
        .expect("admitted");
    // While the URL still allows, re-checks keep it.
    eventually("a re-check", || svc.asked() >= 2).await;
    assert_eq!(r.relay().shared.clients.len(), 1);
    svc.set(Mode::Deny);
    let m = r.relay().metrics();
    eventually("the refused key is evicted", || {
        m.disconnects
            .with_label_values(&[CloseReason::VerifyDenied.as_str()])
            .get()
            == 1
    })
    .await;
    eventually("the registry forgets it", || {
        r.relay().shared.clients.is_empty()
    })
    .await;
    let gone = tokio::time::timeout(WAIT, c.recv_one())
        .await
        .expect("closed in time");
    assert!(gone.is_err(), "the client saw its connection end");
}

/// Each question waits in its own connection's task: while the service sits
/// on one key's question, another key is asked and admitted.
#[tokio::test]
async fn a_slow_answer_delays_only_its_own_handshake() {
    let slow = NodeKeyPair::random();
    let slow_key: &'static str = Box::leak(public(&slow).to_nodekey_hex().into_boxed_str());
    let svc = VerifyServer::start(Mode::HangFor(slow_key)).await;
    let r = relay_asking(svc.url(), |c| c.verify_client_timeout = WAIT * 2).await;
    let addr = r.addr;
    let waiting = tokio::spawn(async move { try_ts_client(addr, Via::Derp, &slow).await.is_ok() });
    eventually("the slow key is being asked", || svc.asked() == 1).await;
    let _fast = try_ts_client(r.addr, Via::Derp, &NodeKeyPair::random())
        .await
        .expect("admitted while the other question is pending");
    assert!(
        !waiting.is_finished(),
        "the slow handshake is still waiting"
    );
    assert_eq!(checks(&r, VerifyResult::Allow), 1);
    waiting.abort();
}

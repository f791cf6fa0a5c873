//! The PROXY protocol from a TCP balancer: the address in the header is the
//! client for bindings, the rate limit and the pending limit; only the named
//! balancers may send it and they must; a slow header is cut at the header
//! timeout. The "balancer" here is the test, connecting from 127.77.0.x,
//! which the relay is told to trust; everyone else connects from other
//! 127.x addresses.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use derp_relay::metrics::RefuseReason;
use derp_relay::protocol::proxy_header::V2_SIGNATURE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ts_http_util::Client as _;
use ts_keys::NodeKeyPair;

const TRUSTED: &str = "127.77.0.0/16";

fn balancer(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 77, 0, n))
}

async fn pp_relay(tweak: impl FnOnce(&mut derp_relay::Config)) -> TestRelay {
    start_relay(|c| {
        c.proxy_protocol = vec![TRUSTED.into()];
        c.rate_limit = 0;
        tweak(c);
    })
    .await
}

fn v1(client: SocketAddr, relay: SocketAddr) -> Vec<u8> {
    let proto = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    let dst = if client.is_ipv4() {
        relay.ip().to_string()
    } else {
        "::1".into()
    };
    format!(
        "PROXY {proto} {} {dst} {} {}\r\n",
        client.ip(),
        client.port(),
        relay.port()
    )
    .into_bytes()
}

fn v2(client: SocketAddr) -> Vec<u8> {
    let mut body = Vec::new();
    let fam = match client.ip() {
        IpAddr::V4(a) => {
            body.extend_from_slice(&a.octets());
            body.extend_from_slice(&[127, 0, 0, 1]);
            0x11
        }
        IpAddr::V6(a) => {
            body.extend_from_slice(&a.octets());
            body.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
            0x21
        }
    };
    body.extend_from_slice(&client.port().to_be_bytes());
    body.extend_from_slice(&443u16.to_be_bytes());
    // A TLV as AWS NLB sends (type 0xEA, VPC endpoint id): skipped.
    body.extend_from_slice(&[0xea, 0, 4, b'v', b'p', b'c', b'e']);
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, fam]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

/// A connection from balancer `n` that has already sent `header`.
async fn via_balancer(n: u8, relay: SocketAddr, header: &[u8]) -> TcpStream {
    let mut s = tcp_from(balancer(n), relay).await.expect("connect");
    s.write_all(header).await.expect("header");
    s
}

/// `ts_derp` upgrade and handshake over a stream the balancer opened.
async fn ts_over(s: TcpStream, relay: SocketAddr, kp: &NodeKeyPair) -> ts_derp::Client<BoxIo> {
    let url = url::Url::parse(&format!("http://{relay}/derp")).unwrap();
    let http = ts_http_util::http1::connect::<ts_http_util::EmptyBody>(s)
        .await
        .expect("http1");
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

async fn bound_address(relay: &TestRelay, kp: &NodeKeyPair) -> Option<IpAddr> {
    let key = public(kp);
    let shared = relay.relay().shared.clone();
    eventually("binding recorded", || {
        shared.bindings.lock().unwrap().get(&key).is_some()
    })
    .await;
    shared
        .bindings
        .lock()
        .unwrap()
        .get(&key)
        .and_then(|b| b.last_addr.parse().ok())
}

async fn response(mut s: TcpStream, request: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("answer or close in time");
    String::from_utf8_lossy(&out).into_owned()
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn v1_client_address_reaches_the_bindings() {
    let relay = pp_relay(|_| {}).await;
    for (n, client) in [(1, "203.0.113.9:40000"), (2, "[2001:db8::9]:40001")] {
        let client: SocketAddr = client.parse().unwrap();
        let kp = NodeKeyPair::random();
        let s = via_balancer(n, relay.addr, &v1(client, relay.addr)).await;
        let _c = ts_over(s, relay.addr, &kp).await;
        assert_eq!(bound_address(&relay, &kp).await, Some(client.ip()));
    }
    // Header and request in one segment: the bytes after the header are kept.
    let mut both = v1("198.51.100.1:1".parse().unwrap(), relay.addr);
    both.extend_from_slice(HEALTHZ.as_bytes());
    let r = response(via_balancer(3, relay.addr, &both).await, "").await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");
}

#[tokio::test]
async fn v2_ipv4_and_ipv6_with_tlvs_reach_the_bindings() {
    let relay = pp_relay(|_| {}).await;
    for (n, client) in [(1, "192.0.2.44:5555"), (2, "[2001:db8:1::44]:5556")] {
        let client: SocketAddr = client.parse().unwrap();
        let kp = NodeKeyPair::random();
        let s = via_balancer(n, relay.addr, &v2(client)).await;
        let _c = ts_over(s, relay.addr, &kp).await;
        assert_eq!(bound_address(&relay, &kp).await, Some(client.ip()));
    }
    // LOCAL (the balancer's own health check): served as the balancer.
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    local.extend_from_slice(HEALTHZ.as_bytes());
    let r = response(via_balancer(3, relay.addr, &local).await, "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn header_comes_before_tls() {
    let relay = pp_relay(|c| c.tls_self_signed = Some("localhost".into())).await;
    let client: SocketAddr = "192.0.2.77:7".parse().unwrap();
    let s = via_balancer(1, relay.addr, &v2(client)).await;
    let tls = tokio_rustls::TlsConnector::from(derp_relay::client::insecure_tls_config().unwrap())
        .connect(
            tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            s,
        )
        .await
        .expect("TLS after the PROXY header");
    let url = url::Url::parse(&format!("https://localhost:{}/derp", relay.addr.port())).unwrap();
    let http = ts_http_util::http1::connect::<ts_http_util::EmptyBody>(tls)
        .await
        .unwrap();
    let resp = http
        .send(ts_http_util::make_upgrade_req(&url, "DERP", None).unwrap())
        .await
        .unwrap();
    let io: BoxIo = Box::new(ts_http_util::do_upgrade(resp).await.unwrap());
    let kp = NodeKeyPair::random();
    let _c = ts_derp::Client::handshake(io, &kp).await.unwrap();
    assert_eq!(bound_address(&relay, &kp).await, Some(client.ip()));
}

async fn closed_without_answer(s: TcpStream, then_send: &str) {
    let r = response(s, then_send).await;
    assert!(r.is_empty(), "refused without an HTTP answer, got {r:?}");
}

#[tokio::test]
async fn a_trusted_balancer_must_send_the_header() {
    let relay = pp_relay(|_| {}).await;
    let before = refused(relay.relay(), RefuseReason::ProxyProtocol);
    let s = tcp_from(balancer(1), relay.addr).await.unwrap();
    closed_without_answer(s, HEALTHZ).await;
    // Too long for v1 is refused too, before the line ends.
    let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
    closed_without_answer(via_balancer(2, relay.addr, long.as_bytes()).await, "").await;
    assert_eq!(
        refused(relay.relay(), RefuseReason::ProxyProtocol),
        before + 2
    );
}

#[tokio::test]
async fn a_forged_header_from_anyone_else_is_refused() {
    let relay = pp_relay(|_| {}).await;
    let stranger = next_source_ip();
    for header in [
        v1("10.1.2.3:4".parse().unwrap(), relay.addr),
        v2("10.1.2.3:4".parse().unwrap()),
    ] {
        let mut s = tcp_from(stranger, relay.addr).await.unwrap();
        s.write_all(&header).await.unwrap();
        closed_without_answer(s, HEALTHZ).await;
    }
    assert_eq!(refused(relay.relay(), RefuseReason::ProxyProtocol), 2);
    // The same stranger without a header is an ordinary direct client (a
    // POST starts like PROXY: one more byte tells them apart).
    let kp = NodeKeyPair::random();
    let _c = ts_client(relay.addr, Via::Derp, &kp).await;
    let got = bound_address(&relay, &kp).await.unwrap();
    assert!(got.to_string().starts_with("127.") && !got.to_string().starts_with("127.77."));
    let r = http_exchange(relay.addr, stranger, HEALTHZ).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn a_slow_header_is_cut_at_the_header_timeout() {
    let relay = pp_relay(|c| c.header_timeout = Duration::from_millis(300)).await;
    let mut s = via_balancer(1, relay.addr, b"PROXY TCP4 192.0.2.1").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("cut before the test's own limit");
    assert!(matches!(n, Ok(0) | Err(_)), "closed, not answered");
    eventually("slow header counted", || {
        refused(relay.relay(), RefuseReason::ProxyProtocol) == 1
    })
    .await;
}

#[tokio::test]
async fn rate_limit_counts_the_client_not_the_balancer() {
    let relay = pp_relay(|c| {
        c.rate_limit = 1;
        c.rate_burst = 1;
    })
    .await;
    let (x, y): (SocketAddr, SocketAddr) = (
        "192.0.2.10:1".parse().unwrap(),
        "192.0.2.11:1".parse().unwrap(),
    );
    let req = |c: SocketAddr| {
        let mut b = v1(c, relay.addr);
        b.extend_from_slice(HEALTHZ.as_bytes());
        b
    };
    // X's burst of one is spent; Y, through the same balancer, is not limited.
    let r = response(via_balancer(1, relay.addr, &req(x)).await, "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = response(via_balancer(1, relay.addr, &req(x)).await, "").await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    let r = response(via_balancer(1, relay.addr, &req(y)).await, "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn pending_limit_counts_the_client_not_the_balancer() {
    let relay = pp_relay(|c| c.max_pending_per_ip = 1).await;
    let (x, y): (SocketAddr, SocketAddr) = (
        "192.0.2.20:1".parse().unwrap(),
        "192.0.2.21:1".parse().unwrap(),
    );
    // An idle connection for X holds X's only slot, not the balancer's...
    let _idle = via_balancer(1, relay.addr, &v1(x, relay.addr)).await;
    let with_request = |c: SocketAddr| {
        let mut b = v1(c, relay.addr);
        b.extend_from_slice(HEALTHZ.as_bytes());
        b
    };
    // ...so once the relay has read its header, X's next connection is
    // refused (until then each one is served and gives its slot back).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "X refused in time");
        let r = response(via_balancer(2, relay.addr, &with_request(x)).await, "").await;
        if r.starts_with("HTTP/1.1 429") {
            break;
        }
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert_eq!(refused(relay.relay(), RefuseReason::PendingLimit), 1);
    // Y, through the same balancer, still gets in.
    let r = response(via_balancer(3, relay.addr, &with_request(y)).await, "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

//! The STUN responder on real UDP sockets, as Tailscale's netcheck meets it:
//! which datagrams get an answer, what the answer's bytes are, and what the
//! operator sees (counters, `probe --stun`, `--stun=false`).
//!
//! Responses are decoded here by hand from RFC 5389, not with the relay's own
//! codec, so a bug shared by encoder and decoder cannot hide.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use derp_relay::metrics::StunResult;
use tokio::net::UdpSocket;

/// How long "no answer" is waited for. Loopback answers take well under a
/// millisecond; every such wait is followed by proof the socket still answers.
const SILENCE: Duration = Duration::from_millis(300);
const COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// Tailscale's Binding Request (`stun.Request`), built by hand: the CRC is
/// checked against the PROTOCOL.md test vector below.
fn tailscale_request(tx: [u8; 12]) -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x14];
    b.extend_from_slice(&COOKIE);
    b.extend_from_slice(&tx);
    b.extend_from_slice(&[0x80, 0x22, 0x00, 0x08]);
    b.extend_from_slice(b"tailnode");
    let fp = crc32_bitwise(&b) ^ 0x5354_554E;
    b.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
    b.extend_from_slice(&fp.to_be_bytes());
    b
}

/// CRC-32/IEEE bit by bit: slow and obviously right, unlike the relay's table.
fn crc32_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The response RFC 5389 says we must get for `tx` seen from `from`.
fn expected_response(tx: [u8; 12], from: SocketAddr) -> Vec<u8> {
    let mut key = COOKIE.to_vec();
    key.extend_from_slice(&tx);
    let (family, ip): (u8, Vec<u8>) = match from.ip() {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (1, v4.octets().to_vec()),
            None => (2, v6.octets().to_vec()),
        },
    };
    let value_len = 4 + ip.len();
    let mut b = vec![0x01, 0x01, 0x00, (4 + value_len) as u8];
    b.extend_from_slice(&COOKIE);
    b.extend_from_slice(&tx);
    b.extend_from_slice(&[0x00, 0x20, 0x00, value_len as u8, 0x00, family]);
    b.extend_from_slice(&(from.port() ^ 0x2112).to_be_bytes());
    b.extend(ip.iter().zip(&key).map(|(a, k)| a ^ k));
    b
}

fn tx(n: u8) -> [u8; 12] {
    std::array::from_fn(|i| n.wrapping_mul(31).wrapping_add(i as u8))
}

async fn recv(sock: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 1500];
    match tokio::time::timeout(within, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        Ok(Err(e)) => panic!("recv: {e}"),
        Err(_) => None,
    }
}

/// Sends one good request and checks the exact answer.
async fn assert_answers(sock: &UdpSocket, server: SocketAddr, id: u8) {
    sock.send_to(&tailscale_request(tx(id)), server)
        .await
        .unwrap();
    let (resp, from) = recv(sock, WAIT).await.expect("an answer");
    assert_eq!(from, server, "answered from the STUN socket");
    assert_eq!(
        resp,
        expected_response(tx(id), sock.local_addr().unwrap()),
        "exact Binding Success bytes"
    );
}

fn stun_count(relay: &TestRelay, r: StunResult) -> u64 {
    relay.relay().metrics().stun.get(r).get()
}

#[test]
fn the_hand_built_request_is_the_protocol_test_vector() {
    let want = "00 01 00 14 21 12 A4 42 00 01 02 03 04 05 06 07 08 09 0A 0B 80 22 00 08 \
                74 61 69 6C 6E 6F 64 65 80 28 00 04 8A AB AD 90";
    let want: Vec<u8> = want
        .split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let txid = std::array::from_fn(|i| i as u8);
    assert_eq!(tailscale_request(txid), want);
    let resp = expected_response(txid, "192.0.2.1:54321".parse().unwrap());
    assert_eq!(
        hex::encode(resp),
        "0101000c2112a442000102030405060708090a0b002000080001f523e112a643"
    );
}

#[tokio::test]
async fn answers_ipv4_with_the_exact_mapped_address() {
    let relay = start_relay(|_| {}).await;
    let server = relay.relay().stun_addr().expect("STUN on");
    assert!(server.ip().is_loopback() && server.port() != 0);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for id in 0..3 {
        assert_answers(&sock, server, id).await;
    }
    // A second client sees its own address, not the first one's.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_answers(&other, server, 9).await;
    eventually("answers counted", || {
        stun_count(&relay, StunResult::Ok) == 4
    })
    .await;
    assert_eq!(stun_count(&relay, StunResult::Invalid), 0);
}

#[tokio::test]
async fn answers_ipv6_and_unmaps_ipv4_on_a_dual_stack_socket() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let relay = start_relay(|c| c.stun_addr = "[::1]:0".into()).await;
    let server = relay.relay().stun_addr().unwrap();
    assert_eq!(server.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    let sock = UdpSocket::bind("[::1]:0").await.unwrap();
    // Family 02, the address XORed with cookie and transaction id.
    assert_answers(&sock, server, 1).await;

    // `[::]` takes IPv4 too (bindv6only=0); those clients get family 01.
    let dual = start_relay(|c| c.stun_addr = "[::]:0".into()).await;
    let port = dual.relay().stun_addr().unwrap().port();
    let v4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    v4.send_to(&tailscale_request(tx(3)), ("127.0.0.1", port))
        .await
        .unwrap();
    match recv(&v4, SILENCE * 3).await {
        Some((resp, _)) => {
            assert_eq!(resp, expected_response(tx(3), v4.local_addr().unwrap()));
            assert_eq!(resp[25], 0x01, "family IPv4, not ::ffff:a.b.c.d");
        }
        None => eprintln!("skipped dual-stack part: [::] does not take IPv4 here"),
    }
}

#[tokio::test]
async fn ignores_everything_but_tailscale_binding_requests() {
    let relay = start_relay(|_| {}).await;
    let server = relay.relay().stun_addr().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let good = tailscale_request(tx(7));

    let mut bad: Vec<Vec<u8>> = Vec::new();
    bad.push(Vec::new()); // empty datagram
    bad.push(b"GET / HTTP/1.1\r\n\r\n".to_vec());
    for n in [1, 19, 20, 24, 32, 39] {
        bad.push(good[..n].to_vec()); // truncated
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 8]);
    bad.push(longer); // length field says less than arrived
    let mut b = good.clone();
    b[4] ^= 0xFF;
    bad.push(b); // no magic cookie (a classic RFC 3489 request)
    let mut b = good.clone();
    b[1] = 0x11;
    bad.push(b); // Binding Indication
    let mut b = good.clone();
    b[39] ^= 1;
    bad.push(b); // wrong FINGERPRINT
    let mut b = good.clone();
    b[24..32].copy_from_slice(b"notnode!");
    bad.push(b); // other SOFTWARE (its fingerprint no longer matches either)
    // A plain RFC 5389 Binding Request with no attributes, as `stunclient` sends.
    let mut plain = vec![0x00, 0x01, 0x00, 0x00];
    plain.extend_from_slice(&COOKIE);
    plain.extend_from_slice(&tx(8));
    bad.push(plain);
    // Our own response sent back at us.
    bad.push(expected_response(tx(9), sock.local_addr().unwrap()));
    bad.push(vec![0xFF; 1400]);

    for b in &bad {
        sock.send_to(b, server).await.unwrap();
    }
    // Loopback keeps order: if anything bad were answered, it would come first.
    sock.send_to(&good, server).await.unwrap();
    let (first, _) = recv(&sock, WAIT)
        .await
        .expect("the good request is answered");
    assert_eq!(first, expected_response(tx(7), sock.local_addr().unwrap()));
    assert!(
        recv(&sock, SILENCE).await.is_none(),
        "nothing but the good request got an answer"
    );
    eventually("every datagram counted", || {
        stun_count(&relay, StunResult::Invalid) == bad.len() as u64
            && stun_count(&relay, StunResult::Ok) == 1
    })
    .await;
    // And it keeps answering afterwards.
    assert_answers(&sock, server, 10).await;
}

#[tokio::test]
async fn every_result_series_exists_before_any_datagram() {
    let relay = start_relay(|_| {}).await;
    let families = relay.relay().metrics().registry.gather();
    let fam = families
        .iter()
        .find(|f| f.name() == "derp_stun_requests_total")
        .expect("family registered");
    let mut results: Vec<String> = fam
        .get_metric()
        .iter()
        .map(|m| {
            assert_eq!(m.get_counter().get_value(), 0.0);
            m.get_label()[0].value().to_owned()
        })
        .collect();
    results.sort();
    assert_eq!(results, ["invalid", "ok", "recv_error", "send_error"]);
}

#[tokio::test]
async fn stun_false_binds_nothing() {
    // Hold a port and point stun_addr at it: a relay that tried to bind would fail.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let a = addr.clone();
    let relay = start_relay(move |c| {
        c.stun = false;
        c.stun_addr = a;
    })
    .await;
    assert_eq!(relay.relay().stun_addr(), None);

    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.data_dir = dir.path().to_path_buf();
    config.stun_addr = addr.clone();
    let err = derp_relay::Relay::start(config)
        .await
        .err()
        .expect("a taken STUN port stops the start");
    assert!(
        err.starts_with("stun_addr:") && err.contains(&addr),
        "{err}"
    );
}

#[tokio::test]
async fn stops_answering_when_the_relay_shuts_down() {
    let mut relay = start_relay(|_| {}).await;
    let server = relay.relay().stun_addr().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_answers(&sock, server, 1).await;
    relay.shutdown().await;
    // The socket is closed, so its port is free again.
    let rebound = std::net::UdpSocket::bind(server);
    assert!(rebound.is_ok(), "STUN port still held after shutdown");
}

// ------------------------------------------------------------ probe --stun

fn probe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_derp-relay"))
        .arg("probe")
        .args(args)
        .output()
        .expect("run derp-relay probe")
}

#[tokio::test]
async fn probe_stun_prints_the_mapped_address_and_round_trip() {
    let relay = start_relay(|_| {}).await;
    let server = relay.relay().stun_addr().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        probe(&["--stun", &server, "--count", "2", "--timeout", "10s"])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("mapped address 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("STUN round trip: min "), "{stdout}");
    assert!(stdout.lines().last() == Some("ok"), "{stdout}");
    assert_eq!(stun_count(&relay, StunResult::Ok), 2);
}

#[test]
fn probe_stun_times_out_with_one_line() {
    // A socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = silent.local_addr().unwrap().to_string();
    let t0 = Instant::now();
    let out = probe(&["--stun", &target, "--timeout", "500ms"]);
    assert!(t0.elapsed() < WAIT, "the timeout bounds the probe");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("derp-relay probe: STUN: timed out after 500ms"),
        "{stderr}"
    );
    let mut buf = [0u8; 64];
    silent.set_nonblocking(true).unwrap();
    let (n, _) = silent
        .recv_from(&mut buf)
        .expect("the probe sent a request");
    assert_eq!(n, 40, "Tailscale's 40-byte request");
}

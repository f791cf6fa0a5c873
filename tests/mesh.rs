//! Regional mesh, end to end: several real relays in this process, each on
//! its own 127.200.x.y address (same port), linked by a static list or by a
//! stand-in DNS resolver; Tailscale's `ts_derp` clients on different nodes;
//! a cuttable TCP proxy for partitions; raw frame clients for what a derper
//! peer would send and expect.

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use derp_relay::Relay;
use derp_relay::actors::mesh::{Resolver, Resolving};
use derp_relay::config::Config;
use derp_relay::metrics::{DropReason, MeshPeerState, RefuseReason};
use derp_relay::protocol::frame::{self, ServerFrame};
use derp_relay::protocol::handshake::mesh_client_info_json;
use derp_relay::protocol::{PeerGoneReason, PublicKey};
use tokio::net::TcpListener;
use ts_keys::NodeKeyPair;

const KEY: [u8; 32] = [0x5a; 32];
const PORT: u16 = 3340;

/// A fresh /24 of loopback addresses per test, so relays of different tests
/// never share an address and all may use [`PORT`].
fn subnet() -> u8 {
    static N: AtomicU32 = AtomicU32::new(1);
    N.fetch_add(1, Ordering::Relaxed) as u8
}

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 200, net, host))
}

fn addr(net: u8, host: u8) -> SocketAddr {
    SocketAddr::new(ip(net, host), PORT)
}

/// The stand-in for DNS: answers whatever the test last set.
#[derive(Default, Clone)]
struct TestDns(Arc<Mutex<Vec<IpAddr>>>);

impl TestDns {
    fn set(&self, ips: &[IpAddr]) {
        *self.0.lock().unwrap() = ips.to_vec();
    }
}

impl Resolver for TestDns {
    fn resolve(&self, _name: &str, _port: u16) -> Resolving {
        let ips = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(ips) })
    }
}

struct Node {
    relay: Option<Relay>,
    addr: SocketAddr,
    config: Config,
    _dir: tempfile::TempDir,
}

impl Node {
    fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("running")
    }

    fn knows(&self, k: &PublicKey) -> bool {
        self.relay().shared.clients.remote.is_known(k)
    }

    fn connected_links(&self) -> usize {
        self.relay()
            .shared
            .clients
            .remote
            .links()
            .iter()
            .filter(|l| l.state() == MeshPeerState::Connected)
            .count()
    }

    async fn kill(&mut self) {
        self.relay.take().expect("running").shutdown().await;
    }

    async fn restart(&mut self, dns: &TestDns) {
        let r = Relay::start_with(self.config.clone(), Arc::new(dns.clone()))
            .await
            .expect("relay restarts");
        self.relay = Some(r);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.shared.draining.store(true, Ordering::SeqCst);
            tokio::spawn(async move {
                r.shutdown().await;
            });
        }
    }
}

fn node_config(at: SocketAddr, dir: &std::path::Path) -> Config {
    Config {
        addr: at.to_string(),
        stun: false,
        open_relay: true,
        data_dir: dir.to_path_buf(),
        mesh_key: Some(hex::encode(KEY)),
        mesh_backoff_max: Duration::from_millis(300),
        mesh_dns_interval: Duration::from_millis(100),
        shutdown_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

async fn start_node(at: SocketAddr, dns: &TestDns, tweak: impl FnOnce(&mut Config)) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = node_config(at, dir.path());
    tweak(&mut config);
    let relay = Relay::start_with(config.clone(), Arc::new(dns.clone()))
        .await
        .expect("relay starts");
    Node {
        addr: relay.local_addr(),
        relay: Some(relay),
        config,
        _dir: dir,
    }
}

/// `n` nodes, each listing all of them (itself included) in `--mesh-with`.
async fn static_mesh(net: u8, n: u8) -> Vec<Node> {
    let list: Vec<String> = (1..=n).map(|h| addr(net, h).to_string()).collect();
    let list = list.join(",");
    let mut nodes = Vec::new();
    for h in 1..=n {
        let list = list.clone();
        nodes.push(start_node(addr(net, h), &TestDns::default(), |c| c.mesh_with = list).await);
    }
    for node in &nodes {
        eventually("every link up", || {
            node.connected_links() == (n - 1) as usize
                && node.relay().metrics().mesh.watchers.get() == (n - 1) as i64
        })
        .await;
    }
    nodes
}

fn pk(kp: &NodeKeyPair) -> PublicKey {
    public(kp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_mesh_delivers_across_nodes_both_ways_once() {
    let net = subnet();
    let nodes = static_mesh(net, 3).await;
    // Each node listed itself: that link finds its own key and stops (a
    // node may dial itself before its listener is up, then retry).
    for n in &nodes {
        let myself = || {
            n.relay()
                .shared
                .clients
                .remote
                .links()
                .iter()
                .filter(|l| l.state() == MeshPeerState::Myself)
                .count()
        };
        eventually("the self link recognised", || myself() == 1).await;
    }
    for via in BOTH {
        let (ka, kb, kc) = (
            NodeKeyPair::random(),
            NodeKeyPair::random(),
            NodeKeyPair::random(),
        );
        let a = ts_client(nodes[0].addr, via, &ka).await;
        let b = ts_client(nodes[1].addr, via, &kb).await;
        let c = ts_client(nodes[2].addr, via, &kc).await;
        for n in &nodes {
            eventually("keys known region-wide", || {
                [&ka, &kb, &kc]
                    .iter()
                    .all(|k| n.relay().shared.clients.is_connected(&pk(k)) || n.knows(&pk(k)))
            })
            .await;
        }
        let out0 = nodes[0].relay().metrics().mesh.packets_out.get();
        let in1 = nodes[1].relay().metrics().mesh.packets_in.get();
        let in2 = nodes[2].relay().metrics().mesh.packets_in.get();
        // a → b: 20 packets of varied sizes, then b → a and c → a.
        let sent: Vec<Vec<u8>> = (0..20u32)
            .map(|i| (0..(i * 997 % 4000 + 1)).map(|j| (i + j) as u8).collect())
            .collect();
        for p in &sent {
            a.send_one(kb.public, p).await.expect("send");
        }
        for p in &sent {
            assert_eq!(
                recv_ts(&b).await,
                (pk(&ka), p.clone()),
                "{via:?}: byte-exact, in order"
            );
        }
        b.send_one(ka.public, b"back from b").await.expect("send");
        assert_eq!(recv_ts(&a).await, (pk(&kb), b"back from b".to_vec()));
        c.send_one(ka.public, b"from c").await.expect("send");
        assert_eq!(recv_ts(&a).await, (pk(&kc), b"from c".to_vec()));
        // One hop, once: node 0 sent exactly the 20, node 1 delivered exactly
        // those, node 2 (which also knows b's key) saw none of them.
        let m0 = nodes[0].relay().metrics();
        eventually("counters settle", || m0.mesh.packets_out.get() - out0 == 20).await;
        assert_eq!(nodes[1].relay().metrics().mesh.packets_in.get() - in1, 20);
        assert_eq!(
            nodes[2].relay().metrics().mesh.packets_in.get() - in2,
            0,
            "node 2 knows b too, yet saw nothing: no packet goes two hops"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_mesh_follows_discovery_moves_keys_and_survives_a_node_restart() {
    let net = subnet();
    let dns = TestDns::default();
    let name = format!("mesh.test:{PORT}");
    dns.set(&[ip(net, 1), ip(net, 2)]);
    let mut nodes = Vec::new();
    for h in 1..=3 {
        let name = name.clone();
        nodes.push(start_node(addr(net, h), &dns, |c| c.mesh_dns = Some(name)).await);
    }
    // Node 3 is not in DNS yet: nobody links to it, it links to 1 and 2.
    eventually("1 and 2 linked", || {
        nodes[0].connected_links() == 1 && nodes[1].connected_links() == 1
    })
    .await;
    dns.set(&[ip(net, 1), ip(net, 2), ip(net, 3)]);
    for n in &nodes {
        eventually("full mesh after DNS change", || n.connected_links() == 2).await;
    }

    // k on node 3 sends to r on node 1; r learns a return route.
    let (kk, kr, ks) = (
        NodeKeyPair::random(),
        NodeKeyPair::random(),
        NodeKeyPair::random(),
    );
    let r = ts_client(nodes[0].addr, Via::Derp, &kr).await;
    let k = ts_client(nodes[2].addr, Via::Ws, &kk).await;
    eventually("k known on 1", || nodes[0].knows(&pk(&kk))).await;
    eventually("r known on 3", || nodes[2].knows(&pk(&kr))).await;
    k.send_one(kr.public, b"hello r").await.expect("send");
    assert_eq!(recv_ts(&r).await, (pk(&kk), b"hello r".to_vec()));

    // A sender leaving the region is reported to the receiver on another node.
    let mut raw_r = RawClient::connect(nodes[0].addr, Via::Derp).await;
    let mut k2 = RawClient::connect(nodes[2].addr, Via::Derp).await;
    eventually("raw r known on 3", || nodes[2].knows(&raw_r.key())).await;
    k2.send_packet(&raw_r.key(), b"to raw r").await;
    match raw_r.recv_skip_keepalive().await {
        Some(ServerFrame::RecvPacket { src, packet }) => {
            assert_eq!((src, &packet[..]), (k2.key(), &b"to raw r"[..]))
        }
        other => panic!("expected the packet, got {other:?}"),
    }
    let k2_key = k2.key();
    drop(k2);
    match raw_r.recv_skip_keepalive().await {
        Some(ServerFrame::PeerGone { key, reason }) => {
            assert_eq!(key, k2_key);
            assert_eq!(reason, Some(PeerGoneReason::Disconnected as u8));
        }
        other => panic!("expected PeerGone, got {other:?}"),
    }
    // Killing node 3 takes its clients out of the region: receivers are told.
    let mut k3 = RawClient::connect(nodes[2].addr, Via::Ws).await;
    k3.send_packet(&raw_r.key(), b"before the crash").await;
    assert!(matches!(
        raw_r.recv_skip_keepalive().await,
        Some(ServerFrame::RecvPacket { .. })
    ));
    nodes[2].kill().await;
    match raw_r.recv_skip_keepalive().await {
        Some(ServerFrame::PeerGone { key, .. }) => assert_eq!(key, k3.key()),
        other => panic!("expected PeerGone for the dead node's client, got {other:?}"),
    }
    eventually("node 3's keys withdrawn", || {
        !nodes[0].knows(&pk(&kk)) && !nodes[1].knows(&pk(&kk))
    })
    .await;
    drop(k);

    // A key moving from node 3 (dead) to node 2 is reachable again.
    let moved = ts_client(nodes[1].addr, Via::Ws, &kk).await;
    let s = ts_client(nodes[0].addr, Via::Derp, &ks).await;
    eventually("moved key known on 1", || nodes[0].knows(&pk(&kk))).await;
    s.send_one(kk.public, b"found you").await.expect("send");
    assert_eq!(recv_ts(&moved).await, (pk(&ks), b"found you".to_vec()));

    // Restarting node 3 (same address, same key) restores routing through it.
    nodes[2].restart(&dns).await;
    for n in &nodes {
        eventually("full mesh again", || n.connected_links() == 2).await;
    }
    let back = NodeKeyPair::random();
    let bc = ts_client(nodes[2].addr, Via::Derp, &back).await;
    eventually("node 3's new client known on 1", || {
        nodes[0].knows(&pk(&back))
    })
    .await;
    s.send_one(back.public, b"welcome back")
        .await
        .expect("send");
    assert_eq!(recv_ts(&bc).await, (pk(&ks), b"welcome back".to_vec()));
    drop(r);
}

/// A raw client presenting `json` as its ClientInfo; None if refused.
async fn raw_with_info(at: SocketAddr, via: Via, json: &[u8]) -> Option<RawClient> {
    let mut c = RawClient::start(at, via).await;
    let sealed = c.secret.seal_client_info(&c.server, json);
    let mut out = BytesMut::new();
    frame::encode_client_info(&mut out, &sealed);
    c.send_raw(&out).await.ok()?;
    match c.recv().await {
        Some(ServerFrame::ServerInfo(_)) => Some(c),
        None => None,
        other => panic!("expected ServerInfo or a close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_and_mesh_frames_from_clients_are_refused_and_counted() {
    let net = subnet();
    let node = start_node(addr(net, 1), &TestDns::default(), |_| {}).await;
    let m = node.relay().metrics();
    let wrong = mesh_client_info_json(&[0x11; 32]);
    for via in BOTH {
        let before = refused(node.relay(), RefuseReason::MeshKey);
        assert!(
            raw_with_info(node.addr, via, &wrong).await.is_none(),
            "wrong mesh key refused"
        );
        assert_eq!(refused(node.relay(), RefuseReason::MeshKey), before + 1);
    }
    let mut watch = BytesMut::new();
    frame::encode_watch_conns(&mut watch);
    let mut fwd = BytesMut::new();
    frame::encode_forward_packet(&mut fwd, &PublicKey([1; 32]), &PublicKey([2; 32]), b"x");
    let mut close = BytesMut::new();
    frame::encode_close_peer(&mut close, &PublicKey([3; 32]));
    let counted = || {
        m.disconnects
            .with_label_values(&["mesh_frame_from_client"])
            .get()
    };
    for bytes in [&watch, &fwd, &close] {
        for via in BOTH {
            let before = counted();
            let mut c = RawClient::connect(node.addr, via).await;
            c.send_raw(bytes).await.expect("send");
            assert!(c.closed().await, "{via:?}: closed for a mesh frame");
            eventually("counted", || counted() == before + 1).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derper_style_watcher_gets_flood_updates_and_can_close_peers() {
    let net = subnet();
    let node = start_node(addr(net, 1), &TestDns::default(), |_| {}).await;
    let kp = NodeKeyPair::random();
    let early = ts_client(node.addr, Via::Derp, &kp).await;
    let mut w = raw_with_info(node.addr, Via::Derp, &mesh_client_info_json(&KEY))
        .await
        .expect("mesh peer admitted");
    let mut out = BytesMut::new();
    frame::encode_watch_conns(&mut out);
    w.send_raw(&out).await.expect("send");
    let present = |f: Option<ServerFrame>| match f {
        Some(ServerFrame::PeerPresent { key, addr, flags }) => (key, addr, flags),
        other => panic!("expected PeerPresent, got {other:?}"),
    };
    let (key, at, flags) = present(w.recv_skip_keepalive().await);
    assert_eq!(key, pk(&kp), "flood names the client connected before");
    assert_eq!(flags, frame::PEER_PRESENT_IS_REGULAR);
    assert!(
        at.is_some_and(|a| a.ip().to_string().starts_with("127.")),
        "{at:?}"
    );
    let late = NodeKeyPair::random();
    let late_c = ts_client(node.addr, Via::Ws, &late).await;
    assert_eq!(present(w.recv_skip_keepalive().await).0, pk(&late));
    drop(late_c);
    match w.recv_skip_keepalive().await {
        Some(ServerFrame::PeerGone { key, reason }) => {
            assert_eq!((key, reason), (pk(&late), Some(0)));
        }
        other => panic!("expected PeerGone, got {other:?}"),
    }
    // ForwardPacket is delivered to the local client with the original source.
    let src = PublicKey([7; 32]);
    let mut out = BytesMut::new();
    frame::encode_forward_packet(&mut out, &src, &pk(&kp), b"forwarded");
    w.send_raw(&out).await.expect("send");
    assert_eq!(recv_ts(&early).await, (src, b"forwarded".to_vec()));
    // ... and one for a key not here is dropped, never sent anywhere else.
    let before = dropped(node.relay(), DropReason::UnknownDestOnFwd);
    let mut out = BytesMut::new();
    frame::encode_forward_packet(&mut out, &src, &PublicKey([8; 32]), b"nobody");
    w.send_raw(&out).await.expect("send");
    eventually("dropped", || {
        dropped(node.relay(), DropReason::UnknownDestOnFwd) == before + 1
    })
    .await;
    // ClosePeer closes that client.
    let mut out = BytesMut::new();
    frame::encode_close_peer(&mut out, &pk(&kp));
    w.send_raw(&out).await.expect("send");
    eventually("closed by ClosePeer", || {
        !node.relay().shared.clients.is_connected(&pk(&kp))
    })
    .await;
    let m = node.relay().metrics();
    assert_eq!(m.disconnects.with_label_values(&["close_peer"]).get(), 1);
}

#[test]
fn mesh_frames_match_protocol_md_section_8() {
    let k = |b: u8| PublicKey([b; 32]);
    let mut b = BytesMut::new();
    frame::encode_watch_conns(&mut b);
    assert_eq!(&b[..], &[0x10, 0, 0, 0, 0], "WatchConns: type 0x10, empty");

    let mut b = BytesMut::new();
    frame::encode_peer_present(
        &mut b,
        &k(0xab),
        Some("1.2.3.4:41641".parse().unwrap()),
        0x01,
    );
    let mut want = vec![0x09, 0, 0, 0, 51];
    want.extend([0xab; 32]);
    want.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4]);
    want.extend(41641u16.to_be_bytes());
    want.push(0x01);
    assert_eq!(
        &b[..],
        &want[..],
        "PeerPresent: key, v4-mapped IPv6, port, flags = 51 bytes"
    );

    let mut b = BytesMut::new();
    frame::encode_forward_packet(&mut b, &k(1), &k(2), b"pkt");
    let mut want = vec![0x0a, 0, 0, 0, 67];
    want.extend([1; 32]);
    want.extend([2; 32]);
    want.extend(b"pkt");
    assert_eq!(&b[..], &want[..], "ForwardPacket: src, dst, packet");

    let mut b = BytesMut::new();
    frame::encode_close_peer(&mut b, &k(3));
    let mut want = vec![0x11, 0, 0, 0, 32];
    want.extend([3; 32]);
    assert_eq!(&b[..], &want[..], "ClosePeer: key");

    // The link's ClientInfo is the Go client's, so derper reads the mesh key.
    let json = String::from_utf8(mesh_client_info_json(&[0xcd; 32])).unwrap();
    assert_eq!(
        json,
        format!(
            "{{\"meshKey\":\"{}\",\"version\":2,\"CanAckPings\":false}}",
            "cd".repeat(32)
        )
    );

    // Readers accept 32-, 50- and 51-byte PeerPresent (older servers).
    for len in [32usize, 50, 51] {
        let mut p = vec![0x09, 0, 0, 0, len as u8];
        p.extend([9; 32]);
        p.extend(std::iter::repeat_n(0u8, len - 32));
        let mut buf = BytesMut::from(&p[..]);
        let f = frame::decode_frame(&mut buf, frame::server_frame_limit)
            .unwrap()
            .unwrap();
        match ServerFrame::parse(f).unwrap() {
            ServerFrame::PeerPresent { key, addr, .. } => {
                assert_eq!(key, k(9));
                assert_eq!(addr.is_some(), len >= 50);
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A TCP proxy that can be cut (every connection through it closed, new
/// ones refused) and healed.
struct Proxy {
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(listen: SocketAddr, to: SocketAddr, from: IpAddr) -> Proxy {
        let l = TcpListener::bind(listen).await.expect("proxy binds");
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c2, conns2) = (cut.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    return;
                };
                if c2.load(Ordering::SeqCst) {
                    continue; // dropped: the dialler sees a closed connection
                }
                let t = tokio::spawn(async move {
                    if let Ok(mut out) = tcp_from(from, to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                conns2.lock().unwrap().push(t);
            }
        });
        Proxy { cut, conns, task }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_two_nodes_heals() {
    let net = subnet();
    let (a1, a2) = (addr(net, 1), addr(net, 2));
    // Each node dials the other through its own proxy.
    let (p1, p2) = (addr(net, 11), addr(net, 12));
    let dns = TestDns::default();
    let n1 = start_node(a1, &dns, |c| c.mesh_with = format!("{a2}/{}", p1.ip())).await;
    let n2 = start_node(a2, &dns, |c| c.mesh_with = format!("{a1}/{}", p2.ip())).await;
    let x1 = Proxy::start(p1, a2, a1.ip()).await;
    let x2 = Proxy::start(p2, a1, a2.ip()).await;
    for n in [&n1, &n2] {
        eventually("linked through the proxies", || n.connected_links() == 1).await;
    }
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_client(n1.addr, Via::Derp, &ka).await;
    let b = ts_client(n2.addr, Via::Ws, &kb).await;
    eventually("b known on 1", || n1.knows(&pk(&kb))).await;
    a.send_one(kb.public, b"before").await.expect("send");
    assert_eq!(recv_ts(&b).await, (pk(&ka), b"before".to_vec()));

    x1.cut();
    x2.cut();
    eventually("keys withdrawn on both sides", || {
        !n1.knows(&pk(&kb)) && !n2.knows(&pk(&ka))
    })
    .await;
    let unknown = dropped(n1.relay(), DropReason::UnknownDest);
    a.send_one(kb.public, b"lost").await.expect("send");
    eventually("dropped while cut", || {
        dropped(n1.relay(), DropReason::UnknownDest) > unknown
    })
    .await;

    x1.heal();
    x2.heal();
    eventually("b known on 1 again", || {
        n1.knows(&pk(&kb)) && n2.knows(&pk(&ka))
    })
    .await;
    a.send_one(kb.public, b"after").await.expect("send");
    assert_eq!(recv_ts(&b).await, (pk(&ka), b"after".to_vec()));
    assert!(n1.relay().metrics().mesh.reconnects.get() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_5000_keys_reaches_a_new_watcher() {
    const KEYS: usize = 5000;
    let net = subnet();
    let (a1, a2) = (addr(net, 1), addr(net, 2));
    let dns = TestDns::default();
    let n1 = start_node(a1, &dns, |c| c.mesh_with = a2.to_string()).await;
    // 5 000 real clients on node 1, handshaken 100 at a time (more at once
    // overruns the 10 s handshake deadline in a debug build on 2 cores).
    let mut clients = Vec::with_capacity(KEYS);
    let mut keys = HashSet::new();
    for _ in 0..KEYS / 100 {
        let batch: Vec<_> = (0..100)
            .map(|_| tokio::spawn(async move { RawClient::connect(a1, Via::Derp).await }))
            .collect();
        for t in batch {
            let c = t.await.expect("client");
            keys.insert(c.key());
            clients.push(c);
        }
    }
    eventually("all registered", || {
        n1.relay().shared.clients.keys() == KEYS
    })
    .await;
    // A node joining now learns every key from the flood.
    let n2 = start_node(a2, &dns, |c| c.mesh_with = a1.to_string()).await;
    eventually("flood applied", || {
        n2.relay().shared.clients.remote.len() >= KEYS
    })
    .await;
    assert!(keys.iter().all(|k| n2.knows(k)));
    // Node 1's own link key is announced too (as a mesh peer).
    assert!(n2.relay().metrics().mesh.remote_keys.get() >= KEYS as i64);
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_peers_are_exempt_from_the_client_bandwidth_limit() {
    let net = subnet();
    // 100 kB/s: the half megabyte below would take over 4 s if paced.
    let node = start_node(addr(net, 1), &TestDns::default(), |c| {
        c.client_bytes_per_sec = 100_000;
    })
    .await;
    let mut rx = RawClient::connect(node.addr, Via::Derp).await;
    let mut w = raw_with_info(node.addr, Via::Derp, &mesh_client_info_json(&KEY))
        .await
        .expect("mesh peer admitted");
    let src = PublicKey([7; 32]);
    let dst = rx.key();
    let sender = tokio::spawn(async move {
        for i in 0..32u8 {
            let mut out = BytesMut::new();
            frame::encode_forward_packet(&mut out, &src, &dst, &[i; 16_000]);
            w.send_raw(&out).await.expect("send");
        }
        w
    });
    for i in 0..32u8 {
        match rx.recv_skip_keepalive().await {
            Some(ServerFrame::RecvPacket { src: s, packet }) => {
                assert_eq!(s, src);
                assert!(packet.iter().all(|&b| b == i), "packet {i}");
            }
            other => panic!("packet {i}: expected RecvPacket, got {other:?}"),
        }
    }
    let _w = sender.await.expect("sender");
    assert_eq!(
        node.relay().metrics().client_rate_paced_reads.get(),
        0,
        "a mesh peer's reads were paced"
    );
}

/// `--mesh-tls`: links dial `https://` and the nodes serve only TLS (here
/// self-signed, so the links skip verification as `--mesh-tls-insecure`
/// says); Tailscale's own client on each node, over TLS, reaches the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_links_over_tls_carry_packets_between_tls_only_nodes() {
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
    let net = subnet();
    let (a_at, b_at) = (addr(net, 1), addr(net, 2));
    let list = format!("{a_at},{b_at}");
    let mut nodes = Vec::new();
    for at in [a_at, b_at] {
        let list = list.clone();
        nodes.push(
            start_node(at, &TestDns::default(), |c| {
                c.mesh_with = list;
                c.mesh_tls = true;
                c.mesh_tls_insecure = true;
                c.tls_self_signed = Some(at.ip().to_string());
                c.rate_limit = 0;
            })
            .await,
        );
    }
    for n in &nodes {
        eventually("the TLS link is up", || n.connected_links() == 1).await;
    }
    let server = |at: SocketAddr| ts_derp::ServerConnInfo {
        hostname: at.ip().to_string(),
        ipv4: ts_derp::IpUsage::FixedAddr(match at.ip() {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => unreachable!("test nodes are on IPv4 loopback"),
        }),
        ipv6: ts_derp::IpUsage::Disable,
        tls_validation_config: ts_derp::TlsValidationConfig::InsecureForTests,
        https_port: at.port(),
        stun_port: None,
        stun_only: false,
        supports_port_80: false,
    };
    let connect = |at: SocketAddr, kp: NodeKeyPair| async move {
        tokio::time::timeout(WAIT, ts_derp::Client::connect([&server(at)], &kp))
            .await
            .expect("connect in time")
            .expect("ts_derp connects over TLS")
    };
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = connect(a_at, ka.clone()).await;
    let b = connect(b_at, kb.clone()).await;
    eventually("each node knows the other's client", || {
        nodes[0].knows(&pk(&kb)) && nodes[1].knows(&pk(&ka))
    })
    .await;
    for (from, to, kto, msg) in [
        (&a, &b, &kb, &b"a to b over TLS links"[..]),
        (&b, &a, &ka, &b"b to a over TLS links"[..]),
    ] {
        from.send_one(kto.public, msg).await.expect("send");
        let (_, data) = tokio::time::timeout(WAIT, to.recv_one())
            .await
            .expect("delivered in time")
            .expect("a packet");
        assert_eq!(data.as_ref(), msg);
    }
    // The link counts a batch once its write returned, which may be after
    // the packet already reached the other side.
    eventually("each node counted its forwarded packet", || {
        nodes[0].relay().metrics().mesh.packets_out.get() >= 1
            && nodes[1].relay().metrics().mesh.packets_out.get() >= 1
    })
    .await;
    assert_eq!(nodes[0].relay().metrics().mesh.packets_out.get(), 1);
    assert_eq!(nodes[1].relay().metrics().mesh.packets_out.get(), 1);
}

/// A peer listed by host name (`--mesh-with localhost:PORT`): what the name
/// resolves to is where that peer's own link comes from, so it is treated as
/// a peer address (exempt from per-address limits) like a listed IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_listed_by_host_name_is_known_by_its_resolved_address() {
    let net = subnet();
    let a_at = addr(net, 1);
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let b = start_node(loopback, &TestDns::default(), |c| {
        c.mesh_with = a_at.to_string()
    })
    .await;
    let b_port = b.addr.port();
    let a = start_node(a_at, &TestDns::default(), |c| {
        c.mesh_with = format!("localhost:{b_port}");
    })
    .await;
    let local: IpAddr = "127.0.0.1".parse().expect("ip");
    assert!(!b.relay().shared.clients.remote.is_peer_ip(&local));
    eventually("A knows B by the address localhost resolves to", || {
        a.relay().shared.clients.remote.is_peer_ip(&local)
    })
    .await;
    eventually("both links up", || {
        a.connected_links() == 1 && b.connected_links() == 1
    })
    .await;
}

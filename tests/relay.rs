//! The relay's wire behaviour, as clients see it. Each test starts a real
//! relay on 127.0.0.1:0 and talks to it over real sockets.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use common::*;
use derp_relay::metrics::{DropReason, RefuseReason};
use derp_relay::protocol::PublicKey;
use derp_relay::protocol::frame::{self, FrameType, ServerFrame};
use ts_keys::NodeKeyPair;

#[tokio::test]
async fn ts_derp_handshakes_over_both_transports() {
    let relay = start_relay(|_| {}).await;
    for via in BOTH {
        let kp = NodeKeyPair::random();
        let _c = ts_client(relay.addr, via, &kp).await;
        eventually("registration", || {
            relay.relay().shared.clients.is_connected(&public(&kp))
        })
        .await;
    }
    assert_eq!(relay.relay().metrics().connections_accepted.get(), 2);
}

#[tokio::test]
async fn packets_cross_both_ways_exactly_at_every_size() {
    let relay = start_relay(|_| {}).await;
    for (va, vb) in [
        (Via::Derp, Via::Ws),
        (Via::Ws, Via::Derp),
        (Via::Derp, Via::Derp),
        (Via::Ws, Via::Ws),
    ] {
        let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
        let a = ts_client(relay.addr, va, &ka).await;
        let b = ts_client(relay.addr, vb, &kb).await;
        // ts_derp caps a whole frame payload (key included) at 64 KiB, so its
        // largest packet is 32 bytes short of the protocol's maximum.
        for size in [1usize, 1280, frame::MAX_PACKET_SIZE - 32] {
            let msg: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
            a.send_one(kb.public, &msg).await.unwrap();
            assert_eq!(
                recv_ts(&b).await,
                (public(&ka), msg.clone()),
                "{va:?}->{vb:?} size {size}"
            );
            b.send_one(ka.public, &msg).await.unwrap();
            assert_eq!(
                recv_ts(&a).await,
                (public(&kb), msg),
                "{vb:?}->{va:?} size {size}"
            );
        }
    }
}

#[tokio::test]
async fn protocol_maximum_packet_is_relayed_and_one_more_byte_is_refused() {
    let relay = start_relay(|_| {}).await;
    for via in BOTH {
        let mut a = RawClient::connect(relay.addr, via).await;
        let mut b = RawClient::connect(relay.addr, via).await;
        let max: Vec<u8> = (0..frame::MAX_PACKET_SIZE).map(|i| i as u8).collect();
        a.send_packet(&b.key(), &max).await;
        match b.recv_skip_keepalive().await {
            Some(ServerFrame::RecvPacket { src, packet }) => {
                assert_eq!(src, a.key());
                assert_eq!(&packet[..], &max[..], "{via:?}");
            }
            other => panic!("expected RecvPacket, got {other:?}"),
        }
        let mut over = BytesMut::new();
        frame::encode_send_packet(&mut over, &b.key(), &vec![0u8; frame::MAX_PACKET_SIZE + 1]);
        // The relay may close mid-write, so the send itself may fail.
        let _ = a.send_raw(&over).await;
        assert!(
            a.closed().await,
            "oversized packet closes the sender ({via:?})"
        );
    }
    assert_eq!(dropped(relay.relay(), DropReason::TooLarge), 2);
}

#[tokio::test]
async fn ten_thousand_packets_arrive_in_order() {
    // Deep queue so the only thing under test is ordering, not drop policy.
    let relay = start_relay(|c| c.queue_depth = 20_000).await;
    for (va, vb) in [(Via::Derp, Via::Ws), (Via::Ws, Via::Derp)] {
        let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
        let a = ts_client(relay.addr, va, &ka).await;
        let b = ts_client(relay.addr, vb, &kb).await;
        let sender = tokio::spawn(async move {
            for i in 0u32..10_000 {
                a.send_one(kb.public, &i.to_be_bytes()).await.unwrap();
            }
            a
        });
        for want in 0u32..10_000 {
            let (_, p) = recv_ts(&b).await;
            assert_eq!(p, want.to_be_bytes(), "{va:?}->{vb:?}");
        }
        sender.await.unwrap();
    }
    assert_eq!(dropped(relay.relay(), DropReason::QueueHead), 0);
}

#[tokio::test]
async fn packet_to_absent_key_is_dropped_and_sender_keeps_working() {
    let relay = start_relay(|_| {}).await;
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_client(relay.addr, Via::Derp, &ka).await;
    let b = ts_client(relay.addr, Via::Ws, &kb).await;
    let nobody = NodeKeyPair::random();
    a.send_one(nobody.public, b"into the void").await.unwrap();
    a.send_one(kb.public, b"still here").await.unwrap();
    assert_eq!(recv_ts(&b).await.1, b"still here");
    assert_eq!(dropped(relay.relay(), DropReason::UnknownDest), 1);
}

#[tokio::test]
async fn disco_packet_to_absent_key_gets_peer_gone_not_here() {
    let relay = start_relay(|_| {}).await;
    let mut a = RawClient::connect(relay.addr, Via::Derp).await;
    let absent = PublicKey([9; 32]);
    let mut disco = frame::DISCO_MAGIC.to_vec();
    disco.resize(80, 1);
    a.send_packet(&absent, &disco).await;
    assert_eq!(
        a.recv_skip_keepalive().await,
        Some(ServerFrame::PeerGone {
            key: absent,
            reason: Some(1)
        })
    );
}

#[tokio::test]
async fn ping_gets_pong_with_same_payload() {
    let relay = start_relay(|_| {}).await;
    for via in BOTH {
        let mut c = RawClient::connect(relay.addr, via).await;
        let mut out = BytesMut::new();
        frame::encode_ping(&mut out, *b"derp!ok?");
        c.send_raw(&out).await.unwrap();
        assert_eq!(
            c.recv_skip_keepalive().await,
            Some(ServerFrame::Pong(*b"derp!ok?")),
            "{via:?}"
        );
    }
    // Tailscale's client sees the Pong too (it reports it as a frame it does not handle).
    let kp = NodeKeyPair::random();
    let c = ts_client(relay.addr, Via::Derp, &kp).await;
    c.send_frame(&ts_derp::frame::Ping { payload: [1; 8] })
        .await
        .unwrap();
    let err = tokio::time::timeout(WAIT, c.recv_one())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            ts_derp::Error::UnexpectedRecvFrameType(ts_derp::frame::FrameType::Pong)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn garbage_instead_of_client_info_closes_only_that_connection() {
    let relay = start_relay(|_| {}).await;
    let kp = NodeKeyPair::random();
    let good = ts_client(relay.addr, Via::Derp, &kp).await;
    for via in BOTH {
        let mut c = RawClient::start(relay.addr, via).await;
        c.send_raw(b"GET / HTTP/1.1\r\nHost: nonsense\r\n\r\n")
            .await
            .unwrap();
        assert!(c.closed().await, "{via:?}");
    }
    assert_eq!(refused(relay.relay(), RefuseReason::BadHandshake), 2);
    // The relay and its other client are unaffected.
    let other = NodeKeyPair::random();
    let o = ts_client(relay.addr, Via::Ws, &other).await;
    o.send_one(kp.public, b"fine").await.unwrap();
    assert_eq!(recv_ts(&good).await.1, b"fine");
}

#[tokio::test]
async fn forged_client_info_is_refused() {
    let relay = start_relay(|_| {}).await;
    for via in BOTH {
        let mut c = RawClient::start(relay.addr, via).await;
        let victim = NodeKeyPair::random();
        let mut sealed = c.secret.seal_client_info(&c.server, br#"{"version":2}"#);
        // Claim someone else's key while the box was sealed with ours.
        sealed[..32].copy_from_slice(public(&victim).as_bytes());
        let mut out = BytesMut::new();
        frame::encode_client_info(&mut out, &sealed);
        c.send_raw(&out).await.unwrap();
        assert!(c.closed().await, "no ServerInfo for a forged box ({via:?})");
        assert!(!relay.relay().shared.clients.is_connected(&public(&victim)));
    }
    assert_eq!(refused(relay.relay(), RefuseReason::BadHandshake), 2);
}

#[tokio::test]
async fn oversized_and_server_only_frames_close_only_that_connection() {
    let relay = start_relay(|_| {}).await;
    let kp = NodeKeyPair::random();
    let good = ts_client(relay.addr, Via::Ws, &kp).await;
    let cases: Vec<Vec<u8>> = vec![
        // SendPacket one byte over the limit: only the header is sent.
        {
            let mut b = BytesMut::new();
            frame::put_header(
                &mut b,
                FrameType::SendPacket,
                32 + frame::MAX_PACKET_SIZE + 1,
            );
            b.to_vec()
        },
        // A server-only frame type from a client.
        {
            let mut b = BytesMut::new();
            frame::encode_keepalive(&mut b);
            b.to_vec()
        },
        // A mesh-only frame from a non-mesh client.
        {
            let mut b = BytesMut::new();
            frame::put_header(&mut b, FrameType::WatchConns, 0);
            b.to_vec()
        },
    ];
    for via in BOTH {
        for bytes in &cases {
            let mut c = RawClient::connect(relay.addr, via).await;
            c.send_raw(bytes).await.unwrap();
            assert!(c.closed().await, "{via:?} {:?}", &bytes[..1]);
        }
    }
    let other = NodeKeyPair::random();
    let o = ts_client(relay.addr, Via::Derp, &other).await;
    o.send_one(kp.public, b"unaffected").await.unwrap();
    assert_eq!(recv_ts(&good).await.1, b"unaffected");
}

#[tokio::test]
async fn unknown_frame_types_are_skipped() {
    let relay = start_relay(|_| {}).await;
    let mut a = RawClient::connect(relay.addr, Via::Derp).await;
    let mut b = RawClient::connect(relay.addr, Via::Ws).await;
    let mut out = BytesMut::from(&[0x7e, 0, 0, 0, 3, 1, 2, 3][..]);
    frame::encode_send_packet(&mut out, &b.key(), b"after unknown");
    a.send_raw(&out).await.unwrap();
    assert_eq!(
        b.recv_skip_keepalive().await,
        Some(ServerFrame::RecvPacket {
            src: a.key(),
            packet: bytes::Bytes::from_static(b"after unknown")
        })
    );
}

#[tokio::test]
async fn websocket_frames_split_and_merged_across_messages() {
    let relay = start_relay(|_| {}).await;
    let mut a = RawClient::connect(relay.addr, Via::Ws).await;
    let mut b = RawClient::connect(relay.addr, Via::Derp).await;
    let mut out = BytesMut::new();
    frame::encode_send_packet(&mut out, &b.key(), b"first, split in three");
    frame::encode_send_packet(&mut out, &b.key(), b"second, shares a message");
    frame::encode_send_packet(&mut out, &b.key(), b"third, same message");
    // Message 1: 3 bytes of header. Message 2: rest of frame 1 and part of
    // frame 2. Message 3: everything else.
    let cut1 = 3;
    let cut2 = 5 + 32 + 21 + 10;
    for part in [&out[..cut1], &out[cut1..cut2], &out[cut2..]] {
        a.send_raw(part).await.unwrap(); // each write is one WebSocket message
    }
    for want in [
        &b"first, split in three"[..],
        b"second, shares a message",
        b"third, same message",
    ] {
        match b.recv_skip_keepalive().await {
            Some(ServerFrame::RecvPacket { src, packet }) => {
                assert_eq!(src, a.key());
                assert_eq!(&packet[..], want);
            }
            other => panic!("expected RecvPacket, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn websocket_text_message_closes_the_connection() {
    use futures_util::SinkExt;
    use tokio::io::AsyncReadExt;
    let relay = start_relay(|_| {}).await;
    let mut ws = ws_connect(relay.addr).await.unwrap();
    let mut server_key = [0u8; 45];
    ws.read_exact(&mut server_key).await.unwrap();
    assert_eq!(server_key[0], FrameType::ServerKey as u8);
    ws.inner()
        .send(tokio_tungstenite::tungstenite::Message::Text(
            "hello".into(),
        ))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, ws.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(
        n.map_or(true, |n| n == 0),
        "nothing but a close after a text message"
    );
    assert_eq!(refused(relay.relay(), RefuseReason::BadHandshake), 1);
}

#[tokio::test]
async fn duplicate_key_newest_is_active_and_last_writer_wins() {
    let relay = start_relay(|_| {}).await;
    let dup = NodeKeyPair::random();
    let peer_kp = NodeKeyPair::random();
    let peer = ts_client(relay.addr, Via::Derp, &peer_kp).await;
    let old = ts_client(relay.addr, Via::Derp, &dup).await;
    let new = ts_client(relay.addr, Via::Ws, &dup).await;
    eventually("both registered", || {
        relay.relay().shared.clients.len() == 3
    })
    .await;
    assert_eq!(relay.relay().metrics().duplicate_keys.get(), 1);

    peer.send_one(dup.public, b"to newest").await.unwrap();
    assert_eq!(recv_ts(&new).await.1, b"to newest");

    // The older connection speaks: it becomes active again.
    old.send_one(peer_kp.public, b"old says hi").await.unwrap();
    assert_eq!(recv_ts(&peer).await.1, b"old says hi");
    eventually("old connection reactivated", || {
        relay
            .relay()
            .shared
            .clients
            .active(&public(&dup))
            .map(|h| h.transport)
            == Some(derp_relay::metrics::Transport::Derp)
    })
    .await;
    peer.send_one(dup.public, b"to last writer").await.unwrap();
    assert_eq!(recv_ts(&old).await.1, b"to last writer");

    // When the active one leaves, the other takes over; nobody is told the key is gone.
    drop(old);
    eventually("old deregistered", || {
        relay.relay().shared.clients.len() == 2
    })
    .await;
    peer.send_one(dup.public, b"to survivor").await.unwrap();
    assert_eq!(recv_ts(&new).await.1, b"to survivor");
}

#[tokio::test]
async fn peer_gone_tells_receivers_when_a_sender_leaves() {
    let relay = start_relay(|_| {}).await;
    for via in BOTH {
        let sender = NodeKeyPair::random();
        let mut rx = RawClient::connect(relay.addr, via).await;
        let a = ts_client(relay.addr, Via::Derp, &sender).await;
        a.send_one(ts_keys::NodePublicKey::from_bytes(rx.key().0), b"hello")
            .await
            .unwrap();
        assert!(matches!(
            rx.recv_skip_keepalive().await,
            Some(ServerFrame::RecvPacket { .. })
        ));
        drop(a);
        assert_eq!(
            rx.recv_skip_keepalive().await,
            Some(ServerFrame::PeerGone {
                key: public(&sender),
                reason: Some(0)
            }),
            "{via:?}"
        );
    }
}

#[tokio::test]
async fn keepalives_arrive_every_ping_interval() {
    let relay = start_relay(|c| c.ping_interval = std::time::Duration::from_millis(100)).await;
    for via in BOTH {
        let mut c = RawClient::connect(relay.addr, via).await;
        for _ in 0..2 {
            assert_eq!(c.recv().await, Some(ServerFrame::KeepAlive), "{via:?}");
        }
    }
}

#[tokio::test]
async fn five_hundred_clients_every_packet_accounted_for() {
    const N: usize = 500;
    const PER: usize = 20;
    let relay = start_relay(|_| {}).await;
    let keys: Vec<NodeKeyPair> = (0..N).map(|_| NodeKeyPair::random()).collect();
    let mut conns = Vec::new();
    for chunk in keys.chunks(50) {
        let futs = chunk.iter().enumerate().map(|(i, kp)| {
            let via = if i % 2 == 0 { Via::Derp } else { Via::Ws };
            ts_client(relay.addr, via, kp)
        });
        conns.extend(futures_util::future::join_all(futs).await);
    }
    let conns: Vec<Arc<_>> = conns.into_iter().map(Arc::new).collect();
    eventually("all registered", || relay.relay().shared.clients.len() == N).await;

    // Each client sends PER packets to pseudo-random peers (never itself).
    let mut expected: HashMap<usize, usize> = HashMap::new();
    let mut plan = Vec::new();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..N {
        for _ in 0..PER {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let j = (i + 1 + (x as usize % (N - 1))) % N;
            plan.push((i, j));
            *expected.entry(j).or_default() += 1;
        }
    }
    let receivers: Vec<_> = (0..N)
        .map(|j| {
            let c = conns[j].clone();
            let want = expected.get(&j).copied().unwrap_or(0);
            tokio::spawn(async move {
                let mut got = 0;
                while got < want {
                    match tokio::time::timeout(std::time::Duration::from_secs(3), c.recv_one())
                        .await
                    {
                        Ok(Ok(_)) => got += 1,
                        _ => break, // a drop: accounted for by the relay's counters
                    }
                }
                got
            })
        })
        .collect();
    let mut senders = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        let c = c.clone();
        let dsts: Vec<_> = plan
            .iter()
            .filter(|(s, _)| *s == i)
            .map(|(_, d)| keys[*d].public)
            .collect();
        senders.push(tokio::spawn(async move {
            for (n, d) in dsts.into_iter().enumerate() {
                c.send_one(d, format!("{i}:{n}").as_bytes()).await.unwrap();
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let mut received = 0;
    for r in receivers {
        received += r.await.unwrap();
    }
    let m = relay.relay().metrics();
    let drops: u64 = DropReason::ALL.iter().map(|r| m.dropped(*r).get()).sum();
    let sent = (N * PER) as u64;
    assert_eq!(
        m.packets_routed.get() + m.dropped(DropReason::UnknownDest).get(),
        sent
    );
    assert_eq!(
        received as u64 + drops,
        sent,
        "received {received} + dropped {drops} != sent {sent}"
    );
}

/// After the handshake, a WebSocket client that breaks the protocol is told
/// why with the close code upstream uses (RFC 6455 §7.4.1), and the close is
/// counted under its own reason.
#[tokio::test]
async fn websocket_violations_after_handshake_get_close_codes() {
    use futures_util::SinkExt;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;
    let relay = start_relay(|_| {}).await;
    let disconnects = |why: &str| {
        relay
            .relay()
            .metrics()
            .disconnects
            .with_label_values(&[why])
            .get()
    };

    // A text message: 1003 (unsupported data).
    let mut ws = ws_connect_handshaken(relay.addr).await;
    ws.inner()
        .send(Message::Text("hello".into()))
        .await
        .unwrap();
    assert_eq!(ws.close_code().await, Some(1003));
    eventually("text close counted", || disconnects("text_message") == 1).await;

    // A frame with a reserved bit set (FIN|RSV1|binary, masked, empty): 1002.
    let mut ws = ws_connect_handshaken(relay.addr).await;
    ws.inner()
        .get_mut()
        .write_all(&[0xc2, 0x80, 1, 2, 3, 4])
        .await
        .unwrap();
    assert_eq!(ws.close_code().await, Some(1002));
    eventually("framing close counted", || {
        disconnects("ws_protocol_error") == 1
    })
    .await;

    // A malformed DERP frame inside a well-formed binary message: 1002.
    let mut ws = ws_connect_handshaken(relay.addr).await;
    // SendPacket announcing 3 bytes: shorter than its 32-byte destination key.
    ws.write_all(&[FrameType::SendPacket as u8, 0, 0, 0, 3, 1, 2, 3])
        .await
        .unwrap();
    ws.flush().await.unwrap();
    assert_eq!(ws.close_code().await, Some(1002));
    eventually("bad frame counted", || disconnects("bad_frame") == 1).await;

    // The relay is unharmed: two fresh clients still exchange packets.
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_client(relay.addr, Via::Ws, &ka).await;
    let b = ts_client(relay.addr, Via::Derp, &kb).await;
    a.send_one(kb.public, b"still fine").await.unwrap();
    assert_eq!(recv_ts(&b).await.1, b"still fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_stops_reading_does_not_hold_its_senders_back() {
    // A long queue wait, so a wait per packet would be unmistakable (20 000
    // packets × 200 ms), and no write timeout within the test, so the stalled
    // receiver stays connected and its queue stays full throughout.
    let relay = start_relay(|c| {
        c.queue_wait = std::time::Duration::from_millis(200);
        c.write_timeout = std::time::Duration::from_secs(600);
    })
    .await;
    let stalled = RawClient::connect(relay.addr, Via::Derp).await;
    let stalled_key = stalled.key();
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = ts_client(relay.addr, Via::Derp, &ka).await;
    let b = ts_client(relay.addr, Via::Ws, &kb).await;
    const N: u32 = 20_000;
    let to_stalled = ts_keys::NodePublicKey::from_bytes(stalled_key.0);
    let sender = tokio::spawn(async move {
        // 24 MB for the stalled receiver: well over what loopback's socket
        // buffers hold, so its writer blocks and its queue fills.
        let filler = [0u8; 1200];
        for i in 0..N {
            a.send_one(to_stalled, &filler).await.unwrap();
            a.send_one(kb.public, &i.to_be_bytes()).await.unwrap();
        }
        a
    });
    let all = async {
        for want in 0..N {
            let (_, p) = recv_ts(&b).await;
            // Nothing lost for the receiver that reads: a full queue makes
            // the sender wait for its writer instead.
            assert_eq!(p, want.to_be_bytes());
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("the stalled receiver held the sender back");
    sender.await.unwrap();
    assert!(dropped(relay.relay(), DropReason::QueueHead) > 0);
    drop(stalled);
}

/// A WebSocket client written frame by frame (RFC 6455), to send what
/// libraries do not: fragments with pings between them, one message larger
/// than any DERP frame, a close in the middle of a stream.
struct HandWs {
    tcp: tokio::net::TcpStream,
    /// DERP bytes received in binary frames, not yet consumed.
    derp: BytesMut,
    pongs: Vec<Vec<u8>>,
    closed: Option<u16>,
}

impl HandWs {
    async fn connect(addr: std::net::SocketAddr) -> HandWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tcp_from(next_source_ip(), addr).await.unwrap();
        let req = format!(
            "GET /derp HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: derp\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        // Byte by byte up to the blank line, so no frame is read with it.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.unwrap());
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // RFC 6455 §1.3's sample key and answer.
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        HandWs {
            tcp,
            derp: BytesMut::new(),
            pongs: Vec::new(),
            closed: None,
        }
    }

    async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut f = Vec::new();
        ws_client_frame(&mut f, fin, opcode, [0x5a, 0x01, 0xc3, 0x7e], payload);
        self.tcp.write_all(&f).await.unwrap();
    }

    /// Reads one server frame; false at end of stream.
    async fn read_frame(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut h = [0u8; 2];
        if self.tcp.read_exact(&mut h).await.is_err() {
            return false;
        }
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => u64::from(self.tcp.read_u16().await.unwrap()),
            127 => self.tcp.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut p = vec![0u8; len as usize];
        self.tcp.read_exact(&mut p).await.unwrap();
        match h[0] & 0x0f {
            0x2 => self.derp.extend_from_slice(&p),
            0xa => self.pongs.push(p),
            0x9 => {}
            0x8 => self.closed = Some(u16::from_be_bytes([p[0], p[1]])),
            op => panic!("unexpected opcode {op}"),
        }
        true
    }

    async fn until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        tokio::time::timeout(WAIT, async {
            while !done(self) {
                assert!(self.read_frame().await, "stream ended waiting for {what}");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} in time"));
    }

    async fn derp_frame(&mut self) -> ServerFrame {
        let mut got = None;
        self.until("a DERP frame", |s| {
            got = frame::decode_frame(&mut s.derp, frame::server_frame_limit)
                .unwrap()
                .map(|f| ServerFrame::parse(f).unwrap());
            got.is_some()
        })
        .await;
        got.unwrap()
    }
}

#[tokio::test]
async fn websocket_pings_fragments_and_large_messages_after_the_handshake() {
    use derp_relay::protocol::handshake::ClientSecret;
    let relay = start_relay(|_| {}).await;
    let mut b = RawClient::connect(relay.addr, Via::Derp).await;
    let mut ws = HandWs::connect(relay.addr).await;
    let ServerFrame::ServerKey(server) = ws.derp_frame().await else {
        panic!("expected ServerKey");
    };
    let secret = ClientSecret::generate();
    let mut out = BytesMut::new();
    frame::encode_client_info(&mut out, &secret.seal_client_info(&server, b"{}"));
    ws.send(true, 0x2, &out).await;
    assert!(matches!(ws.derp_frame().await, ServerFrame::ServerInfo(_)));

    // A ping is answered with its payload.
    ws.send(true, 0x9, b"are you there").await;
    ws.until("a pong", |s| !s.pongs.is_empty()).await;
    assert_eq!(ws.pongs.remove(0), b"are you there");

    // Five largest packets in one message (more than the old 4-packet
    // message limit), cut into three fragments with a ping between them.
    let packets: Vec<Vec<u8>> = (0..5u8)
        .map(|i| (0..frame::MAX_PACKET_SIZE).map(|j| (j as u8) ^ i).collect())
        .collect();
    let mut msg = BytesMut::new();
    for p in &packets {
        frame::encode_send_packet(&mut msg, &b.key(), p);
    }
    let (c1, c2) = (7, msg.len() / 2);
    ws.send(false, 0x2, &msg[..c1]).await;
    ws.send(true, 0x9, b"mid-message").await;
    ws.send(false, 0x0, &msg[c1..c2]).await;
    ws.send(true, 0x0, &msg[c2..]).await;
    for want in &packets {
        match b.recv_skip_keepalive().await {
            Some(ServerFrame::RecvPacket { src, packet }) => {
                assert_eq!(src, secret.public());
                assert!(packet[..] == want[..], "payload differs");
            }
            other => panic!("expected RecvPacket, got {other:?}"),
        }
    }
    ws.until("the second pong", |s| !s.pongs.is_empty()).await;
    assert_eq!(ws.pongs.remove(0), b"mid-message");

    // Packets to this client arrive as binary frames.
    b.send_packet(&secret.public(), b"back the other way").await;
    match ws.derp_frame().await {
        ServerFrame::RecvPacket { packet, .. } => assert_eq!(&packet[..], b"back the other way"),
        other => panic!("expected RecvPacket, got {other:?}"),
    }

    // An oversized control frame is a protocol error: close code 1002.
    ws.send(true, 0x9, &[0u8; 126]).await;
    ws.until("a close frame", |s| s.closed.is_some()).await;
    assert_eq!(ws.closed, Some(1002));
}

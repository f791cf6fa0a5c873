//! Per-client bandwidth limits (`--client-bytes-per-sec`): a limited sender is
//! slowed by pacing its reads, loses nothing, and the limit can be changed
//! while clients are connected. Proven by byte counts, the pacing counters and
//! one lower bound on time (the relay cannot deliver faster than its limit, so
//! a loaded machine only makes that bound easier to meet); no upper bounds.

mod common;

use std::time::{Duration, Instant};

use common::{BOTH, RawClient, Via, start_relay};
use derp_relay::protocol::frame::ServerFrame;

const PACKET: usize = 16_000;
/// Bytes one SendPacket frame costs on the wire (header, key, payload).
const FRAME: u64 = 5 + 32 + PACKET as u64;

/// Sends `n` packets from `from` to `to` flat out and returns when `to` has
/// them all, checking each one's contents and order.
async fn transfer(from: RawClient, to: &mut RawClient, first: u8, n: usize) -> RawClient {
    let dst = to.key();
    let sender = tokio::spawn(async move {
        let mut from = from;
        for i in 0..n {
            from.send_packet(&dst, &[first.wrapping_add(i as u8); PACKET])
                .await;
        }
        from
    });
    for i in 0..n {
        match to.recv_skip_keepalive().await {
            Some(ServerFrame::RecvPacket { packet: data, .. }) => {
                assert_eq!(data.len(), PACKET, "packet {i}");
                assert!(
                    data.iter().all(|&b| b == first.wrapping_add(i as u8)),
                    "packet {i} arrived out of order or damaged"
                );
            }
            other => panic!("packet {i}: expected RecvPacket, got {other:?}"),
        }
    }
    sender.await.expect("sender task")
}

fn paced_reads(t: &common::TestRelay) -> u64 {
    t.relay().metrics().client_rate_paced_reads.get()
}

#[tokio::test]
async fn limited_sender_is_paced_to_its_rate_and_loses_nothing() {
    for via in BOTH {
        const RATE: u64 = 100_000;
        let t = start_relay(|c| {
            c.client_bytes_per_sec = RATE;
            c.client_burst_bytes = 0; // raised to one largest frame
        })
        .await;
        let heavy = RawClient::connect(t.addr, via).await;
        let mut heavy_rx = RawClient::connect(t.addr, via).await;
        let mut light = RawClient::connect(t.addr, via).await;
        let mut light_rx = RawClient::connect(t.addr, via).await;
        let n = 22; // 352 KB: at least 2.9 s at 100 kB/s after the burst
        let started = Instant::now();
        let heavy_done = {
            let rx = &mut heavy_rx;
            async move { transfer(heavy, rx, 0, n).await }
        };
        // A client beside the throttled one has its own bucket: its small
        // exchange completes while the heavy transfer is still being paced.
        let light_done = async {
            let dst = light_rx.key();
            for i in 0..20u8 {
                light.send_packet(&dst, &[i; 100]).await;
                match light_rx.recv_skip_keepalive().await {
                    Some(ServerFrame::RecvPacket { packet: data, .. }) => {
                        assert_eq!(data, vec![i; 100])
                    }
                    other => panic!("{via:?}: expected RecvPacket, got {other:?}"),
                }
            }
        };
        tokio::pin!(heavy_done);
        let heavy_first = tokio::select! {
            biased;
            _ = light_done => false,
            _ = &mut heavy_done => true,
        };
        assert!(
            !heavy_first,
            "{via:?}: the unthrottled pair waited for the throttled one"
        );
        let _heavy = tokio::time::timeout(Duration::from_secs(60), heavy_done)
            .await
            .expect("heavy transfer ends");
        let elapsed = started.elapsed().as_secs_f64();
        let floor = (n as u64 * FRAME - derp_relay::conn::pace::MIN_BURST) as f64 / RATE as f64;
        assert!(
            elapsed >= floor * 0.95,
            "{via:?}: {n} packets delivered in {elapsed:.2}s, faster than the {RATE} B/s limit allows ({floor:.2}s)"
        );
        assert!(paced_reads(&t) > 0, "{via:?}: no read was paced");
        assert_eq!(
            t.relay().metrics().total_dropped(),
            0,
            "{via:?}: pacing must not drop"
        );
    }
}

#[tokio::test]
async fn limit_is_off_at_zero_and_changes_live() {
    let via = Via::Derp;
    let t = start_relay(|_| {}).await;
    let a = RawClient::connect(t.addr, via).await;
    let mut b = RawClient::connect(t.addr, via).await;
    // 0 = off: half a megabyte goes through without a single wait.
    let a = transfer(a, &mut b, 0, 32).await;
    assert_eq!(paced_reads(&t), 0, "limit off, yet reads were paced");

    // Turned on for clients already connected.
    const RATE: u64 = 200_000;
    t.relay().client_rate.set(RATE, 0);
    let n = 40;
    let started = Instant::now();
    let a = transfer(a, &mut b, 100, n).await;
    let elapsed = started.elapsed().as_secs_f64();
    let floor = (n as u64 * FRAME - derp_relay::conn::pace::MIN_BURST) as f64 / RATE as f64;
    assert!(
        elapsed >= floor * 0.95,
        "after a live change: {elapsed:.2}s for {n} packets, faster than {RATE} B/s allows ({floor:.2}s)"
    );
    let paced = paced_reads(&t);
    assert!(
        paced > 0,
        "a live change did not reach the connected reader"
    );

    // And off again.
    t.relay().client_rate.set(0, 0);
    let _a = transfer(a, &mut b, 200, 32).await;
    assert_eq!(
        paced_reads(&t),
        paced,
        "limit turned off, yet reads were paced"
    );
    assert_eq!(t.relay().metrics().total_dropped(), 0);
}

#[tokio::test]
async fn a_reload_sets_the_limit_for_connected_clients() {
    let t = start_relay(|_| {}).await;
    let mut a = RawClient::connect(t.addr, Via::Ws).await;
    let b = RawClient::connect(t.addr, Via::Ws).await;
    assert_eq!(t.relay().client_rate.get(), None);
    let mut new = t.relay().shared.config.clone();
    new.client_bytes_per_sec = 300_000;
    new.client_burst_bytes = 256 << 10;
    let report = t.relay().reload(new).expect("reload applies");
    assert!(
        report.applied.iter().any(|k| k == "client_bytes_per_sec"),
        "reported as applied live: {:?}",
        report.applied
    );
    assert!(
        report.restart_only.is_empty(),
        "needs no restart: {:?}",
        report.restart_only
    );
    assert_eq!(t.relay().client_rate.get(), Some((300_000, 256 << 10)));
    // The connected client now runs under it: 1 MiB (past the 256 KiB
    // burst) takes at least (1 MiB - 256 KiB) / 300 kB/s.
    let n = 64;
    let started = Instant::now();
    let _b = transfer(b, &mut a, 0, n).await;
    let floor = (n as u64 * FRAME - (256 << 10)) as f64 / 300_000.0;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(elapsed >= floor * 0.95, "{elapsed:.2}s < {floor:.2}s");
    assert!(paced_reads(&t) > 0);
}

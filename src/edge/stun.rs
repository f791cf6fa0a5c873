//! The STUN responder: one UDP socket, one task. Tailscale clients send it a
//! Binding Request during netcheck to learn their public address and measure
//! latency to this region; it answers with the address the datagram came from.
//!
//! Everything else is ignored without a word: replying to junk from a spoofed
//! source would make the relay a reflector. The task owns two fixed buffers
//! and allocates nothing per datagram; its only shared state is its counters.

use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::metrics::{StunCounters, StunResult};
use crate::protocol::stun::{MAX_RESPONSE_LEN, parse_binding_request, write_binding_response};

/// Larger than any request we answer (Tailscale's is 40 bytes): a datagram
/// cut to this size fails the length check and is ignored, as it should be.
const RECV_BUF: usize = 2048;
/// Datagrams handled before going back through the scheduler, so a flood
/// cannot starve the other tasks sharing this worker.
const BATCH: usize = 256;

/// Binds the STUN socket. `[::]:PORT` also takes IPv4 where
/// net.ipv6.bindv6only is 0 (Linux's default); those clients show up as
/// IPv4-mapped addresses and are answered as IPv4.
pub async fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    UdpSocket::bind(addr).await
}

/// Answers requests on `socket` until `stop` turns true or its sender is dropped.
pub async fn serve(socket: UdpSocket, counters: StunCounters, mut stop: watch::Receiver<bool>) {
    let mut buf = [0u8; RECV_BUF];
    let mut out = [0u8; MAX_RESPONSE_LEN];
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            ready = socket.readable() => {
                if let Err(e) = ready {
                    // Not expected from a bound UDP socket; the relay keeps
                    // relaying without STUN rather than spinning on the error.
                    tracing::error!(error = %e, "STUN socket failed; STUN is off until restart");
                    return;
                }
            }
        }
        for _ in 0..BATCH {
            let (n, src) = match socket.try_recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    counters.get(StunResult::RecvError).inc();
                    continue;
                }
            };
            let Ok(tx) = parse_binding_request(&buf[..n]) else {
                counters.get(StunResult::Invalid).inc();
                continue;
            };
            let len = write_binding_response(&tx, src, &mut out);
            let sent = match socket.try_send_to(&out[..len], src) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    socket.send_to(&out[..len], src).await
                }
                r => r,
            };
            counters
                .get(if sent.is_ok() {
                    StunResult::Ok
                } else {
                    StunResult::SendError
                })
                .inc();
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

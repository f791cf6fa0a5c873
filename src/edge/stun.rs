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
/// Per-datagram buffer of the batched receive: a 64-datagram batch stays
/// small, and anything longer than this is not Tailscale's 40-byte request
/// (the kernel flags it truncated and it is ignored).
#[cfg(target_os = "linux")]
const RECV_BUF_MMSG: usize = 512;
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
pub async fn serve(socket: UdpSocket, counters: StunCounters, stop: watch::Receiver<bool>) {
    #[cfg(target_os = "linux")]
    mmsg::serve(socket, counters, stop).await;
    #[cfg(not(target_os = "linux"))]
    serve_one_by_one(socket, counters, stop).await;
}

/// Waits until the socket has datagrams (true) or the relay stops (false).
async fn readable(socket: &UdpSocket, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        biased;
        () = stopped(stop) => false,
        ready = socket.readable() => match ready {
            Ok(()) => true,
            Err(e) => {
                // Not expected from a bound UDP socket; the relay keeps
                // relaying without STUN rather than spinning on the error.
                tracing::error!(error = %e, "STUN socket failed; STUN is off until restart");
                false
            }
        },
    }
}

/// The portable loop: one recv and one send per datagram.
#[cfg_attr(target_os = "linux", allow(dead_code))]
async fn serve_one_by_one(
    socket: UdpSocket,
    counters: StunCounters,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = [0u8; RECV_BUF];
    let mut out = [0u8; MAX_RESPONSE_LEN];
    while readable(&socket, &mut stop).await {
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

/// Linux: `recvmmsg`/`sendmmsg`, a batch of datagrams per system call. On a
/// flood the syscall, not the codec, is the cost per answer, so batching is
/// what lets one task keep up. Buffers are allocated once, when the task starts.
#[cfg(target_os = "linux")]
mod mmsg {
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
    use std::os::fd::AsRawFd;

    use tokio::io::Interest;
    use tokio::net::UdpSocket;
    use tokio::sync::watch;

    use super::{RECV_BUF_MMSG as RECV_BUF, readable};
    use crate::metrics::{StunCounters, StunResult};
    use crate::protocol::stun::{MAX_RESPONSE_LEN, parse_binding_request, write_binding_response};

    /// Datagrams per system call.
    const N: usize = 64;

    struct Batch {
        bufs: [[u8; RECV_BUF]; N],
        from: [libc::sockaddr_storage; N],
        in_iov: [libc::iovec; N],
        in_hdr: [libc::mmsghdr; N],
        out: [[u8; MAX_RESPONSE_LEN]; N],
        to: [libc::sockaddr_storage; N],
        out_iov: [libc::iovec; N],
        out_hdr: [libc::mmsghdr; N],
    }

    // SAFETY: the raw pointers in the headers point only into the same Batch,
    // are rewritten before every system call, and the Batch is owned by one task.
    unsafe impl Send for Batch {}

    pub async fn serve(socket: UdpSocket, counters: StunCounters, mut stop: watch::Receiver<bool>) {
        // SAFETY: every field is plain old data for which all-zero is valid.
        let mut b: Box<Batch> = Box::new(unsafe { zeroed() });
        let fd = socket.as_raw_fd();
        while readable(&socket, &mut stop).await {
            // A full batch means more may be waiting: go round again (through
            // `readable`, which yields to the scheduler now and then).
            loop {
                let got = match socket.try_io(Interest::READABLE, || recv(fd, &mut b)) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        counters.get(StunResult::RecvError).inc();
                        break;
                    }
                };
                let answers = answer(&mut b, got, &counters);
                send(&socket, fd, &mut b, answers, &counters).await;
                if got < N {
                    break;
                }
            }
        }
    }

    fn recv(fd: i32, b: &mut Batch) -> io::Result<usize> {
        for i in 0..N {
            b.in_iov[i] = libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: RECV_BUF,
            };
            // SAFETY: all-zero is a valid msghdr.
            b.in_hdr[i].msg_hdr = unsafe { zeroed() };
            b.in_hdr[i].msg_hdr.msg_name = (&mut b.from[i] as *mut libc::sockaddr_storage).cast();
            b.in_hdr[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            b.in_hdr[i].msg_hdr.msg_iov = &mut b.in_iov[i];
            b.in_hdr[i].msg_hdr.msg_iovlen = 1;
            b.in_hdr[i].msg_len = 0;
        }
        // SAFETY: the headers point into `b`, which outlives the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                b.in_hdr.as_mut_ptr(),
                N as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Parses the `got` datagrams received and writes the answers to the
    /// front of the output batch; returns how many there are.
    fn answer(b: &mut Batch, got: usize, counters: &StunCounters) -> usize {
        let mut j = 0;
        for i in 0..got {
            let h = &b.in_hdr[i];
            let len = (h.msg_len as usize).min(RECV_BUF);
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let parsed = if truncated {
                None
            } else {
                parse_binding_request(&b.bufs[i][..len]).ok()
            };
            let (Some(tx), Some(src)) = (parsed, to_socket_addr(&b.from[i])) else {
                counters.get(StunResult::Invalid).inc();
                continue;
            };
            let n = write_binding_response(&tx, src, &mut b.out[j]);
            b.to[j] = b.from[i];
            b.out_iov[j] = libc::iovec {
                iov_base: b.out[j].as_mut_ptr().cast(),
                iov_len: n,
            };
            // SAFETY: all-zero is a valid msghdr.
            b.out_hdr[j].msg_hdr = unsafe { zeroed() };
            b.out_hdr[j].msg_hdr.msg_name = (&mut b.to[j] as *mut libc::sockaddr_storage).cast();
            b.out_hdr[j].msg_hdr.msg_namelen = b.in_hdr[i].msg_hdr.msg_namelen;
            b.out_hdr[j].msg_hdr.msg_iov = &mut b.out_iov[j];
            b.out_hdr[j].msg_hdr.msg_iovlen = 1;
            j += 1;
        }
        j
    }

    /// Sends the first `count` answers. A destination the kernel refuses
    /// (sendmmsg fails on its message) is counted and skipped; a full send
    /// buffer is waited out.
    async fn send(
        socket: &UdpSocket,
        fd: i32,
        b: &mut Batch,
        count: usize,
        counters: &StunCounters,
    ) {
        let mut done = 0;
        while done < count {
            let left = (count - done) as u32;
            let hdrs = &mut b.out_hdr[done..count];
            let r = socket.try_io(Interest::WRITABLE, || {
                // SAFETY: the headers point into `b`, which outlives the call.
                let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), left, libc::MSG_DONTWAIT) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(n) => {
                    counters.get(StunResult::Ok).inc_by(n as u64);
                    done += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if socket.writable().await.is_err() {
                        counters
                            .get(StunResult::SendError)
                            .inc_by((count - done) as u64);
                        return;
                    }
                }
                Err(_) => {
                    counters.get(StunResult::SendError).inc();
                    done += 1;
                }
            }
        }
    }

    fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match i32::from(s.ss_family) {
            libc::AF_INET => {
                // SAFETY: ss_family says the storage holds a sockaddr_in.
                let a =
                    unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                // SAFETY: ss_family says the storage holds a sockaddr_in6.
                let a =
                    unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

//! STUN flood: answers per second from the relay's UDP responder.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use tokio::time::timeout;

use crate::compare::median;
use crate::load::next_source_ip;

/// A window that got no answer for this long is sent again whole: datagrams
/// the kernel dropped under the flood would otherwise shrink it for good.
pub(crate) const STUN_REFILL: Duration = Duration::from_millis(20);

pub(crate) async fn stun_flood(
    addr: SocketAddr,
    sockets: usize,
    window: usize,
    duration: f64,
    rounds: usize,
) -> Result<()> {
    ensure!(duration > 0.0, "--duration must be above 0");
    out!(
        "STUN flood on {addr}: {sockets} sockets x {window} in flight, {rounds} rounds of {duration} s"
    );
    let mut rates = Vec::new();
    for round in 1..=rounds {
        let until = Instant::now() + Duration::from_secs_f64(duration);
        let mut tasks = Vec::new();
        for i in 0..sockets {
            let src = if addr.is_ipv4() {
                SocketAddr::from((next_source_ip(), 0))
            } else {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
            };
            tasks.push(tokio::spawn(stun_socket(src, addr, window, until, i as u8)));
        }
        let t0 = Instant::now();
        let (mut sent, mut answered) = (0u64, 0u64);
        for t in tasks {
            let (s, a) = t.await.context("STUN socket task")??;
            sent += s;
            answered += a;
        }
        let rate = answered as f64 / t0.elapsed().as_secs_f64();
        out!(
            "round {round}: {rate:>10.0} answers/s  ({answered} answered of {sent} sent, {:.1}% unanswered)",
            100.0 * sent.saturating_sub(answered) as f64 / sent.max(1) as f64
        );
        rates.push(rate);
    }
    out!("median: {:.0} answers/s", median(rates));
    Ok(())
}

/// One client socket: keeps `window` requests in flight until `until`.
/// Returns (sent, valid answers).
pub(crate) async fn stun_socket(
    src: SocketAddr,
    server: SocketAddr,
    window: usize,
    until: Instant,
    id: u8,
) -> Result<(u64, u64)> {
    use derp_relay::protocol::stun::{REQUEST_LEN, parse_binding_response, write_binding_request};
    let sock = tokio::net::UdpSocket::bind(src)
        .await
        .with_context(|| format!("binding {src}"))?;
    // Connected: the kernel filters other sources and reports ICMP errors,
    // so a relay without STUN fails the run instead of reading as 0/s.
    sock.connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let tx = [id; 12];
    let mut req = [0u8; REQUEST_LEN];
    write_binding_request(&tx, &mut req);
    let mut io = StunBatch::new();
    let (mut sent, mut answered) = (0u64, 0u64);
    sent += io.send(&sock, &req, window).context("sending")? as u64;
    loop {
        match sock.try_io(tokio::io::Interest::READABLE, || io.recv(&sock)) {
            Ok(n) => {
                answered += (0..n)
                    .filter(|&i| parse_binding_response(io.datagram(i), &tx).is_ok())
                    .count() as u64;
                if Instant::now() >= until {
                    break;
                }
                // One new request per answer keeps the window full.
                sent += io.send(&sock, &req, n).context("sending")? as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= until {
                    break;
                }
                if timeout(STUN_REFILL, sock.readable()).await.is_err() {
                    sent += io.send(&sock, &req, window).context("sending")? as u64;
                }
            }
            Err(e) => bail!("receiving from {server}: {e} (is STUN on?)"),
        }
    }
    Ok((sent, answered))
}

/// Datagrams per batched system call on the bench side.
pub(crate) const STUN_BATCH: usize = 64;

/// The bench's half of the flood, batched like the relay's (recvmmsg and
/// sendmmsg on Linux) so the load generator is not the first bottleneck.
pub(crate) struct StunBatch {
    pub(crate) bufs: Box<[[u8; 64]; STUN_BATCH]>,
    pub(crate) lens: [usize; STUN_BATCH],
}

impl StunBatch {
    pub(crate) fn new() -> Self {
        StunBatch {
            bufs: Box::new([[0; 64]; STUN_BATCH]),
            lens: [0; STUN_BATCH],
        }
    }

    pub(crate) fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// Sends `count` copies of `req` (fewer if the socket buffer fills).
    #[cfg(target_os = "linux")]
    pub(crate) fn send(
        &mut self,
        sock: &tokio::net::UdpSocket,
        req: &[u8],
        count: usize,
    ) -> Result<usize> {
        use std::os::fd::AsRawFd;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(STUN_BATCH);
            let mut iov = [libc::iovec {
                iov_base: req.as_ptr() as *mut libc::c_void,
                iov_len: req.len(),
            }; STUN_BATCH];
            // SAFETY: all-zero is a valid mmsghdr; a connected socket needs no name.
            let mut hdrs: [libc::mmsghdr; STUN_BATCH] = unsafe { std::mem::zeroed() };
            for (h, v) in hdrs.iter_mut().zip(iov.iter_mut()) {
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
            }
            let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
                // SAFETY: the headers and iovecs live on this stack frame; the
                // kernel only reads `req` through them.
                let r = unsafe {
                    libc::sendmmsg(
                        sock.as_raw_fd(),
                        hdrs.as_mut_ptr(),
                        n as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            });
            match r {
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// Receives up to a batch of datagrams; WouldBlock when there are none.
    #[cfg(target_os = "linux")]
    pub(crate) fn recv(&mut self, sock: &tokio::net::UdpSocket) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let mut iov: [libc::iovec; STUN_BATCH] = std::array::from_fn(|_| libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        for (v, b) in iov.iter_mut().zip(self.bufs.iter_mut()) {
            v.iov_base = b.as_mut_ptr().cast();
            v.iov_len = b.len();
        }
        // SAFETY: all-zero is a valid mmsghdr; a connected socket needs no name.
        let mut hdrs: [libc::mmsghdr; STUN_BATCH] = unsafe { std::mem::zeroed() };
        for (h, v) in hdrs.iter_mut().zip(iov.iter_mut()) {
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the headers point into `iov` and `self.bufs`, both alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                STUN_BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (l, h) in self.lens.iter_mut().zip(&hdrs[..n as usize]) {
            *l = (h.msg_len as usize).min(64);
        }
        Ok(n as usize)
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn send(
        &mut self,
        sock: &tokio::net::UdpSocket,
        req: &[u8],
        count: usize,
    ) -> Result<usize> {
        for i in 0..count {
            match sock.try_send(req) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(i),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(count)
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn recv(&mut self, sock: &tokio::net::UdpSocket) -> std::io::Result<usize> {
        let n = sock.try_recv(&mut self.bufs[0])?;
        self.lens[0] = n;
        Ok(1)
    }
}

//! derp-bench: load generator and baseline for derp-relay.
//!
//! A relay's numbers mean little on their own: on a shared 2-core box the
//! kernel's loopback TCP path and the load generator itself eat most of the
//! CPU. So besides driving the relay (`throughput`, `idle`) this tool carries
//! its own ceiling: `forward-server`, a process that splices each sender's
//! socket to its receiver's with no framing or routing at all. `compare` runs
//! the same byte stream (SendPacket frames out, equally sized frames back)
//! through both and reports the relay as a fraction of that ceiling, which is
//! what a change to the hot path should move.
//!
//! All clients run in this one process, so a packet's send timestamp and its
//! receive time come from the same monotonic clock and one-way latency needs no
//! clock sync. Clients bind distinct 127.x.y.z source addresses so per-IP limits
//! in the relay see many hosts, not one.

use std::collections::HashMap;
use std::io::{BufRead, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::BytesMut;
use clap::{Args, Parser, Subcommand};
use derp_relay::client::{self, ConnectOptions, FrameReader, FrameWriter, RelayUrl, connect_tcp};
use derp_relay::protocol::PublicKey;
use derp_relay::protocol::frame::{
    FrameType, HEADER_LEN, MAX_PACKET_SIZE, ServerFrame, encode_pong, encode_send_packet,
};
use derp_relay::protocol::handshake::ClientSecret;
use futures_util::{StreamExt as _, TryStreamExt as _};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout};

/// `println!` that ignores a closed stdout (e.g. piped into `head`) rather
/// than panicking in the middle of a run.
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WARMUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Unpaced senders fill about this much per write: large enough to amortise
/// the syscall, small enough to stay inside one socket buffer.
const BATCH_BYTES: usize = 64 << 10;
const READ_CHUNK: usize = 64 << 10;
/// Sequence number of warm-up packets, which prove the route exists and are
/// not measured.
const WARMUP_SEQ: u64 = u64::MAX;
/// Bytes of each packet used for sequence number and send timestamp.
const STAMP_LEN: usize = 16;
const KEY_LEN: usize = 32;
const ROLE_SENDER: u8 = 0;
const ROLE_RECEIVER: u8 = 1;

#[derive(Parser)]
#[command(
    name = "derp-bench",
    about = "Load generator and raw-TCP baseline for derp-relay (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Sender→receiver pairs through the relay: packets/s, MB/s, one-way latency.
    Throughput {
        /// http://127.0.0.1:PORT/derp (Upgrade: DERP) or ws://127.0.0.1:PORT/derp.
        #[arg(long)]
        url: String,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The same load through a plain TCP splice: the ceiling for `throughput`.
    Forwarder {
        /// Use an already running `forward-server` instead of starting one.
        #[arg(long)]
        addr: Option<SocketAddr>,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Forwarder and relay alternately, then a latency round at half the relay's peak.
    Compare {
        /// Relay URL; repeat to compare transports (http://… and ws://…).
        #[arg(long, required = true)]
        url: Vec<String>,
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Total packets/s for the latency round; 0 = half of each relay
        /// transport's measured peak. A relay that collapses under overload
        /// has a low unpaced peak, so a sweep with `throughput --rate` may
        /// find a better operating point to pass here.
        #[arg(long, default_value_t = 0)]
        latency_rate: u64,
    },
    /// Memory cost of idle handshaken clients, from the relay's VmRSS.
    Idle {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Process id of the relay (read from /proc/PID/status).
        #[arg(long)]
        pid: u32,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
    /// STUN flood: Tailscale Binding Requests from several sockets, each
    /// keeping a window in flight; answers/s per round and the median.
    Stun {
        /// The relay's STUN address (its --stun-addr), e.g. 127.0.0.1:3478.
        #[arg(long, default_value = "127.0.0.1:3478")]
        addr: SocketAddr,
        /// Client sockets, each on its own 127.x.y.z address.
        #[arg(long, default_value_t = 4)]
        sockets: usize,
        /// Requests each socket keeps in flight.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Seconds per round.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Admission latency and relayed-packet p99 while bound keys reconnect,
    /// against two relays it starts: one with a large bindings file, one small.
    Tofu(TofuArgs),
    /// The baseline forwarder itself; prints `listening on ADDR` first.
    ForwardServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Exit when standard input closes (set when a bench process owns us).
        #[arg(long)]
        exit_on_stdin_eof: bool,
    },
}

#[derive(Args, Clone, Debug)]
struct LoadArgs {
    /// Sender→receiver pairs (each pair is two connections).
    #[arg(long, default_value_t = 10)]
    pairs: usize,
    /// Packet size in bytes (at least 16: sequence number and timestamp).
    #[arg(long, default_value_t = 1280)]
    size: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Packets per second per pair, open loop; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("derp-bench: cannot start tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let budget = time_budget(&cli.mode);
    let result = runtime.block_on(async move {
        match budget {
            Some(b) => timeout(b, run(cli.mode)).await.unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "gave up after the overall time limit of {b:?}"
                ))
            }),
            None => run(cli.mode).await,
        }
    });
    // Don't wait for stuck client tasks: every run is bounded and we are done.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("derp-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Upper bound on a whole invocation, so a wedged relay cannot hang a script.
fn time_budget(mode: &Mode) -> Option<Duration> {
    let per_run = |l: &LoadArgs| l.duration.max(0.0) + 45.0;
    let secs = match mode {
        Mode::Throughput { load, .. } | Mode::Forwarder { load, .. } => per_run(load),
        Mode::Compare {
            url, load, rounds, ..
        } => per_run(load) * ((rounds * (url.len() + 1)) + url.len() + 1) as f64,
        Mode::Idle { clients, .. } => 120.0 + *clients as f64 / 100.0,
        Mode::Stun {
            duration, rounds, ..
        } => duration.max(0.0) * *rounds as f64 + 30.0,
        Mode::Tofu(a) => 120.0 + (a.duration.max(0.0) + 20.0) * 2.0 * a.rounds.max(1) as f64,
        Mode::ForwardServer { .. } => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

async fn run(mode: Mode) -> Result<()> {
    match mode {
        Mode::Throughput { url, load } => {
            check_load(&load)?;
            let target = Target::Derp(BenchUrl::parse(&url)?);
            let r = run_load(&target, &load).await?;
            print_throughput_table(&[(r, None)]);
        }
        Mode::Forwarder { addr, load } => {
            check_load(&load)?;
            let child = match addr {
                Some(_) => None,
                None => Some(ForwarderChild::spawn().await?),
            };
            let addr = addr
                .or(child.as_ref().map(|c| c.addr))
                .context("no forwarder address")?;
            let r = run_load(&Target::Forwarder(addr), &load).await?;
            print_throughput_table(&[(r, None)]);
        }
        Mode::Compare {
            url,
            load,
            rounds,
            latency_rate,
        } => compare(&url, &load, rounds.max(1), latency_rate).await?,
        Mode::Idle {
            url,
            clients,
            pid,
            concurrency,
        } => idle(&url, clients, pid, concurrency.max(1)).await?,
        Mode::Stun {
            addr,
            sockets,
            window,
            duration,
            rounds,
        } => stun_flood(addr, sockets.max(1), window.max(1), duration, rounds.max(1)).await?,
        Mode::Tofu(args) => tofu_bench(args).await?,
        Mode::ForwardServer {
            addr,
            exit_on_stdin_eof,
        } => forward_server(addr, exit_on_stdin_eof).await?,
    }
    Ok(())
}

// ---------------------------------------------------------------- stun

/// A window that got no answer for this long is sent again whole: datagrams
/// the kernel dropped under the flood would otherwise shrink it for good.
const STUN_REFILL: Duration = Duration::from_millis(20);

async fn stun_flood(
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
async fn stun_socket(
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
const STUN_BATCH: usize = 64;

/// The bench's half of the flood, batched like the relay's (recvmmsg and
/// sendmmsg on Linux) so the load generator is not the first bottleneck.
struct StunBatch {
    bufs: Box<[[u8; 64]; STUN_BATCH]>,
    lens: [usize; STUN_BATCH],
}

impl StunBatch {
    fn new() -> Self {
        StunBatch {
            bufs: Box::new([[0; 64]; STUN_BATCH]),
            lens: [0; STUN_BATCH],
        }
    }

    fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// Sends `count` copies of `req` (fewer if the socket buffer fills).
    #[cfg(target_os = "linux")]
    fn send(&mut self, sock: &tokio::net::UdpSocket, req: &[u8], count: usize) -> Result<usize> {
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
    fn recv(&mut self, sock: &tokio::net::UdpSocket) -> std::io::Result<usize> {
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
    fn send(&mut self, sock: &tokio::net::UdpSocket, req: &[u8], count: usize) -> Result<usize> {
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
    fn recv(&mut self, sock: &tokio::net::UdpSocket) -> std::io::Result<usize> {
        let n = sock.try_recv(&mut self.bufs[0])?;
        self.lens[0] = n;
        Ok(1)
    }
}

fn check_load(load: &LoadArgs) -> Result<()> {
    ensure!(load.pairs > 0, "--pairs must be at least 1");
    ensure!(
        (STAMP_LEN..=MAX_PACKET_SIZE).contains(&load.size),
        "--size must be between {STAMP_LEN} and {MAX_PACKET_SIZE}"
    );
    ensure!(
        load.duration > 0.0 && load.duration.is_finite(),
        "--duration must be positive"
    );
    Ok(())
}

// ---------------------------------------------------------------- addressing

/// Where the load goes: a relay URL, or the baseline forwarder.
#[derive(Clone)]
enum Target {
    Derp(BenchUrl),
    Forwarder(SocketAddr),
}

impl Target {
    fn label(&self) -> String {
        match self {
            Target::Derp(u) if u.url.websocket => "derp websocket".into(),
            Target::Derp(_) => "derp upgrade".into(),
            Target::Forwarder(_) => "tcp forwarder".into(),
        }
    }
}

/// A relay URL this tool agrees to load: plain http:// or ws:// on IPv4
/// loopback. The shared client speaks TLS and reaches any host, but numbers
/// taken across a network or through TLS would measure something else.
#[derive(Clone)]
struct BenchUrl {
    url: RelayUrl,
    text: String,
}

impl BenchUrl {
    fn parse(text: &str) -> Result<Self> {
        let url = RelayUrl::parse(text)?;
        ensure!(
            !url.tls,
            "URL {text:?}: scheme {:?} unsupported, use http:// or ws:// (loopback, no TLS)",
            url.scheme()
        );
        let ip: IpAddr = match url.host.as_str() {
            "localhost" => Ipv4Addr::LOCALHOST.into(),
            h => h
                .parse()
                .with_context(|| format!("URL host {h:?} is not an IP address"))?,
        };
        // Clients bind 127.x.y.z source addresses, which only reach IPv4 loopback.
        ensure!(
            ip.is_ipv4() && ip.is_loopback(),
            "URL host {ip} is not IPv4 loopback; this tool only benchmarks locally"
        );
        let url = RelayUrl {
            host: ip.to_string(),
            ..url
        };
        Ok(BenchUrl {
            text: url.to_string(),
            url,
        })
    }
}

static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// A fresh loopback source address per connection (127.1.0.1, 127.1.0.2, …,
/// skipping .0 and .255), so per-IP limits and ephemeral ports never collide.
fn next_source_ip() -> Ipv4Addr {
    let n = NEXT_SOURCE.fetch_add(1, Relaxed);
    let mid = n / 254;
    Ipv4Addr::new(
        127,
        1 + ((mid >> 8) % 254) as u8,
        (mid & 0xff) as u8,
        (n % 254 + 1) as u8,
    )
}

fn connect_options() -> ConnectOptions {
    ConnectOptions {
        bind: Some(next_source_ip().into()),
        connect_timeout: CONNECT_TIMEOUT,
        ..ConnectOptions::default()
    }
}

/// One process-wide clock so that send and receive timestamps compare directly.
fn now_ns() -> u64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------- transport

/// A connected, handshaken client (or a forwarder endpoint, which has no handshake).
struct Endpoint {
    rd: FrameReader,
    wr: FrameWriter,
    key: PublicKey,
    /// Receive rate limit the relay advertised in ServerInfo, bytes/s.
    rate_limit: Option<u64>,
}

async fn open_endpoint(target: &Target, role: u8, pair_id: u64) -> Result<Endpoint> {
    match target {
        Target::Derp(url) => timeout(CONNECT_TIMEOUT, connect_derp(url))
            .await
            .map_err(|_| {
                anyhow::anyhow!("DERP connect and handshake with {} timed out", url.text)
            })?,
        Target::Forwarder(addr) => {
            let opts = connect_options();
            let mut stream = connect_tcp(&addr.ip().to_string(), addr.port(), &opts).await?;
            let mut hello = [role; 9];
            hello[1..].copy_from_slice(&pair_id.to_be_bytes());
            stream.write_all(&hello).await.context("forwarder hello")?;
            let (rd, wr) = stream.into_split();
            let mut key = [0u8; KEY_LEN];
            key[..8].copy_from_slice(&pair_id.to_be_bytes());
            Ok(Endpoint {
                rd: FrameReader::from_tcp(rd),
                wr: FrameWriter::from_tcp(wr),
                key: PublicKey(key),
                rate_limit: None,
            })
        }
    }
}

async fn connect_derp(url: &BenchUrl) -> Result<Endpoint> {
    let what = if url.url.websocket {
        "WebSocket upgrade"
    } else {
        "HTTP upgrade"
    };
    let (mut rd, mut wr) = client::open(&url.url, &connect_options())
        .await
        .with_context(|| format!("{what} at {}", url.text))?;
    let secret = ClientSecret::generate();
    let hs = client::handshake(&mut rd, &mut wr, &secret, br#"{"version":2}"#).await?;
    Ok(Endpoint {
        rd,
        wr,
        key: secret.public(),
        rate_limit: hs.rate_limit(),
    })
}

// ---------------------------------------------------------------- load run

struct RunResult {
    label: String,
    rate_per_pair: u64,
    sent: u64,
    received: u64,
    /// Seconds senders were sending.
    send_secs: f64,
    /// Packets per second delivered, over first send to last receive.
    pps: f64,
    /// Payload megabytes (1e6) per second delivered.
    mbps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

impl RunResult {
    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    fn print(&self) {
        let lost_pct = 100.0 * self.lost() as f64 / self.sent.max(1) as f64;
        out!(
            "{:<15} sent {} ({:.0} pps offered), delivered {:.0} pps, {:.1} MB/s, lost {} ({:.2}%), latency µs p50 {:.0} p99 {:.0} p999 {:.0} max {:.0}",
            self.label,
            self.sent,
            self.sent as f64 / self.send_secs,
            self.pps,
            self.mbps,
            self.lost(),
            lost_pct,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
        );
    }
}

/// What a receiver publishes while running, for warm-up and drain decisions.
#[derive(Default)]
struct RecvProgress {
    ready: AtomicBool,
    received: AtomicU64,
    last_ns: AtomicU64,
}

static NEXT_PAIR: AtomicU64 = AtomicU64::new(0);

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 100 s at 3 significant digits; these bounds are always valid.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

async fn run_load(target: &Target, load: &LoadArgs) -> Result<RunResult> {
    let label = target.label();
    // Pair ids only need to be unique within one forwarder's lifetime; the time
    // seed keeps two bench processes sharing a `--addr` forwarder apart.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let ids: Vec<u64> = (0..load.pairs)
        .map(|_| seed.wrapping_add(NEXT_PAIR.fetch_add(1, Relaxed) << 20))
        .collect();

    let receivers = futures_util::future::try_join_all(
        ids.iter()
            .map(|&id| open_endpoint(target, ROLE_RECEIVER, id)),
    )
    .await
    .with_context(|| format!("{label}: opening receivers"))?;
    let senders = futures_util::future::try_join_all(
        ids.iter().map(|&id| open_endpoint(target, ROLE_SENDER, id)),
    )
    .await
    .with_context(|| format!("{label}: opening senders"))?;
    if let Some(r) = receivers.iter().find_map(|e| e.rate_limit) {
        out!("{label}: note: relay advertises a receive rate limit of {r} B/s per client");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(None::<(Instant, Instant)>);
    let peer_gone = Arc::new(AtomicU64::new(0));
    let mut progress = Vec::new();
    let mut recv_tasks = Vec::new();
    let mut dst_keys = Vec::new();
    for ep in receivers {
        let p = Arc::new(RecvProgress::default());
        progress.push(p.clone());
        dst_keys.push(ep.key);
        recv_tasks.push(tokio::spawn(receive(
            ep,
            p,
            stop_rx.clone(),
            peer_gone.clone(),
        )));
    }
    let mut send_tasks = Vec::new();
    let mut drain_tasks = Vec::new();
    for ((ep, dst), p) in senders.into_iter().zip(dst_keys).zip(&progress) {
        let (pong_tx, pong_rx) = mpsc::unbounded_channel();
        drain_tasks.push(tokio::spawn(drain_sender_reads(
            ep.rd,
            pong_tx,
            peer_gone.clone(),
        )));
        let job = SendJob {
            dst,
            size: load.size,
            rate: load.rate,
            ready: p.clone(),
            start: start_rx.clone(),
        };
        send_tasks.push(tokio::spawn(send(ep.wr, job, pong_rx)));
    }

    // Warm-up: every route must be proven before the clock starts, or the
    // first packets of a relay that registers clients asynchronously are lost.
    let warm_deadline = Instant::now() + WARMUP_TIMEOUT;
    while let Some(i) = progress.iter().position(|p| !p.ready.load(Relaxed)) {
        if Instant::now() > warm_deadline {
            bail!("{label}: pair {i} never delivered a warm-up packet within {WARMUP_TIMEOUT:?}");
        }
        // A client that died here would otherwise only show as a timeout.
        ended_early(&mut send_tasks, "sender").await?;
        ended_early(&mut recv_tasks, "receiver").await?;
        sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    let start_ns = now_ns();
    let end = start + Duration::from_secs_f64(load.duration);
    start_tx.send_replace(Some((start, end)));

    let mut total_sent = 0;
    let mut writers = Vec::new(); // held open until the drain is over
    for t in send_tasks {
        let (sent, wr) = t.await.context("sender task panicked")??;
        total_sent += sent;
        writers.push(wr);
    }
    let send_secs = start.elapsed().as_secs_f64();

    // Drain: wait until everything arrived, or nothing has for a while.
    let received = || {
        progress
            .iter()
            .map(|p| p.received.load(Relaxed))
            .sum::<u64>()
    };
    let drain_end = Instant::now() + Duration::from_secs(3);
    let (mut last, mut last_change) = (received(), Instant::now());
    while last < total_sent
        && Instant::now() < drain_end
        && last_change.elapsed() < Duration::from_millis(500)
    {
        sleep(Duration::from_millis(20)).await;
        let now = received();
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
    }
    stop_tx.send_replace(true);
    let mut hist = new_histogram();
    let mut total_received = 0;
    for t in recv_tasks {
        let h = timeout(Duration::from_secs(5), t)
            .await
            .context("receiver did not stop")?
            .context("receiver task panicked")??;
        total_received += h.len();
        hist.add(&h).context("merging histograms")?;
    }
    for t in drain_tasks {
        t.abort();
    }
    drop(writers);
    let gone = peer_gone.load(Relaxed);
    if gone > 0 {
        out!("{label}: warning: relay reported {gone} PeerGone frames");
    }

    let last_ns = progress
        .iter()
        .map(|p| p.last_ns.load(Relaxed))
        .max()
        .unwrap_or(start_ns);
    let window = (last_ns.saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let result = RunResult {
        label,
        rate_per_pair: load.rate,
        sent: total_sent,
        received: total_received,
        send_secs,
        pps: total_received as f64 / window,
        mbps: (total_received * load.size as u64) as f64 / window / 1e6,
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: hist.max() as f64 / 1000.0,
    };
    result.print();
    Ok(result)
}

struct SendJob {
    dst: PublicKey,
    size: usize,
    rate: u64,
    ready: Arc<RecvProgress>,
    start: watch::Receiver<Option<(Instant, Instant)>>,
}

/// Sends warm-up packets until the run starts, then the measured stream.
/// Returns the count sent and the writer, which must outlive the drain.
async fn send(
    mut wr: FrameWriter,
    mut job: SendJob,
    mut pongs: mpsc::UnboundedReceiver<[u8; 8]>,
) -> Result<(u64, FrameWriter)> {
    let mut payload = vec![0u8; job.size];
    let mut buf = BytesMut::new();
    let (start, end) = loop {
        if let Some(window) = *job.start.borrow_and_update() {
            break window;
        }
        if !job.ready.ready.load(Relaxed) {
            payload[..8].copy_from_slice(&WARMUP_SEQ.to_le_bytes());
            encode_send_packet(&mut buf, &job.dst, &payload);
            wr.send(&mut buf).await.context("sending warm-up packet")?;
        }
        tokio::select! {
            _ = sleep(Duration::from_millis(10)) => {}
            r = job.start.changed() => r.context("run abandoned")?,
        }
    };

    let frame_len = HEADER_LEN + KEY_LEN + job.size;
    let per_batch = (BATCH_BYTES / frame_len).max(1) as u64;
    buf.reserve(per_batch as usize * frame_len + 64);
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let n = if job.rate == 0 {
            per_batch
        } else {
            // Open loop: packet k is due at start + k/rate whatever the relay
            // does, so a slow relay builds a backlog instead of being let off.
            let due = ((now - start).as_secs_f64() * job.rate as f64) as u64 + 1;
            let n = due.saturating_sub(seq).min(per_batch);
            if n == 0 {
                sleep_until((start + Duration::from_secs_f64(seq as f64 / job.rate as f64)).into())
                    .await;
                continue;
            }
            n
        };
        while let Ok(data) = pongs.try_recv() {
            encode_pong(&mut buf, data);
        }
        // Stamped with the actual send time, one clock read per batch: tokio
        // timers wake with ~1 ms slack, which stamping the scheduled time
        // would wrongly charge to the relay.
        let ts = now_ns();
        payload[8..STAMP_LEN].copy_from_slice(&ts.to_le_bytes());
        for _ in 0..n {
            payload[..8].copy_from_slice(&seq.to_le_bytes());
            encode_send_packet(&mut buf, &job.dst, &payload);
            seq += 1;
        }
        wr.send(&mut buf).await.context("sending packets")?;
    }
    Ok((seq, wr))
}

/// Fails if one of `tasks` has already finished, with its error if it had one.
async fn ended_early<T>(tasks: &mut Vec<JoinHandle<Result<T>>>, what: &str) -> Result<()> {
    if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
        tasks
            .swap_remove(i)
            .await
            .with_context(|| format!("{what} task panicked"))??;
        bail!("{what} {i} ended during warm-up");
    }
    Ok(())
}

/// Senders must still read: the relay may ping them, and an unread socket
/// would eventually stall the relay's writer for that client.
async fn drain_sender_reads(
    mut rd: FrameReader,
    pongs: mpsc::UnboundedSender<[u8; 8]>,
    peer_gone: Arc<AtomicU64>,
) {
    while let Ok(Some(frame)) = rd.next_frame().await {
        match ServerFrame::parse(frame) {
            Ok(ServerFrame::Ping(data)) => {
                let _ = pongs.send(data);
            }
            Ok(ServerFrame::PeerGone { .. }) => {
                peer_gone.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }
}

/// Counts packets and records one-way latency until told to stop.
async fn receive(
    mut ep: Endpoint,
    progress: Arc<RecvProgress>,
    mut stop: watch::Receiver<bool>,
    peer_gone: Arc<AtomicU64>,
) -> Result<Histogram<u64>> {
    let mut hist = new_histogram();
    let mut count = 0u64;
    let mut out = BytesMut::new();
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.changed() => break,
            f = ep.rd.next_frame() => f.context("receiving")?,
        };
        // Senders are held open until we stop, so neither a relay nor the
        // forwarder has a reason to close a receiver before that.
        let Some(frame) = frame else {
            bail!("connection closed by the far end during the run")
        };
        // RecvPacket from the relay; SendPacket arrives unchanged through the
        // forwarder, and has the same layout (key, then packet).
        if (frame.frame_type == FrameType::RecvPacket as u8
            || frame.frame_type == FrameType::SendPacket as u8)
            && frame.payload.len() >= KEY_LEN + STAMP_LEN
        {
            let p = &frame.payload[KEY_LEN..];
            let seq = u64::from_le_bytes(p[..8].try_into()?);
            if seq == WARMUP_SEQ {
                progress.ready.store(true, Relaxed);
                continue;
            }
            let sent = u64::from_le_bytes(p[8..STAMP_LEN].try_into()?);
            let now = now_ns();
            hist.saturating_record(now.saturating_sub(sent).max(1));
            count += 1;
            progress.received.store(count, Relaxed);
            progress.last_ns.store(now, Relaxed);
            continue;
        }
        match ServerFrame::parse(frame)? {
            ServerFrame::Ping(data) => {
                encode_pong(&mut out, data);
                ep.wr.send(&mut out).await.context("answering ping")?;
            }
            ServerFrame::PeerGone { .. } => {
                peer_gone.fetch_add(1, Relaxed);
            }
            ServerFrame::Restarting { .. } => bail!("relay announced a restart during the run"),
            _ => {}
        }
    }
    Ok(hist)
}

// ---------------------------------------------------------------- reports

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Rows of (result, ratio to forwarder).
fn print_throughput_table(rows: &[(RunResult, Option<f64>)]) {
    out!();
    out!("| transport | pps | MB/s | vs forwarder | p50 µs | p99 µs | p999 µs | lost |");
    out!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (r, ratio) in rows {
        let ratio = ratio.map_or("-".to_owned(), |x| format!("{:.0}%", x * 100.0));
        out!(
            "| {} | {:.0} | {:.1} | {} | {:.0} | {:.0} | {:.0} | {} |",
            r.label,
            r.pps,
            r.mbps,
            ratio,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.lost()
        );
    }
}

async fn compare(urls: &[String], load: &LoadArgs, rounds: usize, latency_rate: u64) -> Result<()> {
    check_load(load)?;
    let relays = urls
        .iter()
        .map(|u| BenchUrl::parse(u).map(Target::Derp))
        .collect::<Result<Vec<_>>>()?;
    // Fail fast on an unreachable relay, before minutes of forwarder rounds.
    for t in &relays {
        open_endpoint(t, ROLE_RECEIVER, 0).await?;
    }
    let fwd = ForwarderChild::spawn().await?;
    out!("forwarder pid {} on {}", fwd.child.id(), fwd.addr);
    let mut targets = vec![Target::Forwarder(fwd.addr)];
    targets.extend(relays);
    let peak_load = LoadArgs {
        rate: 0,
        ..load.clone()
    };

    let mut runs: Vec<Vec<RunResult>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        out!(
            "-- round {round}/{rounds}: {} pairs, {} B, {} s, unpaced",
            load.pairs,
            load.size,
            load.duration
        );
        for (t, out) in targets.iter().zip(&mut runs) {
            out.push(run_load(t, &peak_load).await?);
            // Let closed connections leave the relay before the next run.
            sleep(Duration::from_millis(300)).await;
        }
    }
    let med = |rs: &[RunResult], f: fn(&RunResult) -> f64| median(rs.iter().map(f).collect());
    let summary: Vec<RunResult> = targets
        .iter()
        .zip(&runs)
        .map(|(t, rs)| RunResult {
            label: t.label(),
            rate_per_pair: 0,
            sent: median(rs.iter().map(|r| r.sent as f64).collect()) as u64,
            received: median(rs.iter().map(|r| r.received as f64).collect()) as u64,
            send_secs: med(rs, |r| r.send_secs),
            pps: med(rs, |r| r.pps),
            mbps: med(rs, |r| r.mbps),
            p50_us: med(rs, |r| r.p50_us),
            p99_us: med(rs, |r| r.p99_us),
            p999_us: med(rs, |r| r.p999_us),
            max_us: med(rs, |r| r.max_us),
        })
        .collect();

    // Latency is only meaningful below saturation: rerun each relay transport
    // at half its own peak (or the rate asked for), and the forwarder at the
    // first relay's rate so the two latencies are at the same load.
    let mut latency_runs = Vec::new();
    let per_pair = |total: f64| ((total / load.pairs as f64) as u64).max(1);
    let rate_for = |s: &RunResult| match latency_rate {
        0 => per_pair(s.pps / 2.0),
        r => per_pair(r as f64),
    };
    if summary.len() > 1 {
        out!("-- open-loop latency round");
        for (i, t) in targets.iter().enumerate() {
            let rate = rate_for(&summary[i.max(1)]);
            let paced = LoadArgs {
                rate,
                ..load.clone()
            };
            latency_runs.push(run_load(t, &paced).await?);
            sleep(Duration::from_millis(300)).await;
        }
    }

    let base = summary[0].pps.max(1e-9);
    out!(
        "\nmedian of {rounds} rounds, {} pairs, {} B packets, {} s each, unpaced (bench and relay share this machine's CPUs):",
        load.pairs,
        load.size,
        load.duration
    );
    let rows: Vec<_> = summary
        .into_iter()
        .map(|r| {
            let ratio = r.pps / base;
            (r, Some(ratio))
        })
        .collect();
    print_throughput_table(&rows);
    if !latency_runs.is_empty() {
        let how = match latency_rate {
            0 => "half of the relay's peak".to_owned(),
            r => format!("{r} pps"),
        };
        out!("\nopen-loop latency at {how}:");
        out!("\n| transport | offered pps | delivered pps | p50 µs | p99 µs | p999 µs | lost |");
        out!("|---|---:|---:|---:|---:|---:|---:|");
        for r in &latency_runs {
            out!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                r.label,
                r.rate_per_pair * load.pairs as u64,
                r.pps,
                r.p50_us,
                r.p99_us,
                r.p999_us,
                r.lost()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- idle

async fn idle(url: &str, clients: usize, pid: u32, concurrency: usize) -> Result<()> {
    let url = BenchUrl::parse(url)?;
    raise_nofile_limit(clients as u64 + 256);
    let target = Target::Derp(url);
    let before = rss_kib(pid)?;
    out!("relay pid {pid} VmRSS before: {before} KiB");
    let t = Instant::now();
    let conns: Vec<Endpoint> = futures_util::stream::iter(0..clients)
        .map(|_| open_endpoint(&target, ROLE_RECEIVER, 0))
        .buffer_unordered(concurrency)
        .try_collect()
        .await
        .context("opening idle clients")?;
    let secs = t.elapsed().as_secs_f64();
    out!(
        "opened {clients} {} clients in {secs:.2} s ({:.0}/s)",
        target.label(),
        clients as f64 / secs
    );
    let after = stable_rss_kib(pid).await?;
    let per = (after as f64 - before as f64) / clients.max(1) as f64;
    out!("relay VmRSS with {clients} idle clients: {after} KiB, {per:.2} KiB per client");
    drop(conns);
    let closed = stable_rss_kib(pid).await?;
    out!("relay VmRSS after closing them: {closed} KiB");
    out!(
        "\n| transport | clients | RSS before KiB | RSS with clients KiB | KiB per client | RSS after close KiB |"
    );
    out!("|---|---:|---:|---:|---:|---:|");
    out!(
        "| {} | {clients} | {before} | {after} | {per:.2} | {closed} |",
        target.label()
    );
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// Samples RSS until two consecutive samples 250 ms apart agree within 1%
/// (allocator and lazily grown buffers settle after the connections do).
async fn stable_rss_kib(pid: u32) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    sleep(Duration::from_millis(500)).await;
    let mut prev = rss_kib(pid)?;
    loop {
        sleep(Duration::from_millis(250)).await;
        let cur = rss_kib(pid)?;
        if cur.abs_diff(prev) <= (prev / 100).max(64) || Instant::now() > deadline {
            return Ok(cur);
        }
        prev = cur;
    }
}

fn raise_nofile_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok && lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    if !ok || lim.rlim_cur < want {
        out!(
            "warning: open-file limit {} is below {want}; raise it with `ulimit -n`",
            lim.rlim_cur
        );
    }
}

// ---------------------------------------------------------------- forwarder

/// A `forward-server` child process: separate so that its CPU is accounted
/// like a relay's, not mixed with the load generator's.
struct ForwarderChild {
    child: Child,
    addr: SocketAddr,
}

impl ForwarderChild {
    async fn spawn() -> Result<Self> {
        let exe = std::env::current_exe().context("locating derp-bench executable")?;
        let mut child = Command::new(exe)
            .args([
                "forward-server",
                "--addr",
                "127.0.0.1:0",
                "--exit-on-stdin-eof",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting forward-server child")?;
        let stdout = child.stdout.take().context("forward-server stdout")?;
        // Blocking read on a helper thread, so a silent child hits the timeout.
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        });
        let line = match timeout(CONNECT_TIMEOUT, read).await {
            Ok(Ok(Ok(line))) => line,
            _ => String::new(),
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok());
        match addr {
            Some(addr) => Ok(ForwarderChild { child, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("forward-server printed {line:?} instead of its address")
            }
        }
    }
}

impl Drop for ForwarderChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The baseline: each sender's bytes are copied to its receiver, nothing else.
/// Clients open with 9 bytes: role (0 sender, 1 receiver) and a pair id.
async fn forward_server(addr: SocketAddr, exit_on_stdin_eof: bool) -> Result<()> {
    ensure!(
        addr.ip().is_loopback(),
        "forward-server only listens on loopback"
    );
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    out!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    if exit_on_stdin_eof {
        // Our parent holds the pipe: if it dies, even by SIGKILL, we follow.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    let waiting: Arc<Mutex<HashMap<u64, (u8, TcpStream)>>> = Arc::default();
    loop {
        let (mut stream, _) = listener.accept().await?;
        let waiting = waiting.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut hello = [0u8; 9];
            if !matches!(
                timeout(CONNECT_TIMEOUT, stream.read_exact(&mut hello)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let (role, id) = (
                hello[0],
                u64::from_be_bytes(hello[1..].try_into().unwrap_or_default()),
            );
            let peer = {
                let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                match w.remove(&id) {
                    Some((r, s)) if r != role => Some(s),
                    _ => {
                        w.insert(id, (role, stream));
                        return;
                    }
                }
            };
            let Some(peer) = peer else { return };
            let (sender, receiver) = if role == ROLE_SENDER {
                (stream, peer)
            } else {
                (peer, stream)
            };
            let (srd, _swr) = sender.into_split();
            let (_rrd, mut rwr) = receiver.into_split();
            let mut srd = BufReader::with_capacity(READ_CHUNK, srd);
            let _ = tokio::io::copy_buf(&mut srd, &mut rwr).await;
            let _ = rwr.shutdown().await;
        });
    }
}

// ---------------------------------------------------------------- tofu

/// One relay child of the `tofu` mode, with the bindings it was given.
struct TofuRelay {
    child: Child,
    url: BenchUrl,
    label: String,
    bindings: usize,
    _dir: tempfile_dir::Dir,
}

impl Drop for TofuRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop (the bench has no tempfile crate).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> std::io::Result<Self> {
            let p = std::env::temp_dir().join(format!(
                "derp-bench-{tag}-{}-{}",
                std::process::id(),
                super::now_ns()
            ));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Cheap distinct filler keys (any 32 bytes are a valid binding key).
fn filler_key(i: u64) -> PublicKey {
    let mut k = [0u8; KEY_LEN];
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for chunk in k.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    PublicKey(k)
}

/// Writes a bindings store of `total` keys that includes `bound`, as a
/// relay would have left it (snapshot plus a journal of its generation), and
/// starts `relay` on it with `--tofu-lock`.
async fn start_tofu_relay(
    relay: &std::path::Path,
    total: usize,
    bound: &[PublicKey],
) -> Result<TofuRelay> {
    use derp_relay::admission::bindings::{Bindings, unix_now};
    let dir = tempfile_dir::Dir::new(&format!("tofu{total}"))?;
    let path = dir.path().join("tofu-bindings.json");
    let mut b = Bindings::default();
    let now = unix_now();
    let addr: SocketAddr = ([192, 0, 2, 1], 0).into();
    for (i, k) in bound.iter().enumerate() {
        b.seen(*k, None, addr, now - 60 + (i % 60) as u64);
    }
    for i in 0..total.saturating_sub(bound.len()) as u64 {
        b.seen(filler_key(i), None, addr, now - 86_400 - i % 86_400);
    }
    b.write_atomic(&path).context("writing bindings")?;
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let mut child = Command::new(relay)
        .args([
            "--open-relay",
            "--tofu-lock",
            "--rate-limit",
            "0",
            "--max-pending-per-ip",
            "0",
            "--max-clients",
            "0",
            "--tofu-max-bindings",
            "0",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn,derp_relay::relay=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", relay.display()))?;
    let stderr = child.stderr.take().context("relay stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining the log so the relay never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if !sent && let Some(i) = line.find("addr=") {
                let rest = &line[i + 5..];
                let end = rest.find(' ').unwrap_or(rest.len());
                if let Ok(a) = rest[..end].parse::<SocketAddr>() {
                    let _ = tx.send(a);
                    sent = true;
                }
            }
        }
    });
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await?
        .context("relay did not print its listen address")?;
    out!(
        "relay with {total} bindings ({:.1} MB snapshot) listening on {addr}",
        size as f64 / 1e6
    );
    Ok(TofuRelay {
        child,
        url: BenchUrl::parse(&format!("http://{addr}/derp"))?,
        label: format!("{total} bindings"),
        bindings: total,
        _dir: dir,
    })
}

async fn connect_as(url: &BenchUrl, secret: &ClientSecret) -> Result<Endpoint> {
    let (mut rd, mut wr) = client::open(&url.url, &connect_options()).await?;
    let hs = client::handshake(&mut rd, &mut wr, secret, br#"{"version":2}"#).await?;
    Ok(Endpoint {
        rd,
        wr,
        key: secret.public(),
        rate_limit: hs.rate_limit(),
    })
}

struct TofuResult {
    label: String,
    bindings: usize,
    admissions: u64,
    failures: u64,
    adm_p50_us: f64,
    adm_p99_us: f64,
    adm_max_us: f64,
    pkt_sent: u64,
    pkt_received: u64,
    pkt_p50_us: f64,
    pkt_p99_us: f64,
    pkt_max_us: f64,
    rss_kib: u64,
}

/// One measured round against one relay: a paced pair plus `reconnectors`
/// bound keys that connect, handshake and close in a loop.
async fn tofu_round(
    r: &TofuRelay,
    pair: &[ClientSecret; 2],
    loopers: &[ClientSecret],
    args: &TofuArgs,
) -> Result<TofuResult> {
    let (rate, size, secs) = (args.rate, args.size, args.duration);
    // Each reconnecting key waits this long between its connects.
    let every = (args.reconnect_rate > 0)
        .then(|| Duration::from_secs_f64(loopers.len() as f64 / args.reconnect_rate as f64));
    let rx = timeout(CONNECT_TIMEOUT, connect_as(&r.url, &pair[1]))
        .await
        .context("receiver connect timed out")??;
    let tx = timeout(CONNECT_TIMEOUT, connect_as(&r.url, &pair[0]))
        .await
        .context("sender connect timed out")??;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(None::<(Instant, Instant)>);
    let peer_gone = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(RecvProgress::default());
    let dst = rx.key;
    let recv_task = tokio::spawn(receive(rx, progress.clone(), stop_rx, peer_gone.clone()));
    let (pong_tx, pong_rx) = mpsc::unbounded_channel();
    let drain = tokio::spawn(drain_sender_reads(tx.rd, pong_tx, peer_gone.clone()));
    let job = SendJob {
        dst,
        size,
        rate,
        ready: progress.clone(),
        start: start_rx,
    };
    let send_task = tokio::spawn(send(tx.wr, job, pong_rx));
    let warm = Instant::now() + WARMUP_TIMEOUT;
    while !progress.ready.load(Relaxed) {
        ensure!(Instant::now() < warm, "{}: no warm-up packet", r.label);
        sleep(Duration::from_millis(5)).await;
    }

    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let adm = Arc::new(Mutex::new(new_histogram()));
    let failures = Arc::new(AtomicU64::new(0));
    let mut loop_tasks = Vec::new();
    for s in loopers {
        let s = ClientSecret::from_bytes(s.to_bytes());
        let url = r.url.clone();
        let adm = adm.clone();
        let failures = failures.clone();
        let offset = every.map(|e| e.mul_f64(loop_tasks.len() as f64 / loopers.len() as f64));
        loop_tasks.push(tokio::spawn(async move {
            let mut next = start + offset.unwrap_or_default();
            while Instant::now() < end {
                if let Some(e) = every {
                    sleep_until(next.into()).await;
                    next += e;
                }
                let t = Instant::now();
                match timeout(CONNECT_TIMEOUT, connect_as(&url, &s)).await {
                    Ok(Ok(ep)) => {
                        let us = t.elapsed().as_nanos() as u64;
                        adm.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .saturating_record(us.max(1));
                        drop(ep);
                    }
                    _ => {
                        failures.fetch_add(1, Relaxed);
                        sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    start_tx.send_replace(Some((start, end)));
    let (sent, wr) = send_task.await.context("sender panicked")??;
    for t in loop_tasks {
        let _ = t.await;
    }
    let drain_end = Instant::now() + Duration::from_secs(2);
    while progress.received.load(Relaxed) < sent && Instant::now() < drain_end {
        sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send_replace(true);
    let hist = timeout(Duration::from_secs(5), recv_task)
        .await
        .context("receiver did not stop")?
        .context("receiver panicked")??;
    drain.abort();
    drop(wr);
    let rss = rss_kib(r.child.id()).unwrap_or(0);
    let adm = adm.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(TofuResult {
        label: r.label.clone(),
        bindings: r.bindings,
        admissions: adm.len(),
        failures: failures.load(Relaxed),
        adm_p50_us: us(&adm, 0.5),
        adm_p99_us: us(&adm, 0.99),
        adm_max_us: adm.max() as f64 / 1000.0,
        pkt_sent: sent,
        pkt_received: hist.len(),
        pkt_p50_us: us(&hist, 0.5),
        pkt_p99_us: us(&hist, 0.99),
        pkt_max_us: hist.max() as f64 / 1000.0,
        rss_kib: rss,
    })
}

/// Admission and relaying under a reconnect loop, against a relay holding a
/// large bindings set and one holding a small one, alternating rounds.
async fn tofu_bench(args: TofuArgs) -> Result<()> {
    ensure!(
        args.reconnectors + 2 <= args.small,
        "--small must hold the reconnecting keys and the pair"
    );
    ensure!(args.small <= args.big, "--small must not exceed --big");
    raise_nofile_limit(4096);
    let pair = [ClientSecret::generate(), ClientSecret::generate()];
    let loopers: Vec<ClientSecret> = (0..args.reconnectors)
        .map(|_| ClientSecret::generate())
        .collect();
    let bound: Vec<PublicKey> = pair
        .iter()
        .chain(&loopers)
        .map(ClientSecret::public)
        .collect();
    let relays = [
        start_tofu_relay(&args.relay, args.big, &bound).await?,
        start_tofu_relay(&args.relay, args.small, &bound).await?,
    ];
    // Each relay on its own in turn (they share the two cores), rounds alternating.
    let mut rows: Vec<Vec<TofuResult>> = vec![Vec::new(), Vec::new()];
    for round in 0..args.rounds.max(1) {
        for (i, r) in relays.iter().enumerate() {
            let res = tofu_round(r, &pair, &loopers, &args).await?;
            out!(
                "round {} {:>16}: {} admissions ({} failed), handshake p50 {:.0} µs p99 {:.0} µs max {:.0} µs; packets {}/{} p50 {:.0} µs p99 {:.0} µs max {:.0} µs; RSS {} KiB",
                round + 1,
                res.label,
                res.admissions,
                res.failures,
                res.adm_p50_us,
                res.adm_p99_us,
                res.adm_max_us,
                res.pkt_received,
                res.pkt_sent,
                res.pkt_p50_us,
                res.pkt_p99_us,
                res.pkt_max_us,
                res.rss_kib
            );
            rows[i].push(res);
        }
    }
    out!(
        "\n{} reconnecting bound keys ({}), one pair paced at {} pkt/s of {} B, {} s per round, median of {} rounds",
        args.reconnectors,
        match args.reconnect_rate {
            0 => "unpaced".to_string(),
            r => format!("{r} reconnects/s in all"),
        },
        args.rate,
        args.size,
        args.duration,
        args.rounds.max(1)
    );
    out!(
        "| bindings | admissions/s | handshake p50 µs | handshake p99 µs | packet p50 µs | packet p99 µs | packet max µs | lost | relay RSS MiB |"
    );
    out!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for rs in &rows {
        let m = |f: fn(&TofuResult) -> f64| median(rs.iter().map(f).collect());
        let lost: u64 = rs
            .iter()
            .map(|r| r.pkt_sent.saturating_sub(r.pkt_received))
            .sum();
        out!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.1} |",
            rs[0].bindings,
            m(|r| r.admissions as f64) / args.duration,
            m(|r| r.adm_p50_us),
            m(|r| r.adm_p99_us),
            m(|r| r.pkt_p50_us),
            m(|r| r.pkt_p99_us),
            m(|r| r.pkt_max_us),
            lost,
            m(|r| r.rss_kib as f64) / 1024.0
        );
    }
    Ok(())
}

#[derive(Args, Clone, Debug)]
struct TofuArgs {
    /// The relay binary to start (twice): e.g. target/release/derp-relay.
    #[arg(long)]
    relay: std::path::PathBuf,
    /// Bindings in the large relay's file.
    #[arg(long, default_value_t = 200_000)]
    big: usize,
    /// Bindings in the small relay's file.
    #[arg(long, default_value_t = 64)]
    small: usize,
    /// Bound keys that reconnect in a loop, concurrently.
    #[arg(long, default_value_t = 32)]
    reconnectors: usize,
    /// Packets/s of the paced pair.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Reconnects per second over all reconnecting keys; 0 = as fast as
    /// they go (then the two cores are saturated by handshakes).
    #[arg(long, default_value_t = 0)]
    reconnect_rate: u64,
    #[arg(long, default_value_t = 1280)]
    size: usize,
    /// Seconds per round.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

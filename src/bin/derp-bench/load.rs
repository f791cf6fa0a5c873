//! One load run: sender→receiver pairs through a relay or the forwarder,
//! with addressing, transports and the per-packet stamps.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::BytesMut;
use clap::Args;
use derp_relay::client::{self, ConnectOptions, FrameReader, FrameWriter, RelayUrl, connect_tcp};
use derp_relay::protocol::PublicKey;
use derp_relay::protocol::frame::{
    FrameType, HEADER_LEN, MAX_PACKET_SIZE, ServerFrame, encode_pong, encode_send_packet,
};
use derp_relay::protocol::handshake::ClientSecret;

use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout};

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const WARMUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Unpaced senders fill about this much per write: large enough to amortise
/// the syscall, small enough to stay inside one socket buffer.
pub(crate) const BATCH_BYTES: usize = 64 << 10;
pub(crate) const READ_CHUNK: usize = 64 << 10;
/// Sequence number of warm-up packets, which prove the route exists and are
/// not measured.
pub(crate) const WARMUP_SEQ: u64 = u64::MAX;
/// Bytes of each packet used for sequence number and send timestamp.
pub(crate) const STAMP_LEN: usize = 16;
pub(crate) const KEY_LEN: usize = 32;
pub(crate) const ROLE_SENDER: u8 = 0;
pub(crate) const ROLE_RECEIVER: u8 = 1;

#[derive(Args, Clone, Debug)]
pub(crate) struct LoadArgs {
    /// Sender→receiver pairs (each pair is two connections).
    #[arg(long, default_value_t = 10)]
    pub(crate) pairs: usize,
    /// Packet size in bytes (at least 16: sequence number and timestamp).
    #[arg(long, default_value_t = 1280)]
    pub(crate) size: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// Packets per second per pair, open loop; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
}

pub(crate) fn check_load(load: &LoadArgs) -> Result<()> {
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
pub(crate) enum Target {
    Derp(BenchUrl),
    Forwarder(SocketAddr),
}

impl Target {
    pub(crate) fn label(&self) -> String {
        match self {
            Target::Derp(u) => match (u.url.websocket, u.url.tls) {
                (true, false) => "derp websocket".into(),
                (false, false) => "derp upgrade".into(),
                (true, true) => "derp websocket, TLS".into(),
                (false, true) => "derp upgrade, TLS".into(),
            },
            Target::Forwarder(_) => "tcp forwarder".into(),
        }
    }
}

/// A relay URL this tool agrees to load, on IPv4 loopback only (numbers
/// taken across a network would measure the network): http:// or ws://, or
/// https:// and wss:// to a relay with built-in TLS. The certificate is not
/// checked (the `tls` mode's relay serves a self-signed one); the encryption
/// is what is measured.
#[derive(Clone)]
pub(crate) struct BenchUrl {
    pub(crate) url: RelayUrl,
    pub(crate) text: String,
}

impl BenchUrl {
    pub(crate) fn parse(text: &str) -> Result<Self> {
        let url = RelayUrl::parse(text)?;
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

pub(crate) static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// A fresh loopback source address per connection (127.1.0.1, 127.1.0.2, …,
/// skipping .0 and .255), so per-IP limits and ephemeral ports never collide.
pub(crate) fn next_source_ip() -> Ipv4Addr {
    let n = NEXT_SOURCE.fetch_add(1, Relaxed);
    let mid = n / 254;
    Ipv4Addr::new(
        127,
        1 + ((mid >> 8) % 254) as u8,
        (mid & 0xff) as u8,
        (n % 254 + 1) as u8,
    )
}

/// One TLS client configuration for every connection of the run (as one
/// Tailscale node would reuse its own).
fn bench_tls() -> Result<Arc<tokio_rustls::rustls::ClientConfig>> {
    static CONFIG: OnceLock<Arc<tokio_rustls::rustls::ClientConfig>> = OnceLock::new();
    if let Some(c) = CONFIG.get() {
        return Ok(c.clone());
    }
    let c = client::insecure_tls_config().map_err(anyhow::Error::msg)?;
    Ok(CONFIG.get_or_init(|| c).clone())
}

pub(crate) fn connect_options() -> ConnectOptions {
    ConnectOptions {
        bind: Some(next_source_ip().into()),
        connect_timeout: CONNECT_TIMEOUT,
        ..ConnectOptions::default()
    }
}

/// One process-wide clock so that send and receive timestamps compare directly.
pub(crate) fn now_ns() -> u64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------- transport

/// A connected, handshaken client (or a forwarder endpoint, which has no handshake).
pub(crate) struct Endpoint {
    pub(crate) rd: FrameReader,
    pub(crate) wr: FrameWriter,
    pub(crate) key: PublicKey,
    /// Receive rate limit the relay advertised in ServerInfo, bytes/s.
    pub(crate) rate_limit: Option<u64>,
}

pub(crate) async fn open_endpoint(target: &Target, role: u8, pair_id: u64) -> Result<Endpoint> {
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

pub(crate) async fn connect_derp(url: &BenchUrl) -> Result<Endpoint> {
    let what = if url.url.websocket {
        "WebSocket upgrade"
    } else {
        "HTTP upgrade"
    };
    let mut opts = connect_options();
    if url.url.tls {
        opts.tls = Some(bench_tls()?);
    }
    let (mut rd, mut wr) = client::open(&url.url, &opts)
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

pub(crate) struct RunResult {
    pub(crate) label: String,
    pub(crate) rate_per_pair: u64,
    pub(crate) sent: u64,
    pub(crate) received: u64,
    /// Seconds senders were sending.
    pub(crate) send_secs: f64,
    /// Packets per second delivered, over first send to last receive.
    pub(crate) pps: f64,
    /// Payload megabytes (1e6) per second delivered.
    pub(crate) mbps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
}

impl RunResult {
    pub(crate) fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    pub(crate) fn print(&self) {
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
pub(crate) struct RecvProgress {
    pub(crate) ready: AtomicBool,
    pub(crate) received: AtomicU64,
    pub(crate) last_ns: AtomicU64,
}

pub(crate) static NEXT_PAIR: AtomicU64 = AtomicU64::new(0);

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 ns to 100 s at 3 significant digits; these bounds are always valid.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

pub(crate) async fn run_load(target: &Target, load: &LoadArgs) -> Result<RunResult> {
    run_load_between(target, target, load, target.label()).await
}

/// `run_load` with senders on one target and receivers on another: the mesh
/// bench puts them on different nodes of a region.
pub(crate) async fn run_load_between(
    target: &Target,
    recv_target: &Target,
    load: &LoadArgs,
    label: String,
) -> Result<RunResult> {
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
            .map(|&id| open_endpoint(recv_target, ROLE_RECEIVER, id)),
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

pub(crate) struct SendJob {
    pub(crate) dst: PublicKey,
    pub(crate) size: usize,
    pub(crate) rate: u64,
    pub(crate) ready: Arc<RecvProgress>,
    pub(crate) start: watch::Receiver<Option<(Instant, Instant)>>,
}

/// Sends warm-up packets until the run starts, then the measured stream.
/// Returns the count sent and the writer, which must outlive the drain.
pub(crate) async fn send(
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
pub(crate) async fn ended_early<T>(
    tasks: &mut Vec<JoinHandle<Result<T>>>,
    what: &str,
) -> Result<()> {
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
pub(crate) async fn drain_sender_reads(
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
pub(crate) async fn receive(
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

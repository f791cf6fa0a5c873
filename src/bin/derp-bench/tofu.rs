//! `tofu`: admission and packet latency with a large bindings file vs a small one.

use std::io::{BufRead, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use clap::Args;
use derp_relay::client;
use derp_relay::protocol::PublicKey;
use derp_relay::protocol::handshake::ClientSecret;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, timeout};

use crate::compare::median;
use crate::idle::{raise_nofile_limit, rss_kib};
use crate::load::{
    BenchUrl, CONNECT_TIMEOUT, Endpoint, KEY_LEN, RecvProgress, SendJob, WARMUP_TIMEOUT,
    connect_options, drain_sender_reads, new_histogram, receive, send,
};

/// One relay child of the `tofu` mode, with the bindings it was given.
pub(crate) struct TofuRelay {
    pub(crate) child: Child,
    pub(crate) url: BenchUrl,
    pub(crate) label: String,
    pub(crate) bindings: usize,
    pub(crate) _dir: tempfile_dir::Dir,
}

impl Drop for TofuRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop (the bench has no tempfile crate).
pub(crate) mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> std::io::Result<Self> {
            let p = std::env::temp_dir().join(format!(
                "derp-bench-{tag}-{}-{}",
                std::process::id(),
                crate::load::now_ns()
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

/// Relay flags that admit anyone and turn every per-address and global limit
/// off: the bench spreads its clients over loopback addresses and measures the
/// relay, not its admission gate.
pub(crate) const UNGATED: [&str; 7] = [
    "--open-relay",
    "--rate-limit",
    "0",
    "--max-pending-per-ip",
    "0",
    "--max-clients",
    "0",
];

/// Starts `relay` with `args` and waits for the address it listens on (from
/// its log, which keeps being drained so the relay never blocks on the pipe).
pub(crate) async fn spawn_relay(
    relay: &std::path::Path,
    args: &[std::ffi::OsString],
) -> Result<(Child, SocketAddr, Instant)> {
    let mut child = Command::new(relay)
        .args(args)
        .env("RUST_LOG", "warn,derp_relay::relay=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", relay.display()))?;
    let stderr = child.stderr.take().context("relay stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
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
                    // The address is in the "listening" line: now is when it listens.
                    let _ = tx.send((a, Instant::now()));
                    sent = true;
                }
            }
        }
    });
    let (addr, at) = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await?
        .context("relay did not print its listen address")?;
    Ok((child, addr, at))
}

/// Cheap distinct filler keys (any 32 bytes are a valid binding key).
pub(crate) fn filler_key(i: u64) -> PublicKey {
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
pub(crate) async fn start_tofu_relay(
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
    let mut args: Vec<std::ffi::OsString> = UNGATED
        .into_iter()
        .chain([
            "--tofu-lock",
            "--tofu-max-bindings",
            "0",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .map(Into::into)
        .collect();
    args.push(dir.path().into());
    let (child, addr, _) = spawn_relay(relay, &args).await?;
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

pub(crate) async fn connect_as(url: &BenchUrl, secret: &ClientSecret) -> Result<Endpoint> {
    let (mut rd, mut wr) = client::open(&url.url, &connect_options()).await?;
    let hs = client::handshake(&mut rd, &mut wr, secret, br#"{"version":2}"#).await?;
    Ok(Endpoint {
        rd,
        wr,
        key: secret.public(),
        rate_limit: hs.rate_limit(),
    })
}

pub(crate) struct TofuResult {
    pub(crate) label: String,
    pub(crate) bindings: usize,
    pub(crate) admissions: u64,
    pub(crate) failures: u64,
    pub(crate) adm_p50_us: f64,
    pub(crate) adm_p99_us: f64,
    pub(crate) adm_max_us: f64,
    pub(crate) pkt_sent: u64,
    pub(crate) pkt_received: u64,
    pub(crate) pkt_p50_us: f64,
    pub(crate) pkt_p99_us: f64,
    pub(crate) pkt_max_us: f64,
    pub(crate) rss_kib: u64,
}

/// One measured round against one relay: a paced pair plus `reconnectors`
/// bound keys that connect, handshake and close in a loop.
pub(crate) async fn tofu_round(
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
pub(crate) async fn tofu_bench(args: TofuArgs) -> Result<()> {
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
pub(crate) struct TofuArgs {
    /// The relay binary to start (twice): e.g. target/release/derp-relay.
    #[arg(long)]
    pub(crate) relay: std::path::PathBuf,
    /// Bindings in the large relay's file.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) big: usize,
    /// Bindings in the small relay's file.
    #[arg(long, default_value_t = 64)]
    pub(crate) small: usize,
    /// Bound keys that reconnect in a loop, concurrently.
    #[arg(long, default_value_t = 32)]
    pub(crate) reconnectors: usize,
    /// Packets/s of the paced pair.
    #[arg(long, default_value_t = 2000)]
    pub(crate) rate: u64,
    /// Reconnects per second over all reconnecting keys; 0 = as fast as
    /// they go (then the two cores are saturated by handshakes).
    #[arg(long, default_value_t = 0)]
    pub(crate) reconnect_rate: u64,
    #[arg(long, default_value_t = 1280)]
    pub(crate) size: usize,
    /// Seconds per round.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
}

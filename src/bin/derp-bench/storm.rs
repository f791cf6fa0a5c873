//! `storm`: a reconnect storm. Starts the relay binary, connects many
//! clients in partner pairs until every one is relaying (a packet from its
//! partner arrived), stops the relay with SIGTERM (graceful drain), starts it
//! again on the same address, and measures how long after the new process
//! listens each client is relaying again. Clients reconnect as soon as their
//! connection ends (retrying refused connects with a short jittered backoff)
//! rather than waiting the Restarting frame's hint: this measures the relay,
//! not a client's politeness.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::BytesMut;
use clap::Args;
use derp_relay::protocol::PublicKey;
use derp_relay::protocol::frame::{FrameType, encode_send_packet};
use derp_relay::protocol::handshake::ClientSecret;
use tokio::sync::Semaphore;
use tokio::time::{sleep, timeout};

use crate::idle::raise_nofile_limit;
use crate::load::{BenchUrl, KEY_LEN};
use crate::tofu::{UNGATED, connect_as, spawn_relay, tempfile_dir};

#[derive(Args, Clone, Debug)]
pub(crate) struct StormArgs {
    /// The derp-relay binary to start, stop and start again.
    #[arg(long)]
    relay: PathBuf,
    /// Clients (rounded up to an even number: they relay in partner pairs).
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Address the relay listens on (both runs).
    #[arg(long, default_value = "127.0.0.1:18480")]
    addr: SocketAddr,
    /// Use WebSocket instead of `Upgrade: DERP`.
    #[arg(long)]
    websocket: bool,
    /// Connects in flight at once for the first connection (the storm
    /// after the restart is unthrottled: every client at once).
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Longest wait for all clients to be relaying, per phase, in seconds.
    #[arg(long, default_value_t = 120.0)]
    give_up: f64,
}

impl StormArgs {
    pub(crate) fn time_budget(&self) -> f64 {
        3.0 * self.give_up + 120.0
    }
}

/// Connection number per client: 0 before the restart, 1 after.
const PHASES: usize = 2;
const PROBE_EVERY: Duration = Duration::from_millis(100);
const PROBE: &[u8] = b"storm-probe-from-partner";

struct Shared {
    epoch: Instant,
    /// Nanoseconds after `epoch` at which client i was relaying in each
    /// phase (0 = not yet).
    back: [Vec<AtomicU64>; PHASES],
    relaying: [AtomicUsize; PHASES],
    connects_failed: AtomicU64,
    stop: AtomicBool,
}

pub(crate) async fn storm(a: StormArgs) -> Result<()> {
    let n = a.clients.div_ceil(2) * 2;
    raise_nofile_limit(n as u64 + 512);
    let dir = tempfile_dir::Dir::new("storm")?;
    let scheme = if a.websocket { "ws" } else { "http" };
    let url = BenchUrl::parse(&format!("{scheme}://{}/derp", a.addr))?;
    let secrets: Arc<Vec<ClientSecret>> =
        Arc::new((0..n).map(|_| ClientSecret::generate()).collect());
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        back: std::array::from_fn(|_| (0..n).map(|_| AtomicU64::new(0)).collect()),
        relaying: Default::default(),
        connects_failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    let (mut relay, listening) = start_relay(&a, dir.path()).await?;
    out!(
        "relay listening on {} ({} clients over {})",
        a.addr,
        n,
        url.text
    );
    let gate = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(client(
                i,
                secrets.clone(),
                url.clone(),
                shared.clone(),
                gate.clone(),
            ))
        })
        .collect();
    wait_all(&shared, 0, n, a.give_up).await?;
    let first = t0.elapsed().as_secs_f64();
    let _ = listening;
    out!(
        "phase 1: {n} clients connected, handshaken and relaying in {first:.2} s ({:.0} clients/s, {} connects in flight)",
        n as f64 / first,
        a.concurrency
    );

    // Graceful restart: SIGTERM, wait for the drain to finish, start again.
    let term = Instant::now();
    // SAFETY: kill only sends a signal to the process id we spawned.
    unsafe { libc::kill(relay.id() as libc::pid_t, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || relay.wait().map(|s| (s, relay)))
        .await?
        .context("waiting for the relay to drain")?;
    let drained = term.elapsed().as_secs_f64();
    out!(
        "relay drained and exited ({}) {drained:.2} s after SIGTERM",
        status.0
    );
    let (mut relay2, listening2) = start_relay(&a, dir.path()).await?;
    let since_term = (listening2 - term).as_secs_f64();
    out!("new relay listening {since_term:.2} s after SIGTERM");
    let res = wait_all(&shared, 1, n, a.give_up).await;
    shared.stop.store(true, Relaxed);
    for t in &tasks {
        t.abort();
    }
    let _ = relay2.kill();
    let _ = relay2.wait();
    res?;

    let base = (listening2 - shared.epoch).as_nanos() as u64;
    let mut ms: Vec<f64> = shared.back[1]
        .iter()
        .map(|t| t.load(Relaxed).saturating_sub(base) as f64 / 1e6)
        .collect();
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)];
    let within3 = ms.iter().filter(|&&m| m < 3000.0).count();
    out!(
        "\nreconnect storm: {n} clients, time from the new relay listening until each relays again (connect attempts refused or failed along the way: {})\n",
        shared.connects_failed.load(Relaxed)
    );
    out!("| transport | clients | drain s | p50 ms | p90 ms | p99 ms | all back ms | back < 3 s |");
    out!("|---|---:|---:|---:|---:|---:|---:|---:|");
    out!(
        "| {} | {n} | {drained:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} % |",
        if a.websocket {
            "websocket"
        } else {
            "derp upgrade"
        },
        q(0.5),
        q(0.9),
        q(0.99),
        ms[ms.len() - 1],
        100.0 * within3 as f64 / n as f64
    );
    Ok(())
}

async fn wait_all(shared: &Shared, phase: usize, n: usize, give_up: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(give_up);
    while shared.relaying[phase].load(Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "phase {}: only {} of {n} clients relaying after {give_up} s",
                phase + 1,
                shared.relaying[phase].load(Relaxed)
            );
        }
        sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// One client for the whole run: connect, relay with its partner, and
/// reconnect whenever the connection ends.
async fn client(
    i: usize,
    secrets: Arc<Vec<ClientSecret>>,
    url: BenchUrl,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
) {
    let partner: PublicKey = secrets[i ^ 1].public();
    let mut rng = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut phase = 0usize;
    while !shared.stop.load(Relaxed) && phase < PHASES {
        let mut backoff = Duration::from_millis(10);
        let ep = loop {
            let permit = if phase == 0 {
                gate.clone().acquire_owned().await.ok()
            } else {
                None
            };
            match timeout(Duration::from_secs(5), connect_as(&url, &secrets[i])).await {
                Ok(Ok(ep)) => break ep,
                _ => {
                    drop(permit);
                    shared.connects_failed.fetch_add(1, Relaxed);
                    // xorshift: jitter so refused clients do not retry in lockstep.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let jitter = Duration::from_micros(rng % (backoff.as_micros() as u64 + 1));
                    sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        };
        let (mut rd, mut wr) = (ep.rd, ep.wr);
        let got = Arc::new(AtomicBool::new(false));
        let prober = {
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let mut after = 0;
                while after < 3 {
                    encode_send_packet(&mut buf, &partner, PROBE);
                    if wr.send(&mut buf).await.is_err() {
                        break;
                    }
                    if got.load(Relaxed) {
                        after += 1;
                    }
                    sleep(PROBE_EVERY).await;
                }
                wr
            })
        };
        while let Ok(Some(f)) = rd.next_frame().await {
            if f.frame_type == FrameType::RecvPacket as u8
                && f.payload.len() == KEY_LEN + PROBE.len()
                && f.payload[..KEY_LEN] == partner.0
                && !got.swap(true, Relaxed)
            {
                let at = shared.epoch.elapsed().as_nanos() as u64;
                shared.back[phase][i].store(at.max(1), Relaxed);
                shared.relaying[phase].fetch_add(1, Relaxed);
            }
        }
        prober.abort();
        if got.load(Relaxed) {
            phase += 1;
        }
    }
}

/// Starts the relay and returns it with the moment it said it listens.
async fn start_relay(a: &StormArgs, data_dir: &std::path::Path) -> Result<(Child, Instant)> {
    let args: Vec<std::ffi::OsString> = UNGATED
        .into_iter()
        .chain(["--stun=false", "--shutdown-timeout", "10s", "--addr"])
        .map(Into::into)
        .chain([
            a.addr.to_string().into(),
            "--data-dir".into(),
            data_dir.into(),
        ])
        .collect();
    let (child, _, at) = spawn_relay(&a.relay, &args).await?;
    Ok((child, at))
}

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

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use tokio::time::timeout;

use crate::bandwidth::{BandwidthArgs, bandwidth};
use crate::compare::{compare, print_throughput_table};
use crate::forwarder::{ForwarderChild, forward_server};
use crate::idle::idle;
use crate::load::{BenchUrl, LoadArgs, Target, check_load, run_load, run_load_between};
use crate::mesh::{MeshArgs, mesh_bench};
use crate::storm::{StormArgs, storm};
use crate::stun::stun_flood;
use crate::tls::{TlsArgs, tls_bench};
use crate::tofu::{TofuArgs, tofu_bench};

/// `println!` that ignores a closed stdout (e.g. piped into `head`) rather
/// than panicking in the middle of a run.
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod bandwidth;
mod compare;
mod cpu;
mod forwarder;
mod idle;
mod load;
mod mesh;
mod storm;
mod stun;
mod tls;
mod tofu;

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
        /// Connect the receivers here instead (another node of a meshed
        /// region): packets cross the mesh link.
        #[arg(long)]
        receiver_url: Option<String>,
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
        /// Process id of the relay behind the URLs: its CPU per delivered
        /// packet is reported beside the forwarder's.
        #[arg(long)]
        relay_pid: Option<u32>,
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
    /// Same-node against cross-node pairs on meshed relays it starts (both
    /// transports, throughput and paced latency), then a joining node's key flood.
    Mesh(MeshArgs),
    /// Built-in TLS beside plain HTTP, both transports, in alternating rounds
    /// against two relays it starts (one plain, one --tls-self-signed).
    Tls(TlsArgs),
    /// A client sending flat out through a relay with --client-bytes-per-sec:
    /// its delivered rate against the limit, and light pairs beside it.
    Bandwidth(BandwidthArgs),
    /// Reconnect storm: many clients relaying, the relay restarted (SIGTERM
    /// drain, start again), time until each relays again.
    Storm(StormArgs),
    /// The baseline forwarder itself; prints `listening on ADDR` first.
    ForwardServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Exit when standard input closes (set when a bench process owns us).
        #[arg(long)]
        exit_on_stdin_eof: bool,
    },
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
        // Four runs per transport per round, plus start-up and the flood.
        Mode::Mesh(a) => {
            180.0 + a.flood_keys as f64 / 50.0 + per_run(&a.load) * 8.0 * a.rounds.max(1) as f64
        }
        Mode::Tls(a) => 60.0 + per_run(&a.load) * 4.0 * a.rounds.max(1) as f64,
        Mode::Bandwidth(a) => a.time_budget(),
        Mode::Storm(a) => a.time_budget(),
        Mode::ForwardServer { .. } => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

async fn run(mode: Mode) -> Result<()> {
    match mode {
        Mode::Throughput {
            url,
            receiver_url,
            load,
        } => {
            check_load(&load)?;
            let target = Target::Derp(BenchUrl::parse(&url)?);
            let r = match receiver_url {
                Some(r) => {
                    let to = Target::Derp(BenchUrl::parse(&r)?);
                    let label = format!("{} → receivers on {r}", target.label());
                    run_load_between(&target, &to, &load, label).await?
                }
                None => run_load(&target, &load).await?,
            };
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
            relay_pid,
        } => compare(&url, &load, rounds.max(1), latency_rate, relay_pid).await?,
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
        Mode::Mesh(args) => mesh_bench(args).await?,
        Mode::Tls(args) => tls_bench(args).await?,
        Mode::Bandwidth(args) => bandwidth(args).await?,
        Mode::Storm(args) => storm(args).await?,
        Mode::ForwardServer {
            addr,
            exit_on_stdin_eof,
        } => forward_server(addr, exit_on_stdin_eof).await?,
    }
    Ok(())
}

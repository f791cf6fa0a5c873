//! `tls`: the cost of built-in TLS. Starts two relays from the same binary,
//! one plain and one with `--tls-self-signed 127.0.0.1`, and drives both
//! transports of each in alternating rounds, so the four numbers share one
//! machine state; reports medians and TLS as a fraction of plain per
//! transport.

use std::ffi::OsString;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use tokio::time::sleep;

use crate::compare::{median_result, print_throughput_table};
use crate::load::{BenchUrl, LoadArgs, RunResult, Target, check_load, run_load};
use crate::tofu::{UNGATED, spawn_relay, tempfile_dir};

#[derive(Args, Clone, Debug)]
pub(crate) struct TlsArgs {
    /// The relay binary to start (twice): e.g. target/release/derp-relay.
    #[arg(long)]
    pub(crate) relay: std::path::PathBuf,
    #[command(flatten)]
    pub(crate) load: LoadArgs,
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
}

/// One relay child; killed on drop.
struct RelayChild {
    child: std::process::Child,
    _dir: tempfile_dir::Dir,
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(relay: &std::path::Path, tls: bool) -> Result<(RelayChild, std::net::SocketAddr)> {
    let dir = tempfile_dir::Dir::new(if tls { "tls" } else { "plain" })?;
    let mut args: Vec<OsString> = UNGATED
        .into_iter()
        // Two relays at once: neither needs the STUN port.
        .chain(["--stun=false", "--addr", "127.0.0.1:0"])
        .map(Into::into)
        .collect();
    if tls {
        args.extend(["--tls-self-signed", "127.0.0.1"].map(Into::into));
    }
    args.push("--data-dir".into());
    args.push(dir.path().into());
    let (child, addr, _) = spawn_relay(relay, &args).await?;
    out!(
        "{} relay pid {} on {addr}",
        if tls { "TLS" } else { "plain" },
        child.id()
    );
    Ok((RelayChild { child, _dir: dir }, addr))
}

pub(crate) async fn tls_bench(a: TlsArgs) -> Result<()> {
    check_load(&a.load)?;
    let (_plain, p) = start(&a.relay, false).await?;
    let (_tls, t) = start(&a.relay, true).await?;
    let targets = [
        format!("http://{p}/derp"),
        format!("ws://{p}/derp"),
        format!("https://{t}/derp"),
        format!("wss://{t}/derp"),
    ]
    .iter()
    .map(|u| BenchUrl::parse(u).map(Target::Derp))
    .collect::<Result<Vec<_>>>()?;
    let load = LoadArgs {
        rate: 0,
        ..a.load.clone()
    };
    let mut runs: Vec<Vec<RunResult>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=a.rounds {
        out!(
            "-- round {round}/{}: {} pairs, {} B, {} s, unpaced",
            a.rounds,
            load.pairs,
            load.size,
            load.duration
        );
        for (t, out) in targets.iter().zip(&mut runs) {
            let r = run_load(t, &load)
                .await
                .with_context(|| format!("round {round}, {}", t.label()))?;
            out!("   {}: {:.0} pps, {:.1} MB/s", r.label, r.pps, r.mbps);
            out.push(r);
            // Let closed connections leave the relay before the next run.
            sleep(Duration::from_millis(300)).await;
        }
    }
    let summary: Vec<RunResult> = targets
        .iter()
        .zip(&runs)
        .map(|(t, rs)| median_result(t.label(), rs))
        .collect();
    out!(
        "\nmedian of {} rounds, {} pairs, {} B packets, {} s each, unpaced; \"vs forwarder\" is TLS vs plain on the same transport:",
        a.rounds,
        load.pairs,
        load.size,
        load.duration
    );
    // Plain rows have no ratio; each TLS row is divided by its plain transport.
    let ratios = [None, None, Some(0), Some(1)];
    let pps: Vec<f64> = summary.iter().map(|r| r.pps).collect();
    let rows: Vec<_> = summary
        .into_iter()
        .zip(ratios)
        .map(|(r, base)| {
            let ratio = base.map(|b: usize| r.pps / pps[b].max(1e-9));
            (r, ratio)
        })
        .collect();
    print_throughput_table(&rows);
    for (name, plain, tls) in [("Upgrade: DERP", 0, 2), ("WebSocket", 1, 3)] {
        out!(
            "TLS/plain, {name}: {:.0}%",
            100.0 * pps[tls] / pps[plain].max(1e-9)
        );
    }
    Ok(())
}

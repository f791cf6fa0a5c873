//! Reports, and `compare`: forwarder and relay transports side by side.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Result;
use tokio::time::sleep;

use crate::cpu;
use crate::forwarder::ForwarderChild;
use crate::load::{
    BenchUrl, LoadArgs, ROLE_RECEIVER, RunResult, Target, check_load, open_endpoint, run_load,
};

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median of each figure over rounds of one target, as one row.
pub(crate) fn median_result(label: String, rs: &[RunResult]) -> RunResult {
    let med = |f: fn(&RunResult) -> f64| median(rs.iter().map(f).collect());
    RunResult {
        label,
        rate_per_pair: 0,
        sent: med(|r| r.sent as f64) as u64,
        received: med(|r| r.received as f64) as u64,
        send_secs: med(|r| r.send_secs),
        pps: med(|r| r.pps),
        mbps: med(|r| r.mbps),
        p50_us: med(|r| r.p50_us),
        p99_us: med(|r| r.p99_us),
        p999_us: med(|r| r.p999_us),
        max_us: med(|r| r.max_us),
    }
}

/// Rows of (result, ratio to forwarder).
pub(crate) fn print_throughput_table(rows: &[(RunResult, Option<f64>)]) {
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

pub(crate) async fn compare(
    urls: &[String],
    load: &LoadArgs,
    rounds: usize,
    latency_rate: u64,
    relay_pid: Option<u32>,
) -> Result<()> {
    check_load(load)?;
    let relays = urls
        .iter()
        .map(|u| BenchUrl::parse(u).map(Target::Derp))
        .collect::<Result<Vec<_>>>()?;
    if let Some(p) = relay_pid {
        anyhow::ensure!(
            cpu::seconds(p).is_some(),
            "--relay-pid {p}: no /proc/{p}/stat to read its CPU time from"
        );
    }
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

    let server_pid = |t: &Target| match t {
        Target::Forwarder(_) => Some(fwd.child.id()),
        Target::Derp(_) => relay_pid,
    };
    let mut runs: Vec<Vec<RunResult>> = targets.iter().map(|_| Vec::new()).collect();
    // Per run: (server CPU, load generator CPU), µs per delivered packet.
    let mut cpu_runs: Vec<Vec<(Option<f64>, Option<f64>)>> =
        targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        out!(
            "-- round {round}/{rounds}: {} pairs, {} B, {} s, unpaced",
            load.pairs,
            load.size,
            load.duration
        );
        for ((t, out), cpu_out) in targets.iter().zip(&mut runs).zip(&mut cpu_runs) {
            let server = server_pid(t).map(cpu::Span::start);
            let bench = cpu::Span::start(std::process::id());
            let r = run_load(t, &peak_load).await?;
            cpu_out.push((
                server.and_then(|s| s.per_packet_us(r.received)),
                bench.per_packet_us(r.received),
            ));
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
    print_cpu_table(&targets, &cpu_runs, relay_pid.is_some());
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

/// Medians of the unpaced rounds' CPU per delivered packet: the server's
/// (forwarder or relay) and the load generator's own (whose clients speak
/// DERP, and WebSocket framing, to a relay but only raw bytes to the
/// forwarder). On a machine shared with other tenants throughput moves by
/// tens of percent from run to run; CPU per packet much less.
fn print_cpu_table(targets: &[Target], runs: &[Vec<(Option<f64>, Option<f64>)>], relay: bool) {
    let med = |v: Vec<Option<f64>>| -> Option<f64> {
        let v: Option<Vec<f64>> = v.into_iter().collect();
        v.filter(|v| !v.is_empty()).map(median)
    };
    let rows: Vec<(String, Option<f64>, Option<f64>)> = targets
        .iter()
        .zip(runs)
        .map(|(t, rs)| {
            (
                t.label(),
                med(rs.iter().map(|r| r.0).collect()),
                med(rs.iter().map(|r| r.1).collect()),
            )
        })
        .collect();
    let base = rows.first().and_then(|r| r.1);
    let fmt = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2}"));
    out!("\nCPU per delivered packet, unpaced rounds (median):");
    if !relay {
        out!("(relay figures need --relay-pid)");
    }
    out!("\n| transport | server CPU µs/pkt | vs forwarder | load generator CPU µs/pkt |");
    out!("|---|---:|---:|---:|");
    for (label, server, bench) in &rows {
        let ratio = match (server, base) {
            (Some(s), Some(b)) if b > 0.0 => format!("{:.2}x", s / b),
            _ => "-".to_owned(),
        };
        out!("| {label} | {} | {ratio} | {} |", fmt(*server), fmt(*bench));
    }
}

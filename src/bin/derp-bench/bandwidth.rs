//! `bandwidth`: what `--client-bytes-per-sec` does to a client that sends
//! flat out, and to paced clients beside it. Point it at a relay started with
//! the limit; it reports the heavy client's delivered rate against the limit
//! (after a warm-up that spends the burst and the sockets' buffers) and the
//! light pairs' delivery and latency alone and alongside, from one run.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::BytesMut;
use clap::Args;
use derp_relay::protocol::frame::{FrameType, HEADER_LEN, encode_send_packet};

use crate::load::{
    BenchUrl, KEY_LEN, LoadArgs, ROLE_RECEIVER, ROLE_SENDER, RunResult, Target, open_endpoint,
    run_load,
};

#[derive(Args, Clone, Debug)]
pub(crate) struct BandwidthArgs {
    /// Relay URL (http://… or ws://…) of a relay started with --client-bytes-per-sec.
    #[arg(long)]
    url: String,
    /// The relay's --client-bytes-per-sec, to compare the delivered rate with.
    #[arg(long)]
    limit: u64,
    /// Seconds the heavy client's delivered rate is measured over (after warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of flat-out sending before measuring: spends the burst and
    /// fills the socket buffers between the sender and the relay.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Light sender→receiver pairs beside the heavy client.
    #[arg(long, default_value_t = 4)]
    light_pairs: usize,
    /// Packets per second per light pair (their bytes must stay under the limit).
    #[arg(long, default_value_t = 200)]
    light_rate: u64,
    /// Packet size in bytes.
    #[arg(long, default_value_t = 1280)]
    size: usize,
}

impl BandwidthArgs {
    pub(crate) fn time_budget(&self) -> f64 {
        2.0 * (self.duration + self.warmup) + 120.0
    }
}

pub(crate) async fn bandwidth(a: BandwidthArgs) -> Result<()> {
    let url = BenchUrl::parse(&a.url)?;
    let target = Target::Derp(url);
    let frame = (HEADER_LEN + KEY_LEN + a.size) as u64;
    if a.limit == 0 {
        bail!("--limit: give the relay's --client-bytes-per-sec (not 0)");
    }
    if a.light_rate * frame >= a.limit {
        bail!(
            "--light-rate {} × {frame} B is not below --limit {}: light pairs would be limited too",
            a.light_rate,
            a.limit
        );
    }
    let light = LoadArgs {
        pairs: a.light_pairs,
        size: a.size,
        duration: a.duration,
        rate: a.light_rate,
    };
    let alone = if a.light_pairs > 0 {
        Some(
            run_load(&target, &light)
                .await
                .context("light pairs alone")?,
        )
    } else {
        None
    };

    let mut rx = open_endpoint(&target, ROLE_RECEIVER, 0).await?;
    let mut tx = open_endpoint(&target, ROLE_SENDER, 0).await?;
    let dst = rx.key;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let size = a.size;
        tokio::spawn(async move {
            let payload = vec![7u8; size];
            let mut buf = BytesMut::new();
            while !stop.load(Relaxed) {
                for _ in 0..16 {
                    encode_send_packet(&mut buf, &dst, &payload);
                }
                tx.wr.send(&mut buf).await.context("heavy sender")?;
            }
            anyhow::Ok(())
        })
    };
    // Frames delivered to the heavy receiver, and when the window opened.
    let delivered = Arc::new(AtomicU64::new(0));
    let receiver = {
        let delivered = delivered.clone();
        tokio::spawn(async move {
            while let Some(f) = rx.rd.next_frame().await? {
                if f.frame_type == FrameType::RecvPacket as u8 {
                    delivered.fetch_add(1, Relaxed);
                }
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    let (n0, t0) = (delivered.load(Relaxed), Instant::now());
    let beside = if a.light_pairs > 0 {
        Some(
            run_load(&target, &light)
                .await
                .context("light pairs beside")?,
        )
    } else {
        tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
        None
    };
    let (n1, secs) = (delivered.load(Relaxed), t0.elapsed().as_secs_f64());
    stop.store(true, Relaxed);
    receiver.abort();
    sender.abort();
    let rate = (n1 - n0) as f64 * frame as f64 / secs;
    let ratio = rate / a.limit as f64;

    out!(
        "\n{} client flat out under --client-bytes-per-sec {}: {} frames of {frame} B in {secs:.2} s",
        target.label(),
        a.limit,
        n1 - n0
    );
    out!("\n| what | limit B/s | delivered B/s | delivered / limit |");
    out!("|---|---:|---:|---:|");
    out!(
        "| limited client, flat out | {} | {rate:.0} | {:.1} % |",
        a.limit,
        ratio * 100.0
    );
    if let (Some(alone), Some(beside)) = (alone, beside) {
        let row = |what: &str, r: &RunResult| {
            out!(
                "| {what} | {:.0} | {:.0} | {} | {:.0} | {:.0} |",
                r.sent as f64 / r.send_secs,
                r.pps,
                r.lost(),
                r.p50_us,
                r.p99_us
            );
        };
        out!(
            "\n{} light pairs at {} pkt/s each (under the limit):\n",
            a.light_pairs,
            a.light_rate
        );
        out!("| light pairs | offered pps | delivered pps | lost | p50 µs | p99 µs |");
        out!("|---|---:|---:|---:|---:|---:|");
        row("alone", &alone);
        row("beside the limited client", &beside);
    }
    if (ratio - 1.0).abs() > 0.10 {
        out!("note: delivered rate is more than 10 % from the limit");
    }
    Ok(())
}

//! `idle`: memory per handshaken idle client from the relay's VmRSS.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures_util::{StreamExt as _, TryStreamExt as _};
use tokio::time::sleep;

use crate::load::{BenchUrl, Endpoint, ROLE_RECEIVER, Target, open_endpoint};

pub(crate) async fn idle(url: &str, clients: usize, pid: u32, concurrency: usize) -> Result<()> {
    let url = BenchUrl::parse(url)?;
    raise_nofile_limit(clients as u64 + 256);
    let target = Target::Derp(url);
    let before = rss_kib(pid)?;
    out!("relay pid {pid} VmRSS before: {before} KiB");
    let t = Instant::now();
    // Each connect is its own task: inside one stream they would all run on
    // one thread, and the bench's own X25519 work would cap the rate.
    let conns: Vec<Endpoint> = futures_util::stream::iter(0..clients)
        .map(|_| {
            let target = target.clone();
            async move {
                tokio::spawn(async move { open_endpoint(&target, ROLE_RECEIVER, 0).await })
                    .await
                    .context("connect task")?
            }
        })
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

pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
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
pub(crate) async fn stable_rss_kib(pid: u32) -> Result<u64> {
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

pub(crate) fn raise_nofile_limit(want: u64) {
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

//! Giving freed heap back to the system.
//!
//! glibc's malloc returns memory to the kernel only from the top of each
//! arena; what a burst of connections freed in the middle stays in the
//! process, reused but counted in RSS for good. After a flood of strangers
//! (or a drain of thousands of clients) that is megabytes an operator sees as
//! a leak and a memory-limited container pays for. So a background task
//! looks, now and then, at how much freed memory malloc holds and, past a
//! threshold, asks it to release it (`malloc_trim`, which also returns free
//! pages inside arenas). The check is a few microseconds; the trim runs on a
//! blocking thread and only after memory was actually freed, so a steady
//! relay never trims. Other allocators (musl, or a build with jemalloc)
//! return memory on their own; there this does nothing.

use std::time::Duration;

/// How often malloc's figures are looked at.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);
/// Trim once malloc holds this much more freed memory than it did right
/// after the last trim (or than its lowest since, when a burst reused some),
/// and at least a quarter of what is in use: smaller swings are a steady
/// relay's churn, which reuses what it frees, and trimming them would only
/// make the next burst fault the pages back in.
pub const TRIM_AFTER_FREEING: usize = 2 << 20;

/// The running trim task; it stops when this is dropped.
pub struct Trimmer(tokio::task::JoinHandle<()>);

impl Trimmer {
    pub fn start() -> Trimmer {
        Trimmer(tokio::spawn(trim_task()))
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn trim_task() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Freed memory malloc held right after the last trim, lowered when a
    // burst reuses some of it (those pages are resident again).
    let mut floor = 0usize;
    loop {
        tick.tick().await;
        let Some((in_use, free)) = heap() else {
            return; // not glibc: nothing to do, ever
        };
        floor = floor.min(free);
        if free >= floor + TRIM_AFTER_FREEING && free >= in_use / 4 {
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(target: "derp_relay::core", in_use, free, released, "returned freed heap to the system");
            floor = free;
        }
    }
}

/// Heap bytes in use and freed-but-held, all arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap() -> Option<(usize, usize)> {
    // SAFETY: mallinfo2 only reads malloc's own statistics (glibc >= 2.33).
    let mi = unsafe { libc::mallinfo2() };
    Some((mi.uordblks + mi.hblkhd, mi.fordblks))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap() -> Option<(usize, usize)> {
    None
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim takes malloc's locks itself; any thread may call it.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

//! Per-client receive bandwidth limit (derper's `--rate-config`): a token
//! bucket in the reader that sleeps until the bytes it just read are paid
//! for. While it sleeps the connection is not read, so the kernel's receive
//! window fills and TCP slows the sender; nothing is dropped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Smallest burst a limit runs with: one largest frame (64 KiB packet plus
/// its key), as derper raises it, so a limit can never stall a packet forever.
pub const MIN_BURST: u64 = 65_568;

/// The limit in force, shared by every connection. Readers load it on every
/// read rather than copying it at connect time, so a live reload changes it
/// for connected clients too.
#[derive(Debug, Default)]
pub struct ClientRate {
    bytes_per_sec: AtomicU64,
    burst: AtomicU64,
}

impl ClientRate {
    pub fn new(bytes_per_sec: u64, burst: u64) -> Self {
        let r = ClientRate::default();
        r.set(bytes_per_sec, burst);
        r
    }

    /// Replaces the limit; `bytes_per_sec` 0 turns it off. A burst below
    /// [`MIN_BURST`] is raised to it.
    pub fn set(&self, bytes_per_sec: u64, burst: u64) {
        self.burst.store(burst.max(MIN_BURST), Relaxed);
        self.bytes_per_sec.store(bytes_per_sec, Relaxed);
    }

    /// `(bytes per second, burst bytes)`, or `None` when off.
    pub fn get(&self) -> Option<(u64, u64)> {
        match self.bytes_per_sec.load(Relaxed) {
            0 => None,
            r => Some((r, self.burst.load(Relaxed))),
        }
    }
}

/// One connection's bucket. Tokens may go negative: a read is never split
/// (it already happened), the debt is slept off instead.
pub(super) struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    pub(super) const fn new() -> Self {
        Bucket {
            tokens: 0.0,
            at: None,
        }
    }

    /// Charges `n` bytes read at `now` under `limit`; returns how long to wait
    /// before reading again (zero when within the limit). A bucket starts
    /// full, and refills to `burst` at most.
    pub(super) fn charge(&mut self, n: u64, (rate, burst): (u64, u64), now: Instant) -> Duration {
        let (rate, burst) = (rate as f64, burst as f64);
        self.tokens = match self.at {
            None => burst,
            Some(t) => {
                (self.tokens + now.saturating_duration_since(t).as_secs_f64() * rate).min(burst)
            }
        };
        self.at = Some(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_paces_to_rate() {
        let mut b = Bucket::new();
        let t0 = Instant::now();
        let lim = (100_000, MIN_BURST);
        assert_eq!(b.charge(MIN_BURST, lim, t0), Duration::ZERO);
        // 50 000 bytes more with no time passed: half a second of debt.
        let d = b.charge(50_000, lim, t0);
        assert!((d.as_secs_f64() - 0.5).abs() < 1e-6, "{d:?}");
        // After sleeping it off, the same again costs the same.
        let d = b.charge(50_000, lim, t0 + d);
        assert!((d.as_secs_f64() - 0.5).abs() < 1e-6, "{d:?}");
        // Idle for long: refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.charge(MIN_BURST, lim, later), Duration::ZERO);
        assert!(b.charge(1, lim, later) > Duration::ZERO);
    }

    #[test]
    fn burst_is_raised_to_one_frame_and_zero_is_off() {
        let r = ClientRate::new(1000, 10);
        assert_eq!(r.get(), Some((1000, MIN_BURST)));
        r.set(0, 1 << 20);
        assert_eq!(r.get(), None);
        r.set(5000, 1 << 20);
        assert_eq!(r.get(), Some((5000, 1 << 20)));
    }
}

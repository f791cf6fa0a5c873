//! Per-client-address HTTP rate limit (governor's keyed GCRA limiter), and the
//! rule for which address is "the client" behind a proxy.
//!
//! The limiter's memory is bounded: idle addresses are swept every few seconds,
//! and if a flood of distinct addresses still fills the table, unknown
//! addresses are refused until the sweep catches up rather than growing it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Addresses tracked at most; about 100 bytes each.
const MAX_TRACKED: usize = 100_000;
/// How often idle addresses are forgotten.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

type Keyed = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>;

pub struct IpRateLimit {
    /// Swapped whole when SIGHUP changes the rate (buckets start full again).
    limiter: RwLock<(u32, u32, Option<Arc<Keyed>>)>,
    clock: DefaultClock,
}

fn keyed(per_second: u32, burst: u32) -> Option<Arc<Keyed>> {
    NonZeroU32::new(per_second).map(|rate| {
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Arc::new(RateLimiter::keyed(
            Quota::per_second(rate).allow_burst(burst),
        ))
    })
}

impl IpRateLimit {
    /// `per_second == 0` turns the limit off.
    pub fn new(per_second: u32, burst: u32) -> Self {
        IpRateLimit {
            limiter: RwLock::new((per_second, burst, keyed(per_second, burst))),
            clock: DefaultClock::default(),
        }
    }

    /// Applies a new rate and burst (a live reload); unchanged values keep
    /// the buckets as they are.
    pub fn reconfigure(&self, per_second: u32, burst: u32) {
        let mut l = self.limiter.write().unwrap_or_else(|p| p.into_inner());
        if (l.0, l.1) != (per_second, burst) {
            *l = (per_second, burst, keyed(per_second, burst));
        }
    }

    fn current(&self) -> Option<Arc<Keyed>> {
        self.limiter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .2
            .clone()
    }

    /// `Err(retry_after)` when `ip` is over its limit.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(l) = self.current() else {
            return Ok(());
        };
        if l.len() >= MAX_TRACKED {
            l.retain_recent();
            if l.len() >= MAX_TRACKED {
                return Err(Duration::from_secs(1));
            }
        }
        l.check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets addresses whose buckets are full again.
    pub fn sweep(&self) {
        if let Some(l) = self.current() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    pub fn tracked(&self) -> usize {
        self.current().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let l = IpRateLimit::new(5, 10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert!(l.check(ip).is_ok());
        }
        let wait = l.check(ip).unwrap_err();
        assert!(wait <= Duration::from_millis(200), "{wait:?}");
        assert!(
            l.check("192.0.2.2".parse().unwrap()).is_ok(),
            "other addresses unaffected"
        );
        assert!(IpRateLimit::new(0, 0).check(ip).is_ok(), "0 = off");
        l.reconfigure(0, 0);
        assert!(l.check(ip).is_ok(), "turned off live");
        l.reconfigure(1, 1);
        assert!(l.check(ip).is_ok());
        assert!(l.check(ip).is_err(), "turned on live");
    }
}

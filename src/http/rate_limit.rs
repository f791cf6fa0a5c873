//! Per-client-address HTTP rate limit (governor's keyed GCRA limiter), and the
//! rule for which address is "the client" behind a proxy.
//!
//! The limiter's memory is bounded: idle addresses are swept every few seconds,
//! and if a flood of distinct addresses still fills the table, unknown
//! addresses are refused until the sweep catches up rather than growing it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::HeaderMap;

/// Addresses tracked at most; about 100 bytes each.
const MAX_TRACKED: usize = 100_000;
/// How often idle addresses are forgotten.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

type Keyed = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>;

pub struct IpRateLimit {
    limiter: Option<Keyed>,
    clock: DefaultClock,
}

impl IpRateLimit {
    /// `per_second == 0` turns the limit off.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        IpRateLimit {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// `Err(retry_after)` when `ip` is over its limit.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(l) = &self.limiter else {
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
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

/// The client's address: the TCP peer, or with `trust_proxy` the address the
/// proxy reports (`Fly-Client-IP`, else the rightmost `X-Forwarded-For` entry,
/// the one our own proxy appended). Without `trust_proxy` these headers are
/// ignored, since anyone can send them.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trust_proxy: bool) -> IpAddr {
    if !trust_proxy {
        return peer;
    }
    let parse = |s: &str| s.trim().parse::<IpAddr>().ok();
    if let Some(ip) = headers
        .get("fly-client-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
    {
        return ip;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next_back()
        .and_then(parse)
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

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
    }

    #[test]
    fn proxy_headers_only_with_trust_proxy() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.7")]);
        assert_eq!(client_ip(peer, &h, false), peer);
        assert_eq!(
            client_ip(peer, &h, true),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[
            ("fly-client-ip", "2001:db8::1"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(
            client_ip(peer, &h, true),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[("x-forwarded-for", "garbage")]);
        assert_eq!(client_ip(peer, &h, true), peer);
    }
}

//! Which address is "the client", and how many unauthenticated connections
//! one client address may hold.
//!
//! Behind a proxy the TCP peer is the proxy, so with `--trust-proxy` the
//! address comes from a header. Only a header that the proxy in front always
//! overwrites can be trusted: a client may send any header it likes, and a
//! proxy that forwards it untouched lets the client pick its own rate-limit
//! bucket and write any address into the bindings. So exactly one source is
//! trusted per deployment, chosen at start:
//! - a header named with `--client-ip-header` (the operator knows the front);
//! - on Fly.io (recognised from `FLY_APP_NAME`), `Fly-Client-IP`, which Fly's
//!   edge sets on every request;
//! - otherwise the rightmost `X-Forwarded-For` entry, the one the proxy next
//!   to us appended (the shipped nginx, Caddy and ingress configs overwrite it).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName};

/// Where the client address comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIpSource {
    /// The TCP peer (no proxy trusted).
    Peer,
    /// The rightmost `X-Forwarded-For` entry.
    RightmostForwardedFor,
    /// One header that the front always sets.
    Header(HeaderName),
}

impl ClientIpSource {
    /// The rule for this deployment: `on_fly` is whether Fly's environment is present.
    pub fn choose(trust_proxy: bool, header: Option<&str>, on_fly: bool) -> Self {
        if !trust_proxy {
            return ClientIpSource::Peer;
        }
        if let Some(h) = header.and_then(|h| HeaderName::from_bytes(h.trim().as_bytes()).ok()) {
            return ClientIpSource::Header(h);
        }
        if on_fly {
            return ClientIpSource::Header(HeaderName::from_static("fly-client-ip"));
        }
        ClientIpSource::RightmostForwardedFor
    }

    /// Fly.io sets these in every Machine.
    pub fn on_fly() -> bool {
        std::env::var_os("FLY_APP_NAME").is_some() && std::env::var_os("FLY_MACHINE_ID").is_some()
    }

    pub fn describe(&self) -> String {
        match self {
            ClientIpSource::Peer => "tcp peer".into(),
            ClientIpSource::RightmostForwardedFor => "rightmost X-Forwarded-For".into(),
            ClientIpSource::Header(h) => format!("header {h}"),
        }
    }

    /// The client's address for a request from `peer`. A missing or malformed
    /// header falls back to the peer, never to another header.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let parse = |s: &str| s.trim().parse::<IpAddr>().ok();
        let found = match self {
            ClientIpSource::Peer => None,
            ClientIpSource::RightmostForwardedFor => headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .next_back()
                .and_then(parse),
            ClientIpSource::Header(name) => headers
                .get_all(name)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(parse),
        };
        // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
        // An IPv4 client on a dual-stack listener is the IPv4 address it carries.
        found.unwrap_or(peer).to_canonical()
    }
}

/// The bucket an address is counted in: IPv4 as is, IPv6 by its first
/// `v6_prefix` bits (one customer gets a /64 or more, so counting single
/// IPv6 addresses would give one client 2^64 buckets).
pub fn bucket(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

/// What the accept loop needs, besides the routes.
pub struct FrontGate {
    pub source: ClientIpSource,
    pub pending: Arc<PendingLimit>,
}

/// The pending slot of one TCP connection, shared by its requests: the accept
/// loop puts the slot there, and `/derp` takes it along into the handshake so
/// the connection stays counted until the client has proven its key.
#[derive(Clone, Default)]
pub struct PendingCell(Arc<Mutex<Option<PendingGuard>>>);

impl PendingCell {
    pub fn new(g: Option<PendingGuard>) -> Self {
        PendingCell(Arc::new(Mutex::new(g)))
    }

    pub fn take(&self) -> Option<PendingGuard> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Counts connections per address that have not authenticated yet.
pub struct PendingLimit {
    max: u32,
    v6_prefix: u8,
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One pending connection; its drop gives the slot back.
pub struct PendingGuard {
    limit: Arc<PendingLimit>,
    key: IpAddr,
}

impl PendingLimit {
    /// `max == 0` turns the limit off.
    pub fn new(max: u32, v6_prefix: u8) -> Arc<Self> {
        Arc::new(PendingLimit {
            max,
            v6_prefix,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more pending connection from `ip`, or `None` when that
    /// address already holds `max`. With the limit off, a guard that counts nothing.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Option<PendingGuard>> {
        if self.max == 0 {
            return Some(None);
        }
        let key = bucket(ip, self.v6_prefix);
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Some(PendingGuard {
            limit: self.clone(),
            key,
        }))
    }

    pub fn pending(&self, ip: IpAddr) -> u32 {
        let m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&bucket(ip, self.v6_prefix)).copied().unwrap_or(0)
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut m = self.limit.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_per_deployment() {
        assert_eq!(
            ClientIpSource::choose(false, Some("x"), true),
            ClientIpSource::Peer
        );
        assert_eq!(
            ClientIpSource::choose(true, None, false),
            ClientIpSource::RightmostForwardedFor
        );
        assert_eq!(
            ClientIpSource::choose(true, None, true),
            ClientIpSource::Header(HeaderName::from_static("fly-client-ip"))
        );
        assert_eq!(
            ClientIpSource::choose(true, Some("CF-Connecting-IP"), true),
            ClientIpSource::Header(HeaderName::from_static("cf-connecting-ip"))
        );
    }

    #[test]
    fn forged_fly_header_is_ignored_off_fly() {
        let peer = ip("10.0.0.1");
        let xff = ClientIpSource::choose(true, None, false);
        // A client behind nginx sends its own Fly-Client-IP; nginx overwrote XFF.
        let h = headers(&[
            ("fly-client-ip", "203.0.113.66"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(xff.client_ip(peer, &h), ip("198.51.100.7"));
        // Behind a proxy that appends: the client's forged entry is on the left.
        let h = headers(&[("x-forwarded-for", "203.0.113.66, 198.51.100.7")]);
        assert_eq!(xff.client_ip(peer, &h), ip("198.51.100.7"));
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.66"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(xff.client_ip(peer, &h), ip("198.51.100.7"));
        assert_eq!(ClientIpSource::Peer.client_ip(peer, &h), peer);
        assert_eq!(
            xff.client_ip(peer, &headers(&[("x-forwarded-for", "garbage")])),
            peer
        );
    }

    #[test]
    fn fly_header_on_fly_and_mapped_addresses() {
        let peer = ip("172.16.0.1");
        let fly = ClientIpSource::choose(true, None, true);
        let h = headers(&[
            ("fly-client-ip", "2001:db8::1"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(fly.client_ip(peer, &h), ip("2001:db8::1"));
        // Missing header: the peer, not X-Forwarded-For (which the client controls on Fly).
        assert_eq!(
            fly.client_ip(peer, &headers(&[("x-forwarded-for", "1.2.3.4")])),
            peer
        );
        let h = headers(&[("fly-client-ip", "::ffff:192.0.2.9")]);
        assert_eq!(fly.client_ip(peer, &h), ip("192.0.2.9"));
    }

    #[test]
    fn ipv6_buckets_by_prefix() {
        assert_eq!(bucket(ip("2001:db8:1:2:3:4:5:6"), 64), ip("2001:db8:1:2::"));
        assert_eq!(
            bucket(ip("2001:db8:1:2:3:4:5:6"), 128),
            ip("2001:db8:1:2:3:4:5:6")
        );
        assert_eq!(bucket(ip("192.0.2.1"), 64), ip("192.0.2.1"));
        assert_eq!(bucket(ip("::ffff:192.0.2.1"), 64), ip("192.0.2.1"));
    }

    #[test]
    fn pending_limit_counts_and_releases() {
        let l = PendingLimit::new(2, 64);
        let a = l.try_acquire(ip("2001:db8::1")).unwrap();
        let b = l.try_acquire(ip("2001:db8::2")).unwrap();
        assert!(l.try_acquire(ip("2001:db8::3")).is_none(), "same /64");
        assert!(l.try_acquire(ip("192.0.2.1")).is_some());
        drop(a);
        assert!(l.try_acquire(ip("2001:db8::3")).is_some());
        drop(b);
        assert!(
            PendingLimit::new(0, 64)
                .try_acquire(ip("192.0.2.1"))
                .unwrap()
                .is_none()
        );
    }
}

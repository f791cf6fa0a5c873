//! Admission by URL, as derper's `--verify-client-url` and headscale's
//! `/verify` define it: POST `{"NodePublic":"nodekey:<hex>","Source":"<ip>"}`,
//! answer HTTP 200 with `{"Allow":true|false}`. Anything else (another
//! status, a body that is not that object, no answer in time) is "could not
//! ask", which fails closed unless the operator chose fail-open.
//!
//! This module holds the formats, the answer cache and the question as a
//! future; the bytes travel through a [`VerifyTransport`] the relay hands in
//! (`edge::verify_url`), so there is no socket and no runtime here.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::protocol::PublicKey;
use crate::reasons::VerifyResult;

/// What the URL said about a key, as `admit` weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlVerdict {
    /// Not asked: no URL configured, or the key is in the allowed-keys file.
    NotAsked,
    Allow,
    Deny,
    /// No usable answer (down, slow, malformed); `fail_open` says what the
    /// operator chose for that case.
    Unavailable {
        fail_open: bool,
    },
}

/// Why a question got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskError {
    Timeout,
    Failed(String),
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Timeout => f.write_str("no answer in time"),
            AskError::Failed(why) => f.write_str(why),
        }
    }
}

/// An HTTP answer: status and body.
pub type Answer = Result<(u16, Vec<u8>), AskError>;

/// How the question reaches the URL: one POST of a JSON body, bounded by
/// `timeout` (the implementation enforces it and reports [`AskError::Timeout`]).
pub trait VerifyTransport: Send + Sync {
    fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + 'static>>;
}

/// The request body, byte for byte what derper sends.
pub fn request_body(key: &PublicKey, source: IpAddr) -> Vec<u8> {
    serde_json::json!({
        "NodePublic": key.to_nodekey_hex(),
        "Source": source.to_canonical().to_string(),
    })
    .to_string()
    .into_bytes()
}

/// Reads an answer: 200 and a JSON object with a boolean `Allow` (other
/// fields ignored, as Go's decoder does). Errors are phrased for a log line.
pub fn parse_answer(status: u16, body: &[u8]) -> Result<bool, String> {
    #[derive(Deserialize)]
    struct Response {
        #[serde(rename = "Allow")]
        allow: Option<bool>,
    }
    let shown = || -> String { String::from_utf8_lossy(body).chars().take(80).collect() };
    if status != 200 {
        return Err(format!("HTTP {status}: {:?}", shown()));
    }
    match serde_json::from_slice::<Response>(body) {
        Ok(Response { allow: Some(a) }) => Ok(a),
        Ok(Response { allow: None }) => Err(format!("answer has no \"Allow\": {:?}", shown())),
        Err(e) => Err(format!(
            "answer is not {{\"Allow\":bool}} ({e}): {:?}",
            shown()
        )),
    }
}

/// Recent answers by (key, source address), each kept for a TTL, at most
/// `cap` of them. Entries are evicted oldest first; with one TTL for all,
/// the oldest is also the first to expire, so the queue needs no scan.
#[derive(Default)]
pub struct AnswerCache {
    map: HashMap<(PublicKey, IpAddr), (bool, Instant, u64)>,
    /// Insertion order; an entry whose sequence number no longer matches
    /// the map was overwritten and is skipped.
    order: VecDeque<((PublicKey, IpAddr), u64)>,
    seq: u64,
}

impl AnswerCache {
    pub fn get(&self, k: &(PublicKey, IpAddr), ttl: Duration, now: Instant) -> Option<bool> {
        let (allow, at, _) = self.map.get(k)?;
        (now.duration_since(*at) < ttl).then_some(*allow)
    }

    pub fn insert(
        &mut self,
        k: (PublicKey, IpAddr),
        allow: bool,
        ttl: Duration,
        cap: usize,
        now: Instant,
    ) {
        if cap == 0 || ttl.is_zero() {
            self.map.clear();
            self.order.clear();
            return;
        }
        self.seq += 1;
        self.map.insert(k, (allow, now, self.seq));
        self.order.push_back((k, self.seq));
        self.trim(ttl, cap, now);
    }

    /// Drops expired entries and the oldest beyond `cap`.
    fn trim(&mut self, ttl: Duration, cap: usize, now: Instant) {
        while let Some((k, seq)) = self.order.front().copied() {
            let live = self.map.get(&k).filter(|e| e.2 == seq).copied();
            match live {
                None => {
                    self.order.pop_front();
                }
                Some((_, at, _)) if self.map.len() > cap || now.duration_since(at) >= ttl => {
                    self.map.remove(&k);
                    self.order.pop_front();
                }
                Some(_) => break,
            }
        }
        // Overwrites leave stale queue entries behind the front; compact
        // when they outnumber the live ones so memory stays O(cap).
        if self.order.len() > 2 * cap.max(self.map.len()) + 16 {
            let map = &self.map;
            self.order
                .retain(|(k, seq)| map.get(k).is_some_and(|e| e.2 == *seq));
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// How one question went: the verdict for `admit`, the result to count, and
/// the reason when there was no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub verdict: UrlVerdict,
    pub result: VerifyResult,
    pub error: Option<String>,
}

/// The settings one question uses (the live values at the time it is asked).
#[derive(Debug, Clone, Copy)]
pub struct AskPolicy<'a> {
    pub url: &'a str,
    pub timeout: Duration,
    pub fail_open: bool,
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

/// Asks the URL through the cache. Shared by every connection; the lock is
/// held only to read or write the cache, never across the question, so
/// handshakes are not serialised behind one another's answers.
pub struct Verifier {
    transport: Arc<dyn VerifyTransport>,
    cache: Mutex<AnswerCache>,
}

impl Verifier {
    pub fn new(transport: Arc<dyn VerifyTransport>) -> Self {
        Verifier {
            transport,
            cache: Mutex::new(AnswerCache::default()),
        }
    }

    pub async fn check(&self, p: AskPolicy<'_>, key: &PublicKey, source: IpAddr) -> Checked {
        let ck = (*key, source.to_canonical());
        if let Some(allow) = self.cache().get(&ck, p.cache_ttl, Instant::now()) {
            return Checked {
                verdict: if allow {
                    UrlVerdict::Allow
                } else {
                    UrlVerdict::Deny
                },
                result: if allow {
                    VerifyResult::CachedAllow
                } else {
                    VerifyResult::CachedDeny
                },
                error: None,
            };
        }
        let answer = self
            .transport
            .post(p.url, request_body(key, ck.1), p.timeout)
            .await;
        let parsed = match answer {
            Ok((status, body)) => parse_answer(status, &body).map_err(AskError::Failed),
            Err(e) => Err(e),
        };
        match parsed {
            Ok(allow) => {
                // Only real answers are cached: a blip must not pin a refusal.
                self.cache()
                    .insert(ck, allow, p.cache_ttl, p.cache_size, Instant::now());
                Checked {
                    verdict: if allow {
                        UrlVerdict::Allow
                    } else {
                        UrlVerdict::Deny
                    },
                    result: if allow {
                        VerifyResult::Allow
                    } else {
                        VerifyResult::Deny
                    },
                    error: None,
                }
            }
            Err(e) => Checked {
                verdict: UrlVerdict::Unavailable {
                    fail_open: p.fail_open,
                },
                result: if e == AskError::Timeout {
                    VerifyResult::Timeout
                } else {
                    VerifyResult::Error
                },
                error: Some(e.to_string()),
            },
        }
    }

    /// Forgets every cached answer (the URL or its policy changed).
    pub fn clear_cache(&self) {
        *self.cache() = AnswerCache::default();
    }

    pub fn cached(&self) -> usize {
        self.cache().len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, AnswerCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_derpers_shape() {
        let k = PublicKey([0xab; 32]);
        let body = request_body(&k, "::ffff:192.0.2.7".parse().unwrap());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["NodePublic"], format!("nodekey:{}", "ab".repeat(32)));
        assert_eq!(v["Source"], "192.0.2.7");
        assert_eq!(v.as_object().unwrap().len(), 2);
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer(200, br#"{"Allow":true}"#), Ok(true));
        assert_eq!(parse_answer(200, br#"{"Allow":false,"x":1}"#), Ok(false));
        assert!(parse_answer(200, br#"{"allow":"yes"}"#).is_err());
        assert!(parse_answer(200, br#"{}"#).is_err());
        assert!(parse_answer(200, b"ok").is_err());
        assert!(parse_answer(500, br#"{"Allow":true}"#).is_err());
    }

    #[test]
    fn cache_is_bounded_and_expires() {
        let mut c = AnswerCache::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        for i in 0..5u8 {
            c.insert((PublicKey([i; 32]), ip), true, ttl, 3, t0);
        }
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.get(&(PublicKey([0; 32]), ip), ttl, t0),
            None,
            "oldest evicted"
        );
        assert_eq!(c.get(&(PublicKey([4; 32]), ip), ttl, t0), Some(true));
        assert_eq!(
            c.get(&(PublicKey([4; 32]), ip), ttl, t0 + ttl),
            None,
            "expired"
        );
        // Overwriting one key many times keeps the queue bounded.
        for _ in 0..1000 {
            c.insert((PublicKey([9; 32]), ip), false, ttl, 3, t0);
        }
        assert!(c.order.len() <= 2 * 3 + 16 + 1, "{}", c.order.len());
        c.insert((PublicKey([1; 32]), ip), true, Duration::ZERO, 3, t0);
        assert!(c.is_empty(), "ttl 0 = off");
    }
}

//! TOFU bindings: every key the relay has admitted, kept small in memory and
//! persisted as a snapshot plus an append-only journal.
//!
//! The snapshot (`tofu-bindings.json`) is the versioned, human-readable file
//! operators read and `keys export` turns into an allowed-keys file. Rewriting
//! it whole whenever one timestamp changes would cost a full serialisation per
//! second on a large relay, so changes go to a journal beside it
//! (`tofu-bindings.json.journal`, one JSON line per changed or removed key) and
//! the snapshot is rewritten only when the journal has grown to a fraction of
//! it. Both carry a generation number: a journal whose generation differs from
//! the snapshot's is stale (a crash between the two renames of a compaction)
//! and is ignored, so a kill -9 at any instant leaves a consistent state.
//!
//! This module is formats and rules only; the TOFU actor decides when to
//! write, and does the I/O on a blocking thread.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::protocol::PublicKey;

const FILE_VERSION: u32 = 1;

/// What the relay remembers about one key (about 0.4 KiB each at 200 000, measured with derp-bench tofu).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// Address of the most recent connection (proxy-aware with `--trust-proxy`).
    pub addr: Option<IpAddr>,
    pub connections: u64,
    /// The ACL label for the key when it was last seen, if any.
    pub label: Option<Arc<str>>,
}

/// One binding as written in the files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// The client's public key, standard base64 (as WireGuard prints it).
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// RFC 3339, UTC.
    pub first_seen: String,
    pub last_seen: String,
    pub last_addr: String,
    pub connections: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingsFile {
    version: u32,
    /// Matches the journal's header; absent in files of earlier releases.
    #[serde(default, skip_serializing_if = "is_zero")]
    generation: u64,
    bindings: Vec<Binding>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A journal line: a binding to upsert, or a key to forget.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum JournalLine {
    Header { generation: u64 },
    Removed { key: String, removed: bool },
    Upsert(Binding),
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn parse_time(s: &str) -> Result<u64, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("time {s:?}: {e}"))
        .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Record {
    fn to_binding(&self, key: &PublicKey) -> Binding {
        Binding {
            key: key.to_base64(),
            label: self.label.as_deref().map(str::to_owned),
            first_seen: rfc3339(self.first_seen),
            last_seen: rfc3339(self.last_seen),
            last_addr: self.addr.map(|a| a.to_string()).unwrap_or_default(),
            connections: self.connections,
        }
    }

    fn from_binding(b: &Binding) -> Result<(PublicKey, Record), String> {
        let key = PublicKey::parse(&b.key).map_err(|e| format!("key {:?}: {e}", b.key))?;
        Ok((
            key,
            Record {
                first_seen: parse_time(&b.first_seen)?,
                last_seen: parse_time(&b.last_seen)?,
                addr: b.last_addr.parse().ok(),
                connections: b.connections,
                label: b.label.as_deref().map(Arc::from),
            },
        ))
    }
}

/// Why a binding was forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    /// The set was over `--tofu-max-bindings`; the longest-unseen went first.
    Cap,
    /// Not seen for `--tofu-expire`.
    Expired,
}

impl EvictReason {
    pub const ALL: [EvictReason; 2] = [EvictReason::Cap, EvictReason::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Cap => "cap",
            EvictReason::Expired => "expired",
        }
    }
}

/// All bindings, with what changed since the last journal append.
#[derive(Debug, Default, Clone)]
pub struct Bindings {
    map: HashMap<PublicKey, Record>,
    changed: HashSet<PublicKey>,
    removed: HashSet<PublicKey>,
    /// Generation of the snapshot on disk (and of the journal appended to it).
    generation: u64,
    /// Lines in the journal since the snapshot.
    journal_lines: usize,
    /// The on-disk state may lack changes that were taken but not written:
    /// the next write must be a full snapshot.
    needs_snapshot: bool,
}

/// The paths of one bindings store.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".journal");
    PathBuf::from(s)
}

/// A write the TOFU actor runs on a blocking thread, prepared under the lock.
pub enum Write_ {
    /// Append these lines (each ends in `\n`) to the journal.
    Append(String),
    /// Write a new snapshot with this generation, then an empty journal.
    Snapshot {
        generation: u64,
        records: Vec<(PublicKey, Record)>,
    },
}

impl Bindings {
    /// Reads the snapshot and replays its journal. A missing snapshot is an
    /// empty set; a file that exists but does not parse is an error naming the
    /// file, line and problem. A torn last journal line (a crash mid-append) is
    /// dropped; any other bad line is an error.
    pub fn load(path: &Path) -> Result<Bindings, String> {
        let mut b = match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(&t).map_err(|e| format!("{}:{e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Bindings::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let jpath = journal_path(path);
        match std::fs::read_to_string(&jpath) {
            Ok(t) => b
                .replay(&t)
                .map_err(|e| format!("{}:{e}", jpath.display()))?,
            // No journal to append to yet: the first write is a snapshot.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => b.needs_snapshot = true,
            Err(e) => return Err(format!("{}: {e}", jpath.display())),
        }
        Ok(b)
    }

    /// Parses a snapshot's text; errors are `line:column: problem`.
    pub fn parse(text: &str) -> Result<Bindings, String> {
        let f: BindingsFile =
            serde_json::from_str(text).map_err(|e| format!("{}:{}: {e}", e.line(), e.column()))?;
        if f.version != FILE_VERSION {
            return Err(format!(
                "1: unsupported bindings file version {} (want {FILE_VERSION})",
                f.version
            ));
        }
        let mut map = HashMap::with_capacity(f.bindings.len());
        for (i, b) in f.bindings.iter().enumerate() {
            let (k, r) = Record::from_binding(b).map_err(|e| format!("binding #{}: {e}", i + 1))?;
            map.insert(k, r);
        }
        Ok(Bindings {
            map,
            generation: f.generation,
            ..Default::default()
        })
    }

    fn replay(&mut self, text: &str) -> Result<(), String> {
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let mut applied = 0;
        for (i, line) in lines.iter().enumerate() {
            let last = i + 1 == lines.len();
            let parsed = serde_json::from_str::<JournalLine>(line.trim_end());
            let entry = match parsed {
                Ok(e) if line.ends_with('\n') => e,
                // Only the final line can be torn by a crash mid-append. The
                // next write must not append after the fragment, or the
                // fragment and that write become one bad line mid-file.
                _ if last => {
                    self.needs_snapshot = true;
                    break;
                }
                Err(e) => return Err(format!("{}: {e}", i + 1)),
                Ok(_) => return Err(format!("{}: line not terminated", i + 1)),
            };
            match entry {
                JournalLine::Header { generation } if i == 0 => {
                    if generation != self.generation {
                        // Left over from a compaction that crashed after the
                        // snapshot's rename: the snapshot already has it all.
                        self.needs_snapshot = true;
                        return Ok(());
                    }
                }
                JournalLine::Header { .. } => return Err(format!("{}: header not first", i + 1)),
                _ if i == 0 => return Err("1: journal has no header".into()),
                JournalLine::Removed { key, .. } => {
                    let k = PublicKey::parse(&key).map_err(|e| format!("{}: {e}", i + 1))?;
                    self.map.remove(&k);
                }
                JournalLine::Upsert(b) => {
                    let (k, r) = Record::from_binding(&b).map_err(|e| format!("{}: {e}", i + 1))?;
                    self.map.insert(k, r);
                }
            }
            applied += 1;
        }
        self.journal_lines = applied;
        Ok(())
    }

    pub fn contains(&self, key: &PublicKey) -> bool {
        self.map.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, key: &PublicKey) -> Option<Binding> {
        self.map.get(key).map(|r| r.to_binding(key))
    }

    /// Records a successful admission at `now` (unix seconds). Returns true
    /// for a key seen for the first time.
    pub fn seen(
        &mut self,
        key: PublicKey,
        label: Option<Arc<str>>,
        addr: SocketAddr,
        now: u64,
    ) -> bool {
        let mut new = false;
        let r = self.map.entry(key).or_insert_with(|| {
            new = true;
            Record {
                first_seen: now,
                last_seen: now,
                addr: None,
                connections: 0,
                label: None,
            }
        });
        if label.is_some() {
            r.label = label;
        }
        r.last_seen = now;
        r.addr = Some(addr.ip());
        r.connections += 1;
        self.removed.remove(&key);
        self.changed.insert(key);
        new
    }

    /// Adds bindings from `other` that this set does not have (used after a
    /// restart of the actor to recover anything only the files knew).
    pub fn merge_missing(&mut self, other: Bindings) {
        for (k, r) in other.map {
            self.map.entry(k).or_insert(r);
        }
    }

    /// Forgets keys not seen since `now - expire` (if `expire` is set), then
    /// the longest-unseen beyond `cap` (if set), never a key for which
    /// `keep` is true. Returns how many went for each reason.
    pub fn evict(
        &mut self,
        now: u64,
        expire: Duration,
        cap: usize,
        keep: impl Fn(&PublicKey) -> bool,
    ) -> (usize, usize) {
        let mut gone = Vec::new();
        if !expire.is_zero() {
            let cutoff = now.saturating_sub(expire.as_secs());
            gone.extend(
                self.map
                    .iter()
                    .filter(|(k, r)| r.last_seen < cutoff && !keep(k))
                    .map(|(k, _)| *k),
            );
        }
        let expired = gone.len();
        for k in &gone {
            self.forget(k);
        }
        let mut capped = 0;
        if cap != 0 && self.map.len() > cap {
            // Evict a little more than the excess so a relay at its cap does
            // not sort the whole set for every new key.
            let excess = self.map.len() - cap + cap / 100;
            let mut by_age: Vec<(u64, PublicKey)> = self
                .map
                .iter()
                .filter(|(k, _)| !keep(k))
                .map(|(k, r)| (r.last_seen, *k))
                .collect();
            let n = excess.min(by_age.len());
            if n > 0 {
                by_age.select_nth_unstable(n - 1);
                for (_, k) in &by_age[..n] {
                    self.forget(k);
                }
                capped = n;
            }
        }
        (expired, capped)
    }

    fn forget(&mut self, k: &PublicKey) {
        if self.map.remove(k).is_some() {
            self.changed.remove(k);
            self.removed.insert(*k);
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
            || !self.removed.is_empty()
            || (self.needs_snapshot && !self.map.is_empty())
    }

    /// Takes what changed and says how to write it: a journal append, or a
    /// full snapshot when the journal has grown to half the set (or a 4096
    /// lines floor). Cheap for appends: only changed keys are serialised.
    pub fn take_write(&mut self) -> Option<Write_> {
        if !self.has_changes() {
            return None;
        }
        let pending = self.changed.len() + self.removed.len();
        let threshold = (self.map.len() / 2).max(4096);
        if self.needs_snapshot || self.journal_lines + pending > threshold {
            return Some(self.take_snapshot());
        }
        let mut out = String::with_capacity(pending * 200);
        for k in self.changed.drain() {
            if let Some(r) = self.map.get(&k) {
                push_line(&mut out, &JournalLine::Upsert(r.to_binding(&k)));
            }
        }
        for k in self.removed.drain() {
            push_line(
                &mut out,
                &JournalLine::Removed {
                    key: k.to_base64(),
                    removed: true,
                },
            );
        }
        self.journal_lines += pending;
        Some(Write_::Append(out))
    }

    /// A snapshot of everything, for a full write.
    pub fn take_snapshot(&mut self) -> Write_ {
        self.changed.clear();
        self.removed.clear();
        self.needs_snapshot = false;
        Write_::Snapshot {
            generation: self.generation + 1,
            records: self.map.iter().map(|(k, r)| (*k, r.clone())).collect(),
        }
    }

    /// Outcome of a write from [`take_write`](Self::take_write).
    pub fn wrote(&mut self, generation: Option<u64>, ok: bool) {
        match (ok, generation) {
            (true, Some(g)) => {
                self.generation = g;
                self.journal_lines = 0;
            }
            (true, None) => {}
            // What was taken is not on disk: the next write carries everything.
            (false, _) => self.needs_snapshot = true,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The snapshot's JSON, keys in a stable order.
    pub fn to_json(&self) -> String {
        snapshot_json(
            self.generation,
            self.map.iter().map(|(k, r)| (*k, r.clone())).collect(),
        )
    }

    /// The bindings as an allowed-keys file, labels as comments, so what the
    /// relay learned can become its ACL.
    pub fn to_allowed_keys(&self) -> String {
        let mut keys: Vec<_> = self.map.iter().collect();
        keys.sort_by_key(|(k, _)| **k);
        let mut out = String::from("# Allowed keys exported from derp-relay TOFU bindings\n");
        for (k, r) in keys {
            out.push('\n');
            match &r.label {
                Some(l) => out.push_str(&format!("# {l}\n")),
                None => out.push_str(&format!(
                    "# first seen {} from {}\n",
                    rfc3339(r.first_seen),
                    r.addr.map(|a| a.to_string()).unwrap_or_default()
                )),
            }
            out.push_str(&k.to_base64());
            out.push('\n');
        }
        out
    }

    /// Writes the whole set as a fresh snapshot (tests and tools).
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        write_snapshot(path, self.generation, self.to_json().as_bytes())
    }
}

fn push_line(out: &mut String, l: &JournalLine) {
    // Serialising strings and integers cannot fail.
    if let Ok(s) = serde_json::to_string(l) {
        out.push_str(&s);
        out.push('\n');
    }
}

/// The snapshot JSON for these records, sorted by key so the file is stable.
pub fn snapshot_json(generation: u64, mut records: Vec<(PublicKey, Record)>) -> String {
    records.sort_unstable_by_key(|(k, _)| *k);
    let f = BindingsFile {
        version: FILE_VERSION,
        generation,
        bindings: records.iter().map(|(k, r)| r.to_binding(k)).collect(),
    };
    let mut s = serde_json::to_string_pretty(&f).unwrap_or_default();
    s.push('\n');
    s
}

/// Runs a write prepared by [`Bindings::take_write`]. Blocking: call it on a
/// blocking thread. Returns the new generation for a snapshot.
pub fn run_write(path: &Path, w: Write_) -> std::io::Result<Option<u64>> {
    match w {
        Write_::Append(lines) => {
            let jpath = journal_path(path);
            let mut f = std::fs::OpenOptions::new().append(true).open(&jpath)?;
            f.write_all(lines.as_bytes())?;
            f.sync_data()?;
            Ok(None)
        }
        Write_::Snapshot {
            generation,
            records,
        } => {
            let json = snapshot_json(generation, records);
            write_snapshot(path, generation, json.as_bytes())?;
            Ok(Some(generation))
        }
    }
}

/// Snapshot, then a journal that starts at its generation. A crash between
/// the two renames leaves the new snapshot and a stale journal, which `load`
/// ignores.
fn write_snapshot(path: &Path, generation: u64, json: &[u8]) -> std::io::Result<()> {
    let mut header = String::new();
    push_line(&mut header, &JournalLine::Header { generation });
    write_file_atomic(path, json)?;
    write_file_atomic(&journal_path(path), header.as_bytes())
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn tmp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("bindings");
    format!(".{name}.tmp-")
}

/// Temp file beside the target (mode 0600: it holds client addresses),
/// fsync, rename, fsync the directory.
pub fn write_file_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = dir_of(path);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("{}{}", tmp_prefix(path), std::process::id()));
    let res = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Removes temp files that a killed process left beside the bindings and
/// their journal. Returns how many.
pub fn remove_stale_temp_files(path: &Path) -> usize {
    let dir = dir_of(path);
    let prefixes = [tmp_prefix(path), tmp_prefix(&journal_path(path))];
    let mine = format!("{}", std::process::id());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = prefixes
            .iter()
            .any(|p| name.strip_prefix(p.as_str()).is_some_and(|pid| pid != mine));
        if stale && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "192.0.2.1:5".parse().unwrap()
    }

    #[test]
    fn round_trip_is_stable_and_exportable() {
        let mut b = Bindings::default();
        b.seen(
            PublicKey([2; 32]),
            Some("Agent: web-01".into()),
            addr(),
            1_700_000_000,
        );
        b.seen(PublicKey([1; 32]), None, addr(), 1_700_000_000);
        b.seen(PublicKey([1; 32]), None, addr(), 1_700_000_001);
        let json = b.to_json();
        let back = Bindings::parse(&json).unwrap();
        assert_eq!(back.to_json(), json);
        assert_eq!(back.get(&PublicKey([1; 32])).unwrap().connections, 2);
        let keys = b.to_allowed_keys();
        let acl = crate::admission::allowed_keys::AllowedKeys::parse(&keys).unwrap();
        assert_eq!(acl.len(), 2);
        assert_eq!(acl.label(&PublicKey([2; 32])), Some("Agent: web-01"));
    }

    #[test]
    fn malformed_files_name_the_line() {
        let e = Bindings::parse("{\"version\":1,\n\"bindings\":[\n{\"key\":1}]}").unwrap_err();
        assert!(e.starts_with("3:"), "{e}");
        let e = Bindings::parse("{\"version\":2,\"bindings\":[]}").unwrap_err();
        assert!(e.contains("version 2"), "{e}");
        let e = Bindings::parse(
            r#"{"version":1,"bindings":[{"key":"bad","first_seen":"","last_seen":"","last_addr":"","connections":0}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("binding #1"), "{e}");
    }

    fn write(b: &mut Bindings, path: &Path) {
        if let Some(w) = b.take_write() {
            let g = run_write(path, w).unwrap();
            b.wrote(g, true);
        }
    }

    #[test]
    fn journal_appends_then_compacts_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        let mut b = Bindings::default();
        b.seen(PublicKey([1; 32]), None, addr(), 100);
        b.needs_snapshot = true; // first write: a snapshot and an empty journal
        write(&mut b, &p);
        b.seen(PublicKey([1; 32]), None, addr(), 200);
        b.seen(PublicKey([2; 32]), None, addr(), 200);
        write(&mut b, &p);
        let journal = std::fs::read_to_string(journal_path(&p)).unwrap();
        assert_eq!(journal.lines().count(), 3, "{journal}");
        let back = Bindings::load(&p).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.get(&PublicKey([1; 32])).unwrap().connections, 2);
        // A torn last line is dropped; the rest stands.
        std::fs::write(journal_path(&p), format!("{journal}{{\"key\":\"abc")).unwrap();
        let mut torn = Bindings::load(&p).unwrap();
        assert_eq!(torn.len(), 2);
        // The relay goes on after such a crash: its next write replaces the
        // journal instead of appending to the fragment.
        torn.seen(PublicKey([3; 32]), None, addr(), 300);
        assert!(matches!(torn.take_write(), Some(Write_::Snapshot { .. })));
        torn.wrote(None, false); // not run: the next write still snapshots
        write(&mut torn, &p);
        torn.seen(PublicKey([4; 32]), None, addr(), 400);
        write(&mut torn, &p);
        assert_eq!(Bindings::load(&p).unwrap().len(), 4);
        let journal = {
            let mut b = Bindings::default();
            b.seen(PublicKey([1; 32]), None, addr(), 100);
            b.needs_snapshot = true;
            write(&mut b, &p);
            b.seen(PublicKey([1; 32]), None, addr(), 200);
            b.seen(PublicKey([2; 32]), None, addr(), 200);
            write(&mut b, &p);
            std::fs::read_to_string(journal_path(&p)).unwrap()
        };
        // A bad line in the middle is an error naming the line.
        std::fs::write(journal_path(&p), format!("{journal}oops\n{journal}")).unwrap();
        let e = Bindings::load(&p).unwrap_err();
        assert!(e.contains("b.json.journal:4:"), "{e}");
        // A stale journal (older generation) is ignored.
        std::fs::write(
            journal_path(&p),
            journal.replace("\"generation\":1", "\"generation\":0"),
        )
        .unwrap();
        assert_eq!(Bindings::load(&p).unwrap().len(), 1);
    }

    #[test]
    fn eviction_by_age_and_cap_spares_kept_keys() {
        let mut b = Bindings::default();
        for i in 0..10u8 {
            b.seen(PublicKey([i; 32]), None, addr(), 1000 + u64::from(i));
        }
        let keep = PublicKey([0; 32]);
        let (expired, capped) = b.evict(1005, Duration::from_secs(3), 0, |k| *k == keep);
        assert_eq!(
            (expired, capped),
            (1, 0),
            "key 1 is older than 1002; key 0 is kept"
        );
        assert!(b.contains(&keep));
        let (_, capped) = b.evict(1005, Duration::ZERO, 4, |k| *k == keep);
        assert_eq!(capped, 5);
        assert_eq!(b.len(), 4);
        assert!(b.contains(&keep) && b.contains(&PublicKey([9; 32])));
        assert!(!b.contains(&PublicKey([3; 32])), "oldest unseen went first");
    }

    #[test]
    fn files_are_private_and_stale_temps_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        let mut b = Bindings::default();
        b.seen(PublicKey([3; 32]), None, addr(), 1);
        b.write_atomic(&p).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::write(dir.path().join(".b.json.tmp-999999"), "x").unwrap();
        std::fs::write(dir.path().join(".b.json.journal.tmp-999999"), "x").unwrap();
        assert_eq!(remove_stale_temp_files(&p), 2);
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["b.json", "b.json.journal"]);
    }
}

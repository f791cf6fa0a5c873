//! TOFU: remembers every key the relay has admitted ("trust on first use") in a
//! versioned, human-readable JSON file.
//!
//! The bindings live in [`Shared`](crate::relay::Shared) so admission
//! (`--tofu-lock`) can read them without a message and a restart of this actor
//! loses nothing. The actor only decides *when* to write: at most once per
//! second, atomically (temp file in the same directory, fsync, rename, fsync the
//! directory), and once more on shutdown. A `kill -9` at any instant leaves
//! either the old or the new file, never a torn one.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::protocol::PublicKey;
use crate::relay::Shared;

const FILE_VERSION: u32 = 1;
const WRITE_EVERY: Duration = Duration::from_secs(1);

/// What the relay remembers about one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The client's public key, standard base64 (as WireGuard prints it).
    pub key: String,
    /// The ACL label for the key when it was last seen, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// RFC 3339, UTC.
    pub first_seen: String,
    pub last_seen: String,
    /// Address of the most recent connection (proxy-aware with `--trust-proxy`).
    pub last_addr: String,
    pub connections: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingsFile {
    version: u32,
    bindings: Vec<Binding>,
}

/// All bindings, ordered by key so the file is stable across writes.
#[derive(Debug, Default, Clone)]
pub struct Bindings {
    map: BTreeMap<PublicKey, Binding>,
    dirty: bool,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Bindings {
    /// Reads a bindings file. A missing file is an empty set; a file that exists
    /// but does not parse is an error naming the file, line and problem.
    pub fn load(path: &Path) -> Result<Bindings, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Bindings::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Self::parse(&text).map_err(|e| format!("{}:{e}", path.display()))
    }

    /// Parses the file's text; errors are `line:column: problem`.
    pub fn parse(text: &str) -> Result<Bindings, String> {
        let f: BindingsFile =
            serde_json::from_str(text).map_err(|e| format!("{}:{}: {e}", e.line(), e.column()))?;
        if f.version != FILE_VERSION {
            return Err(format!(
                "1: unsupported bindings file version {} (want {FILE_VERSION})",
                f.version
            ));
        }
        let mut map = BTreeMap::new();
        for (i, b) in f.bindings.into_iter().enumerate() {
            let k = PublicKey::parse(&b.key)
                .map_err(|e| format!("binding #{}: key {:?}: {e}", i + 1, b.key))?;
            map.insert(k, b);
        }
        Ok(Bindings { map, dirty: false })
    }

    pub fn to_json(&self) -> String {
        let f = BindingsFile {
            version: FILE_VERSION,
            bindings: self.map.values().cloned().collect(),
        };
        // Serialising plain strings and integers cannot fail.
        let mut s = serde_json::to_string_pretty(&f).unwrap_or_default();
        s.push('\n');
        s
    }

    /// The bindings as an allowed-keys file, labels as comments, so what the
    /// relay learned can become its ACL.
    pub fn to_allowed_keys(&self) -> String {
        let mut out = String::from("# Allowed keys exported from derp-relay TOFU bindings\n");
        for b in self.map.values() {
            out.push('\n');
            match &b.label {
                Some(l) => out.push_str(&format!("# {l}\n")),
                None => out.push_str(&format!(
                    "# first seen {} from {}\n",
                    b.first_seen, b.last_addr
                )),
            }
            out.push_str(&b.key);
            out.push('\n');
        }
        out
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

    pub fn get(&self, key: &PublicKey) -> Option<&Binding> {
        self.map.get(key)
    }

    /// Records a successful admission.
    pub fn seen(&mut self, key: PublicKey, label: Option<String>, addr: SocketAddr) {
        let now = now_rfc3339();
        let b = self.map.entry(key).or_insert_with(|| Binding {
            key: key.to_base64(),
            label: None,
            first_seen: now.clone(),
            last_seen: now.clone(),
            last_addr: String::new(),
            connections: 0,
        });
        if label.is_some() {
            b.label = label;
        }
        b.last_seen = now;
        b.last_addr = addr.ip().to_string();
        b.connections += 1;
        self.dirty = true;
    }

    /// Adds bindings from `other` that this set does not have (used after a
    /// restart to recover anything only the file knew).
    pub fn merge_missing(&mut self, other: Bindings) {
        for (k, b) in other.map {
            self.map.entry(k).or_insert(b);
        }
    }

    /// Writes atomically: temp file beside the target, fsync, rename, fsync dir.
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("bindings");
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.to_json().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }
}

pub enum TofuMsg {
    /// A key was admitted.
    Seen {
        key: PublicKey,
        label: Option<String>,
        addr: SocketAddr,
    },
    /// Periodic: write if anything changed.
    Tick,
    /// Write now if anything changed (shutdown); replies with the outcome.
    Flush(RpcReplyPort<Result<(), String>>),
    /// Lets tests prove a TOFU crash is survived.
    CrashForTest,
}

pub struct TofuActor;

pub struct TofuState {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl TofuState {
    fn write_if_dirty(&self) -> Result<(), String> {
        let mut b = self
            .shared
            .bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !b.dirty {
            return Ok(());
        }
        // Holding the lock across the write keeps admissions from racing the
        // snapshot; at one write per second this never contends for long.
        match b.write_atomic(&self.path) {
            Ok(()) => {
                b.dirty = false;
                self.shared.metrics.tofu_bindings.set(b.len() as i64);
                Ok(())
            }
            Err(e) => {
                self.shared.metrics.tofu_write_failures.inc();
                let msg = format!("{}: {e}", self.path.display());
                tracing::error!(target: "derp_relay::admission", error = %msg, "writing TOFU bindings failed; will retry");
                Err(msg)
            }
        }
    }
}

impl Actor for TofuActor {
    type Msg = TofuMsg;
    type State = TofuState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<TofuMsg>,
        shared: Arc<Shared>,
    ) -> Result<TofuState, ActorProcessingErr> {
        let path = shared.config.bindings_path();
        // On a restart the in-memory set is the newest truth; the file can
        // only add what memory lacks.
        if let Ok(from_file) = Bindings::load(&path) {
            let mut b = shared.bindings.lock().unwrap_or_else(|p| p.into_inner());
            b.merge_missing(from_file);
            shared.metrics.tofu_bindings.set(b.len() as i64);
        }
        myself.send_interval(WRITE_EVERY, || TofuMsg::Tick);
        Ok(TofuState { shared, path })
    }

    async fn handle(
        &self,
        _me: ActorRef<TofuMsg>,
        msg: TofuMsg,
        st: &mut TofuState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TofuMsg::Seen { key, label, addr } => {
                let mut b = st.shared.bindings.lock().unwrap_or_else(|p| p.into_inner());
                let new = !b.contains(&key);
                b.seen(key, label, addr);
                if new {
                    tracing::info!(target: "derp_relay::admission", %key, "new key bound (trust on first use)");
                }
            }
            TofuMsg::Tick => {
                let _ = st.write_if_dirty();
            }
            TofuMsg::Flush(reply) => {
                let _ = reply.send(st.write_if_dirty());
            }
            TofuMsg::CrashForTest => panic!("TOFU crash requested by a test"),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<TofuMsg>,
        st: &mut TofuState,
    ) -> Result<(), ActorProcessingErr> {
        let _ = st.write_if_dirty();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_stable_and_exportable() {
        let mut b = Bindings::default();
        let addr: SocketAddr = "192.0.2.1:5".parse().unwrap();
        b.seen(PublicKey([2; 32]), Some("Agent: web-01".into()), addr);
        b.seen(PublicKey([1; 32]), None, addr);
        b.seen(PublicKey([1; 32]), None, addr);
        let json = b.to_json();
        let back = Bindings::parse(&json).unwrap();
        assert_eq!(back.to_json(), json);
        assert_eq!(back.get(&PublicKey([1; 32])).unwrap().connections, 2);
        let keys = b.to_allowed_keys();
        let acl = crate::actors::acl::AllowedKeys::parse(&keys).unwrap();
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

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        let mut b = Bindings::default();
        b.seen(PublicKey([3; 32]), None, "127.0.0.1:1".parse().unwrap());
        b.write_atomic(&p).unwrap();
        b.write_atomic(&p).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("b.json")]);
        assert_eq!(Bindings::load(&p).unwrap().len(), 1);
        assert!(
            Bindings::load(&dir.path().join("missing.json"))
                .unwrap()
                .is_empty()
        );
    }
}

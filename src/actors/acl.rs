//! ACL: the allowed-keys file, reloaded live.
//!
//! The actor watches the file's *directory* (editors and Kubernetes ConfigMaps
//! replace files by rename or symlink swap, which a watch on the file itself
//! would lose), debounces bursts of events, re-parses, and swaps the new set in
//! only if the whole file parses; otherwise the last good set stays and the
//! error is logged with file and line. Keys that lost admission are handed to
//! the registry to disconnect.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::Actors;
use super::registry::RegistryMsg;
use crate::admission::allowed_keys::{AclStatus, AllowedKeys};
use crate::reasons::CloseReason;
use crate::state::Shared;

/// The file is re-read once the directory has been quiet this long. Waiting
/// for quiet (rather than reading this long after the first event) matters for
/// in-place writes, which truncate and then write: reading in between would see
/// a partial file that parses, and evict keys that were never removed.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// Gap between the two reads that must agree before a reload is trusted.
const SETTLE: Duration = Duration::from_millis(30);

pub enum AclMsg {
    /// Something changed in the watched directory.
    Changed,
    /// The debounce delay passed: re-read the file.
    Reload,
    /// SIGHUP named another allowed-keys file: watch it and read it now.
    Repoint(PathBuf),
    /// Lets tests prove an ACL crash is survived.
    #[cfg(feature = "test-hooks")]
    CrashForTest,
}

pub struct AclActor;

pub struct AclState {
    shared: Arc<Shared>,
    actors: Arc<Actors>,
    path: PathBuf,
    reload_pending: bool,
    last_event: Instant,
    _watcher: notify::RecommendedWatcher,
}

impl Actor for AclActor {
    type Msg = AclMsg;
    type State = AclState;
    type Arguments = (Arc<Shared>, Arc<Actors>, PathBuf);

    async fn pre_start(
        &self,
        myself: ActorRef<AclMsg>,
        (shared, actors, path): (Arc<Shared>, Arc<Actors>, PathBuf),
    ) -> Result<AclState, ActorProcessingErr> {
        let watcher = watch_dir_of(&path, &myself)?;
        // A restart re-reads the file: it may have changed while we were down.
        let _ = myself.cast(AclMsg::Reload);
        Ok(AclState {
            shared,
            actors,
            path,
            reload_pending: false,
            last_event: Instant::now(),
            _watcher: watcher,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AclMsg>,
        msg: AclMsg,
        st: &mut AclState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AclMsg::Changed => {
                st.last_event = Instant::now();
                if !st.reload_pending {
                    st.reload_pending = true;
                    myself.send_after(DEBOUNCE, || AclMsg::Reload);
                }
            }
            AclMsg::Reload => {
                let quiet = st.last_event.elapsed();
                if st.reload_pending && quiet < DEBOUNCE {
                    // Still being written: one timer at a time, re-armed.
                    myself.send_after(DEBOUNCE - quiet, || AclMsg::Reload);
                    return Ok(());
                }
                // An in-place write (truncate, then write) that starts right now
                // would be read half-done and parse: read twice, a moment
                // apart, and only trust identical contents.
                let first = std::fs::read(&st.path).ok();
                tokio::time::sleep(SETTLE).await;
                let second = std::fs::read(&st.path).ok();
                if first != second {
                    st.last_event = Instant::now();
                    myself.send_after(DEBOUNCE, || AclMsg::Reload);
                    return Ok(());
                }
                st.reload_pending = false;
                reload(&st.shared, &st.actors, &st.path);
            }
            AclMsg::Repoint(path) => {
                if path != st.path {
                    // The new watch first: if it cannot be set up, the old
                    // file stays watched and in force.
                    match watch_dir_of(&path, &myself) {
                        Ok(w) => {
                            tracing::info!(target: "derp_relay::admission", file = %path.display(), "watching another allowed-keys file");
                            st._watcher = w;
                            st.path = path;
                            st.reload_pending = false;
                            reload(&st.shared, &st.actors, &st.path);
                        }
                        Err(e) => {
                            tracing::error!(target: "derp_relay::admission", file = %path.display(), error = %e, "cannot watch the new allowed-keys file; keeping the old one");
                        }
                    }
                }
            }
            #[cfg(feature = "test-hooks")]
            AclMsg::CrashForTest => panic!("ACL crash requested by a test"),
        }
        Ok(())
    }
}

/// Watches the directory holding `path`, telling `me` about every change.
fn watch_dir_of(
    path: &Path,
    me: &ActorRef<AclMsg>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let me = me.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = me.cast(AclMsg::Changed);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

fn reload(shared: &Shared, actors: &Actors, path: &Path) {
    let m = &shared.metrics;
    match AllowedKeys::load(path) {
        Ok(new) => {
            let old = shared.acl();
            m.acl_read(true);
            shared.set_acl_status(AclStatus {
                last_reload: Some(SystemTime::now()),
                last_error: None,
            });
            if old.as_deref() == Some(&new) {
                return;
            }
            let removed = old
                .as_deref()
                .map(|o| o.removed_in(&new))
                .unwrap_or_default();
            m.acl_keys.set(new.len() as i64);
            tracing::info!(target: "derp_relay::admission", keys = new.len(), removed = removed.len(), file = %path.display(), "allowed keys reloaded");
            // Swap first, then evict: a registration racing this reload is
            // checked by the registry against the new set or evicted after it.
            shared.set_acl(Arc::new(new));
            if !removed.is_empty()
                && let Some(reg) = actors.registry.get()
            {
                let _ = reg.cast(RegistryMsg::Evict(removed, CloseReason::AclRemoved));
            }
        }
        Err(e) => {
            m.acl_read(false);
            tracing::error!(target: "derp_relay::admission", error = %e, "allowed keys file rejected; keeping the last good set");
            let mut s = shared.acl_status();
            s.last_error = Some(e);
            shared.set_acl_status(s);
        }
    }
}

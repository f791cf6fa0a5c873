//! The TOFU actor: decides when the bindings ("trust on first use") reach the
//! disk, and applies the size and age bounds.
//!
//! The bindings live in [`Shared`](crate::state::Shared) so admission
//! (`--tofu-lock`) reads them without a message and a restart of this actor
//! loses nothing. Once a second the actor takes what changed under the lock
//! (a few lines of JSON, or for a compaction a copy of the records), releases
//! it, and does the serialisation, write and fsync on a blocking thread: disk
//! work never holds a lock that admission takes, and never runs on an async
//! worker that relays packets. Formats and crash safety are in
//! [`admission::bindings`](crate::admission::bindings).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::admission::bindings::{self, Bindings, EvictReason, unix_now};
use crate::protocol::PublicKey;
use crate::state::Shared;

const WRITE_EVERY: Duration = Duration::from_secs(1);
/// Age and size bounds are applied this often (and after every new key over the cap).
const EVICT_EVERY: Duration = Duration::from_secs(60);

pub enum TofuMsg {
    /// A key was admitted.
    Seen {
        key: PublicKey,
        label: Option<Arc<str>>,
        addr: SocketAddr,
    },
    /// Periodic: write if anything changed.
    Tick,
    /// Periodic: apply `--tofu-expire` and `--tofu-max-bindings`.
    Evict,
    /// Write now if anything changed (shutdown); replies with the outcome.
    Flush(RpcReplyPort<Result<(), String>>),
    /// Lets tests prove a TOFU crash is survived.
    #[cfg(feature = "test-hooks")]
    CrashForTest,
}

pub struct TofuActor;

pub struct TofuState {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl TofuState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Bindings> {
        self.shared
            .bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn write_changes(&self) -> Result<(), String> {
        let Some(w) = self.lock().take_write() else {
            return Ok(());
        };
        let path = self.path.clone();
        let res = tokio::task::spawn_blocking(move || bindings::run_write(&path, w))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let mut b = self.lock();
        b.wrote(res.as_ref().ok().copied().flatten(), res.is_ok());
        self.shared.metrics.tofu_bindings.set(b.len() as i64);
        drop(b);
        res.map(|_| ()).map_err(|e| {
            self.shared.metrics.tofu_write_failures.inc();
            let msg = format!("{}: {e}", self.path.display());
            tracing::error!(target: "derp_relay::admission", error = %msg, "writing TOFU bindings failed; will retry");
            msg
        })
    }

    fn evict(&self) {
        let cfg = self.shared.live();
        let acl = self.shared.acl();
        let (expired, capped) = self.lock().evict(
            unix_now(),
            cfg.tofu_expire,
            cfg.tofu_max_bindings,
            // Keys the operator listed are never forgotten.
            |k| acl.as_deref().is_some_and(|a| a.contains(k)),
        );
        let m = &self.shared.metrics.tofu_evictions;
        for (n, r) in [(expired, EvictReason::Expired), (capped, EvictReason::Cap)] {
            if n > 0 {
                m.with_label_values(&[r.as_str()]).inc_by(n as u64);
                tracing::info!(target: "derp_relay::admission", bindings = n, reason = r.as_str(), "TOFU bindings forgotten");
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
        // On a restart the in-memory set is the newest truth; the files can
        // only add what memory lacks.
        let path2 = path.clone();
        if let Ok(Ok(from_file)) = tokio::task::spawn_blocking(move || Bindings::load(&path2)).await
        {
            let mut b = shared.bindings.lock().unwrap_or_else(|p| p.into_inner());
            b.merge_missing(from_file);
            shared.metrics.tofu_bindings.set(b.len() as i64);
        }
        myself.send_interval(WRITE_EVERY, || TofuMsg::Tick);
        myself.send_interval(EVICT_EVERY, || TofuMsg::Evict);
        let st = TofuState { shared, path };
        st.evict();
        Ok(st)
    }

    async fn handle(
        &self,
        _me: ActorRef<TofuMsg>,
        msg: TofuMsg,
        st: &mut TofuState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TofuMsg::Seen { key, label, addr } => {
                let (new, over) = {
                    let mut b = st.lock();
                    let new = b.seen(key, label, addr, unix_now());
                    let cap = st.shared.live().tofu_max_bindings;
                    (new, cap != 0 && b.len() > cap)
                };
                if new {
                    tracing::info!(target: "derp_relay::admission", %key, "new key bound (trust on first use)");
                }
                if over {
                    st.evict();
                }
            }
            TofuMsg::Tick => {
                let _ = st.write_changes().await;
            }
            TofuMsg::Evict => st.evict(),
            TofuMsg::Flush(reply) => {
                let _ = reply.send(st.write_changes().await);
            }
            #[cfg(feature = "test-hooks")]
            TofuMsg::CrashForTest => panic!("TOFU crash requested by a test"),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<TofuMsg>,
        st: &mut TofuState,
    ) -> Result<(), ActorProcessingErr> {
        let _ = st.write_changes().await;
        Ok(())
    }
}

//! Re-asking `--verify-client-url` about connected keys, so that a key the
//! URL later refuses is disconnected as an allowed-keys removal is: through
//! the registry's `Evict`, with cause `verify_denied`.
//!
//! A plain task rather than an actor: it holds no state a restart would
//! need, and its questions must run side by side (each up to the verify
//! timeout), which an actor's one-message-at-a-time handler would serialise.
//! Questions go through the answer cache, so a key is really asked again
//! only once its cached answer is older than `--verify-client-cache-ttl`.
//! Only a definite deny evicts: a verify service that is down does not
//! disconnect clients that were admitted while it was up.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;

use super::Actors;
use super::registry::RegistryMsg;
use crate::admission::UrlVerdict;
use crate::protocol::PublicKey;
use crate::reasons::CloseReason;
use crate::state::Shared;

/// Questions in flight at once during one sweep.
const PARALLEL: usize = 16;

/// Runs until the relay stops (the task is aborted); the period and whether
/// there is a URL at all follow the live settings.
pub async fn recheck_loop(shared: Arc<Shared>, actors: Arc<Actors>) {
    let mut live = shared.watch_live();
    loop {
        let period = shared
            .live()
            .verify
            .as_ref()
            .map(|v| v.recheck)
            .filter(|d| !d.is_zero());
        let Some(period) = period else {
            if live.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            changed = live.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        if shared.is_draining() {
            return;
        }
        recheck_once(&shared, &actors).await;
    }
}

/// One sweep over the connected keys; returns how many were evicted.
pub async fn recheck_once(shared: &Arc<Shared>, actors: &Actors) -> usize {
    let mut seen = HashSet::new();
    let mut todo = Vec::new();
    shared.clients.for_each(|h| {
        // Mesh peers are admitted by the mesh key and never asked.
        if !h.is_mesh_peer() && seen.insert(h.key) {
            todo.push((h.key, h.remote.ip()));
        }
    });
    let denied: Vec<PublicKey> = futures_util::stream::iter(todo)
        .map(|(key, ip)| async move {
            let c = shared.verify_client(&key, ip).await;
            c.filter(|c| c.verdict == UrlVerdict::Deny).map(|_| key)
        })
        .buffer_unordered(PARALLEL)
        .filter_map(|k| async move { k })
        .collect()
        .await;
    let n = denied.len();
    if n > 0 {
        for k in &denied {
            tracing::info!(target: "derp_relay::admission", key = %k, "verify URL now refuses a connected key; disconnecting");
        }
        if let Some(reg) = actors.registry.get() {
            let _ = reg.cast(RegistryMsg::Evict(denied, CloseReason::VerifyDenied));
        }
    }
    n
}

//! Fault injection for the integration tests (feature `test-hooks`): make one
//! connection's handler, reader or writer panic, to prove a panic costs exactly
//! that connection.

use std::collections::HashMap;
use std::sync::Mutex;

use ractor::ActorRef;

use super::ConnMsg;
use crate::protocol::PublicKey;
use crate::routing::ClientHandle;

/// Which part of a connection should panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Reader,
    Writer,
}

/// Keyed by key and connection id: connection ids are per relay, and tests
/// run several relays in one process.
type Id = (PublicKey, u64);

static ACTORS: Mutex<Option<HashMap<Id, ActorRef<ConnMsg>>>> = Mutex::new(None);
static PANIC: Mutex<Vec<(Id, Part)>> = Mutex::new(Vec::new());

pub(crate) fn started(h: &ClientHandle, a: ActorRef<ConnMsg>) {
    let mut m = ACTORS.lock().unwrap_or_else(|p| p.into_inner());
    m.get_or_insert_with(HashMap::new)
        .insert((h.key, h.conn_id), a);
}

pub(crate) fn ended(h: &ClientHandle) {
    if let Some(m) = ACTORS.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        m.remove(&(h.key, h.conn_id));
    }
}

/// Makes the connection's actor panic in its message handler.
pub fn crash_handler(h: &ClientHandle) -> bool {
    let m = ACTORS.lock().unwrap_or_else(|p| p.into_inner());
    m.as_ref()
        .and_then(|m| m.get(&(h.key, h.conn_id)))
        .is_some_and(|a| a.cast(ConnMsg::CrashForTest).is_ok())
}

/// Makes the connection's reader or writer panic at its next step.
pub fn panic_in(h: &ClientHandle, part: Part) {
    PANIC
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(((h.key, h.conn_id), part));
}

pub(crate) fn check(h: &ClientHandle, part: Part) {
    let mut v = PANIC.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = v.iter().position(|e| *e == ((h.key, h.conn_id), part)) {
        v.remove(i);
        drop(v);
        panic!("{part:?} panic requested by a test");
    }
}

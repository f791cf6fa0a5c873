//! One client connection, from the upgraded stream to its close: the bounded
//! pre-authentication phase and handshake (`accept`, `preauth`), the actor that
//! owns the connection, its reader and writer tasks, and the two transports
//! behind one reader and one writer type.
//!
//! This layer sits on `routing` (where packets go), `state` and `protocol`. It
//! does not know the actors: registration goes through [`Registrar`], which
//! the relay implements over the registry actor, and the supervisor to link
//! connection actors to is handed in.

pub mod accept;
pub mod actor;
pub mod mesh;
pub mod pace;
pub mod preauth;
pub mod reader;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod transport;
pub mod writer;
pub mod ws;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use ractor::ActorCell;

use crate::admission::UrlVerdict;
use crate::reasons::{CloseReason, RefuseReason};
use crate::routing::ClientHandle;
use crate::state::Shared;

pub use accept::accept;

/// A registration's outcome: admitted, refused for a reason, or the registry
/// could not be asked.
pub type Registered =
    Pin<Box<dyn Future<Output = Result<Result<(), RefuseReason>, String>> + Send>>;

/// How a connection registers with the routing table's single writer.
pub trait Registrar: Send + Sync {
    /// Admission and registration of a proven key, with the verify URL's
    /// verdict asked beforehand by the connection.
    fn register(&self, h: Arc<ClientHandle>, url: UrlVerdict) -> Registered;
    /// The connection ended.
    fn deregister(&self, h: Arc<ClientHandle>);
    /// An inactive duplicate sent a packet (last writer becomes active).
    fn activity(&self, h: Arc<ClientHandle>);
    /// A mesh peer sent WatchConns.
    fn watch(&self, h: Arc<ClientHandle>);
}

/// An upgraded connection's byte stream (TLS, if any, is beneath it).
pub type RawIo = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// What every connection uses.
pub struct ConnDeps {
    pub state: Arc<Shared>,
    pub registrar: Arc<dyn Registrar>,
    /// The supervisor connection actors are linked to (set once it runs).
    pub supervisor: OnceLock<ActorCell>,
    /// Per-client receive bandwidth limit, swappable while clients are connected.
    pub client_rate: Arc<pace::ClientRate>,
    /// Whether `client_rate` applies to these connections: false for mesh
    /// peers, which carry many clients' traffic (derper exempts them too).
    pub rate_limited: bool,
}

/// Control messages for a connection actor.
#[derive(Debug)]
pub enum ConnMsg {
    /// The relay is stopping: flush, say goodbye, close.
    GoingAway,
    /// Close now, for the given reason (logged and counted).
    Close(CloseReason),
    /// Lets tests prove that a panicking connection is contained.
    #[cfg(feature = "test-hooks")]
    CrashForTest,
}

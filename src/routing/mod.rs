//! The data plane: where a packet goes and how it waits there.
//!
//! Rules of the hot path (DESIGN.md §2), which everything here keeps:
//! 1. No per-packet actor message: a sender's reader looks the destination up
//!    in [`Clients`] (a concurrent map) and pushes onto its [`SendQueue`].
//! 2. Bounded everything: each queue has a fixed depth; a full queue drops its
//!    oldest packet, counted by [`DropReason`](crate::reasons::DropReason).
//! 3. Batch writes: a writer takes everything queued at once.
//! 4. Only the registry actor writes the table; readers never wait on it.
//! 5. A key not connected here but announced by a mesh peer is forwarded:
//!    [`RemoteKeys`] names the link, whose [`ForwardQueue`] is bounded the same
//!    way (mesh links write that half, the registry the local one).
//!
//! This layer knows keys, queues and connections as handles; it imports only
//! `protocol` and `reasons`, never actors, sockets or HTTP.

pub mod handle;
pub mod remote;
pub mod send_queue;
pub mod table;
pub mod watch;

pub use handle::ClientHandle;
pub use remote::{ForwardQueue, MeshLink, RemoteKeys, TryForward};
pub use send_queue::{Batch, Control, SendQueue};
pub use table::Clients;
pub use watch::{Presence, WatchQueue};

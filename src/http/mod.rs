//! The HTTP front: our own accept loop (header timeout, stop-accepting) serving
//! warp routes, including the two upgrades on `/derp`.

pub mod client_addr;
pub mod rate_limit;
pub mod reply;
pub mod routes;
pub mod server;
pub mod upgrade;

use std::net::SocketAddr;

/// The client's address (the TCP peer, or what a trusted proxy reports), put
/// into request extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

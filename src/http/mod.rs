//! The HTTP front: our own accept loop (PROXY header, TLS, header timeout,
//! stop-accepting) serving warp routes, including the two upgrades on
//! `/derp`, and the optional plain port-80 listener.

pub mod client_addr;
pub mod port80;
pub mod proxy_protocol;
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

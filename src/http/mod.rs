//! The HTTP front: our own accept loop (header timeout, stop-accepting) serving
//! warp routes, including the two upgrades on `/derp`.

pub mod routes;
pub mod server;
pub mod upgrade;

use std::net::SocketAddr;

/// The TCP peer of a request, put into request extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

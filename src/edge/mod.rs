//! What faces the internet besides `/derp`: the STUN socket, the outbound
//! HTTP client that asks `--verify-client-url` (and, later, the TLS acceptor). Each part here shares nothing with the data plane but the
//! metrics, so a flood on one cannot slow the relaying of packets.

pub mod stun;
pub mod verify_url;

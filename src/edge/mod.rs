//! What faces the internet besides `/derp`: the STUN socket, the TLS
//! certificate (loaded, served, reloaded live), and the outbound HTTP client
//! that asks `--verify-client-url`. Each part here shares nothing with the
//! data plane but the metrics, so a flood on one cannot slow the relaying of
//! packets.

pub mod stun;
pub mod tls;
pub mod verify_url;

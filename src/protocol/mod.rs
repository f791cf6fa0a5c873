//! The DERP v2 wire protocol as pure data transformations: frame encoding and
//! decoding, the handshake's NaCl boxes, and key types; the STUN codec; and the PROXY protocol header a TCP balancer
//! writes before the client's bytes.
//!
//! Nothing here does I/O or knows about tokio or actors, so the same code serves
//! the relay, the load generator, and unit tests, and can be fuzzed on its own.

pub mod frame;
pub mod handshake;
pub mod keys;
pub mod proxy_header;
pub mod stun;
pub mod ws;

pub use frame::{ClientFrame, FrameError, FrameType, PeerGoneReason};
pub use handshake::{ClientInfo, HandshakeError, ServerSecret};
pub use keys::PublicKey;

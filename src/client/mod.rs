//! A DERP client over either transport, with or without TLS, for the tools that
//! talk to a relay from outside: `derp-bench` (load) and `derp-relay probe`
//! (does this deployment work end to end?).
//!
//! It lives in the library so both binaries share one implementation of the
//! upgrade, the handshake and frame reassembly, and so a failure can be told
//! apart precisely (TLS, an HTTP refusal such as 429, a key the relay refused)
//! rather than collapsing into "connection failed". The wire format itself stays
//! in [`crate::protocol`]; this module only adds sockets.
//!
//! The parts, in the order a connection uses them: `url` (where the relay is),
//! `net` (TCP and TLS), `upgrade` (HTTP upgrade to DERP or WebSocket), `frames`
//! (frame reader and writer over either transport), `handshake` (ServerKey to
//! ServerInfo, and the resulting [`Client`]); `error` is the one error type all
//! of them report. Everything public is re-exported here, so callers name
//! `client::X` and never the file it lives in.

mod error;
mod frames;
mod handshake;
mod net;
mod upgrade;
mod url;

pub use self::error::ClientError;
pub use self::frames::{FrameReader, FrameWriter, WRITE_STALL};
pub use self::handshake::{Client, Handshake, connect, handshake};
pub use self::net::{
    Conn, ConnectOptions, connect_stream, connect_stream_via, connect_tcp, insecure_tls_config,
    load_pem_certs, tls_config,
};
pub use self::upgrade::{ResponseHead, open, open_via, parse_response_head, read_response_head};
pub use self::url::{RelayUrl, authority};

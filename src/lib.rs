//! derp-relay: a DERP v2 relay server. See README.md for operation and
//! DESIGN.md (in the team's shared folder) for the architecture.
//!
//! Modules by plane, lowest first (a module imports only those above it in
//! this list; `tests/layering.rs` enforces it):
//! `protocol` (frames, handshake boxes, keys: pure), `reasons` (how things
//! end), `config` → `routing` (table, client handle, send queue) and
//! `admission` (allowed keys, bindings, server key, verify-URL formats and
//! cache, `admit`) → `metrics`, `limits`, `memory` (returns freed heap) →
//! `state` (what the running relay shares) → `conn` (one client,
//! upgrade to close) → `actors` (control plane) and `http` (accept loop,
//! routes) → `relay` (wires it all). `client` (on `protocol` only) is the
//! outside client, used by `cli`, the bench, and the mesh links in `actors`.
//!
//! A packet's path: `http::server` accepts, `http::upgrade` answers 101,
//! `conn::accept` runs the bounded handshake and starts `conn::actor`, whose
//! `conn::reader` decodes SendPacket and pushes it onto the destination's
//! `routing::SendQueue` through `routing::Clients` (a map read), waking each
//! destination's `conn::writer` once per read, which drains the queue and
//! writes the batch.
//! A key connected to another relay of the region instead goes onto that mesh
//! link's `routing::ForwardQueue`, which `actors::mesh::link` writes as
//! ForwardPacket; a ForwardPacket received is delivered locally only.
//! No actor sees the packet.

pub mod actors;
pub mod admission;
pub mod client;
pub mod config;
pub mod conn;
pub mod edge;
pub mod http;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod protocol;
pub mod reasons;
pub mod relay;
pub mod routing;
pub mod state;
pub mod stream;

pub use config::Config;
pub use relay::Relay;

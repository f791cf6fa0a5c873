//! derp-relay: a DERP v2 relay server. See README.md for operation and
//! DESIGN.md (in the team's shared folder) for the architecture.

pub mod actors;
pub mod client;
pub mod config;
pub mod edge;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod relay;

pub use config::Config;
pub use relay::Relay;

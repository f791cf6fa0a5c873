//! derp-relay: a DERP v2 relay server. See README.md for operation and
//! `../shared/DESIGN.md` for the architecture.

pub mod protocol;

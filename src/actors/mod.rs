//! The supervisor tree (see DESIGN.md §1): RootSupervisor, Metrics, Tofu, Acl, Registry,
//! and one actor per connection, plus the send queue and transports they share.

pub mod acl;
pub mod connection;
pub mod metrics;
pub mod preauth;
pub mod read_ahead;
pub mod registry;
pub mod send_queue;
pub mod supervisor;
pub mod tofu;
pub mod transport;

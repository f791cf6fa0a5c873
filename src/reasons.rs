//! The closed lists of how things end: why a packet was dropped, why a
//! connection attempt was refused, and the transport a client used. Each is a
//! metric label and a log field; nothing else names these outcomes.
//!
//! A leaf module: it imports nothing, so every layer may use it.

/// Why a packet was not delivered. A closed list, so every drop is counted
/// under exactly one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No client with the destination key is connected here.
    UnknownDest,
    /// The destination left while the packet was queued for it.
    GoneDisconnected,
    /// The destination's queue was full; its oldest packet made room. (Upstream
    /// also has `queue_tail`, for a race its lock-free queue has and ours does not.)
    QueueHead,
    /// Writing to the destination's socket failed or timed out.
    WriteError,
    /// The packet was over the 64 KiB limit (the sender is disconnected).
    TooLarge,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::UnknownDest,
        DropReason::GoneDisconnected,
        DropReason::QueueHead,
        DropReason::WriteError,
        DropReason::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownDest => "unknown_dest",
            DropReason::GoneDisconnected => "gone_disconnected",
            DropReason::QueueHead => "queue_head",
            DropReason::WriteError => "write_error",
            DropReason::TooLarge => "too_large",
        }
    }
}

/// Why a connection attempt did not become a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The ClientInfo box did not open, or the handshake was malformed or late.
    BadHandshake,
    /// The client cap was reached.
    Cap,
    /// The key is not in the allowed-keys file.
    Acl,
    /// The key has no TOFU binding while `--tofu-lock` is on.
    TofuLock,
    /// Too many requests from the client's address.
    RateLimit,
    /// The relay is shutting down.
    ShuttingDown,
    /// The client's address already holds `--max-pending-per-ip` connections
    /// that have not finished their handshake.
    PendingLimit,
    /// The process ran out of file descriptors (answered 503 from a spare one).
    Descriptors,
    /// The TLS handshake failed or did not finish within the header timeout.
    Tls,
    /// A PROXY protocol header was missing or malformed from a trusted
    /// balancer, or sent by an address that is not one.
    ProxyProtocol,
}

impl RefuseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::BadHandshake => "bad_handshake",
            RefuseReason::Cap => "cap",
            RefuseReason::Acl => "acl",
            RefuseReason::TofuLock => "tofu_lock",
            RefuseReason::RateLimit => "rate_limit",
            RefuseReason::ShuttingDown => "shutting_down",
            RefuseReason::PendingLimit => "pending_limit",
            RefuseReason::Descriptors => "descriptors",
            RefuseReason::Tls => "tls",
            RefuseReason::ProxyProtocol => "proxy_protocol",
        }
    }
}

/// The transport a client connected over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/1.1 `Upgrade: DERP`, raw frames on the upgraded stream.
    Derp,
    /// WebSocket, subprotocol `derp`, frames in binary messages.
    WebSocket,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Derp => "derp",
            Transport::WebSocket => "websocket",
        }
    }
}

/// Why an established client connection ended. A closed list: it is the
/// `cause` label of `derp_disconnects_total` and the `cause` log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its side.
    Eof,
    /// Reading from the socket failed.
    ReadError,
    /// Writing to the socket failed.
    WriteError,
    /// A write stayed blocked past `--write-timeout` (the client stopped reading).
    WriteTimeout,
    /// The client sent a malformed, oversized or server-only frame.
    BadFrame,
    /// A mesh frame (WatchConns, ClosePeer, ForwardPacket) from a non-mesh client.
    MeshFrameFromClient,
    /// The key was removed from the allowed-keys file.
    AclRemoved,
    /// The relay is stopping; the client was told to go elsewhere.
    GoingAway,
    /// A panic in this connection's reader, writer or actor (a bug; counted
    /// so it is seen, and it costs only this connection).
    Panic,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Eof,
        CloseReason::ReadError,
        CloseReason::WriteError,
        CloseReason::WriteTimeout,
        CloseReason::BadFrame,
        CloseReason::MeshFrameFromClient,
        CloseReason::AclRemoved,
        CloseReason::GoingAway,
        CloseReason::Panic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::ReadError => "read_error",
            CloseReason::WriteError => "write_error",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::BadFrame => "bad_frame",
            CloseReason::MeshFrameFromClient => "mesh_frame_from_client",
            CloseReason::AclRemoved => "acl_removed",
            CloseReason::GoingAway => "going_away",
            CloseReason::Panic => "panic",
        }
    }
}

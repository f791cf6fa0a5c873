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
    /// The destination is on another node and that mesh link's queue was
    /// full (its oldest packet made room), or the link went down with it queued.
    MeshQueue,
    /// A ForwardPacket from a mesh peer named a key not connected here
    /// (never forwarded again: one hop).
    UnknownDestOnFwd,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::UnknownDest,
        DropReason::GoneDisconnected,
        DropReason::QueueHead,
        DropReason::WriteError,
        DropReason::TooLarge,
        DropReason::MeshQueue,
        DropReason::UnknownDestOnFwd,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownDest => "unknown_dest",
            DropReason::GoneDisconnected => "gone_disconnected",
            DropReason::QueueHead => "queue_head",
            DropReason::WriteError => "write_error",
            DropReason::TooLarge => "too_large",
            DropReason::MeshQueue => "mesh_queue",
            DropReason::UnknownDestOnFwd => "unknown_dest_on_fwd",
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
    /// ClientInfo carried a well-formed mesh key that is not this region's
    /// (a misconfigured peer, or a guess).
    MeshKey,
    /// The TLS handshake failed or did not finish within the header timeout.
    Tls,
    /// A PROXY protocol header was missing or malformed from a trusted
    /// balancer, or sent by an address that is not one.
    ProxyProtocol,
    /// `--verify-client-url` answered `{"Allow":false}`.
    VerifyDenied,
    /// `--verify-client-url` could not be asked (down, slow, malformed
    /// answer) and the relay fails closed.
    VerifyUnavailable,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 13] = [
        RefuseReason::BadHandshake,
        RefuseReason::Cap,
        RefuseReason::Acl,
        RefuseReason::TofuLock,
        RefuseReason::RateLimit,
        RefuseReason::ShuttingDown,
        RefuseReason::PendingLimit,
        RefuseReason::Descriptors,
        RefuseReason::VerifyDenied,
        RefuseReason::VerifyUnavailable,
        RefuseReason::MeshKey,
        RefuseReason::Tls,
        RefuseReason::ProxyProtocol,
    ];

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
            RefuseReason::MeshKey => "mesh_key",
            RefuseReason::Tls => "tls",
            RefuseReason::ProxyProtocol => "proxy_protocol",
            RefuseReason::VerifyDenied => "verify_denied",
            RefuseReason::VerifyUnavailable => "verify_unavailable",
        }
    }
}

/// Mesh link states, the `state` label of `derp_mesh_peers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshPeerState {
    /// Dialling or in the handshake.
    Connecting,
    /// Handshaken and watching: packets for its keys go out on it.
    Connected,
    /// Down, waiting before the next attempt.
    Backoff,
    /// The address turned out to be this node; the link is stopped.
    Myself,
}

impl MeshPeerState {
    pub const ALL: [MeshPeerState; 4] = [
        MeshPeerState::Connecting,
        MeshPeerState::Connected,
        MeshPeerState::Backoff,
        MeshPeerState::Myself,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MeshPeerState::Connecting => "connecting",
            MeshPeerState::Connected => "connected",
            MeshPeerState::Backoff => "backoff",
            MeshPeerState::Myself => "self",
        }
    }

    pub fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(MeshPeerState::Connecting)
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
    /// A WebSocket text message: DERP travels in binary messages only
    /// (WebSocket close code 1003, as upstream).
    TextMessage,
    /// A WebSocket framing violation (bad opcode or reserved bits, masking,
    /// oversized message, ...): close code 1002, as upstream.
    WsProtocol,
    /// A mesh frame (WatchConns, ClosePeer, ForwardPacket) from a non-mesh client.
    MeshFrameFromClient,
    /// The key was removed from the allowed-keys file.
    AclRemoved,
    /// `--verify-client-url` refused the key when it was checked again.
    VerifyDenied,
    /// The relay is stopping; the client was told to go elsewhere.
    GoingAway,
    /// A panic in this connection's reader, writer or actor (a bug; counted
    /// so it is seen, and it costs only this connection).
    Panic,
    /// A mesh peer asked for this key's connections to be closed (ClosePeer).
    ClosePeer,
    /// A watching mesh peer fell `mesh_watch_max` presence updates behind;
    /// it reconnects and gets a fresh flood.
    MeshWatchOverflow,
}

impl CloseReason {
    pub const ALL: [CloseReason; 14] = [
        CloseReason::Eof,
        CloseReason::ReadError,
        CloseReason::WriteError,
        CloseReason::WriteTimeout,
        CloseReason::BadFrame,
        CloseReason::TextMessage,
        CloseReason::WsProtocol,
        CloseReason::MeshFrameFromClient,
        CloseReason::AclRemoved,
        CloseReason::VerifyDenied,
        CloseReason::GoingAway,
        CloseReason::Panic,
        CloseReason::ClosePeer,
        CloseReason::MeshWatchOverflow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::ReadError => "read_error",
            CloseReason::WriteError => "write_error",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::BadFrame => "bad_frame",
            CloseReason::TextMessage => "text_message",
            CloseReason::WsProtocol => "ws_protocol_error",
            CloseReason::MeshFrameFromClient => "mesh_frame_from_client",
            CloseReason::AclRemoved => "acl_removed",
            CloseReason::VerifyDenied => "verify_denied",
            CloseReason::GoingAway => "going_away",
            CloseReason::Panic => "panic",
            CloseReason::ClosePeer => "close_peer",
            CloseReason::MeshWatchOverflow => "mesh_watch_overflow",
        }
    }
}

/// What became of one question to `--verify-client-url`. The `result` label
/// of `derp_verify_client_checks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyResult {
    /// The URL answered `{"Allow":true}`.
    Allow,
    /// The URL answered `{"Allow":false}`.
    Deny,
    /// A recent allow, answered from the cache.
    CachedAllow,
    /// A recent deny, answered from the cache.
    CachedDeny,
    /// No answer within `--verify-client-timeout`.
    Timeout,
    /// Connection refused, TLS failure, a non-200 status or a body that is
    /// not `{"Allow":bool}`.
    Error,
}

impl VerifyResult {
    pub const ALL: [VerifyResult; 6] = [
        VerifyResult::Allow,
        VerifyResult::Deny,
        VerifyResult::CachedAllow,
        VerifyResult::CachedDeny,
        VerifyResult::Timeout,
        VerifyResult::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VerifyResult::Allow => "allow",
            VerifyResult::Deny => "deny",
            VerifyResult::CachedAllow => "cached_allow",
            VerifyResult::CachedDeny => "cached_deny",
            VerifyResult::Timeout => "timeout",
            VerifyResult::Error => "error",
        }
    }
}

/// The long-lived actors the supervisor restarts: the `actor` label of
/// `derp_actor_restarts_total`. Listed here so every series exists from the
/// start; the supervisor names its children with these strings.
pub const RESTARTABLE_ACTORS: [&str; 6] =
    ["metrics", "tofu", "acl", "registry", "mesh", "mesh_link"];

/// Results of an allowed-keys reload (`derp_acl_reloads_total{result}`) and
/// of a config reload on SIGHUP (`derp_config_reloads_total{result}`).
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "failed"];

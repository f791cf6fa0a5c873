//! Curve25519 public keys as the relay sees them: 32 opaque bytes that name a peer.

use std::fmt;

use base64::Engine as _;

/// Length in bytes of a Curve25519 public key.
pub const KEY_LEN: usize = 32;

/// A peer's WireGuard/Tailscale node public key.
///
/// `Display` prints a short form (`[AbCdE]`, as Tailscale does) so logs never carry
/// whole keys; use [`PublicKey::to_base64`] or [`PublicKey::to_nodekey_hex`] when the
/// full value is wanted.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

/// Why a textual key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("not valid base64 or nodekey:<hex>: {0}")]
    Encoding(String),
    #[error("key is {0} bytes long, want 32")]
    Length(usize),
}

impl PublicKey {
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; KEY_LEN]>::try_from(b).ok().map(PublicKey)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Tailscale's textual form, `nodekey:<64 lowercase hex>`.
    pub fn to_nodekey_hex(&self) -> String {
        format!("nodekey:{}", hex::encode(self.0))
    }

    /// Parses standard base64 (as WireGuard prints keys) or Tailscale's
    /// `nodekey:<hex>` form.
    pub fn parse(s: &str) -> Result<Self, KeyParseError> {
        let s = s.trim();
        let bytes = if let Some(h) = s.strip_prefix("nodekey:") {
            hex::decode(h).map_err(|e| KeyParseError::Encoding(e.to_string()))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| KeyParseError::Encoding(e.to_string()))?
        };
        PublicKey::from_slice(&bytes).ok_or(KeyParseError::Length(bytes.len()))
    }

    /// The short form used in logs.
    pub fn short(&self) -> ShortKey {
        ShortKey(*self)
    }
}

/// Log-friendly rendering of a key: the first five base64 characters in brackets.
pub struct ShortKey(PublicKey);

impl fmt::Display for ShortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b64 = self.0.to_base64();
        write!(f, "[{}]", &b64[..5])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.short().fmt(f)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey{}", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base64_and_nodekey_forms() {
        let k = PublicKey([7u8; 32]);
        assert_eq!(PublicKey::parse(&k.to_base64()).unwrap(), k);
        assert_eq!(PublicKey::parse(&k.to_nodekey_hex()).unwrap(), k);
        assert_eq!(
            PublicKey::parse(&format!("  {}\t", k.to_base64())).unwrap(),
            k
        );
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(matches!(
            PublicKey::parse("AAAA"),
            Err(KeyParseError::Length(3))
        ));
        assert!(matches!(
            PublicKey::parse("!!!"),
            Err(KeyParseError::Encoding(_))
        ));
        assert!(matches!(
            PublicKey::parse("nodekey:zz"),
            Err(KeyParseError::Encoding(_))
        ));
        assert!(matches!(
            PublicKey::parse("nodekey:abcd"),
            Err(KeyParseError::Length(2))
        ));
    }

    #[test]
    fn display_is_short() {
        let k = PublicKey([0xff; 32]);
        assert_eq!(k.to_string(), "[/////]");
    }
}

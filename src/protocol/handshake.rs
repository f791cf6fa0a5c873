//! The DERP handshake's cryptography: ClientInfo is a NaCl box from the client's
//! key to the server's, so opening it proves the client holds the private key it
//! claims; ServerInfo is a box back the other way.

use aws_lc_rs::agreement::{self, UnparsedPublicKey, X25519};
use crypto_box::aead::generic_array::GenericArray;
use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{SalsaBox, SecretKey};
use crypto_secretbox::{Kdf, KeyInit, XSalsa20Poly1305};
use serde_json::Value;

use super::frame::{MAX_INFO_LEN, NONCE_LEN, PROTOCOL_VERSION};
use super::keys::{KEY_LEN, PublicKey};

/// Why a handshake failed. All of them close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("ClientInfo payload of {0} bytes is too short")]
    TooShort(usize),
    #[error("ClientInfo box does not open with the claimed key")]
    BadBox,
    #[error("ClientInfo is not a JSON object")]
    BadJson,
    #[error("ServerInfo announces version {0}, want 2")]
    Version(i64),
}

/// What a client says about itself in ClientInfo. Both the Go client's spelling
/// (`meshKey`, `CanAckPings`) and `ts_derp`'s (`mesh_key`, `can_ack_pings`) are
/// accepted; unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    pub mesh_key: Option<String>,
    pub version: i64,
    pub can_ack_pings: bool,
    pub is_prober: bool,
    pub app_name: Option<String>,
}

impl ClientInfo {
    fn from_json(v: &Value) -> Result<Self, HandshakeError> {
        let obj = v.as_object().ok_or(HandshakeError::BadJson)?;
        let field = |names: &[&str]| names.iter().find_map(|n| obj.get(*n));
        let string = |names: &[&str]| {
            field(names)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let flag = |names: &[&str]| field(names).and_then(Value::as_bool).unwrap_or(false);
        Ok(ClientInfo {
            mesh_key: string(&["meshKey", "mesh_key", "MeshKey"]),
            version: field(&["version", "Version"])
                .and_then(Value::as_i64)
                .unwrap_or(0),
            can_ack_pings: flag(&["CanAckPings", "can_ack_pings", "canAckPings"]),
            is_prober: flag(&["IsProber", "is_prober", "isProber"]),
            app_name: string(&["AppName", "app_name", "appName"]),
        })
    }

    /// True when the client sent something shaped like a mesh key (64 hex
    /// digits), right or wrong; ts_derp's `"none"` is not.
    pub fn presents_mesh_key(&self) -> bool {
        self.mesh_key
            .as_deref()
            .is_some_and(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// True when the client presented exactly `configured` as its mesh key.
    /// Absent or malformed keys are simply "not a mesh peer".
    pub fn is_mesh_peer(&self, configured: Option<&[u8; 32]>) -> bool {
        use subtle::ConstantTimeEq;
        let (Some(want), Some(got)) = (configured, self.mesh_key.as_deref()) else {
            return false;
        };
        let mut got_bytes = [0u8; 32];
        if hex::decode_to_slice(got, &mut got_bytes).is_err() {
            return false;
        }
        got_bytes.ct_eq(want).into()
    }
}

/// The relay's long-term Curve25519 identity.
#[derive(Clone)]
pub struct ServerSecret {
    secret: SecretKey,
    public: PublicKey,
    /// The same key for aws-lc's X25519 (assembly; about 3× dalek's portable
    /// ladder, which was most of a handshake's CPU).
    agree: Agree,
}

impl ServerSecret {
    pub fn generate() -> Self {
        Self::from_bytes(SecretKey::generate(&mut OsRng).to_bytes())
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        let secret = SecretKey::from_bytes(b);
        let public = PublicKey(*secret.public_key().as_bytes());
        ServerSecret {
            agree: Agree::new(&b),
            secret,
            public,
        }
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The same identity as a client key: a mesh link presents the node's own
    /// server key as its client key (as derper does), which is also how a
    /// node recognises a link to itself.
    pub fn as_client(&self) -> ClientSecret {
        ClientSecret::from_bytes(self.secret.to_bytes())
    }

    /// The key file format of Tailscale's derper (`{"PrivateKey":"privkey:<hex>"}`),
    /// so an operator can carry a derper identity over, or back.
    pub fn to_key_file(&self) -> String {
        let hex = hex::encode(self.secret.to_bytes());
        format!("{{\"PrivateKey\":\"privkey:{hex}\"}}\n")
    }

    pub fn from_key_file(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let s = v
            .get("PrivateKey")
            .and_then(Value::as_str)
            .ok_or("missing string field \"PrivateKey\"")?;
        let hex_part = s
            .strip_prefix("privkey:")
            .ok_or("PrivateKey does not start with \"privkey:\"")?;
        let mut b = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut b)
            .map_err(|e| format!("PrivateKey is not 64 hex digits: {e}"))?;
        Ok(Self::from_bytes(b))
    }

    /// Opens a ClientInfo payload (`client key | nonce | box`), proving the
    /// client holds the private half of the key it claims.
    /// Also returns the box shared with that client, which seals ServerInfo
    /// without a second X25519 (the costliest step of a handshake).
    pub fn open_client_info(
        &self,
        payload: &[u8],
    ) -> Result<(PublicKey, ClientInfo, Session), HandshakeError> {
        if payload.len() < KEY_LEN + NONCE_LEN {
            return Err(HandshakeError::TooShort(payload.len()));
        }
        let client = PublicKey::from_slice(&payload[..KEY_LEN])
            .ok_or(HandshakeError::TooShort(payload.len()))?;
        let nonce = &payload[KEY_LEN..KEY_LEN + NONCE_LEN];
        // A key whose shared secret is all zeros (a low-order point) is
        // refused by aws-lc: anyone could seal such a box.
        let session = self
            .agree
            .session(&self.secret, &client)
            .ok_or(HandshakeError::BadBox)?;
        let json = session.open(nonce, &payload[KEY_LEN + NONCE_LEN..])?;
        let v: Value = serde_json::from_slice(&json).map_err(|_| HandshakeError::BadJson)?;
        Ok((client, ClientInfo::from_json(&v)?, session))
    }

    /// Seals the ServerInfo JSON to `client`: returns `nonce | box`.
    pub fn seal_server_info(&self, client: &PublicKey, json: &[u8]) -> Vec<u8> {
        seal(&self.secret, client, json)
    }
}

/// The ClientInfo JSON of a mesh link, in the Go client's field order and
/// spelling (`{"meshKey":"<hex>","version":2,"CanAckPings":false}`), which
/// derper and this relay both read.
pub fn mesh_client_info_json(mesh_key: &[u8; 32]) -> Vec<u8> {
    format!(
        "{{\"meshKey\":\"{}\",\"version\":{PROTOCOL_VERSION},\"CanAckPings\":false}}",
        hex::encode(mesh_key)
    )
    .into_bytes()
}

/// The ServerInfo JSON this relay sends.
pub fn server_info_json(token_bucket: Option<(u64, u64)>) -> Vec<u8> {
    let mut v = serde_json::json!({ "version": PROTOCOL_VERSION });
    if let Some((rate, burst)) = token_bucket {
        v["tokenBucketBytesPerSecond"] = rate.into();
        v["tokenBucketBytesBurst"] = burst.into();
    }
    v.to_string().into_bytes()
}

/// The box one side of a handshake shares with the other: one X25519 per
/// handshake, used to seal and open both info frames. It is NaCl's
/// `crypto_box` precomputed: HSalsa20 of the X25519 secret keys
/// XSalsa20-Poly1305.
pub struct Session(SessionBox);

enum SessionBox {
    Lc(XSalsa20Poly1305),
    /// crypto_box's own path, for a key aws-lc would not take.
    Portable(SalsaBox),
}

impl Session {
    /// Seals `json` to the peer: returns `nonce | box`.
    pub fn seal(&self, json: &[u8]) -> Vec<u8> {
        let nonce = SalsaBox::generate_nonce(&mut OsRng);
        let mut out = Vec::with_capacity(NONCE_LEN + json.len() + 16);
        out.extend_from_slice(&nonce);
        // Encryption of an in-memory buffer with a fresh nonce cannot fail.
        let sealed = match &self.0 {
            SessionBox::Lc(b) => b.encrypt(&nonce, json),
            SessionBox::Portable(b) => b.encrypt(&nonce, json),
        };
        out.extend_from_slice(&sealed.unwrap_or_default());
        out
    }

    fn open(&self, nonce: &[u8], sealed: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        let nonce = GenericArray::from_slice(nonce);
        match &self.0 {
            SessionBox::Lc(b) => b.decrypt(nonce, sealed),
            SessionBox::Portable(b) => b.decrypt(nonce, sealed),
        }
        .map_err(|_| HandshakeError::BadBox)
    }
}

/// A private key prepared for aws-lc's X25519, or `None` if aws-lc refused
/// it (it takes any 32 bytes; then the portable path is used).
#[derive(Clone)]
struct Agree(Option<std::sync::Arc<agreement::PrivateKey>>);

impl Agree {
    fn new(b: &[u8; 32]) -> Self {
        Agree(
            agreement::PrivateKey::from_private_key(&X25519, b)
                .ok()
                .map(std::sync::Arc::new),
        )
    }

    fn public(&self) -> Option<PublicKey> {
        let p = self.0.as_ref()?.compute_public_key().ok()?;
        Some(PublicKey(p.as_ref().try_into().ok()?))
    }

    fn session(&self, secret: &SecretKey, peer: &PublicKey) -> Option<Session> {
        let Some(k) = &self.0 else {
            let sbox = SalsaBox::new(&crypto_box::PublicKey::from(peer.0), secret);
            return Some(Session(SessionBox::Portable(sbox)));
        };
        agreement::agree(k, UnparsedPublicKey::new(&X25519, &peer.0), (), |shared| {
            let key = <XSalsa20Poly1305 as Kdf>::kdf(
                GenericArray::from_slice(shared),
                &GenericArray::default(),
            );
            Ok(Session(SessionBox::Lc(XSalsa20Poly1305::new(&key))))
        })
        .ok()
    }
}

fn seal(secret: &SecretKey, to: &PublicKey, plaintext: &[u8]) -> Vec<u8> {
    let sbox = SalsaBox::new(&crypto_box::PublicKey::from(to.0), secret);
    let nonce = SalsaBox::generate_nonce(&mut OsRng);
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
    out.extend_from_slice(&nonce);
    // Encryption of an in-memory buffer with a fresh nonce cannot fail.
    out.extend_from_slice(&sbox.encrypt(&nonce, plaintext).unwrap_or_default());
    out
}

/// Client side of the handshake, for our own load generator and probe.
pub struct ClientSecret {
    secret: SecretKey,
    public: PublicKey,
    agree: Agree,
}

impl std::fmt::Debug for ClientSecret {
    // Never print the private half.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientSecret{{public: {}}}", self.public)
    }
}

impl ClientSecret {
    pub fn generate() -> Self {
        Self::from_bytes(SecretKey::generate(&mut OsRng).to_bytes())
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        let secret = SecretKey::from_bytes(b);
        let agree = Agree::new(&b);
        // aws-lc derived the public key while loading the private one; a
        // second base-point multiplication through crypto_box cost about a
        // quarter of a client's handshake CPU.
        let public = agree
            .public()
            .unwrap_or_else(|| PublicKey(*secret.public_key().as_bytes()));
        ClientSecret {
            agree,
            secret,
            public,
        }
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The box shared with `server`, for [`Self::seal_client_info_with`] and
    /// [`Self::open_server_info_with`]: one X25519 for the whole handshake.
    pub fn session(&self, server: &PublicKey) -> Session {
        // A server key aws-lc refuses (low order) gets crypto_box's path,
        // whose box the server then fails to open: the handshake fails there.
        self.agree.session(&self.secret, server).unwrap_or_else(|| {
            Session(SessionBox::Portable(SalsaBox::new(
                &crypto_box::PublicKey::from(server.0),
                &self.secret,
            )))
        })
    }

    /// Builds a ClientInfo payload (`key | nonce | box`) for `server`.
    pub fn seal_client_info(&self, server: &PublicKey, json: &[u8]) -> Vec<u8> {
        self.seal_client_info_with(&self.session(server), json)
    }

    pub fn seal_client_info_with(&self, session: &Session, json: &[u8]) -> Vec<u8> {
        let mut out = self.public.0.to_vec();
        out.extend_from_slice(&session.seal(json));
        out
    }

    /// Opens ServerInfo and checks the protocol version.
    pub fn open_server_info(
        &self,
        server: &PublicKey,
        payload: &[u8],
    ) -> Result<Value, HandshakeError> {
        self.open_server_info_with(&self.session(server), payload)
    }

    pub fn open_server_info_with(
        &self,
        session: &Session,
        payload: &[u8],
    ) -> Result<Value, HandshakeError> {
        if payload.len() < NONCE_LEN || payload.len() > NONCE_LEN + MAX_INFO_LEN {
            return Err(HandshakeError::TooShort(payload.len()));
        }
        let json = session.open(&payload[..NONCE_LEN], &payload[NONCE_LEN..])?;
        let v: Value = serde_json::from_slice(&json).map_err(|_| HandshakeError::BadJson)?;
        let version = v.get("version").and_then(Value::as_i64).unwrap_or(0);
        if version != i64::from(PROTOCOL_VERSION) {
            return Err(HandshakeError::Version(version));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_info_round_trip_go_spelling() {
        let server = ServerSecret::generate();
        let client = ClientSecret::generate();
        let json = br#"{"version":2,"CanAckPings":true,"meshKey":"","AppName":"x","Extra":[1]}"#;
        let payload = client.seal_client_info(&server.public(), json);
        let (key, info, _) = server.open_client_info(&payload).unwrap();
        assert_eq!(key, client.public());
        assert_eq!(info.version, 2);
        assert!(info.can_ack_pings);
        assert_eq!(info.mesh_key, None);
        assert_eq!(info.app_name.as_deref(), Some("x"));
    }

    #[test]
    fn client_info_ts_derp_spelling() {
        let server = ServerSecret::generate();
        let client = ClientSecret::generate();
        let json = br#"{"can_ack_pings":false,"is_prober":true,"mesh_key":"none","version":2}"#;
        let (_, info, _) = server
            .open_client_info(&client.seal_client_info(&server.public(), json))
            .unwrap();
        assert!(info.is_prober);
        assert_eq!(info.mesh_key.as_deref(), Some("none"));
        assert!(!info.is_mesh_peer(Some(&[0; 32])));
    }

    #[test]
    fn mesh_key_matches_only_exactly() {
        let want = [0xab; 32];
        let mut info = ClientInfo {
            mesh_key: Some(hex::encode(want)),
            ..Default::default()
        };
        assert!(info.is_mesh_peer(Some(&want)));
        assert!(!info.is_mesh_peer(None));
        info.mesh_key = Some(hex::encode([0xac; 32]));
        assert!(!info.is_mesh_peer(Some(&want)));
    }

    #[test]
    fn forged_client_info_is_refused() {
        let server = ServerSecret::generate();
        let honest = ClientSecret::generate();
        let forger = ClientSecret::generate();
        let mut payload = forger.seal_client_info(&server.public(), b"{}");
        // Claim the honest client's key while the box was sealed by the forger.
        payload[..32].copy_from_slice(&honest.public().0);
        assert_eq!(
            server.open_client_info(&payload).err(),
            Some(HandshakeError::BadBox)
        );
    }

    #[test]
    fn malformed_client_info_is_refused() {
        let server = ServerSecret::generate();
        let client = ClientSecret::generate();
        assert_eq!(
            server.open_client_info(&[0; 10]).err(),
            Some(HandshakeError::TooShort(10))
        );
        let mut p = client.seal_client_info(&server.public(), b"{}");
        let last = p.len() - 1;
        p[last] ^= 1;
        assert_eq!(
            server.open_client_info(&p).err(),
            Some(HandshakeError::BadBox)
        );
        let p = client.seal_client_info(&server.public(), b"not json");
        assert_eq!(
            server.open_client_info(&p).err(),
            Some(HandshakeError::BadJson)
        );
        let p = client.seal_client_info(&server.public(), b"[1]");
        assert_eq!(
            server.open_client_info(&p).err(),
            Some(HandshakeError::BadJson)
        );
    }

    #[test]
    fn server_info_round_trip_and_version_check() {
        let server = ServerSecret::generate();
        let client = ClientSecret::generate();
        let sealed = server.seal_server_info(&client.public(), &server_info_json(Some((10, 20))));
        let v = client.open_server_info(&server.public(), &sealed).unwrap();
        assert_eq!(v["tokenBucketBytesPerSecond"], 10);
        let sealed = server.seal_server_info(&client.public(), br#"{"version":1}"#);
        assert_eq!(
            client.open_server_info(&server.public(), &sealed),
            Err(HandshakeError::Version(1))
        );
    }

    #[test]
    fn one_shared_key_per_side_carries_both_info_frames() {
        let server = ServerSecret::generate();
        let client = ClientSecret::generate();
        let c = client.session(&server.public());
        let (_, _, s) = server
            .open_client_info(&client.seal_client_info_with(&c, br#"{"version":2}"#))
            .unwrap();
        let v = client
            .open_server_info_with(&c, &s.seal(&server_info_json(None)))
            .unwrap();
        assert_eq!(v["version"], 2);
        // And it is the same box the long way round computes.
        let v = client
            .open_server_info(&server.public(), &s.seal(&server_info_json(None)))
            .unwrap();
        assert_eq!(v["version"], 2);
    }

    #[test]
    fn aws_lc_sessions_interoperate_with_crypto_box() {
        for _ in 0..20 {
            let server = ServerSecret::generate();
            let client = ClientSecret::generate();
            // Sealed by crypto_box (the long way), opened by the aws-lc session.
            let sealed = seal(&client.secret, &server.public(), br#"{"version":2}"#);
            let mut payload = client.public().0.to_vec();
            payload.extend_from_slice(&sealed);
            let (_, _, s) = server.open_client_info(&payload).unwrap();
            assert!(matches!(s.0, SessionBox::Lc(_)));
            // Sealed by the aws-lc session, opened by crypto_box.
            let back = s.seal(b"hello");
            let sbox = SalsaBox::new(
                &crypto_box::PublicKey::from(server.public().0),
                &client.secret,
            );
            let opened = sbox
                .decrypt(
                    crypto_box::Nonce::from_slice(&back[..NONCE_LEN]),
                    &back[NONCE_LEN..],
                )
                .unwrap();
            assert_eq!(opened, b"hello");
        }
    }

    #[test]
    fn a_low_order_client_key_is_refused() {
        let server = ServerSecret::generate();
        // The all-zero point: every private key shares the zero secret with it.
        let mut payload = vec![0u8; KEY_LEN];
        payload.extend_from_slice(&[0u8; NONCE_LEN + 16]);
        assert_eq!(
            server.open_client_info(&payload).err(),
            Some(HandshakeError::BadBox)
        );
    }

    #[test]
    #[ignore = "timing, run with --release -- --ignored --nocapture"]
    fn x25519_speed() {
        let server = ServerSecret::generate();
        let peers: Vec<_> = (0..2000)
            .map(|_| ClientSecret::generate().public())
            .collect();
        let t = std::time::Instant::now();
        for p in &peers {
            std::hint::black_box(server.agree.session(&server.secret, p));
        }
        let lc = t.elapsed();
        let t = std::time::Instant::now();
        for p in &peers {
            std::hint::black_box(SalsaBox::new(
                &crypto_box::PublicKey::from(p.0),
                &server.secret,
            ));
        }
        let dalek = t.elapsed();
        println!(
            "per shared key: aws-lc {:.1} µs, crypto_box {:.1} µs",
            lc.as_secs_f64() * 1e6 / 2000.0,
            dalek.as_secs_f64() * 1e6 / 2000.0
        );
    }

    #[test]
    fn client_public_key_from_aws_lc_matches_crypto_box() {
        for _ in 0..64 {
            let b = SecretKey::generate(&mut OsRng).to_bytes();
            let want = *SecretKey::from_bytes(b).public_key().as_bytes();
            assert_eq!(ClientSecret::from_bytes(b).public().0, want);
        }
    }

    #[test]
    fn key_file_round_trip_and_errors() {
        let s = ServerSecret::generate();
        let back = ServerSecret::from_key_file(&s.to_key_file()).unwrap();
        assert_eq!(back.public(), s.public());
        assert!(ServerSecret::from_key_file("").is_err());
        assert!(ServerSecret::from_key_file(r#"{"PrivateKey":"nope"}"#).is_err());
        assert!(ServerSecret::from_key_file(r#"{"PrivateKey":"privkey:abcd"}"#).is_err());
    }
}

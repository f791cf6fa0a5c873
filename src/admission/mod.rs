//! Who may connect, as formats and rules: the allowed-keys file, the TOFU
//! bindings, the server's own key, and the order in which they are applied.
//! No actors and no sockets here; the actors decide when to read and write.

pub mod allowed_keys;
pub mod bindings;
pub mod server_key;

use std::sync::Arc;

use crate::protocol::PublicKey;
use crate::reasons::RefuseReason;
use allowed_keys::AllowedKeys;

/// Admission of a key whose ClientInfo box opened: listed keys pass (with
/// their label); with an allowed-keys file nobody else does; then, with
/// `--tofu-lock`, only keys that already have a binding.
pub fn admit(
    key: &PublicKey,
    acl: Option<&AllowedKeys>,
    tofu_lock: bool,
    bound: impl FnOnce(&PublicKey) -> bool,
) -> Result<Option<Arc<str>>, RefuseReason> {
    let in_acl = acl.is_some_and(|a| a.contains(key));
    if acl.is_some() && !in_acl {
        return Err(RefuseReason::Acl);
    }
    if tofu_lock && !in_acl && !bound(key) {
        return Err(RefuseReason::TofuLock);
    }
    Ok(acl.and_then(|a| a.label(key)).map(Arc::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_acl_then_tofu_lock() {
        let k = PublicKey([1; 32]);
        let other = PublicKey([2; 32]);
        let acl = AllowedKeys::parse(&format!("# web\n{}\n", k.to_base64())).unwrap();
        assert_eq!(
            admit(&k, Some(&acl), true, |_| false).unwrap().as_deref(),
            Some("web")
        );
        assert_eq!(
            admit(&other, Some(&acl), false, |_| true),
            Err(RefuseReason::Acl)
        );
        assert_eq!(
            admit(&other, None, true, |_| false),
            Err(RefuseReason::TofuLock)
        );
        assert_eq!(admit(&other, None, true, |_| true), Ok(None));
        assert_eq!(admit(&other, None, false, |_| false), Ok(None));
    }
}

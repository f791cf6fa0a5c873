//! Who may connect, as formats and rules: the allowed-keys file, the TOFU
//! bindings, the server's own key, and the order in which they are applied.
//! No actors and no sockets here; the actors decide when to read and write.

pub mod allowed_keys;
pub mod bindings;
pub mod server_key;
pub mod verify;

use std::sync::Arc;

use crate::protocol::PublicKey;
use crate::reasons::RefuseReason;
use allowed_keys::AllowedKeys;
pub use verify::UrlVerdict;

/// Whether `admit` needs the verify URL's answer for `key`: a URL is set
/// and the key is not in the allowed-keys file (listed keys never wait on it).
pub fn should_ask_url(key: &PublicKey, acl: Option<&AllowedKeys>, url_configured: bool) -> bool {
    url_configured && !acl.is_some_and(|a| a.contains(key))
}

/// Admission of a key whose ClientInfo box opened. The order:
/// 1. keys in the allowed-keys file pass (with their label), unasked;
/// 2. with a verify URL, its answer decides (`url`, asked beforehand by the
///    connection because of [`should_ask_url`]): deny refuses, no answer
///    refuses unless fail-open; without a URL, an allowed-keys file refuses
///    everyone it does not list;
/// 3. then, with `--tofu-lock`, only keys that already have a binding.
///
/// Mesh peers (a matching mesh key) are trusted before any of this; the
/// caller skips `admit` for them.
pub fn admit(
    key: &PublicKey,
    acl: Option<&AllowedKeys>,
    url_configured: bool,
    url: UrlVerdict,
    tofu_lock: bool,
    bound: impl FnOnce(&PublicKey) -> bool,
) -> Result<Option<Arc<str>>, RefuseReason> {
    if let Some(a) = acl
        && a.contains(key)
    {
        return Ok(a.label(key).map(Arc::from));
    }
    if url_configured {
        match url {
            UrlVerdict::Allow | UrlVerdict::Unavailable { fail_open: true } => {}
            UrlVerdict::Deny => return Err(RefuseReason::VerifyDenied),
            UrlVerdict::Unavailable { fail_open: false } => {
                return Err(RefuseReason::VerifyUnavailable);
            }
            // The URL was turned on, or the key left the allowed-keys file,
            // between the question and now: refuse; the client retries and
            // is asked then.
            UrlVerdict::NotAsked => {
                return Err(if acl.is_some() {
                    RefuseReason::Acl
                } else {
                    RefuseReason::VerifyUnavailable
                });
            }
        }
    } else if acl.is_some() {
        return Err(RefuseReason::Acl);
    }
    if tofu_lock && !bound(key) {
        return Err(RefuseReason::TofuLock);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_acl_then_tofu_lock() {
        let k = PublicKey([1; 32]);
        let other = PublicKey([2; 32]);
        let acl = AllowedKeys::parse(&format!("# web\n{}\n", k.to_base64())).unwrap();
        let n = UrlVerdict::NotAsked;
        assert_eq!(
            admit(&k, Some(&acl), false, n, true, |_| false)
                .unwrap()
                .as_deref(),
            Some("web")
        );
        assert_eq!(
            admit(&other, Some(&acl), false, n, false, |_| true),
            Err(RefuseReason::Acl)
        );
        assert_eq!(
            admit(&other, None, false, n, true, |_| false),
            Err(RefuseReason::TofuLock)
        );
        assert_eq!(admit(&other, None, false, n, true, |_| true), Ok(None));
        assert_eq!(admit(&other, None, false, n, false, |_| false), Ok(None));
    }

    #[test]
    fn order_with_a_verify_url() {
        let k = PublicKey([1; 32]);
        let other = PublicKey([2; 32]);
        let acl = AllowedKeys::parse(&format!("{}\n", k.to_base64())).unwrap();
        // Listed keys are never asked and pass even when the URL would deny.
        assert!(!should_ask_url(&k, Some(&acl), true));
        assert!(should_ask_url(&other, Some(&acl), true));
        assert!(!should_ask_url(&other, None, false));
        let deny = UrlVerdict::Deny;
        assert!(admit(&k, Some(&acl), true, deny, true, |_| false).is_ok());
        // Unlisted keys: the URL decides, not the file.
        assert_eq!(
            admit(&other, Some(&acl), true, UrlVerdict::Allow, false, |_| {
                false
            }),
            Ok(None)
        );
        assert_eq!(
            admit(&other, None, true, deny, false, |_| true),
            Err(RefuseReason::VerifyDenied)
        );
        let down = |fail_open| UrlVerdict::Unavailable { fail_open };
        assert_eq!(
            admit(&other, None, true, down(false), false, |_| true),
            Err(RefuseReason::VerifyUnavailable)
        );
        assert_eq!(
            admit(&other, None, true, down(true), false, |_| true),
            Ok(None)
        );
        // Then TOFU: allowed by the URL but unbound under --tofu-lock.
        assert_eq!(
            admit(&other, None, true, UrlVerdict::Allow, true, |_| false),
            Err(RefuseReason::TofuLock)
        );
        assert_eq!(
            admit(&other, None, true, UrlVerdict::NotAsked, false, |_| true),
            Err(RefuseReason::VerifyUnavailable)
        );
    }
}

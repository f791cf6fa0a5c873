//! The allowed-keys file format: parsing, labels, and what a new version
//! removed. The ACL actor decides when to read it.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use crate::protocol::PublicKey;

/// The parsed allowed-keys file: key → optional label.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AllowedKeys {
    keys: HashMap<PublicKey, Option<String>>,
}

impl AllowedKeys {
    /// Parses the file format: one key per line (base64 or `nodekey:<hex>`),
    /// `#` comments, blank lines ignored, whitespace trimmed; a comment line
    /// directly above a key labels it. Errors are `line: problem`.
    ///
    /// A file with nothing in it is an error, not "admit no one": a
    /// truncated deploy (a failed copy, a ConfigMap rendered empty) must not
    /// disconnect every client. To admit no one on purpose, leave a comment.
    pub fn parse(text: &str) -> Result<AllowedKeys, String> {
        if text.trim().is_empty() {
            return Err(
                "1: the file is empty; refusing to revoke every key (to admit no one on purpose, \
                 write a comment line such as \"# no keys\")"
                    .into(),
            );
        }
        let mut keys = HashMap::new();
        let mut label: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                label = None;
                continue;
            }
            if let Some(c) = line.strip_prefix('#') {
                let c = c.trim();
                label = (!c.is_empty()).then(|| c.to_string());
                continue;
            }
            let key = PublicKey::parse(line).map_err(|e| {
                let shown: String = line.chars().take(60).collect();
                format!("{}: {shown:?} is not a public key: {e}", i + 1)
            })?;
            keys.insert(key, label.take());
        }
        Ok(AllowedKeys { keys })
    }

    pub fn load(path: &Path) -> Result<AllowedKeys, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}:{e}", path.display()))
    }

    pub fn contains(&self, k: &PublicKey) -> bool {
        self.keys.contains_key(k)
    }

    pub fn label(&self, k: &PublicKey) -> Option<&str> {
        self.keys.get(k).and_then(|l| l.as_deref())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys of this set that `newer` no longer lists.
    pub fn removed_in(&self, newer: &AllowedKeys) -> Vec<PublicKey> {
        self.keys
            .keys()
            .filter(|k| !newer.contains(k))
            .copied()
            .collect()
    }
}

/// What `/healthz` reports about the ACL.
#[derive(Debug, Clone, Default)]
pub struct AclStatus {
    pub last_reload: Option<SystemTime>,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_comments_labels_and_both_forms() {
        let a = PublicKey([1; 32]);
        let b = PublicKey([2; 32]);
        let c = PublicKey([3; 32]);
        let text = format!(
            "# header comment\n\n# Agent: web-01\n  {}  \n{}\n\n# orphan label\n\n#\n{}\n",
            a.to_base64(),
            b.to_nodekey_hex(),
            c.to_base64()
        );
        let acl = AllowedKeys::parse(&text).unwrap();
        assert_eq!(acl.len(), 3);
        assert_eq!(acl.label(&a), Some("Agent: web-01"));
        assert_eq!(acl.label(&b), None);
        assert_eq!(acl.label(&c), None);
    }

    #[test]
    fn errors_name_the_line() {
        let text = format!("{}\n# ok\nnot-a-key\n", PublicKey([1; 32]).to_base64());
        let e = AllowedKeys::parse(&text).unwrap_err();
        assert!(e.starts_with("3: \"not-a-key\""), "{e}");
        let e = AllowedKeys::load(Path::new("/nonexistent/keys.txt")).unwrap_err();
        assert!(e.starts_with("/nonexistent/keys.txt: "), "{e}");
    }

    #[test]
    fn an_empty_file_is_refused_but_comments_only_admit_no_one() {
        assert!(AllowedKeys::parse("").unwrap_err().contains("empty"));
        assert!(AllowedKeys::parse(" \n\n").unwrap_err().contains("empty"));
        assert!(AllowedKeys::parse("# no keys\n").unwrap().is_empty());
    }

    #[test]
    fn removed_keys_are_found() {
        let old = AllowedKeys::parse(&format!(
            "{}\n{}\n",
            PublicKey([1; 32]).to_base64(),
            PublicKey([2; 32]).to_base64()
        ))
        .unwrap();
        let new = AllowedKeys::parse(&PublicKey([2; 32]).to_base64()).unwrap();
        assert_eq!(old.removed_in(&new), vec![PublicKey([1; 32])]);
    }
}

//! The relay's own key file (derper's `derp.key` format), created on first start.

use std::path::Path;

use crate::protocol::ServerSecret;

/// Loads the server key from `path`, or creates it (mode 0600) if absent.
/// A key file that exists but does not parse is an error, never replaced.
pub fn load_or_create_key(path: &Path) -> Result<ServerSecret, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            ServerSecret::from_key_file(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            let key = ServerSecret::generate();
            write_private(path, key.to_key_file().as_bytes())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "created new server key");
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

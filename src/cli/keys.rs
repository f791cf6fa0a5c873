//! `derp-relay keys`: client private key files (for `probe` against a relay
//! with an ACL) and exporting what TOFU learned as an allowed-keys file.
//!
//! The private key file is one line, `privkey:<64 lowercase hex>`, the prefix
//! Tailscale uses when it prints private keys, so the file says what it is.
//! It is created with mode 0600 and never overwritten: replacing a key an ACL
//! lists would lock its user out, so that takes a deliberate `rm`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use derp_relay::admission::bindings::Bindings;
use derp_relay::protocol::handshake::ClientSecret;

const PRIVATE_PREFIX: &str = "privkey:";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write a new client private key (mode 0600) and print its public key.
    Generate {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Print the public key of a private key file.
    Public {
        /// A key file written by `keys generate`.
        #[arg(long, value_name = "PATH")]
        key_file: PathBuf,
    },
    /// Print the TOFU bindings as an allowed-keys file (labels become comments).
    Export(ExportArgs),
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Bindings file; wins over --data-dir, as it does for the relay.
    #[arg(long, value_name = "PATH", env = "DERP_RELAY_BINDINGS_FILE")]
    bindings_file: Option<PathBuf>,
    /// The relay's data directory (the bindings file is <DIR>/tofu-bindings.json).
    #[arg(
        long,
        value_name = "DIR",
        env = "DERP_RELAY_DATA_DIR",
        default_value = "data"
    )]
    data_dir: PathBuf,
}

pub fn run(cmd: Command) -> (&'static str, Result<(), String>) {
    match cmd {
        Command::Generate { out } => ("keys generate", generate(&out)),
        Command::Public { key_file } => ("keys public", public(&key_file)),
        Command::Export(a) => ("keys export", export(&a)),
    }
}

/// The file's text for `secret`.
pub fn encode_private(secret: &ClientSecret) -> String {
    format!("{PRIVATE_PREFIX}{}\n", hex::encode(secret.to_bytes()))
}

/// Parses a key file's text (surrounding whitespace ignored).
pub fn decode_private(text: &str) -> Result<ClientSecret, String> {
    let t = text.trim();
    let hex_part = t.strip_prefix(PRIVATE_PREFIX).ok_or_else(|| {
        if t.starts_with('{') {
            "this looks like a relay's server key (JSON); a client key file is one line \
             \"privkey:<64 hex digits>\" as written by `derp-relay keys generate`"
                .to_owned()
        } else {
            "not a private key: want one line \"privkey:<64 hex digits>\" \
             (see `derp-relay keys generate`)"
                .to_owned()
        }
    })?;
    let mut b = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut b)
        .map_err(|e| format!("the key after \"privkey:\" is not 64 hex digits: {e}"))?;
    Ok(ClientSecret::from_bytes(b))
}

/// Reads and parses a key file, naming the file in any error.
pub fn read_private(path: &Path) -> Result<ClientSecret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode_private(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn print_public(secret: &ClientSecret) {
    let k = secret.public();
    // Either line works in an allowed-keys file.
    println!("{}", k.to_base64());
    println!("{}", k.to_nodekey_hex());
}

fn generate(out: &Path) -> Result<(), String> {
    let secret = ClientSecret::generate();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(out).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => format!(
            "{} already exists; refusing to overwrite a private key (remove it first to replace it)",
            out.display()
        ),
        _ => format!("{}: {e}", out.display()),
    })?;
    let written = f
        .write_all(encode_private(&secret).as_bytes())
        .and_then(|()| f.sync_all());
    if let Err(e) = written {
        // Never leave a truncated key behind for a later run to trip over.
        drop(f);
        let _ = std::fs::remove_file(out);
        return Err(format!("{}: {e}", out.display()));
    }
    print_public(&secret);
    eprintln!(
        "wrote private key to {} (mode 0600); either public key line above can go in an allowed-keys file",
        out.display()
    );
    Ok(())
}

fn public(key_file: &Path) -> Result<(), String> {
    print_public(&read_private(key_file)?);
    Ok(())
}

fn export(a: &ExportArgs) -> Result<(), String> {
    let path = a
        .bindings_file
        .clone()
        .unwrap_or_else(|| a.data_dir.join("tofu-bindings.json"));
    // `Bindings::load` reads a missing file as empty, which suits the relay's
    // first start; here it almost always means a wrong path.
    if !path.exists() {
        return Err(format!(
            "{}: no bindings file there (pass --data-dir or --bindings-file)",
            path.display()
        ));
    }
    let bindings = Bindings::load(&path)?;
    print!("{}", bindings.to_allowed_keys());
    eprintln!("exported {} key(s) from {}", bindings.len(), path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_refuse_garbage() {
        let s = ClientSecret::generate();
        let back = decode_private(&format!("  {}  ", encode_private(&s))).unwrap();
        assert_eq!(back.public(), s.public());
        assert!(decode_private("privkey:abcd").is_err());
        assert!(decode_private("nodekey:00").is_err());
        let e = decode_private(r#"{"PrivateKey":"privkey:00"}"#).unwrap_err();
        assert!(e.contains("server key"), "{e}");
    }
}

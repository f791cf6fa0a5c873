//! Built-in TLS for the main listener: the certificate in force, and a watcher
//! that replaces it when the files change.
//!
//! Every handshake asks [`CertSlot`] for the pair in force, so a reload is one
//! pointer swap: the next handshake gets the new certificate, connections
//! already open keep the session they negotiated. The watcher follows the
//! allowed-keys file's rules (DESIGN §1): it watches the files' directories
//! (renames and the Kubernetes `..data` symlink swap never touch the file
//! itself), waits for the directory to be quiet, reads twice to skip a
//! half-done in-place write, and swaps only a pair that loads whole and whose
//! key matches the certificate. A bad pair keeps the old one serving, is
//! logged once naming the file, and is counted.
//!
//! The watcher is a task, not an actor under the root supervisor: it sends no
//! one a message, and its whole state is the files on disk, which it re-reads;
//! the supervisor's restart budget would protect nothing here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::config::Config;
use crate::metrics::TlsCounters;

/// Quiet time before the files are re-read (as for the allowed-keys file:
/// an in-place write truncates, then writes).
const DEBOUNCE: Duration = Duration::from_millis(250);
/// Gap between the two reads that must agree.
const SETTLE: Duration = Duration::from_millis(30);
/// A self-signed certificate is made for this long, and remade at start when
/// less than [`SELF_SIGNED_RENEW`] is left.
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
const SELF_SIGNED_RENEW: Duration = Duration::from_secs(30 * 86_400);

/// The certificate and key in force; handshakes read it, the watcher swaps it.
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    fn get(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, k: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = k;
    }
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertSlot")
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Where the pair comes from.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A pair that loaded: what to serve, and when it stops being valid.
struct Loaded {
    key: Arc<CertifiedKey>,
    not_after: i64,
}

/// TLS on the main listener: the rustls settings (whose resolver is the slot)
/// and, for operator-supplied files, what the watcher needs.
pub struct TlsFront {
    pub server_config: Arc<ServerConfig>,
    slot: Arc<CertSlot>,
    /// `None` for a self-signed certificate, which nobody rotates.
    watched: Option<CertFiles>,
    contents: (Vec<u8>, Vec<u8>),
}

fn provider() -> Arc<CryptoProvider> {
    // Explicit, not the process default: more than one provider may be compiled in.
    Arc::new(aws_lc_rs::default_provider())
}

impl TlsFront {
    /// Loads the configured pair (or makes the self-signed one); `None`
    /// without TLS. Errors name the setting and the file.
    pub fn from_config(cfg: &Config, m: &TlsCounters) -> Result<Option<TlsFront>, String> {
        let (files, watched) = match (&cfg.tls_cert_file, &cfg.tls_key_file, &cfg.tls_self_signed) {
            (Some(cert), Some(key), _) => {
                let f = CertFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                (f.clone(), Some(f))
            }
            (_, _, Some(host)) => (self_signed(&cfg.data_dir, host.trim())?, None),
            _ => return Ok(None),
        };
        let contents = read_both(&files).map_err(|e| e.to_string())?;
        let loaded = load_pair(&files, &contents.0, &contents.1)?;
        warn_if_expired(&files, loaded.not_after);
        m.cert_expiry.set(loaded.not_after);
        let slot = Arc::new(CertSlot(RwLock::new(loaded.key)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        // HTTP/2 cannot carry the DERP upgrade; clients that offer no ALPN
        // (ts_derp, Tailscale's Go client) get HTTP/1.1 all the same.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(TlsFront {
            server_config: Arc::new(config),
            slot,
            watched,
            contents,
        }))
    }

    /// Starts watching the files (nothing to watch for a self-signed
    /// certificate). The watch is in place when this returns, so a change
    /// made right after start is seen.
    pub fn watch(
        self,
        m: TlsCounters,
        stop: watch::Receiver<bool>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
        let Some(files) = self.watched else {
            return Ok(None);
        };
        let (tx, rx) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.is_ok() {
                // A full channel already holds a wake-up: events coalesce.
                let _ = tx.try_send(());
            }
        })
        .map_err(|e| format!("tls_cert_file: cannot watch for changes: {e}"))?;
        let mut dirs: Vec<PathBuf> = [&files.cert, &files.key]
            .iter()
            .map(|p| parent_dir(p))
            .collect();
        dirs.dedup();
        for d in &dirs {
            watcher
                .watch(d, RecursiveMode::NonRecursive)
                .map_err(|e| format!("tls_cert_file: cannot watch {}: {e}", d.display()))?;
        }
        Ok(Some(tokio::spawn(reload_loop(
            watcher,
            rx,
            files,
            self.slot,
            self.contents,
            m,
            stop,
        ))))
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

async fn reload_loop(
    _watcher: notify::RecommendedWatcher,
    mut events: mpsc::Receiver<()>,
    files: CertFiles,
    slot: Arc<CertSlot>,
    mut last: (Vec<u8>, Vec<u8>),
    m: TlsCounters,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            ev = events.recv() => if ev.is_none() { return },
        }
        let now = loop {
            match tokio::time::timeout(DEBOUNCE, events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_) => {}
            }
            let first = read_both_async(&files).await;
            tokio::time::sleep(SETTLE).await;
            let second = read_both_async(&files).await;
            if first.as_ref().ok() == second.as_ref().ok() {
                break second;
            }
        };
        let now = match now {
            Ok(c) => c,
            Err(e) => {
                m.reloads_failed.inc();
                tracing::error!(error = %e, "TLS certificate files unreadable; keeping the certificate in force");
                continue;
            }
        };
        if now == last {
            // Another file in the directory changed (a Secret volume also holds ca.crt).
            continue;
        }
        match load_pair(&files, &now.0, &now.1) {
            Ok(loaded) => {
                slot.set(loaded.key);
                m.cert_expiry.set(loaded.not_after);
                m.reloads_ok.inc();
                warn_if_expired(&files, loaded.not_after);
                tracing::info!(file = %files.cert.display(), not_after = loaded.not_after, "TLS certificate reloaded");
            }
            Err(e) => {
                m.reloads_failed.inc();
                tracing::error!(error = %e, "TLS certificate rejected; keeping the certificate in force");
            }
        }
        last = now;
    }
}

/// A read error naming the setting and the file.
#[derive(Debug)]
struct ReadError(String);

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq for ReadError {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

fn read_both(f: &CertFiles) -> Result<(Vec<u8>, Vec<u8>), ReadError> {
    let read = |what: &str, p: &Path| {
        std::fs::read(p).map_err(|e| ReadError(format!("{what} {}: {e}", p.display())))
    };
    Ok((
        read("tls_cert_file", &f.cert)?,
        read("tls_key_file", &f.key)?,
    ))
}

async fn read_both_async(f: &CertFiles) -> Result<(Vec<u8>, Vec<u8>), ReadError> {
    let f = f.clone();
    tokio::task::spawn_blocking(move || read_both(&f))
        .await
        .unwrap_or_else(|e| Err(ReadError(format!("reading TLS files: {e}"))))
}

/// Parses and checks a pair: a chain of at least one certificate, a key the
/// provider can sign with, and the key belonging to the first certificate.
fn load_pair(f: &CertFiles, cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, String> {
    let cert_err = |why: String| format!("tls_cert_file {}: {why}", f.cert.display());
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not PEM certificates: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_err("no PEM certificate in the file".into()));
    };
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| cert_err(format!("certificate does not parse: {e}")))?
        .1
        .validity()
        .not_after
        .timestamp();
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        format!(
            "tls_key_file {}: no usable PEM private key: {e}",
            f.key.display()
        )
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "tls_key_file {} does not belong to the certificate in {}",
            f.key.display(),
            f.cert.display()
        ),
        e => format!("tls_key_file {}: {e}", f.key.display()),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn warn_if_expired(f: &CertFiles, not_after: i64) {
    if not_after <= unix_now() {
        tracing::warn!(file = %f.cert.display(), not_after, "the TLS certificate has expired; clients will refuse it");
    }
}

/// The self-signed pair for `host` in `data_dir`, made when missing, broken
/// or close to expiry. The key file is written mode 0600.
fn self_signed(data_dir: &Path, host: &str) -> Result<CertFiles, String> {
    let stem: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let files = CertFiles {
        cert: data_dir.join(format!("tls-self-signed-{stem}.crt")),
        key: data_dir.join(format!("tls-self-signed-{stem}.key")),
    };
    if let Ok((c, k)) = read_both(&files)
        && let Ok(l) = load_pair(&files, &c, &k)
        && l.not_after > unix_now() + SELF_SIGNED_RENEW.as_secs() as i64
    {
        return Ok(files);
    }
    let err = |e: &dyn fmt::Display| format!("tls_self_signed {host:?}: {e}");
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).map_err(|e| err(&e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, host);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + SELF_SIGNED_VALIDITY;
    let key = rcgen::KeyPair::generate().map_err(|e| err(&e))?;
    let cert = params.self_signed(&key).map_err(|e| err(&e))?;
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("data_dir {}: {e}", data_dir.display()))?;
    write_private(&files.key, key.serialize_pem().as_bytes())
        .map_err(|e| format!("tls_self_signed: writing {}: {e}", files.key.display()))?;
    std::fs::write(&files.cert, cert.pem())
        .map_err(|e| format!("tls_self_signed: writing {}: {e}", files.cert.display()))?;
    tracing::warn!(host, cert = %files.cert.display(), "serving a new self-signed TLS certificate: for development only (clients need InsecureForTests)");
    Ok(files)
}

/// Writes a file readable by its owner only, replacing any old one whole.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("key.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> CertFiles {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let f = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&f.cert, c.cert.pem()).unwrap();
        std::fs::write(&f.key, c.signing_key.serialize_pem()).unwrap();
        f
    }

    #[test]
    fn pairs_that_do_not_fit_are_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let a = pair(d.path(), "a.test");
        let b = pair(d.path(), "b.test");
        let (c, k) = read_both(&a).unwrap();
        assert!(load_pair(&a, &c, &k).is_ok());
        let mixed = CertFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let (c, k) = read_both(&mixed).unwrap();
        let e = load_pair(&mixed, &c, &k).err().unwrap();
        assert!(
            e.contains("does not belong") && e.contains("b.test.key"),
            "{e}"
        );
        let e = load_pair(&a, b"junk", &k).err().unwrap();
        assert!(
            e.starts_with("tls_cert_file") && e.contains("a.test.crt"),
            "{e}"
        );
        let e = load_pair(&a, &c, b"junk").err().unwrap();
        assert!(e.starts_with("tls_key_file"), "{e}");
    }

    #[test]
    fn self_signed_is_made_once_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let f = self_signed(d.path(), "127.0.0.1").unwrap();
        let mode = std::fs::metadata(&f.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let first = std::fs::read(&f.cert).unwrap();
        let again = self_signed(d.path(), "127.0.0.1").unwrap();
        assert_eq!(
            std::fs::read(&again.cert).unwrap(),
            first,
            "reused, not remade"
        );
        let (c, k) = read_both(&f).unwrap();
        let l = load_pair(&f, &c, &k).unwrap();
        assert!(l.not_after > unix_now() + 300 * 86_400);
    }

    /// What TLS costs per relayed packet in CPU, with no sockets: a rustls
    /// client and this server's own rustls config in memory. A client's
    /// packet is one record (SendPacket, 1 317 bytes), the relay's writes
    /// carry a batch per record; each packet is sealed and opened twice on
    /// its way (sender, relay in, relay out, receiver).
    #[test]
    #[ignore = "timing, run with --release -- --ignored --nocapture"]
    fn tls_cost_per_packet() {
        use std::io::{Read, Write};
        let d = tempfile::tempdir().unwrap();
        let cfg = Config {
            data_dir: d.path().to_path_buf(),
            tls_self_signed: Some("127.0.0.1".into()),
            ..Config::default()
        };
        let front = TlsFront::from_config(&cfg, &crate::metrics::Metrics::new().tls)
            .unwrap()
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut c: rustls::Connection =
            rustls::ClientConnection::new(crate::client::insecure_tls_config().unwrap(), name)
                .unwrap()
                .into();
        let mut s: rustls::Connection = rustls::ServerConnection::new(front.server_config.clone())
            .unwrap()
            .into();
        // Moves what `from` has to send into `to`, in memory.
        let mut wire = Vec::new();
        let mut pump = |from: &mut rustls::Connection, to: &mut rustls::Connection| {
            wire.clear();
            while from.wants_write() {
                from.write_tls(&mut wire).unwrap();
            }
            let mut r = &wire[..];
            while !r.is_empty() {
                to.read_tls(&mut r).unwrap();
            }
            to.process_new_packets().unwrap();
        };
        while c.is_handshaking() || s.is_handshaking() {
            pump(&mut c, &mut s);
            pump(&mut s, &mut c);
        }
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        // Per packet per direction: `per_record` packets per record.
        let mut run = |per_record: usize| {
            let frame = vec![7u8; 1317];
            let batch: Vec<u8> = frame.repeat(per_record);
            let mut plain = vec![0u8; batch.len()];
            let rounds = 200_000 / per_record;
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                c.writer().write_all(&batch).unwrap();
                pump(&mut c, &mut s);
                s.reader().read_exact(&mut plain).unwrap();
            }
            assert_eq!(plain, batch, "the records carried the bytes unchanged");
            t.elapsed().as_secs_f64() * 1e6 / (rounds * per_record) as f64
        };
        run(1); // warm-up: buffers grown, code and keys in cache
        let single = run(1);
        let batched = run(12);
        println!(
            "{suite:?}: seal+open per 1317-byte packet: {single:.3} µs as its own record, \
             {batched:.3} µs in a 12-packet record; per relayed packet (sender and relay in \
             per packet, relay out and receiver batched): {:.3} µs",
            single + batched
        );
    }
}

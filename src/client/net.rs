//! Getting a byte stream to the relay: resolving and connecting TCP (with an
//! optional source address for the bench), then TLS with the Mozilla roots plus
//! any CA the operator names. It exists so every tool connects the same way
//! and reports resolve, connect, timeout and TLS failures each as its own
//! [`ClientError`] variant.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_util::either::Either;

use super::error::ClientError;
use super::url::authority;
use crate::stream::ReadAhead;

/// How to reach the relay.
#[derive(Clone)]
pub struct ConnectOptions {
    /// Source address to bind (the load generator spreads clients over many
    /// loopback addresses so per-IP limits see many hosts).
    pub bind: Option<IpAddr>,
    /// TLS settings for https/wss; `None` uses the Mozilla roots.
    pub tls: Option<Arc<ClientConfig>>,
    /// Limit for each TCP connect attempt.
    pub connect_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            bind: None,
            tls: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// TLS client settings trusting the Mozilla root set plus `extra_roots`
/// (a private CA, or a test certificate). ALPN offers only HTTP/1.1: an
/// upgrade cannot happen over HTTP/2, and a terminator that negotiated h2
/// would never pass `Upgrade: DERP` through.
pub fn tls_config(extra_roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("CA certificate not usable: {e}"))?;
    }
    // An explicit provider: test builds also carry other rustls users, and the
    // process-wide default is ambiguous when more than one provider is compiled in.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// TLS client settings that accept any certificate: `--insecure`, for a relay
/// serving `--tls-self-signed` (what Tailscale's `InsecureForTests` does).
/// The handshake's signatures are still checked, so the session is encrypted
/// to whoever holds the key the certificate names; only who that is goes
/// unverified.
pub fn insecure_tls_config() -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Reads every certificate in a PEM file (for `--ca-file`).
pub fn load_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificates found", path.display()));
    }
    Ok(certs)
}

/// Resolves `host` and connects to the first address that answers. With
/// `bind`, only addresses of the same family are tried.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    opts: &ConnectOptions,
) -> Result<TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ClientError::Resolve {
                host: host.to_owned(),
                why: e.to_string(),
            })?
            .collect(),
    };
    let addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| opts.bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4()))
        .collect();
    let mut last = None;
    for addr in &addrs {
        match connect_one(*addr, opts).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Resolve {
        host: host.to_owned(),
        why: match opts.bind {
            Some(b) => format!("no address of the same family as the source address {b}"),
            None => "no addresses".into(),
        },
    }))
}

async fn connect_one(addr: SocketAddr, opts: &ConnectOptions) -> Result<TcpStream, ClientError> {
    let err = |source: io::Error| ClientError::Connect {
        addr: match opts.bind {
            Some(b) => format!("{addr} from {b}"),
            None => addr.to_string(),
        },
        source,
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    if let Some(src) = opts.bind {
        sock.bind(SocketAddr::new(src, 0)).map_err(err)?;
    }
    let stream = timeout(opts.connect_timeout, sock.connect(addr))
        .await
        .map_err(|_| ClientError::ConnectTimeout {
            addr: addr.to_string(),
            after: opts.connect_timeout,
        })?
        .map_err(err)?;
    stream.set_nodelay(true).map_err(err)?;
    Ok(stream)
}

/// A connection to the relay: plain TCP (`Left`) or TLS (`Right`).
/// TLS reads through [`ReadAhead`]: rustls asks for 4 KiB at a time, which
/// would be a syscall per record or two on a busy connection.
pub type Conn = Either<TcpStream, Box<TlsStream<ReadAhead<TcpStream>>>>;

/// TCP connect, then TLS if `tls` (SNI and certificate check against `host`).
pub async fn connect_stream(
    host: &str,
    port: u16,
    tls: bool,
    opts: &ConnectOptions,
) -> Result<Conn, ClientError> {
    connect_stream_via(host, host, port, tls, opts).await
}

/// [`connect_stream`] with the TCP connection going to `dial` while TLS
/// names `host` (derper's `host/dialhost` mesh entries).
pub async fn connect_stream_via(
    dial: &str,
    host: &str,
    port: u16,
    tls: bool,
    opts: &ConnectOptions,
) -> Result<Conn, ClientError> {
    let tcp = connect_tcp(dial, port, opts).await?;
    if !tls {
        return Ok(Either::Left(tcp));
    }
    let tls_err = |why: String| ClientError::Tls {
        host: authority(host, port),
        why,
    };
    let config = match &opts.tls {
        Some(c) => c.clone(),
        None => tls_config(&[]).map_err(tls_err)?,
    };
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| tls_err(format!("{host:?} is not a valid TLS server name: {e}")))?;
    let stream = TlsConnector::from(config)
        .connect(name, ReadAhead::new(tcp))
        .await
        .map_err(|e| tls_err(e.to_string()))?;
    Ok(Either::Right(Box::new(stream)))
}

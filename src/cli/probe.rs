//! `derp-relay probe URL`: proves a deployment relays packets, end to end,
//! through whatever sits in front of it (TLS terminator, ingress, Fly's proxy).
//!
//! `/healthz` only says the process is up. A relay can be healthy and still
//! useless: the proxy drops `Upgrade: DERP`, the certificate is wrong, the
//! ACL refuses everyone, the rate limit sees every client as the proxy. So the
//! probe does what two Tailscale nodes do: two clients connect and handshake,
//! each sends the other a packet, and a few timed round trips follow. Each
//! step that fails is named in the one-line reason.
//!
//! Keys: a relay with an ACL admits only listed keys and holds one active
//! connection per key, so the two clients need two different listed keys:
//! `--key-file` for client A and `--peer-key-file` for client B. A client
//! without a key file gets a fresh random key, which only an open relay admits.
//!
//! `--stun HOST:PORT` checks the relay's STUN responder the way netcheck
//! does: Tailscale's Binding Request, and the address the relay saw us at.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use derp_relay::client::{self, Client, ClientError, ConnectOptions, RelayUrl};
use derp_relay::protocol::PublicKey;
use derp_relay::protocol::frame::{ServerFrame, encode_send_packet};
use derp_relay::protocol::handshake::ClientSecret;
use tokio::time::timeout_at;

use super::{keys, ms, parse_duration};

/// The ClientInfo the probe sends: it is a prober, not a node, and does not
/// answer pings (it never stays long enough to need keepalive).
const PROBE_INFO: &[u8] = br#"{"version":2,"IsProber":true}"#;
/// How often an undelivered first packet is resent while the relay may still
/// be registering the receiver.
const RESEND_EVERY: Duration = Duration::from_millis(200);

#[derive(clap::Args)]
pub struct Args {
    /// Relay URL: http(s)://host[:port][/derp] for Upgrade: DERP, ws(s)://… for WebSocket.
    #[arg(required_unless_present = "stun")]
    url: Option<String>,
    /// Also (or only, without URL) probe STUN on HOST:PORT, e.g. derp.example.com:3478.
    #[arg(long, value_name = "HOST:PORT")]
    stun: Option<String>,
    /// Private key for client A (`keys generate` writes one); needed when the relay has an ACL.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Private key for client B; random when absent, which only an open relay admits.
    #[arg(long, value_name = "PATH")]
    peer_key_file: Option<PathBuf>,
    /// Give up after this long in total, e.g. `10s`.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Extra CA certificates (PEM) to trust for https/wss, e.g. a private CA.
    #[arg(long, value_name = "PATH", conflicts_with = "insecure")]
    ca_file: Option<PathBuf>,
    /// Accept any TLS certificate (a relay on --tls-self-signed); the connection is still encrypted.
    #[arg(long)]
    insecure: bool,
    /// Timed round trips after the first packet each way.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    count: u32,
}

/// The overall deadline, and the stage names failures are reported under.
struct Deadline {
    at: tokio::time::Instant,
    total: Duration,
}

impl Deadline {
    async fn run<T>(
        &self,
        stage: &str,
        fut: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, String> {
        match timeout_at(self.at, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{stage}: {e}")),
            Err(_) => Err(format!(
                "timed out after {} while {stage}",
                humantime::format_duration(self.total)
            )),
        }
    }
}

struct Side {
    name: &'static str,
    client: Client,
}

pub async fn run(a: Args) -> Result<(), String> {
    if let Some(target) = &a.stun {
        stun::run(target, a.timeout, a.count).await?;
    }
    let Some(url) = &a.url else {
        return Ok(());
    };
    let url = RelayUrl::parse(url).map_err(|e| e.to_string())?;
    let secret_a = load_key(a.key_file.as_ref())?;
    let secret_b = load_key(a.peer_key_file.as_ref())?;
    if secret_a.public() == secret_b.public() {
        return Err(
            "--key-file and --peer-key-file hold the same key; the relay keeps \
                    one active connection per key, so the clients need two different keys"
                .into(),
        );
    }
    let mut opts = ConnectOptions::default();
    if url.tls {
        opts.tls = Some(if a.insecure {
            client::insecure_tls_config()?
        } else {
            let extra = match &a.ca_file {
                Some(p) => client::load_pem_certs(p)?,
                None => Vec::new(),
            };
            client::tls_config(&extra)?
        });
    }
    let deadline = Deadline {
        at: tokio::time::Instant::now() + a.timeout,
        total: a.timeout,
    };

    println!("probing {url} ({})", url.transport());
    let mut sa = connect(&deadline, &url, &opts, "A", &secret_a).await?;
    let mut sb = connect(&deadline, &url, &opts, "B", &secret_b).await?;
    println!(
        "relay key {}",
        sa.client.handshake.server_key.to_nodekey_hex()
    );
    if let Some(r) = sa.client.handshake.rate_limit() {
        println!("relay advertises a receive limit of {r} bytes/s per client");
    }

    let first = first_delivery(&deadline, &mut sa, &mut sb, b"a-to-b").await?;
    println!("A -> B delivered after {}", ms(first));
    let first = first_delivery(&deadline, &mut sb, &mut sa, b"b-to-a").await?;
    println!("B -> A delivered after {}", ms(first));

    let mut rtts = Vec::new();
    for i in 0..a.count {
        rtts.push(round_trip(&deadline, &mut sa, &mut sb, i).await?);
    }
    print_round_trips("round trip A -> B -> A", "rounds", &rtts);
    Ok(())
}

/// The min/avg/max summary line and the final "ok".
fn print_round_trips(what: &str, unit: &str, rtts: &[Duration]) {
    let min = rtts.iter().min().copied().unwrap_or_default();
    let max = rtts.iter().max().copied().unwrap_or_default();
    let avg = rtts.iter().sum::<Duration>() / rtts.len().max(1) as u32;
    println!(
        "{what}: min {} avg {} max {} ({} {unit})",
        ms(min),
        ms(avg),
        ms(max),
        rtts.len()
    );
    println!("ok");
}

fn load_key(path: Option<&PathBuf>) -> Result<ClientSecret, String> {
    match path {
        Some(p) => keys::read_private(p),
        None => Ok(ClientSecret::generate()),
    }
}

async fn connect(
    deadline: &Deadline,
    url: &RelayUrl,
    opts: &ConnectOptions,
    name: &'static str,
    secret: &ClientSecret,
) -> Result<Side, String> {
    let t0 = Instant::now();
    let stage = format!(
        "connecting client {name} ({}{})",
        if url.tls { "TCP, TLS, " } else { "TCP, " },
        url.transport()
    );
    let (mut rd, mut wr) = deadline.run(&stage, client::open(url, opts)).await?;
    let connected = t0.elapsed();
    let t1 = Instant::now();
    let stage = format!("client {name} DERP handshake");
    let handshake = deadline
        .run(
            &stage,
            client::handshake(&mut rd, &mut wr, secret, PROBE_INFO),
        )
        .await?;
    println!(
        "client {name} {}: connect {}, handshake {}",
        secret.public().to_nodekey_hex(),
        ms(connected),
        ms(t1.elapsed())
    );
    Ok(Side {
        name,
        client: Client {
            rd,
            wr,
            key: secret.public(),
            handshake,
        },
    })
}

async fn send(c: &mut Client, to: &PublicKey, payload: &[u8]) -> Result<(), ClientError> {
    let mut buf = BytesMut::new();
    encode_send_packet(&mut buf, to, payload);
    c.wr.send(&mut buf).await
}

/// Reads frames until `payload` arrives from `from`. Frames that belong to
/// normal operation (KeepAlive, PeerGone for others, stale probe packets)
/// are skipped; a relay that announces a restart or closes fails the probe.
async fn receive(c: &mut Client, from: &PublicKey, payload: &[u8]) -> Result<(), ClientError> {
    loop {
        let Some(frame) = c.rd.next_frame().await? else {
            return Err(ClientError::Protocol(
                "relay closed the connection while a packet was expected".into(),
            ));
        };
        match ServerFrame::parse(frame).map_err(|e| ClientError::Protocol(e.to_string()))? {
            ServerFrame::RecvPacket { src, packet } if src == *from && packet == payload => {
                return Ok(());
            }
            ServerFrame::Restarting {
                reconnect_in_ms, ..
            } => {
                return Err(ClientError::Protocol(format!(
                    "relay is restarting (reconnect in {reconnect_in_ms} ms)"
                )));
            }
            ServerFrame::Health(text) if !text.is_empty() => {
                return Err(ClientError::Protocol(format!(
                    "relay reports a problem: {}",
                    String::from_utf8_lossy(&text)
                )));
            }
            _ => {}
        }
    }
}

/// The first packet from one client to the other, resent until it arrives:
/// a relay may admit a client a moment before it can route to it.
async fn first_delivery(
    deadline: &Deadline,
    from: &mut Side,
    to: &mut Side,
    tag: &[u8],
) -> Result<Duration, String> {
    let payload = probe_payload(tag, u32::MAX);
    let stage = format!(
        "waiting for client {}'s first packet to reach client {}",
        from.name, to.name
    );
    let t0 = Instant::now();
    let key_to = to.client.key;
    let key_from = from.client.key;
    loop {
        deadline
            .run(&stage, send(&mut from.client, &key_to, &payload))
            .await?;
        let until = (tokio::time::Instant::now() + RESEND_EVERY).min(deadline.at);
        // Cancelling the read between frames loses nothing: reads land in the
        // reader's buffer before a frame is taken from it.
        match tokio::time::timeout_at(until, receive(&mut to.client, &key_from, &payload)).await {
            Ok(Ok(())) => return Ok(t0.elapsed()),
            Ok(Err(e)) => return Err(format!("{stage}: {e}")),
            Err(_) if tokio::time::Instant::now() >= deadline.at => {
                return Err(format!(
                    "timed out after {} while {stage}",
                    humantime::format_duration(deadline.total)
                ));
            }
            Err(_) => {}
        }
    }
}

/// A → B, then B echoes → A; the time from A's send to A's receive.
async fn round_trip(
    deadline: &Deadline,
    a: &mut Side,
    b: &mut Side,
    round: u32,
) -> Result<Duration, String> {
    let (ka, kb) = (a.client.key, b.client.key);
    let ping = probe_payload(b"ping", round);
    let pong = probe_payload(b"pong", round);
    let stage = format!("round trip {}", round + 1);
    let t0 = Instant::now();
    deadline
        .run(&stage, send(&mut a.client, &kb, &ping))
        .await?;
    deadline
        .run(&stage, receive(&mut b.client, &ka, &ping))
        .await?;
    deadline
        .run(&stage, send(&mut b.client, &ka, &pong))
        .await?;
    deadline
        .run(&stage, receive(&mut a.client, &kb, &pong))
        .await?;
    Ok(t0.elapsed())
}

/// Recognisable, never mistaken for a disco packet (which starts with "TS").
fn probe_payload(tag: &[u8], round: u32) -> Vec<u8> {
    let mut p = b"derp-relay probe ".to_vec();
    p.extend_from_slice(tag);
    p.extend_from_slice(&round.to_be_bytes());
    p
}

mod stun {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use derp_relay::protocol::stun::{
        REQUEST_LEN, TxId, parse_binding_response, write_binding_request,
    };
    use rand_core::{OsRng, RngCore};
    use tokio::net::UdpSocket;

    /// Sends `count` Binding Requests one after another, each with a fresh
    /// transaction id, and prints the mapped address and the round trips.
    pub async fn run(target: &str, timeout: Duration, count: u32) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let within = |stage: String| {
            move |_| {
                format!(
                    "STUN: timed out after {} while {stage}",
                    humantime::format_duration(timeout)
                )
            }
        };
        let server: SocketAddr = tokio::time::timeout_at(deadline, tokio::net::lookup_host(target))
            .await
            .map_err(within(format!("resolving {target}")))?
            .map_err(|e| format!("STUN: cannot resolve {target}: {e}"))?
            .next()
            .ok_or_else(|| format!("STUN: {target} resolves to no address"))?;
        let local: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let sock = UdpSocket::bind(local)
            .await
            .map_err(|e| format!("STUN: cannot open a UDP socket: {e}"))?;
        println!("probing STUN at {server}");
        let mut rtts = Vec::new();
        let mut mapped = None;
        for round in 1..=count {
            let mut tx: TxId = [0; 12];
            OsRng.fill_bytes(&mut tx);
            let mut req = [0u8; REQUEST_LEN];
            write_binding_request(&tx, &mut req);
            let t0 = Instant::now();
            sock.send_to(&req, server)
                .await
                .map_err(|e| format!("STUN: sending to {server}: {e}"))?;
            let addr = tokio::time::timeout_at(deadline, answer(&sock, server, &tx))
                .await
                .map_err(within(format!("waiting for answer {round} from {server}")))?
                .map_err(|e| format!("STUN: receiving from {server}: {e}"))?;
            rtts.push(t0.elapsed());
            if mapped.is_some_and(|m| m != addr) {
                println!("mapped address changed to {addr} (the NAT moved us)");
            }
            mapped = Some(addr);
        }
        if let Some(addr) = mapped {
            println!("mapped address {addr}");
        }
        super::print_round_trips("STUN round trip", "requests", &rtts);
        Ok(())
    }

    /// The mapped address from the first valid answer to `tx` from `server`;
    /// stray datagrams (a late answer to an earlier request) are skipped.
    async fn answer(
        sock: &UdpSocket,
        server: SocketAddr,
        tx: &TxId,
    ) -> std::io::Result<SocketAddr> {
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await?;
            if from != server {
                continue;
            }
            if let Ok(addr) = parse_binding_response(&buf[..n], tx) {
                return Ok(addr);
            }
        }
    }
}

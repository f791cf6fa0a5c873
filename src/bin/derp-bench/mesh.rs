//! `mesh`: what the regional mesh costs. Starts meshed relay processes itself
//! and, in one run, compares pairs homed on one node with pairs split across
//! two (throughput and latency, both transports), then times the key flood a
//! joining node receives.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;
use futures_util::{StreamExt as _, TryStreamExt as _};
use tokio::time::sleep;

use crate::compare::median;
use crate::idle::raise_nofile_limit;
use crate::load::{
    BenchUrl, Endpoint, LoadArgs, ROLE_RECEIVER, RunResult, Target, check_load, open_endpoint,
    run_load_between,
};
use crate::tofu::UNGATED;
use crate::tofu::tempfile_dir::Dir;

#[derive(Args, Clone, Debug)]
pub(crate) struct MeshArgs {
    /// The relay binary to start: e.g. target/release/derp-relay.
    #[arg(long)]
    pub(crate) relay: PathBuf,
    #[command(flatten)]
    pub(crate) load: LoadArgs,
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Total packets/s of the latency runs (split over the pairs).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) latency_rate: u64,
    /// Idle clients on node A whose keys a joining node must learn; 0 skips the flood.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) flood_keys: usize,
    /// Handshakes in flight at once while connecting the flood's clients.
    #[arg(long, default_value_t = 200)]
    pub(crate) concurrency: usize,
}

/// Node addresses: A and B carry the load, C joins for the flood. Clients
/// bind 127.1.x.y and up (see `next_source_ip`), so these never collide.
const NODE_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
    Ipv4Addr::new(127, 0, 0, 4),
];
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One relay process of the bench's region.
struct Node {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    _dir: Dir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn url(&self, websocket: bool) -> Result<BenchUrl> {
        let scheme = if websocket { "ws" } else { "http" };
        BenchUrl::parse(&format!("{scheme}://{}/derp", self.addr))
    }

    /// Fails with the tail of the node's log if it has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "node {} exited ({status}); last log lines:\n{}",
                self.name,
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// Polls the metrics endpoint until `name` reaches `want`.
    async fn wait_metric(&mut self, name: &str, want: f64, limit: Duration) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if let Ok(text) = scrape(self.metrics).await
                && metric(&text, name).is_some_and(|v| v >= want)
            {
                return Ok(Instant::now());
            }
            ensure!(
                Instant::now() < deadline,
                "node {}: {name} did not reach {want} within {limit:?} (log {})",
                self.name,
                self.log.display()
            );
            sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A port free on `ip` right now; the relay binds it moments later. Fixed
/// ports are needed because every node's `--mesh-with` names the others'.
fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    Ok(l.local_addr()?.port())
}

fn write_mesh_key(dir: &Path) -> Result<PathBuf> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("reading /dev/urandom for the mesh key")?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("mesh.key");
    std::fs::write(&path, format!("{hex}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn spawn_node(
    relay: &Path,
    name: &'static str,
    ip: Ipv4Addr,
    port: u16,
    key_file: &Path,
    peers: &str,
) -> Result<Node> {
    let dir = Dir::new(&format!("mesh-{name}"))?;
    let addr = SocketAddr::new(ip.into(), port);
    let metrics = SocketAddr::new(ip.into(), free_port(ip)?);
    let log = dir.path().join("relay.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(relay)
        .args(UNGATED)
        .args([
            "--stun=false",
            // A node started later must be dialled promptly by the others.
            "--mesh-backoff-max",
            "200ms",
            "--mesh-with",
            peers,
        ])
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .arg("--mesh-key-file")
        .arg(key_file)
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", relay.display()))?;
    Ok(Node {
        name,
        child,
        addr,
        metrics,
        log,
        _dir: dir,
    })
}

/// One `GET /metrics`; the relay's metrics listener speaks plain HTTP/1.1.
async fn scrape(addr: SocketAddr) -> Result<String> {
    tokio::task::spawn_blocking(move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        ensure!(
            body.starts_with("HTTP/1.1 200"),
            "metrics answered {body:.40}"
        );
        Ok(body)
    })
    .await?
}

/// The value of the series whose name-and-labels text is exactly `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

const CONNECTED: &str = "derp_mesh_peers{state=\"connected\"}";
const REMOTE_KEYS: &str = "derp_mesh_remote_keys";

#[derive(Default)]
struct Cell {
    pps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

impl Cell {
    fn push_throughput(&mut self, r: &RunResult) {
        self.pps.push(r.pps);
    }
    fn push_latency(&mut self, r: &RunResult) {
        self.p50.push(r.p50_us);
        self.p99.push(r.p99_us);
    }
}

pub(crate) async fn mesh_bench(args: MeshArgs) -> Result<()> {
    check_load(&args.load)?;
    ensure!(args.latency_rate > 0, "--latency-rate must be positive");
    raise_nofile_limit(args.flood_keys as u64 + 4 * args.load.pairs as u64 + 512);
    let key_dir = Dir::new("mesh-key")?;
    let key_file = write_mesh_key(key_dir.path())?;
    let ports: Vec<u16> = NODE_IPS
        .iter()
        .map(|&ip| free_port(ip))
        .collect::<Result<_>>()?;
    // Every node gets the whole list, C included before it exists: it is the
    // static configuration of a three-node region with one node down.
    let peers = NODE_IPS
        .iter()
        .zip(&ports)
        .map(|(ip, p)| format!("{ip}:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut a = spawn_node(&args.relay, "A", NODE_IPS[0], ports[0], &key_file, &peers)?;
    let mut b = spawn_node(&args.relay, "B", NODE_IPS[1], ports[1], &key_file, &peers)?;
    a.wait_metric(CONNECTED, 1.0, START_TIMEOUT).await?;
    b.wait_metric(CONNECTED, 1.0, START_TIMEOUT).await?;
    out!(
        "nodes A {} and B {} meshed (metrics {} and {})",
        a.addr,
        b.addr,
        a.metrics,
        b.metrics
    );

    let transports = [false, true];
    // [transport][same, cross]
    let mut cells: Vec<[Cell; 2]> = transports.iter().map(|_| Default::default()).collect();
    let pairs = args.load.pairs as u64;
    let paced = LoadArgs {
        rate: (args.latency_rate / pairs).max(1),
        ..args.load.clone()
    };
    for round in 1..=args.rounds.max(1) {
        out!("-- round {round}");
        for (ti, &ws) in transports.iter().enumerate() {
            let ta = Target::Derp(a.url(ws)?);
            let tb = Target::Derp(b.url(ws)?);
            let name = ta.label();
            let same = format!("{name} same-node");
            let cross = format!("{name} A→B");
            let r = run_load_between(&ta, &ta, &args.load, same.clone()).await?;
            cells[ti][0].push_throughput(&r);
            let r = run_load_between(&ta, &tb, &args.load, cross.clone()).await?;
            cells[ti][1].push_throughput(&r);
            let r = run_load_between(&ta, &ta, &paced, same).await?;
            cells[ti][0].push_latency(&r);
            let r = run_load_between(&ta, &tb, &paced, cross).await?;
            cells[ti][1].push_latency(&r);
            a.check_alive()?;
            b.check_alive()?;
        }
    }

    // Where lost packets went: the reasons say whether the mesh queue or the
    // receivers' own queues gave way.
    for (node, name) in [(&a, "A"), (&b, "B")] {
        let text = scrape(node.metrics).await?;
        for l in text.lines().filter(|l| {
            l.starts_with("derp_packets_dropped_total")
                && l.rsplit(' ').next().is_some_and(|v| v != "0")
        }) {
            out!("node {name}: {l}");
        }
    }

    let flood = if args.flood_keys > 0 {
        Some(key_flood(&args, &mut a, ports[2], &key_file, &peers).await?)
    } else {
        None
    };

    out!(
        "\nMedians of {} rounds; {} pairs, {}-byte packets, {} s per run; latency at {} pkt/s total.",
        args.rounds.max(1),
        args.load.pairs,
        args.load.size,
        args.load.duration,
        paced.rate * pairs
    );
    out!(
        "\n| transport | same-node pkt/s | cross-node pkt/s | cross / same | same p50 | same p99 | cross p50 | cross p99 | added p99 |"
    );
    out!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (ti, &ws) in transports.iter().enumerate() {
        let [s, c] = &cells[ti];
        let (sp, cp) = (median(s.pps.clone()), median(c.pps.clone()));
        let (s50, s99) = (median(s.p50.clone()), median(s.p99.clone()));
        let (c50, c99) = (median(c.p50.clone()), median(c.p99.clone()));
        out!(
            "| {} | {sp:.0} | {cp:.0} | {:.0} % | {s50:.0} µs | {s99:.0} µs | {c50:.0} µs | {c99:.0} µs | {:.0} µs |",
            if ws { "WebSocket" } else { "DERP upgrade" },
            100.0 * cp / sp.max(1e-9),
            c99 - s99
        );
    }
    if let Some(f) = flood {
        out!(
            "\nkey flood: {} keys learnt by a joining node in {:.0} ms after its link was seen up ({:.0} ms after process start)",
            args.flood_keys,
            f.from_link.as_secs_f64() * 1e3,
            f.from_start.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

struct Flood {
    from_link: Duration,
    from_start: Duration,
}

/// N idle clients on A, then node C starts: how long until C's table holds
/// all N keys. Polls are 2 ms apart, so "link up" is seen up to 2 ms late and
/// `from_link` can be that much short; `from_start` bounds it from above.
async fn key_flood(
    args: &MeshArgs,
    a: &mut Node,
    c_port: u16,
    key_file: &Path,
    peers: &str,
) -> Result<Flood> {
    let n = args.flood_keys;
    let target = Target::Derp(a.url(false)?);
    let t = Instant::now();
    let conns: Vec<Endpoint> = futures_util::stream::iter(0..n)
        .map(|_| open_endpoint(&target, ROLE_RECEIVER, 0))
        .buffer_unordered(args.concurrency.max(1))
        .try_collect()
        .await
        .context("opening the flood's idle clients on node A")?;
    out!(
        "{n} idle clients on node A in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let mut c = spawn_node(&args.relay, "C", NODE_IPS[2], c_port, key_file, peers)?;
    let link = c.wait_metric(CONNECTED, 1.0, START_TIMEOUT).await?;
    let done = c
        .wait_metric(REMOTE_KEYS, n as f64, START_TIMEOUT)
        .await
        .context("node C never learnt every key of node A")?;
    drop(conns);
    Ok(Flood {
        from_link: done - link,
        from_start: done - started,
    })
}

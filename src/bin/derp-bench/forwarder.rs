//! The raw TCP splice that is the ceiling every relay figure is a ratio of.

use std::collections::HashMap;
use std::io::{BufRead, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, bail, ensure};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::load::{CONNECT_TIMEOUT, READ_CHUNK, ROLE_SENDER};

/// A `forward-server` child process: separate so that its CPU is accounted
/// like a relay's, not mixed with the load generator's.
pub(crate) struct ForwarderChild {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
}

impl ForwarderChild {
    pub(crate) async fn spawn() -> Result<Self> {
        let exe = std::env::current_exe().context("locating derp-bench executable")?;
        let mut child = Command::new(exe)
            .args([
                "forward-server",
                "--addr",
                "127.0.0.1:0",
                "--exit-on-stdin-eof",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting forward-server child")?;
        let stdout = child.stdout.take().context("forward-server stdout")?;
        // Blocking read on a helper thread, so a silent child hits the timeout.
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        });
        let line = match timeout(CONNECT_TIMEOUT, read).await {
            Ok(Ok(Ok(line))) => line,
            _ => String::new(),
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok());
        match addr {
            Some(addr) => Ok(ForwarderChild { child, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("forward-server printed {line:?} instead of its address")
            }
        }
    }
}

impl Drop for ForwarderChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The baseline: each sender's bytes are copied to its receiver, nothing else.
/// Clients open with 9 bytes: role (0 sender, 1 receiver) and a pair id.
pub(crate) async fn forward_server(addr: SocketAddr, exit_on_stdin_eof: bool) -> Result<()> {
    ensure!(
        addr.ip().is_loopback(),
        "forward-server only listens on loopback"
    );
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    out!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    if exit_on_stdin_eof {
        // Our parent holds the pipe: if it dies, even by SIGKILL, we follow.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    let waiting: Arc<Mutex<HashMap<u64, (u8, TcpStream)>>> = Arc::default();
    loop {
        let (mut stream, _) = listener.accept().await?;
        let waiting = waiting.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut hello = [0u8; 9];
            if !matches!(
                timeout(CONNECT_TIMEOUT, stream.read_exact(&mut hello)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let (role, id) = (
                hello[0],
                u64::from_be_bytes(hello[1..].try_into().unwrap_or_default()),
            );
            let peer = {
                let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                match w.remove(&id) {
                    Some((r, s)) if r != role => Some(s),
                    _ => {
                        w.insert(id, (role, stream));
                        return;
                    }
                }
            };
            let Some(peer) = peer else { return };
            let (sender, receiver) = if role == ROLE_SENDER {
                (stream, peer)
            } else {
                (peer, stream)
            };
            let (srd, _swr) = sender.into_split();
            let (_rrd, mut rwr) = receiver.into_split();
            let mut srd = BufReader::with_capacity(READ_CHUNK, srd);
            let _ = tokio::io::copy_buf(&mut srd, &mut rwr).await;
            let _ = rwr.shutdown().await;
        });
    }
}

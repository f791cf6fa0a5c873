//! derp-relay's entry point. Without a subcommand it runs the relay
//! (configuration, logging, the supervisor tree, signals); the operator
//! subcommands (`healthcheck`, `probe`, `derpmap`, `keys`) live in [`cli`] and
//! share the binary so a minimal container image carries every tool it needs.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use derp_relay::Relay;
use derp_relay::config::{Config, Flags, LogFormat};

#[derive(Parser)]
#[command(
    name = "derp-relay",
    version,
    about = "A self-hosted DERP relay for Tailscale-compatible clients",
    long_about = "A self-hosted DERP relay for Tailscale-compatible clients.\n\n\
        Without a subcommand, runs the relay with the flags below \
        (e.g. `derp-relay --open-relay`). Every flag but --config is also an \
        environment variable DERP_RELAY_<NAME> and a key in the --config file.",
    // Relay flags and a subcommand never mix: `derp-relay --open-relay probe`
    // is a mistake to report, not a relay to start.
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Option<cli::Command>,
}

/// Puts a new `log_level` in force (SIGHUP).
type SetLogLevel = Box<dyn Fn(Option<&str>) -> Result<(), String> + Send + Sync>;

/// `log_level` if set, else `RUST_LOG`, else `info`. The setting was
/// validated with the config, so a parse failure here cannot happen.
///
/// ractor opens an INFO span for every actor, so at `info` each client's
/// connection actor held a span (about 300 bytes of formatted fields, a tenth
/// of a client's own memory) and every line logged inside an actor carried an
/// `Actor{id="0.12345"}:` prefix that names nothing an operator can use. Our
/// lines carry their own fields, so ractor is held to `warn` unless the
/// filter names it.
fn log_filter(level: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l.trim()).unwrap_or_else(|_| EnvFilter::new("info")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    if filter.to_string().contains("ractor") {
        return filter;
    }
    match "ractor=warn".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) -> SetLogLevel {
    let b = tracing_subscriber::fmt()
        .with_env_filter(log_filter(level))
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in collected logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // The reload handle's type depends on the format, hence two arms.
    match format {
        LogFormat::Text => {
            let b = b.with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |l| h.reload(log_filter(l)).map_err(|e| e.to_string()))
        }
        LogFormat::Json => {
            let b = b.json().with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |l| h.reload(log_filter(l)).map_err(|e| e.to_string()))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(cmd) = cli.command {
        return cli::run(cmd);
    }
    let config = match Config::load(&cli.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("derp-relay: {e}");
            return ExitCode::from(2);
        }
    };
    let set_log_level = init_logging(config.log_format, config.log_level.as_deref());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("derp-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(config, cli.flags, set_log_level))
}

/// SIGHUP: re-read every layer as at start, apply what is live, name what
/// needs a restart; a file that does not load changes nothing.
fn reload(relay: &Relay, flags: &Flags, set_log_level: &SetLogLevel) {
    let config = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            relay.reload_failed();
            tracing::error!("config reload rejected, nothing changed: {e}");
            return;
        }
    };
    let level = config.log_level.clone();
    match relay.reload(config) {
        Ok(report) => {
            if report.applied.iter().any(|k| k == "log_level")
                && let Err(e) = set_log_level(level.as_deref())
            {
                tracing::error!(error = %e, "log_level: could not apply");
            }
            tracing::info!(
                applied = %report.applied.join(","),
                "config reloaded"
            );
            if !report.restart_only.is_empty() {
                tracing::warn!(
                    "config reload: changed settings need a restart and were left as they were: {}",
                    report.restart_only.join(", ")
                );
            }
        }
        Err(e) => tracing::error!("config reload rejected, nothing changed: {e}"),
    }
}

async fn run(config: Config, flags: Flags, set_log_level: SetLogLevel) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            eprintln!("derp-relay: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let mut relay = match Relay::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("derp-relay: {e}");
            return ExitCode::from(2);
        }
    };
    let failure = loop {
        tokio::select! {
            _ = term.recv() => break None,
            _ = int.recv() => break None,
            _ = hup.recv() => reload(&relay, &flags, &set_log_level),
            why = relay.failed() => break Some(why),
        }
    };
    tracing::info!("stopping: draining clients (a second signal exits at once)");
    let drain = relay.shutdown();
    let forced = tokio::select! {
        left = drain => {
            tracing::info!(cut = left, "stopped");
            false
        }
        _ = term.recv() => true,
        _ = int.recv() => true,
    };
    if forced {
        // The drain was cut short: say so in the exit status too.
        tracing::warn!("second signal: exiting now");
        return ExitCode::from(130);
    }
    match failure {
        Some(why) => {
            eprintln!("derp-relay: {why}");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

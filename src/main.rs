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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in collected logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
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
    init_logging(config.log_format);
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
    rt.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
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
    let failure = tokio::select! {
        _ = term.recv() => None,
        _ = int.recv() => None,
        why = relay.failed() => Some(why),
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

//! The operator subcommands: everything the binary does besides running the
//! relay. They live in the same binary so a distroless image (no shell, no
//! curl) can still health-check itself, and so an operator has one tool to
//! probe a deployment, print its DERP map and manage keys.
//!
//! Each subcommand prints its result on stdout and, on failure, exactly one
//! line on stderr saying why, with a non-zero exit: health checkers and
//! scripts act on the exit code, people read the line.

pub mod derpmap;
pub mod healthcheck;
pub mod keys;
pub mod probe;

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Exit 0 if the relay's /healthz answers 200 "ok" (for container health checks).
    Healthcheck(healthcheck::Args),
    /// Connect two clients through a relay, pass a packet each way, report timings.
    Probe(probe::Args),
    /// Print this relay's DERP map for a Tailscale policy file or headscale.
    Derpmap(derpmap::Args),
    /// Client private keys and the TOFU bindings.
    #[command(subcommand)]
    Keys(keys::Command),
}

/// Runs a subcommand to completion and maps its outcome to an exit code.
pub fn run(cmd: Command) -> ExitCode {
    let (name, result) = match cmd {
        Command::Healthcheck(a) => ("healthcheck", block_on(healthcheck::run(a))),
        Command::Probe(a) => ("probe", block_on(probe::run(a))),
        Command::Derpmap(a) => ("derpmap", derpmap::run(a)),
        Command::Keys(k) => keys::run(k),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            // One line, whatever the cause: health checkers keep only a little output.
            let why = why.replace('\n', " ");
            eprintln!("derp-relay {name}: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The network subcommands are one short sequence of awaits: a single-threaded
/// runtime is all they need and starts faster than the relay's.
fn block_on(fut: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(fut)
}

/// Durations the way the config file takes them: `5s`, `2m`, `1m 30s`, or
/// a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let d = match t.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(t)
            .map_err(|e| format!("{t:?} is not a duration like \"5s\" or \"2m\" ({e})"))?,
    };
    if d.is_zero() {
        return Err("must be longer than 0s".into());
    }
    Ok(d)
}

/// Milliseconds with two decimals, the resolution these tools report in.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_config_file() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }
}

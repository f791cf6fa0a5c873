//! The deployment files and docs against the code they describe.
//!
//! Every flag, environment variable, port, path and metric name written in
//! Dockerfile, fly.toml, deploy/, config/ and README.md is checked against
//! the truth: the real binary's `--help`, `Config` (its default, serialised,
//! is the list of keys), the real config loader, and the metric names in the
//! source. A renamed flag or a changed default then fails here instead of in
//! an operator's deployment.
//!
//! One module per deployment file (or set of files) it checks; what the
//! binary and the code say — flags, config keys, the loader — and the small
//! readers for TOML and YAML are in `common`.

mod caddy;
mod common;
mod compose;
mod config_file;
mod dockerfile;
mod env_vars;
mod fly;
mod kubernetes;
mod monitoring;
mod nginx;
mod readme;

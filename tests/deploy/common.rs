//! What the deployment files are checked against, shared by every module:
//! the real binary's `--help` flags, the config keys of `Config`, the real
//! flag parser and config loader, environment-variable checks, and small
//! readers for the repository's TOML and YAML files. It exists so each file's
//! test states only what that file must say.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use clap::Parser;
use derp_relay::config::{Config, Flags};
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

pub fn yaml(rel: &str) -> Yaml {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"))
}

pub fn toml_file(rel: &str) -> toml::Table {
    read(rel)
        .parse()
        .unwrap_or_else(|e| panic!("{rel}: not TOML: {e}"))
}

// ------------------------------------------------------------ the truth

/// Long flags listed by `derp-relay [SUBCOMMAND...] --help`.
pub fn help_flags(subcommand: &[&str]) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_derp-relay"))
        .args(subcommand)
        .arg("--help")
        .output()
        .expect("run derp-relay --help");
    assert!(out.status.success(), "--help failed for {subcommand:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let flags: BTreeSet<String> = text
        .lines()
        .map(str::trim_start)
        .filter_map(|l| {
            // "--flag <V>" or "-h, --help"
            let l = l.split_once(", ").map_or(l, |(short, rest)| {
                if short.len() == 2 && short.starts_with('-') {
                    rest
                } else {
                    l
                }
            });
            l.starts_with("--").then(|| {
                l.split(|c: char| c.is_whitespace() || c == '=' || c == '<')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
        .collect();
    assert!(flags.len() > 2, "no flags parsed from --help: {text}");
    flags
}

pub fn relay_flags() -> &'static BTreeSet<String> {
    static F: OnceLock<BTreeSet<String>> = OnceLock::new();
    F.get_or_init(|| help_flags(&[]))
}

/// Config keys: the fields of `Config::default()` serialised.
pub fn config_keys() -> &'static BTreeSet<String> {
    static K: OnceLock<BTreeSet<String>> = OnceLock::new();
    K.get_or_init(|| match serde_json::to_value(Config::default()) {
        Ok(Json::Object(m)) => m.keys().cloned().collect(),
        other => panic!("Config does not serialise to an object: {other:?}"),
    })
}

/// The relay's command line exactly as `main` parses it.
#[derive(Parser)]
struct RelayCli {
    #[command(flatten)]
    flags: Flags,
}

/// Parses relay arguments with the real flag definitions and loads them
/// through the real config loader (layers and validation).
pub fn load_args(what: &str, args: &[String]) -> Config {
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let name = a.split('=').next().unwrap_or(a);
        assert!(
            relay_flags().contains(name),
            "{what}: {name} is not a flag of derp-relay (see --help)"
        );
    }
    let argv = std::iter::once("derp-relay".to_owned()).chain(args.iter().cloned());
    let cli = RelayCli::try_parse_from(argv).unwrap_or_else(|e| panic!("{what}: {e}"));
    Config::load(&cli.flags).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Checks environment variables as the relay reads them: the name must be
/// DERP_RELAY_<config key>, and the value must deserialise into that key.
pub fn check_env(what: &str, vars: &BTreeMap<String, String>) {
    for (name, value) in vars {
        let Some(key) = name.strip_prefix("DERP_RELAY_") else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        assert!(
            config_keys().contains(&key),
            "{what}: {name} is not a config key's variable"
        );
        if value.is_empty() || value.contains("${") {
            continue; // filled in at deploy time
        }
        // Figment reads env values as TOML-ish scalars.
        let v = value
            .parse::<bool>()
            .map(Json::from)
            .or_else(|_| value.parse::<u64>().map(Json::from))
            .unwrap_or_else(|_| Json::from(value.clone()));
        let obj = Json::Object([(key.clone(), v)].into_iter().collect());
        if let Err(e) = serde_json::from_value::<Config>(obj) {
            panic!("{what}: {name}={value:?} is not a valid {key}: {e}");
        }
    }
}

/// Every `DERP_RELAY_*` name mentioned anywhere in `text`.
pub fn env_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("DERP_RELAY_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        if name.len() > "DERP_RELAY_".len() {
            names.insert(name.trim_end_matches('_').to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    names
}

pub fn port_of(addr: &str) -> u16 {
    Config {
        addr: addr.to_owned(),
        ..Config::default()
    }
    .listen_addr()
    .unwrap_or_else(|e| panic!("{e}"))
    .port()
}

pub fn secs(text: &str) -> Duration {
    humantime::parse_duration(text.trim()).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// Flag value in an argument list.
pub fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

pub fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|x| match x {
            Yaml::String(s) => s.clone(),
            Yaml::Number(n) => n.to_string(),
            Yaml::Bool(b) => b.to_string(),
            other => panic!("not a scalar: {other:?}"),
        })
        .collect()
}

pub fn get<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(v, |v, k| {
        v.get(*k)
            .unwrap_or_else(|| panic!("missing {k:?} (path {path:?})"))
    })
}

pub fn str_of(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

// ------------------------------------------------------------ proxies

/// Flags in the `derp-relay ...` command lines a file's comments show (a
/// command continues over lines ending in `\`) must be real. Other tools'
/// flags on other lines are not ours to check.
pub fn comment_flags_are_real(rel: &str) {
    let all: BTreeSet<String> = relay_flags()
        .iter()
        .cloned()
        .chain(help_flags(&["healthcheck"]))
        .chain(help_flags(&["probe"]))
        .collect();
    let mut in_command = false;
    let mut commands = 0;
    for line in read(rel).lines() {
        let text = line.trim().trim_start_matches('#').trim();
        let words: Vec<&str> = text.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "derp-relay") {
            in_command = true;
            commands += 1;
            check_flags(rel, &all, &words[i + 1..]);
        } else if in_command {
            check_flags(rel, &all, &words);
        }
        in_command = in_command && text.ends_with('\\');
    }
    assert!(commands > 0, "{rel} shows how to run the relay");
}

fn check_flags(rel: &str, all: &BTreeSet<String>, words: &[&str]) {
    for w in words.iter().filter(|w| w.starts_with("--")) {
        let f = w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        assert!(all.contains(f), "{rel}: {f} is not a derp-relay flag");
    }
}

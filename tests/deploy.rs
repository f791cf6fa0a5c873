//! The deployment files and docs against the code they describe.
//!
//! Every flag, environment variable, port, path and metric name written in
//! Dockerfile, fly.toml, deploy/, config/ and README.md is checked against
//! the truth: the real binary's `--help`, `Config` (its default, serialised,
//! is the list of keys), the real config loader, and the metric names in the
//! source. A renamed flag or a changed default then fails here instead of in
//! an operator's deployment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use clap::Parser;
use derp_relay::actors::acl::AllowedKeys;
use derp_relay::config::{Config, Flags};
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"))
}

fn toml_file(rel: &str) -> toml::Table {
    read(rel)
        .parse()
        .unwrap_or_else(|e| panic!("{rel}: not TOML: {e}"))
}

// ------------------------------------------------------------ the truth

/// Long flags listed by `derp-relay [SUBCOMMAND...] --help`.
fn help_flags(subcommand: &[&str]) -> BTreeSet<String> {
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

fn relay_flags() -> &'static BTreeSet<String> {
    static F: OnceLock<BTreeSet<String>> = OnceLock::new();
    F.get_or_init(|| help_flags(&[]))
}

/// Config keys: the fields of `Config::default()` serialised.
fn config_keys() -> &'static BTreeSet<String> {
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
fn load_args(what: &str, args: &[String]) -> Config {
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
fn check_env(what: &str, vars: &BTreeMap<String, String>) {
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
fn env_names_in(text: &str) -> BTreeSet<String> {
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

/// Metric names the relay exports: every family its registry gathers (the
/// process collector's included), plus every `derp_*` name in the source,
/// which covers labelled families that have no sample until first used.
fn known_metrics() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = derp_relay::metrics::Metrics::new()
        .registry
        .gather()
        .iter()
        .map(|mf| mf.name().to_owned())
        .collect();
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("derp_")
                        && piece.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    {
                        names.insert(piece.to_owned());
                    }
                }
            }
        }
    }
    names
}

/// Metric names used in a PromQL expression.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("derp_") || w.starts_with("process_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    w.strip_suffix(s)
                        .filter(|b| b.ends_with("_seconds") || b.ends_with("_bytes"))
                })
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

fn check_metrics(what: &str, expr: &str) {
    let known = known_metrics();
    for m in metrics_in(expr) {
        assert!(
            known.contains(&m),
            "{what}: metric {m} is not defined by the relay (expr: {expr})"
        );
    }
}

fn port_of(addr: &str) -> u16 {
    Config {
        addr: addr.to_owned(),
        ..Config::default()
    }
    .listen_addr()
    .unwrap_or_else(|e| panic!("{e}"))
    .port()
}

/// The port of a `stun_addr`, which may name a host (`fly-global-services:3478`).
fn stun_port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("stun_addr {addr:?} has no port"))
}

fn secs(text: &str) -> Duration {
    humantime::parse_duration(text.trim()).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// Flag value in an argument list.
fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn strings(v: &Yaml) -> Vec<String> {
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

fn get<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(v, |v, k| {
        v.get(*k)
            .unwrap_or_else(|| panic!("missing {k:?} (path {path:?})"))
    })
}

fn str_of(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

// ------------------------------------------------------------ Dockerfile

struct Dockerfile {
    /// Per stage: (name, instructions with continuations joined).
    stages: Vec<(String, Vec<String>)>,
}

impl Dockerfile {
    fn parse() -> Dockerfile {
        let text = read("Dockerfile");
        let mut logical = Vec::new();
        let mut cur = String::new();
        for line in text.lines() {
            let t = line.trim();
            if cur.is_empty() && (t.starts_with('#') || t.is_empty()) {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(part) => {
                    cur.push_str(part);
                    cur.push(' ');
                }
                None => {
                    cur.push_str(t);
                    logical.push(std::mem::take(&mut cur));
                }
            }
        }
        let mut stages: Vec<(String, Vec<String>)> = Vec::new();
        for l in logical {
            if l.starts_with("FROM ") {
                let name = l.split_whitespace().last().unwrap_or_default().to_owned();
                stages.push((name, Vec::new()));
            } else if let Some(s) = stages.last_mut() {
                s.1.push(l);
            }
        }
        Dockerfile { stages }
    }

    fn instr<'a>(stage: &'a [String], word: &str) -> Vec<&'a str> {
        stage
            .iter()
            .filter_map(|l| l.strip_prefix(word).and_then(|r| r.strip_prefix(' ')))
            .map(str::trim)
            .collect()
    }

    fn exec_form(what: &str, s: &str) -> Vec<String> {
        serde_json::from_str(s)
            .unwrap_or_else(|e| panic!("Dockerfile {what}: not exec form (JSON array): {e}: {s}"))
    }
}

#[test]
fn dockerfile_commands_flags_and_ports_match_the_binary() {
    let d = Dockerfile::parse();
    let runtime = d
        .stages
        .iter()
        .filter(|(name, _)| name != "builder")
        .collect::<Vec<_>>();
    assert!(
        runtime.len() >= 2,
        "expected a root (fly) and a nonroot runtime stage"
    );
    let last = &d.stages.last().unwrap().1;
    assert!(
        Dockerfile::instr(last, "USER")
            .iter()
            .any(|u| u.starts_with("65532")),
        "the default (last) stage runs as nonroot"
    );
    for (name, stage) in runtime {
        let what = format!("Dockerfile stage {name}");
        let entry = Dockerfile::exec_form(&what, Dockerfile::instr(stage, "ENTRYPOINT")[0]);
        assert_eq!(entry, ["/usr/local/bin/derp-relay"], "{what}: ENTRYPOINT");
        let cmd = Dockerfile::exec_form(&what, Dockerfile::instr(stage, "CMD")[0]);
        let config = load_args(&what, &cmd);
        assert!(
            config.allowed_keys_file.is_some(),
            "{what}: ACL relay by default"
        );
        let port = config.listen_addr().unwrap().port();
        let exposed: Vec<u16> = Dockerfile::instr(stage, "EXPOSE")
            .iter()
            .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
            .collect();
        assert_eq!(exposed, [port], "{what}: EXPOSE matches --addr");
        let data = arg_value(&cmd, "--data-dir").unwrap();
        for v in Dockerfile::instr(stage, "VOLUME") {
            let vols = Dockerfile::exec_form(&what, v);
            assert_eq!(vols, [data], "{what}: VOLUME is the data dir");
        }
        for hc in Dockerfile::instr(stage, "HEALTHCHECK") {
            let exec = hc.split_once("CMD ").expect("HEALTHCHECK CMD").1;
            let argv = Dockerfile::exec_form(&what, exec);
            assert_eq!(argv[..2], ["/usr/local/bin/derp-relay", "healthcheck"]);
            let hc_flags = help_flags(&["healthcheck"]);
            for f in argv.iter().filter(|a| a.starts_with("--")) {
                assert!(hc_flags.contains(f), "{what}: healthcheck has no {f}");
            }
            // Without --url the default must point at the listen port.
            if !argv.iter().any(|a| a == "--url") {
                let out = Command::new(env!("CARGO_BIN_EXE_derp-relay"))
                    .args(["healthcheck", "--help"])
                    .output()
                    .unwrap();
                let help = String::from_utf8_lossy(&out.stdout);
                assert!(
                    help.contains(&format!("127.0.0.1:{port}/healthz")),
                    "{what}: healthcheck default URL is not on port {port}"
                );
            }
        }
    }
    let ignore = read(".dockerignore");
    for needed in ["!Cargo.toml", "!Cargo.lock", "!src/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == needed),
            ".dockerignore keeps {needed}"
        );
    }
}

// ------------------------------------------------------------ fly.toml

#[test]
fn fly_toml_matches_the_image_and_the_relay() {
    let fly = toml_file("fly.toml");
    let d = Dockerfile::parse();
    let target = fly["build"]["build-target"].as_str().unwrap();
    let stage = &d
        .stages
        .iter()
        .find(|(n, _)| n == target)
        .unwrap_or_else(|| panic!("fly.toml build-target {target:?} is not a Dockerfile stage"))
        .1;
    let cmd = Dockerfile::exec_form("fly stage", Dockerfile::instr(stage, "CMD")[0]);
    let config = load_args("fly stage CMD", &cmd);

    let env: BTreeMap<String, String> = fly["env"]
        .as_table()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    check_env("fly.toml [env]", &env);
    assert_eq!(
        env.get("DERP_RELAY_TRUST_PROXY").map(String::as_str),
        Some("true"),
        "Fly's proxy sets Fly-Client-IP; the relay must trust it"
    );
    for name in env_names_in(&read("fly.toml")) {
        check_env("fly.toml text", &BTreeMap::from([(name, String::new())]));
    }

    let svc = fly["http_service"].as_table().unwrap();
    assert_eq!(
        svc["internal_port"].as_integer(),
        Some(i64::from(config.listen_addr().unwrap().port()))
    );
    assert_eq!(svc["force_https"].as_bool(), Some(true));
    assert_eq!(svc["auto_stop_machines"].as_str(), Some("off"));
    assert_eq!(svc["min_machines_running"].as_integer(), Some(1));
    let conc = svc["concurrency"].as_table().unwrap();
    assert_eq!(conc["type"].as_str(), Some("connections"));
    assert_eq!(conc["hard_limit"].as_integer(), Some(10_000));
    assert_eq!(conc["soft_limit"].as_integer(), Some(8_000));
    assert_eq!(
        conc["hard_limit"].as_integer(),
        Some(config.max_clients as i64),
        "Fly's hard limit is the relay's own cap"
    );
    let checks = svc["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .any(|c| c["path"].as_str() == Some("/healthz"))
    );

    let kill = secs(fly["kill_timeout"].as_str().unwrap());
    assert!(
        kill > config.shutdown_timeout,
        "kill_timeout {kill:?} must exceed the drain ({:?})",
        config.shutdown_timeout
    );
    assert_eq!(fly["kill_signal"].as_str(), Some("SIGTERM"));
    assert_eq!(
        fly["mounts"]["destination"].as_str(),
        Some(config.data_dir.to_str().unwrap()),
        "the volume holds --data-dir"
    );
    let files = fly["files"].as_array().unwrap();
    assert!(
        files.iter().any(|f| f["guest_path"].as_str().map(Path::new)
            == config.allowed_keys_file.as_deref()),
        "[[files]] writes the --allowed-keys-file the image reads"
    );
    // STUN: a UDP service to the port the relay binds on fly-global-services.
    let stun_addr = env
        .get("DERP_RELAY_STUN_ADDR")
        .expect("fly.toml sets DERP_RELAY_STUN_ADDR");
    assert!(
        stun_addr.starts_with("fly-global-services:"),
        "Fly delivers UDP only to fly-global-services"
    );
    let udp = fly["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["protocol"].as_str() == Some("udp"))
        .expect("a UDP [[services]] for STUN");
    assert_eq!(
        udp["internal_port"].as_integer(),
        Some(i64::from(stun_port_of(stun_addr)))
    );
    assert_eq!(
        udp["ports"][0]["port"].as_integer(),
        Some(3478),
        "clients use STUN port 3478 (the derpmap default)"
    );
    let vm = &fly["vm"].as_array().unwrap()[0];
    assert_eq!(vm["memory"].as_str(), Some("256mb"));
    assert_eq!(vm["size"].as_str(), Some("shared-cpu-1x"));
}

// ------------------------------------------------------------ Compose

#[test]
fn compose_file_matches_the_relay() {
    let c = yaml("deploy/docker-compose.yml");
    let relay = get(&c, &["services", "derp-relay"]);
    let cmd = strings(get(relay, &["command"]));
    let config = load_args("compose derp-relay command", &cmd);
    let port = config.listen_addr().unwrap().port();
    assert!(config.metrics_port > 0, "compose serves metrics");

    let env: BTreeMap<String, String> = get(relay, &["environment"])
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (str_of(k), str_of(v)))
        .collect();
    check_env("compose environment", &env);
    for name in env_names_in(&read("deploy/docker-compose.yml")) {
        check_env("compose text", &BTreeMap::from([(name, String::new())]));
    }

    // host:container[/udp] mappings
    let all_ports: Vec<(String, u16, bool)> = strings(get(relay, &["ports"]))
        .iter()
        .map(|p| {
            let (host, container) = p.rsplit_once(':').unwrap();
            let (container, udp) = match container.strip_suffix("/udp") {
                Some(c) => (c, true),
                None => (container, false),
            };
            (host.to_owned(), container.parse().unwrap(), udp)
        })
        .collect();
    let stun_port = stun_port_of(&config.stun_addr);
    assert!(
        config.stun && all_ports.iter().any(|(_, c, udp)| *udp && *c == stun_port),
        "compose publishes STUN on UDP {stun_port}"
    );
    let ports: Vec<(String, u16)> = all_ports
        .into_iter()
        .filter(|(_, _, udp)| !udp)
        .map(|(h, c, _)| (h, c))
        .collect();
    assert!(
        ports.iter().any(|(_, c)| *c == port),
        "compose publishes the relay's port {port}"
    );
    let bridge = get(&c, &["services", "metrics-bridge"]);
    assert_eq!(
        str_of(get(bridge, &["network_mode"])),
        "service:derp-relay",
        "the bridge must share the relay's network namespace to reach its loopback"
    );
    let socat = strings(get(bridge, &["command"]));
    let listen: u16 = socat
        .iter()
        .find_map(|a| a.strip_prefix("TCP-LISTEN:"))
        .and_then(|a| a.split(',').next())
        .and_then(|p| p.parse().ok())
        .expect("socat listens");
    let target = socat
        .iter()
        .find_map(|a| a.strip_prefix("TCP:127.0.0.1:"))
        .and_then(|p| p.parse::<u16>().ok())
        .expect("socat forwards to loopback");
    assert_eq!(
        target, config.metrics_port,
        "the bridge forwards to --metrics-port"
    );
    assert!(
        ports
            .iter()
            .any(|(h, c)| *c == listen && h.starts_with("127.0.0.1:")),
        "metrics published on the host's loopback only"
    );
    assert!(
        !ports.iter().any(|(_, c)| *c == config.metrics_port),
        "publishing --metrics-port itself reaches nothing: the relay binds it to loopback"
    );

    let hc = strings(get(relay, &["healthcheck", "test"]));
    assert_eq!(hc[..3], ["CMD", "/usr/local/bin/derp-relay", "healthcheck"]);
    let hc_flags = help_flags(&["healthcheck"]);
    for f in hc.iter().filter(|a| a.starts_with("--")) {
        assert!(hc_flags.contains(f), "compose healthcheck: no flag {f}");
    }
    if let Some(url) = arg_value(&hc, "--url") {
        assert!(
            url.contains(&format!(":{port}/healthz")),
            "healthcheck URL {url} is on port {port}"
        );
    }
    let grace = secs(&str_of(get(relay, &["stop_grace_period"])));
    assert!(grace > config.shutdown_timeout, "stop_grace_period > drain");
    assert_eq!(str_of(get(relay, &["mem_limit"])), "256m");
    assert_eq!(str_of(get(relay, &["restart"])), "unless-stopped");
    let vols = strings(get(relay, &["volumes"]));
    let keys_dir = config
        .allowed_keys_file
        .as_ref()
        .and_then(|p| p.parent())
        .unwrap();
    assert!(
        vols.iter()
            .any(|v| v.contains(&format!(":{}:ro", keys_dir.display()))),
        "the allowed-keys directory is mounted read-only"
    );
    assert!(
        vols.iter()
            .any(|v| v.ends_with(&format!(":{}", config.data_dir.display()))),
        "the data dir is a volume"
    );
    let caddy_up = str_of(get(
        &c,
        &["services", "caddy", "environment", "DERP_UPSTREAM"],
    ));
    assert_eq!(caddy_up, format!("derp-relay:{port}"));
}

// ------------------------------------------------------------ Kubernetes

fn k8s(name: &str) -> Yaml {
    yaml(&format!("deploy/kubernetes/{name}"))
}

fn container<'a>(pod: &'a Yaml, name: &str) -> &'a Yaml {
    get(pod, &["containers"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| str_of(get(c, &["name"])) == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn named_port(c: &Yaml, name: &str) -> u16 {
    get(c, &["ports"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| str_of(get(p, &["name"])) == name)
        .and_then(|p| get(p, &["containerPort"]).as_u64())
        .unwrap_or_else(|| panic!("no port named {name}")) as u16
}

#[test]
fn kubernetes_manifests_match_the_relay_and_each_other() {
    let kust = k8s("kustomization.yaml");
    let resources = strings(get(&kust, &["resources"]));
    for r in &resources {
        k8s(r); // exists and parses
    }
    for r in [
        "deployment.yaml",
        "service.yaml",
        "ingress.yaml",
        "configmap.yaml",
        "pdb.yaml",
        "servicemonitor.yaml",
    ] {
        assert!(resources.iter().any(|x| x == r), "kustomization lists {r}");
    }
    let image = str_of(get(&get(&kust, &["images"])[0], &["name"]));

    let dep = k8s("deployment.yaml");
    assert_eq!(get(&dep, &["spec", "replicas"]).as_u64(), Some(1));
    let pod = get(&dep, &["spec", "template", "spec"]);
    let relay = container(pod, "derp-relay");
    assert!(str_of(get(relay, &["image"])).starts_with(&image));
    let args = strings(get(relay, &["args"]));
    let config = load_args("deployment args", &args);
    let port = config.listen_addr().unwrap().port();
    assert_eq!(named_port(relay, "http"), port);

    let env: BTreeMap<String, String> = get(relay, &["env"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            let v = e.get("value").map(str_of).unwrap_or_default();
            (str_of(get(e, &["name"])), v)
        })
        .collect();
    check_env("deployment env", &env);

    for probe in ["readinessProbe", "livenessProbe"] {
        let p = get(relay, &[probe, "httpGet"]);
        assert_eq!(str_of(get(p, &["path"])), "/healthz", "{probe}");
        assert_eq!(str_of(get(p, &["port"])), "http", "{probe}");
    }
    // A liveness probe must not kill a relay that is draining (503).
    let live = get(relay, &["livenessProbe"]);
    let live_budget = get(live, &["periodSeconds"]).as_u64().unwrap()
        * get(live, &["failureThreshold"]).as_u64().unwrap();
    assert!(Duration::from_secs(live_budget) > config.shutdown_timeout);

    let grace = get(pod, &["terminationGracePeriodSeconds"])
        .as_u64()
        .unwrap();
    let pre_stop = get(relay, &["lifecycle", "preStop", "sleep", "seconds"])
        .as_u64()
        .unwrap();
    assert_eq!(grace, 45);
    assert!(
        Duration::from_secs(grace) > config.shutdown_timeout + Duration::from_secs(pre_stop),
        "grace period covers preStop + drain"
    );
    for c in get(pod, &["containers"]).as_sequence().unwrap() {
        let sc = get(c, &["securityContext"]);
        assert_eq!(get(sc, &["readOnlyRootFilesystem"]).as_bool(), Some(true));
        assert_eq!(
            get(sc, &["allowPrivilegeEscalation"]).as_bool(),
            Some(false)
        );
        assert!(get(c, &["resources", "limits", "memory"]).is_string());
    }
    assert_eq!(
        get(pod, &["securityContext", "runAsNonRoot"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        str_of(get(relay, &["resources", "limits", "memory"])),
        "256Mi"
    );

    // Volumes: the ConfigMap holds the keys file the relay reads.
    let mounts = get(relay, &["volumeMounts"]).as_sequence().unwrap();
    let mount_of = |vol: &str| {
        mounts
            .iter()
            .find(|m| str_of(get(m, &["name"])) == vol)
            .map(|m| PathBuf::from(str_of(get(m, &["mountPath"]))))
            .unwrap_or_else(|| panic!("volume {vol} not mounted"))
    };
    let keys_file = config.allowed_keys_file.clone().unwrap();
    assert_eq!(
        mount_of("allowed-keys").join(keys_file.file_name().unwrap()),
        keys_file
    );
    assert!(
        mounts.iter().all(|m| m.get("subPath").is_none()),
        "subPath mounts never see ConfigMap updates"
    );
    assert_eq!(mount_of("data"), config.data_dir);
    let cm = k8s("configmap.yaml");
    let cm_name = str_of(get(&cm, &["metadata", "name"]));
    let vol = get(pod, &["volumes"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| str_of(get(v, &["name"])) == "allowed-keys")
        .unwrap();
    assert_eq!(str_of(get(vol, &["configMap", "name"])), cm_name);
    let keys_text = str_of(get(
        &cm,
        &["data", keys_file.file_name().unwrap().to_str().unwrap()],
    ));
    AllowedKeys::parse(&keys_text).unwrap_or_else(|e| panic!("configmap keys: {e}"));

    // The metrics bridge forwards to --metrics-port and serves `metrics`.
    let bridge = container(pod, "metrics-bridge");
    let socat = strings(get(bridge, &["args"]));
    assert!(
        socat
            .iter()
            .any(|a| *a == format!("TCP:127.0.0.1:{}", config.metrics_port))
    );
    let metrics_port = named_port(bridge, "metrics");
    assert!(
        socat
            .iter()
            .any(|a| a.starts_with(&format!("TCP-LISTEN:{metrics_port},")))
    );
    let ann = get(&dep, &["spec", "template", "metadata", "annotations"]);
    assert_eq!(
        str_of(get(ann, &["prometheus.io/port"])),
        metrics_port.to_string()
    );

    // Service → container ports, Ingress/ServiceMonitor → Service ports.
    let svc = k8s("service.yaml");
    let svc_ports = get(&svc, &["spec", "ports"]).as_sequence().unwrap();
    let mut svc_port_names = BTreeSet::new();
    for p in svc_ports {
        let target = str_of(get(p, &["targetPort"]));
        assert!(
            target == "http" || target == "metrics",
            "service targetPort {target}"
        );
        let c = if target == "http" { relay } else { bridge };
        named_port(c, &target);
        svc_port_names.insert(str_of(get(p, &["name"])));
    }
    let ing = k8s("ingress.yaml");
    let backend = get(
        &get(&get(&ing, &["spec", "rules"])[0], &["http", "paths"])[0],
        &["backend", "service"],
    );
    assert_eq!(
        str_of(get(backend, &["name"])),
        str_of(get(&svc, &["metadata", "name"]))
    );
    assert!(svc_port_names.contains(&str_of(get(backend, &["port", "name"]))));
    let ann = get(&ing, &["metadata", "annotations"]);
    for t in ["proxy-read-timeout", "proxy-send-timeout"] {
        let v: u64 = str_of(get(ann, &[&format!("nginx.ingress.kubernetes.io/{t}")]))
            .parse()
            .unwrap();
        assert!(v >= 3600, "{t} is an hour");
    }
    assert_eq!(
        str_of(get(ann, &["nginx.ingress.kubernetes.io/proxy-buffering"])),
        "off"
    );
    let sm = k8s("servicemonitor.yaml");
    assert!(svc_port_names.contains(&str_of(get(
        &get(&sm, &["spec", "endpoints"])[0],
        &["port"]
    ))));
    let pdb = k8s("pdb.yaml");
    assert_eq!(
        get(&pdb, &["spec", "selector", "matchLabels"]),
        get(&dep, &["spec", "selector", "matchLabels"])
    );
    let lb = k8s("service-loadbalancer.yaml");
    assert_eq!(
        str_of(get(&get(&lb, &["spec", "ports"])[0], &["targetPort"])),
        "http"
    );
    // STUN: the container's UDP port is the relay's, and the LB forwards it.
    assert!(config.stun);
    let stun = get(relay, &["ports"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| str_of(get(p, &["name"])) == "stun")
        .expect("container port named stun");
    assert_eq!(
        get(stun, &["containerPort"]).as_u64(),
        Some(u64::from(stun_port_of(&config.stun_addr)))
    );
    assert_eq!(str_of(get(stun, &["protocol"])), "UDP");
    let lb_stun = get(&lb, &["spec", "ports"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| str_of(get(p, &["targetPort"])) == "stun")
        .expect("the LoadBalancer forwards STUN");
    assert_eq!(str_of(get(lb_stun, &["protocol"])), "UDP");
    assert_eq!(get(lb_stun, &["port"]).as_u64(), Some(3478));
}

// ------------------------------------------------------------ proxies

/// Flags in the `derp-relay ...` command lines a file's comments show (a
/// command continues over lines ending in `\`) must be real. Other tools'
/// flags on other lines are not ours to check.
fn comment_flags_are_real(rel: &str) {
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

#[test]
fn nginx_passes_both_upgrades_with_long_timeouts() {
    let conf = read("deploy/nginx/derp-relay.conf");
    let lines: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let has = |s: &str| lines.iter().any(|l| l.contains(s));
    assert!(has("map $http_upgrade $connection_upgrade"));
    assert!(has("proxy_set_header Upgrade $http_upgrade;"));
    assert!(has("proxy_set_header Connection $connection_upgrade;"));
    assert!(has("proxy_http_version 1.1;"));
    assert!(has("proxy_buffering off;"));
    assert!(has("proxy_set_header X-Forwarded-For"));
    let ping = Config::default().ping_interval;
    for directive in ["proxy_read_timeout", "proxy_send_timeout"] {
        let v = lines
            .iter()
            .find_map(|l| l.strip_prefix(directive))
            .unwrap_or_else(|| panic!("no {directive}"));
        let d = secs(v.trim().trim_end_matches(';'));
        assert!(
            d > ping * 2,
            "{directive} {d:?} well above the ping interval"
        );
    }
    let upstream = lines
        .iter()
        .find_map(|l| l.strip_prefix("server 127.0.0.1:"))
        .expect("upstream server");
    let port: u16 = upstream.trim_end_matches(';').parse().unwrap();
    assert_eq!(port, port_of(&Config::default().addr));
    comment_flags_are_real("deploy/nginx/derp-relay.conf");
}

#[test]
fn caddy_proxies_to_the_relay() {
    let conf = read("deploy/caddy/Caddyfile");
    let want = format!(
        "reverse_proxy {{$DERP_UPSTREAM:127.0.0.1:{}}}",
        port_of(&Config::default().addr)
    );
    assert!(conf.contains(&want), "Caddyfile: {want}");
    assert!(conf.contains("health_uri /healthz"));
    comment_flags_are_real("deploy/caddy/Caddyfile");
}

// ------------------------------------------------------------ monitoring

#[test]
fn prometheus_alerts_and_dashboard_use_real_metrics() {
    let p = yaml("deploy/prometheus/prometheus.yml");
    for f in strings(get(&p, &["rule_files"])) {
        assert!(root().join("deploy/prometheus").join(&f).exists(), "{f}");
    }
    let job = &get(&p, &["scrape_configs"])[0];
    let target = str_of(&get(&get(job, &["static_configs"])[0], &["targets"])[0]);
    let compose = yaml("deploy/docker-compose.yml");
    let socat = strings(get(&compose, &["services", "metrics-bridge", "command"]));
    let (host, port) = target.rsplit_once(':').unwrap();
    assert_eq!(host, "derp-relay", "scrapes the compose service");
    assert!(
        socat
            .iter()
            .any(|a| a.starts_with(&format!("TCP-LISTEN:{port},")))
    );
    let job_name = str_of(get(job, &["job_name"]));

    let alerts = yaml("deploy/prometheus/alerts.yml");
    let mut names = BTreeSet::new();
    for g in get(&alerts, &["groups"]).as_sequence().unwrap() {
        for r in get(g, &["rules"]).as_sequence().unwrap() {
            let name = str_of(get(r, &["alert"]));
            let expr = str_of(get(r, &["expr"]));
            check_metrics(&name, &expr);
            if expr.contains("job=") {
                assert!(expr.contains(&format!("job=\"{job_name}\"")), "{name}");
            }
            assert!(get(r, &["annotations", "summary"]).is_string());
            names.insert(name);
        }
    }
    for want in [
        "DerpRelayDown",
        "DerpRelayDropsRising",
        "DerpRelayNearClientCap",
        "DerpRelayAclReloadFailing",
        "DerpRelayMemoryNearLimit",
    ] {
        assert!(names.contains(want), "alert {want}");
    }

    let dash: Json = serde_json::from_str(&read("deploy/grafana/derp-relay.json")).unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = 0;
    for panel in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            check_metrics(panel["title"].as_str().unwrap(), expr);
            exprs += 1;
        }
    }
    assert!(exprs > 10, "the dashboard has queries");
    let used: BTreeSet<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .flat_map(|t| metrics_in(t["expr"].as_str().unwrap()))
        .collect();
    for m in [
        "derp_clients_active",
        "derp_packets_routed_total",
        "derp_packets_dropped_total",
        "derp_connections_refused_total",
        "derp_handshake_duration_seconds",
    ] {
        assert!(used.contains(m), "dashboard shows {m}");
    }
}

// ------------------------------------------------------------ config/

#[test]
fn config_file_documents_every_key_with_its_default() {
    let text = read("config/derp-relay.toml");
    let table: toml::Table = text.parse().unwrap();
    let from_file: Config = toml::from_str(&text).expect("config/derp-relay.toml is a Config");
    assert_eq!(
        serde_json::to_value(&from_file).unwrap(),
        serde_json::to_value(Config::default()).unwrap(),
        "every value in config/derp-relay.toml is the built-in default"
    );
    // Keys without a default (paths, the token) are shown commented out.
    let mut documented: BTreeSet<String> = table.keys().cloned().collect();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix('#') else {
            continue;
        };
        let Some((key, _)) = rest.trim().split_once(" = ") else {
            continue;
        };
        if config_keys().contains(key) {
            let one: Config = toml::from_str(rest.trim())
                .unwrap_or_else(|e| panic!("commented example for {key}: {e}"));
            let _ = one;
            assert!(
                !table.contains_key(key),
                "{key} is both set and commented out"
            );
            documented.insert(key.to_owned());
        }
    }
    assert_eq!(
        &documented,
        config_keys(),
        "config/derp-relay.toml lists every key"
    );
    // Every key has a comment line right above it.
    let lines: Vec<&str> = text.lines().collect();
    for key in config_keys() {
        let i = lines
            .iter()
            .position(|l| {
                let l = l.trim_start_matches('#').trim_start();
                l.starts_with(&format!("{key} = "))
            })
            .unwrap();
        assert!(
            i > 0 && lines[i - 1].starts_with("# "),
            "{key} has a one-line comment"
        );
    }
    // And the real loader takes the file.
    let flags = Flags {
        config: Some(root().join("config/derp-relay.toml")),
        open_relay: true,
        ..Flags::default()
    };
    let c = Config::load(&flags).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.addr, Config::default().addr);

    let example = read("config/allowed-keys.txt.example");
    let keys = AllowedKeys::parse(&example).unwrap_or_else(|e| panic!("example: {e}"));
    assert!(keys.len() >= 2, "the example shows both key forms");
}

#[test]
fn every_env_var_named_anywhere_is_a_config_key() {
    let mut files = vec![
        "README.md".to_owned(),
        "Dockerfile".to_owned(),
        "fly.toml".to_owned(),
        "config/derp-relay.toml".to_owned(),
    ];
    let mut stack = vec![root().join("deploy")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(
                    p.strip_prefix(root())
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    for f in files {
        for name in env_names_in(&read(&f)) {
            let key = name.trim_start_matches("DERP_RELAY_").to_ascii_lowercase();
            assert!(
                config_keys().contains(&key),
                "{f}: {name} is not DERP_RELAY_<config key>"
            );
        }
    }
}

// ------------------------------------------------------------ README

#[test]
fn readme_documents_every_flag_and_the_quick_start() {
    let readme = read("README.md");
    let table_rows: Vec<&str> = readme.lines().filter(|l| l.starts_with('|')).collect();
    for flag in relay_flags() {
        if flag == "--help" || flag == "--version" {
            continue;
        }
        assert!(
            table_rows.iter().any(|r| r.contains(&format!("`{flag}")))
                || table_rows.iter().any(|r| r.contains(&format!("{flag} "))),
            "README's flags table lists {flag}"
        );
    }
    for key in config_keys() {
        let var = format!("DERP_RELAY_{}", key.to_ascii_uppercase());
        assert!(
            table_rows.iter().any(|r| r.contains(&var)),
            "README's flags table lists {var}"
        );
    }
    for sub in [
        "healthcheck",
        "probe",
        "derpmap",
        "keys generate",
        "keys export",
    ] {
        assert!(
            readme.contains(&format!("derp-relay {sub}")),
            "README shows `derp-relay {sub}`"
        );
    }
    assert!(readme.contains("cargo run --release -- --open-relay"));
    assert!(readme.contains("cargo test"));
    assert!(readme.contains("## Performance"));
    assert!(readme.contains("cargo build --release --bin derp-bench"));
    let ci = read(".ci/run");
    assert_eq!(
        ci.lines().filter(|l| l.trim() == "cargo test").count(),
        1,
        ".ci/run runs exactly the README's `cargo test`"
    );
    // The bench commands the README gives must be real derp-bench commands.
    let bench = Command::new(env!("CARGO_BIN_EXE_derp-bench"))
        .args(["compare", "--help"])
        .output()
        .unwrap();
    assert!(bench.status.success());
}

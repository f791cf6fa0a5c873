//! `deploy/docker-compose.yml`: the relay service's command, environment,
//! ports (metrics included), healthcheck, grace period, limits and volumes
//! against the relay, and the Caddy service's upstream.

use std::collections::BTreeMap;

use crate::common::{
    arg_value, check_env, env_names_in, get, help_flags, load_args, read, secs, str_of, strings,
    yaml,
};

#[test]
fn compose_file_matches_the_relay() {
    let c = yaml("deploy/docker-compose.yml");
    let relay = get(&c, &["services", "derp-relay"]);
    let cmd = strings(get(relay, &["command"]));
    let config = load_args("compose derp-relay command", &cmd);
    let port = config.listen_addr().unwrap().port();

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
    let stun_port = config
        .stun_addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .expect("stun_addr has a port");
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
    // Metrics on the container's address (no bridge): published on the
    // host's loopback only, and reachable as derp-relay:PORT on the network.
    let metrics = config
        .metrics_listen()
        .unwrap()
        .expect("compose serves metrics");
    assert!(
        !metrics.ip().is_loopback(),
        "the container's loopback reaches nothing"
    );
    assert!(
        ports
            .iter()
            .any(|(h, c)| *c == metrics.port() && h.starts_with("127.0.0.1:")),
        "metrics published on the host's loopback only"
    );
    assert!(
        !ports
            .iter()
            .any(|(h, c)| *c == metrics.port() && !h.starts_with("127.0.0.1:")),
        "metrics never published on a public address"
    );
    let services = get(&c, &["services"]).as_mapping().unwrap();
    assert!(
        !services.contains_key("metrics-bridge"),
        "no socat bridge: --metrics-addr serves the network directly"
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

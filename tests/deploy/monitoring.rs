//! `deploy/prometheus/` and `deploy/grafana/`: the scrape target is the
//! compose relay's --metrics-addr, and every metric an alert or a dashboard panel
//! queries is one the relay exports. Checked together because the alerts and
//! the dashboard share one test and one list of known metrics.

use std::collections::BTreeSet;

use serde_json::Value as Json;

use crate::common::{get, read, root, str_of, strings, yaml};

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

#[test]
fn prometheus_alerts_and_dashboard_use_real_metrics() {
    let p = yaml("deploy/prometheus/prometheus.yml");
    for f in strings(get(&p, &["rule_files"])) {
        assert!(root().join("deploy/prometheus").join(&f).exists(), "{f}");
    }
    let job = &get(&p, &["scrape_configs"])[0];
    let target = str_of(&get(&get(job, &["static_configs"])[0], &["targets"])[0]);
    let compose = yaml("deploy/docker-compose.yml");
    let cmd = strings(get(&compose, &["services", "derp-relay", "command"]));
    let metrics = crate::common::load_args("compose derp-relay command", &cmd)
        .metrics_listen()
        .unwrap()
        .expect("compose serves metrics");
    let (host, port) = target.rsplit_once(':').unwrap();
    assert_eq!(host, "derp-relay", "scrapes the compose service");
    assert_eq!(port, metrics.port().to_string(), "scrapes --metrics-addr");
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

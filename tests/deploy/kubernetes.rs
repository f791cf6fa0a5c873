//! `deploy/kubernetes/`: the kustomization, Deployment, Service, Ingress,
//! ConfigMap, PodDisruptionBudget and ServiceMonitor against the relay's
//! command line and against each other (names, ports, mounts, timeouts).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use derp_relay::admission::allowed_keys::AllowedKeys;
use serde_norway::Value as Yaml;

use crate::common::{check_env, get, load_args, str_of, strings, yaml};

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
        "networkpolicy.yaml",
    ] {
        assert!(resources.iter().any(|x| x == r), "kustomization lists {r}");
    }
    let image = str_of(get(&get(&kust, &["images"])[0], &["name"]));

    let dep = k8s("deployment.yaml");
    // Meshed replicas: ≥ 2, found through the headless Service.
    assert!(get(&dep, &["spec", "replicas"]).as_u64() >= Some(2));
    let pod = get(&dep, &["spec", "template", "spec"]);
    let relay = container(pod, "derp-relay");
    assert!(str_of(get(relay, &["image"])).starts_with(&image));
    let mut args = strings(get(relay, &["args"]));
    let mesh = k8s("service-mesh.yaml");
    assert_eq!(str_of(get(&mesh, &["spec", "clusterIP"])), "None");
    assert!(resources.iter().any(|x| x == "service-mesh.yaml"));
    let dns = args
        .iter()
        .skip_while(|a| *a != "--mesh-dns")
        .nth(1)
        .expect("--mesh-dns in the args")
        .clone();
    let mesh_name = str_of(get(&mesh, &["metadata", "name"]));
    assert!(
        dns.starts_with(&format!("{mesh_name}.")),
        "{dns} names the headless Service"
    );
    let env = serde_norway::to_string(get(relay, &["env"])).unwrap();
    assert!(
        env.contains("DERP_RELAY_MESH_KEY") && env.contains("derp-relay-mesh"),
        "mesh key from its Secret"
    );
    // The Secret's value, as the pod would have it.
    args.extend(["--mesh-key".to_owned(), "00".repeat(32)]);
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

    // The relay serves metrics on the pod address (no bridge), on the port
    // named `metrics` that the annotations, the Service and the
    // ServiceMonitor use.
    let metrics_addr = config
        .metrics_listen()
        .unwrap()
        .expect("deployment serves metrics");
    assert!(
        !metrics_addr.ip().is_loopback(),
        "a scraper cannot reach a pod's loopback"
    );
    let metrics_port = named_port(relay, "metrics");
    assert_eq!(metrics_port, metrics_addr.port());
    let names: Vec<String> = get(pod, &["containers"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| str_of(get(c, &["name"])))
        .collect();
    assert_eq!(names, ["derp-relay"], "no sidecar");
    let ann = get(&dep, &["spec", "template", "metadata", "annotations"]);
    assert_eq!(
        str_of(get(ann, &["prometheus.io/port"])),
        metrics_port.to_string()
    );
    let sm = k8s("servicemonitor.yaml");
    assert_eq!(
        str_of(get(&get(&sm, &["spec", "endpoints"])[0], &["port"])),
        "metrics"
    );

    // The NetworkPolicy leaves DERP and STUN open and admits only a
    // selected peer to the metrics port.
    let np = k8s("networkpolicy.yaml");
    assert_eq!(
        str_of(get(
            &np,
            &[
                "spec",
                "podSelector",
                "matchLabels",
                "app.kubernetes.io/name"
            ]
        )),
        "derp-relay"
    );
    let rules = get(&np, &["spec", "ingress"]).as_sequence().unwrap();
    let ports_of = |r: &Yaml| -> Vec<String> {
        get(r, &["ports"])
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| str_of(get(p, &["port"])))
            .collect()
    };
    for r in rules {
        let ports = ports_of(r);
        for p in &ports {
            assert!(
                ["http", "stun", "metrics"].contains(&p.as_str()),
                "networkpolicy port {p}"
            );
        }
        if ports.iter().any(|p| p == "metrics") {
            assert!(
                r.get("from")
                    .is_some_and(|f| !f.as_sequence().unwrap().is_empty()),
                "metrics open only to named peers"
            );
            assert_eq!(ports, ["metrics"]);
        }
    }
    assert!(
        rules
            .iter()
            .any(|r| ports_of(r).contains(&"http".to_string()) && r.get("from").is_none())
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
        named_port(relay, &target);
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
}

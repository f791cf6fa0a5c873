//! `fly.toml`: the Dockerfile stage it builds, its `[env]` against the config
//! keys, and the service, concurrency, kill timeout, mount and files settings
//! against what that stage's relay command line configures.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::{check_env, env_names_in, load_args, read, secs, toml_file};
use crate::dockerfile::Dockerfile;

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
    let vm = &fly["vm"].as_array().unwrap()[0];
    assert_eq!(vm["memory"].as_str(), Some("256mb"));
    assert_eq!(vm["size"].as_str(), Some("shared-cpu-1x"));
}

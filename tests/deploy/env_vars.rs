//! Every `DERP_RELAY_*` variable named in README.md, Dockerfile, fly.toml,
//! config/ or deploy/ is `DERP_RELAY_<config key>`. Its own module because it
//! spans all the deployment files rather than one.

use crate::common::{config_keys, env_names_in, read, root};

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

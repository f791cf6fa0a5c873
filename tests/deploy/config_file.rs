//! `config/derp-relay.toml` and `config/allowed-keys.txt.example`: the sample
//! config lists every key with its built-in default and a comment, and loads
//! through the real loader; the allowed-keys example parses.

use std::collections::BTreeSet;

use derp_relay::admission::allowed_keys::AllowedKeys;
use derp_relay::config::{Config, Flags};

use crate::common::{config_keys, read, root};

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

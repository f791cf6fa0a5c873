//! `README.md`: the flags table lists every flag and environment variable,
//! the subcommands and quick-start commands are shown, `.ci/run` runs the
//! README's `cargo test`, and the bench command it gives exists.

use std::process::Command;

use crate::common::{config_keys, read, relay_flags};

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

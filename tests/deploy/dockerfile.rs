//! `Dockerfile` and `.dockerignore`: every runtime stage's ENTRYPOINT, CMD
//! flags, EXPOSE, VOLUME and HEALTHCHECK against the real binary, and the
//! nonroot default stage. The Dockerfile reader lives here and is also used by
//! the fly.toml check, which builds one of these stages.

use std::process::Command;

use crate::common::{arg_value, help_flags, load_args, read};

pub struct Dockerfile {
    /// Per stage: (name, instructions with continuations joined).
    pub stages: Vec<(String, Vec<String>)>,
}

impl Dockerfile {
    pub fn parse() -> Dockerfile {
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

    pub fn instr<'a>(stage: &'a [String], word: &str) -> Vec<&'a str> {
        stage
            .iter()
            .filter_map(|l| l.strip_prefix(word).and_then(|r| r.strip_prefix(' ')))
            .map(str::trim)
            .collect()
    }

    pub fn exec_form(what: &str, s: &str) -> Vec<String> {
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

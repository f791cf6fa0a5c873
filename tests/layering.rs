//! The layers of `src/` (lib.rs draws them): a module may import only the
//! layers below it. This test reads every source file and fails when an
//! import reaches up, so the structure cannot drift back into a circle.

use std::collections::BTreeSet;
use std::path::Path;

/// Each module and the crate modules it may use.
const RULES: &[(&str, &[&str])] = &[
    ("protocol", &[]),
    ("reasons", &[]),
    ("config", &[]),
    ("routing", &["protocol", "reasons"]),
    ("admission", &["protocol", "reasons"]),
    ("metrics", &["reasons", "admission"]),
    ("limits", &["config"]),
    ("memory", &[]),
    ("stream", &[]),
    (
        "state",
        &[
            "config",
            "admission",
            "routing",
            "metrics",
            "protocol",
            "reasons",
        ],
    ),
    (
        "conn",
        &[
            "state",
            "routing",
            "protocol",
            "reasons",
            "metrics",
            "config",
            "admission",
            "stream",
        ],
    ),
    (
        "actors",
        &[
            "client",
            "conn",
            "state",
            "routing",
            "admission",
            "protocol",
            "reasons",
            "metrics",
            "config",
        ],
    ),
    (
        "http",
        &[
            "conn",
            "state",
            "routing",
            "admission",
            "protocol",
            "reasons",
            "metrics",
            "config",
            "limits",
            "stream",
        ],
    ),
    (
        "edge",
        &[
            "config",
            "metrics",
            "protocol",
            "reasons",
            "admission",
            "client",
        ],
    ),
    ("client", &["protocol", "stream"]),
];

/// External crates a pure layer must not touch (no I/O, no runtime).
const PURE: &[(&str, &[&str])] = &[
    ("protocol", &["tokio", "ractor", "hyper", "warp"]),
    ("reasons", &["tokio", "ractor", "hyper", "warp"]),
    ("routing", &["ractor", "hyper", "warp", "tokio_tungstenite"]),
    ("admission", &["tokio", "ractor", "hyper", "warp"]),
];

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// Crate modules a file names as `crate::X`.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        // `derp_relay::` from binaries is not `crate::`; skip `$crate::`.
        if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

fn uses_external(text: &str, krate: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim_start();
        !l.starts_with("//")
            && (l.starts_with(&format!("use {krate}::")) || l.contains(&format!(" {krate}::")))
    })
}

#[test]
fn no_layer_imports_a_higher_one() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut violations = Vec::new();
    let mut checked = 0;
    for f in &all {
        let Some(module) = module_of(&src, f) else {
            continue;
        };
        let Some((_, allowed)) = RULES.iter().find(|(m, _)| *m == module) else {
            continue; // lib.rs, relay.rs, main.rs, cli/, bin/: the top, which wires everything
        };
        checked += 1;
        let text = std::fs::read_to_string(f).expect("read source");
        for used in crate_imports(&text) {
            if used != module && !allowed.contains(&used.as_str()) {
                violations.push(format!("{}: {module} imports crate::{used}", f.display()));
            }
        }
        if let Some((_, banned)) = PURE.iter().find(|(m, _)| *m == module) {
            for b in *banned {
                if uses_external(&text, b) {
                    violations.push(format!("{}: {module} must not use {b}", f.display()));
                }
            }
        }
    }
    assert!(
        checked > 20,
        "the rules cover the tree ({checked} files checked)"
    );
    assert!(
        violations.is_empty(),
        "imports that reach up:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_an_upward_import() {
    let text = "use crate::actors::Actors;\nlet x = crate::protocol::frame::MAGIC;";
    let got = crate_imports(text);
    assert!(got.contains("actors") && got.contains("protocol"));
    assert!(uses_external("use tokio::sync::Notify;", "tokio"));
    assert!(!uses_external("// tokio::spawn is not used here", "tokio"));
}

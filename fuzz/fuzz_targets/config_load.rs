//! The config loader on arbitrary TOML text: the public path is
//! `Config::load` with `--config FILE`, so each input is written to a file
//! (one per fuzzing process) and loaded with no other flags. Errors are the
//! expected outcome; a panic is the bug.
#![no_main]

use derp_relay::config::{Config, Flags};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("derp-relay-fuzz-{}.toml", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let flags = Flags {
        config: Some(path),
        ..Flags::default()
    };
    let _ = Config::load(&flags);
});

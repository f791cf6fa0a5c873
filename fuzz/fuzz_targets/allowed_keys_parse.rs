//! The allowed-keys file format.
#![no_main]

use derp_relay::admission::allowed_keys::AllowedKeys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(keys) = AllowedKeys::parse(text)
    {
        let _ = keys.removed_in(&AllowedKeys::default());
    }
});

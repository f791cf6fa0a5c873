//! The TOFU bindings snapshot format; what parses must serialise and parse
//! back to the same keys.
#![no_main]

use derp_relay::admission::bindings::Bindings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(b) = Bindings::parse(text) {
        let again = Bindings::parse(&b.to_json()).expect("own output parses");
        assert_eq!(again.len(), b.len());
        let _ = b.to_allowed_keys();
    }
});

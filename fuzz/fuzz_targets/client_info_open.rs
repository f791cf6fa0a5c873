//! The handshake box: a ClientInfo payload sealed to a fixed server key with
//! arbitrary JSON inside (so the fuzzer reaches the JSON and ClientInfo
//! parsing behind the crypto), and raw arbitrary payloads.
#![no_main]

use derp_relay::protocol::handshake::{ClientSecret, ServerSecret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let server = ServerSecret::from_bytes([7; 32]);
    let client = ClientSecret::from_bytes([9; 32]);
    // Mutated JSON, properly sealed: exercises everything after the box opens.
    let payload = client.seal_client_info(&server.public(), data);
    let _ = server.open_client_info(&payload);
    // The bytes as a payload themselves: key, nonce and box all attacker-chosen.
    let _ = server.open_client_info(data);
});

//! Any byte stream through the relay's WebSocket frame decoder, and the DERP
//! bytes it yields through the DERP frame decoder, as an authenticated
//! WebSocket connection reads them. The first byte picks a read size so
//! partial headers and payloads split across reads are exercised too.
#![no_main]

use bytes::BytesMut;
use derp_relay::protocol::ws::{ANY_LENGTH, Decoded, WsDecoder};
use derp_relay::protocol::frame::{self, client_frame_limit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut dec = WsDecoder::new(ANY_LENGTH);
    let mut derp = BytesMut::new();
    'feed: for chunk in stream.chunks(step) {
        dec.input().extend_from_slice(chunk);
        loop {
            match dec.decode(&mut derp, |_| {}) {
                Ok(Decoded::Data(0)) => break,
                Ok(Decoded::Data(_)) => {}
                Ok(Decoded::Closed) | Err(_) => break 'feed,
            }
            while let Ok(Some(_)) = frame::decode_frame(&mut derp, client_frame_limit) {}
        }
    }
});

//! Any byte stream through the DERP frame decoder (both directions' limits),
//! each complete frame through `ClientFrame::parse` and `ServerFrame::parse`.
//! The first byte picks a read size so partial headers are exercised too.
#![no_main]

use bytes::BytesMut;
use derp_relay::protocol::frame::{
    self, ClientFrame, ServerFrame, client_frame_limit, server_frame_limit,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    for limit in [client_frame_limit as fn(u8) -> usize, server_frame_limit] {
        let mut buf = BytesMut::new();
        'feed: for chunk in stream.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                match frame::decode_frame(&mut buf, limit) {
                    Ok(Some(f)) => {
                        let _ = ClientFrame::parse(f.clone());
                        let _ = ServerFrame::parse(f);
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
});

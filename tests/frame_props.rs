//! Property tests of the DERP frame decoder (and, at the end, of the
//! WebSocket frame decoder under it): however a byte stream is cut
//! into reads, it decodes to the same frames and the same error as when it
//! arrives at once, and nothing a peer sends makes the decoder or the frame
//! parsers panic. Bounded (a few hundred cases of a few KiB) so it runs in
//! the normal `cargo test`.

mod common;

use bytes::BytesMut;
use derp_relay::protocol::frame::{
    self, ClientFrame, FrameError, RawFrame, ServerFrame, client_frame_limit, server_frame_limit,
};
use proptest::prelude::*;

/// What decoding a stream produced: the frames, then the first error (if
/// any), then the bytes still buffered (when there was no error).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<RawFrame>,
    error: Option<FrameError>,
    rest: Vec<u8>,
}

type Limit = fn(u8) -> usize;

/// Drains every complete frame from `buf`; `Err` stops decoding for good.
fn drain(buf: &mut BytesMut, limit: Limit, out: &mut Outcome) -> bool {
    loop {
        match frame::decode_frame(buf, limit) {
            Ok(Some(f)) => {
                // Parsing a decoded frame must not panic either; its result
                // is not part of the comparison.
                let _ = ClientFrame::parse(f.clone());
                let _ = ServerFrame::parse(f.clone());
                out.frames.push(f);
            }
            Ok(None) => return true,
            Err(e) => {
                out.error = Some(e);
                return false;
            }
        }
    }
}

fn decode_chunked(stream: &[u8], cuts: &[usize], limit: Limit) -> Outcome {
    let mut out = Outcome {
        frames: Vec::new(),
        error: None,
        rest: Vec::new(),
    };
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut sizes = cuts.iter().copied().cycle();
    while at < stream.len() {
        let n = sizes.next().unwrap_or(stream.len()).max(1);
        let end = (at + n).min(stream.len());
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        if !drain(&mut buf, limit, &mut out) {
            return out;
        }
    }
    out.rest = buf.to_vec();
    out
}

fn decode_at_once(stream: &[u8], limit: Limit) -> Outcome {
    decode_chunked(stream, &[stream.len().max(1)], limit)
}

/// Streams that look like DERP: mostly well-formed frames of every type
/// (with lengths around the limits), some junk and truncated headers.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        // A frame with a real payload.
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(t, p)| {
            let mut v = vec![t];
            v.extend_from_slice(&(p.len() as u32).to_be_bytes());
            v.extend_from_slice(&p);
            v
        }),
        // Known types with their exact payload sizes, so parse() sees real shapes.
        (
            prop::sample::select(vec![
                0x01u8, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x10, 0x11, 0x12,
                0x13, 0x14, 0x15,
            ]),
            prop::sample::select(vec![0usize, 1, 8, 9, 31, 32, 33, 40, 64, 65]),
            any::<u8>()
        )
            .prop_map(|(t, n, fill)| {
                let mut v = vec![t];
                v.extend_from_slice(&(n as u32).to_be_bytes());
                v.extend(std::iter::repeat_n(fill, n));
                v
            }),
        // A header announcing anything (often over a limit), without its body.
        (any::<u8>(), any::<u32>()).prop_map(|(t, n)| {
            let mut v = vec![t];
            v.extend_from_slice(&n.to_be_bytes());
            v
        }),
        // Junk.
        proptest::collection::vec(any::<u8>(), 0..12),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|ps| ps.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn chunking_does_not_change_what_a_stream_decodes_to(
        s in stream(),
        cuts in proptest::collection::vec(1usize..64, 1..8),
    ) {
        for limit in [client_frame_limit as Limit, server_frame_limit as Limit] {
            let whole = decode_at_once(&s, limit);
            prop_assert_eq!(&decode_chunked(&s, &cuts, limit), &whole);
            // Byte by byte too: the worst case for partial headers.
            prop_assert_eq!(&decode_chunked(&s, &[1], limit), &whole);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        s in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(1usize..300, 1..6),
    ) {
        for limit in [client_frame_limit as Limit, server_frame_limit as Limit] {
            let whole = decode_at_once(&s, limit);
            prop_assert_eq!(&decode_chunked(&s, &cuts, limit), &whole);
        }
    }

    #[test]
    fn an_oversized_header_fails_before_its_body(t in any::<u8>(), extra in 1u32..1 << 20) {
        let limit = client_frame_limit(t);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[t]);
        buf.extend_from_slice(&(limit as u32).saturating_add(extra).to_be_bytes());
        let is_too_large = matches!(
            frame::decode_frame(&mut buf, client_frame_limit),
            Err(FrameError::TooLarge { .. })
        );
        prop_assert!(is_too_large);
    }
}

// ------------------------------------------- WebSocket frames (conn::ws)

use common::ws_client_frame;
use derp_relay::protocol::ws::{ANY_LENGTH, Decoded, WsDecoder};

/// Feeds `stream` to a decoder `cuts` bytes at a time: the DERP bytes, the
/// pings' payloads, and whether it ended in a close or an error.
///
/// With `drain`, the DERP bytes are taken out after every call, as the
/// relay's reader does when it has parsed whole frames.
fn ws_decode(
    stream: &[u8],
    cuts: &[usize],
    drain: bool,
) -> (Vec<u8>, Vec<Vec<u8>>, Option<String>) {
    let mut dec = WsDecoder::new(ANY_LENGTH);
    let (mut derp, mut pings) = (BytesMut::new(), Vec::new());
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = cuts.iter().copied().cycle();
    while at < stream.len() {
        let end = (at + sizes.next().unwrap_or(1).max(1)).min(stream.len());
        dec.input().extend_from_slice(&stream[at..end]);
        at = end;
        loop {
            let r = dec.decode(&mut derp, |p| pings.push(p.to_vec()));
            if drain || r.is_err() || matches!(r, Ok(Decoded::Closed)) {
                out.extend_from_slice(&derp.split());
            }
            match r {
                Ok(Decoded::Data(0)) => break,
                Ok(Decoded::Data(_)) => {}
                Ok(Decoded::Closed) => return (out, pings, Some("closed".into())),
                Err(e) => return (out, pings, Some(e.to_string())),
            }
        }
    }
    out.extend_from_slice(&derp);
    (out, pings, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn websocket_fragments_and_pings_decode_to_the_same_bytes_at_any_cut(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        splits in proptest::collection::vec(0usize..4096, 0..12),
        ends in proptest::collection::vec(any::<bool>(), 13),
        pings in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..=125), 0..4),
        masks in proptest::collection::vec(any::<[u8; 4]>(), 17),
        cuts in proptest::collection::vec(1usize..300, 1..8),
    ) {
        let mut at: Vec<usize> = splits.into_iter().map(|s| s.min(data.len())).collect();
        at.push(0);
        at.push(data.len());
        at.sort_unstable();
        at.dedup();
        let mut stream = Vec::new();
        let mut in_message = false;
        let pieces: Vec<_> = at.windows(2).collect();
        for (i, w) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let fin = last || ends[i];
            let opcode = if in_message { 0x0 } else { 0x2 };
            ws_client_frame(&mut stream, fin, opcode, masks[i], &data[w[0]..w[1]]);
            in_message = !fin;
            // Control frames may come between the fragments of a message.
            if let Some(p) = pings.get(i) {
                ws_client_frame(&mut stream, true, 0x9, masks[16], p);
            }
        }
        let pings_sent: Vec<Vec<u8>> = pings.iter().take(pieces.len()).cloned().collect();
        for c in [&cuts[..], &[1], &[stream.len().max(1)]] {
            for drain in [false, true] {
                let (derp, got_pings, end) = ws_decode(&stream, c, drain);
                prop_assert_eq!(&derp, &data);
                prop_assert_eq!(&got_pings, &pings_sent);
                prop_assert_eq!(end, None);
            }
        }
    }

    #[test]
    fn websocket_decoder_takes_anything_without_panicking(
        frames in proptest::collection::vec(
            (any::<u8>(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200), any::<[u8; 4]>()),
            0..10,
        ),
        junk in proptest::collection::vec(any::<u8>(), 0..16),
        cuts in proptest::collection::vec(1usize..64, 1..6),
    ) {
        // Headers with any first byte (reserved bits, every opcode) and the
        // mask bit mostly set, so decoding gets past the first check.
        let mut stream = Vec::new();
        for (b0, masked, payload, mask) in &frames {
            let mut f = Vec::new();
            ws_client_frame(&mut f, b0 & 0x80 != 0, b0 & 0x7f, *mask, payload);
            if !masked {
                f[1] &= 0x7f;
            }
            stream.extend_from_slice(&f);
        }
        stream.extend_from_slice(&junk);
        // However it is cut, it decodes to the same outcome.
        let whole = ws_decode(&stream, &[stream.len().max(1)], false);
        for drain in [false, true] {
            prop_assert_eq!(ws_decode(&stream, &cuts, drain), whole.clone());
            prop_assert_eq!(ws_decode(&stream, &[1], drain), whole.clone());
        }
    }
}

//! Property tests of the DERP frame decoder: however a byte stream is cut
//! into reads, it decodes to the same frames and the same error as when it
//! arrives at once, and nothing a peer sends makes the decoder or the frame
//! parsers panic. Bounded (a few hundred cases of a few KiB) so it runs in
//! the normal `cargo test`.

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

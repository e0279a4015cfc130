//! The body of the `frame_decoder` fuzz target, shared with the stable test
//! `proto/tests/amqp_fuzz_stable.rs` so CI runs the same checks without nightly.
//!
//! The first input octet picks the decoder's configuration; the rest is the byte stream.
//! Checks, beyond "no panic":
//! - decoding the stream at once and in small chunks gives the same results
//!   (the decoder is incremental and `Ok(None)` consumes nothing);
//! - every decoded frame encodes, and decoding that encoding gives the same octets again;
//! - a fatal error stops the decoder for good;
//! - the content assembler accepts any frame sequence without panicking.

use std::collections::HashMap;

use bytes::BytesMut;
use warren_proto::amqp::{ContentAssembler, Frame, FrameDecoder, FrameError, encode_frame};

/// One decoder outcome: a frame's canonical encoding, or an error.
type Outcome = Result<Vec<u8>, FrameError>;

fn canonical(frame: &Frame) -> Vec<u8> {
    let mut first = BytesMut::new();
    encode_frame(frame, &mut first).expect("a decoded frame must encode");
    let mut decoder = if matches!(frame, Frame::ProtocolHeader(_)) {
        FrameDecoder::new()
    } else {
        FrameDecoder::without_protocol_header(0)
    };
    let mut again = first.clone();
    let decoded = decoder
        .decode(&mut again)
        .expect("an encoded frame must decode")
        .expect("an encoded frame is complete");
    assert!(
        again.is_empty(),
        "encoding of {frame:?} has trailing octets"
    );
    let mut second = BytesMut::new();
    encode_frame(&decoded, &mut second).expect("a decoded frame must encode");
    assert_eq!(first, second, "encoding is not stable for {frame:?}");
    first.to_vec()
}

fn drain(
    decoder: &mut FrameDecoder,
    buf: &mut BytesMut,
    out: &mut Vec<Outcome>,
    frames: &mut Vec<Frame>,
) -> bool {
    loop {
        let before = buf.len();
        match decoder.decode(buf) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "a frame must consume input");
                out.push(Ok(canonical(&frame)));
                frames.push(frame);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) must consume nothing");
                return true;
            }
            Err(error) => {
                let fatal = error.is_fatal();
                out.push(Err(error.clone()));
                if fatal {
                    assert_eq!(decoder.decode(buf).err(), Some(error), "fatal errors stick");
                    return false;
                }
            }
        }
    }
}

fn decoder_for(control: u8) -> FrameDecoder {
    let frame_max = match control & 3 {
        0 => 0,
        1 => 8192,
        2 => 131_072,
        _ => 64,
    };
    if control & 4 != 0 {
        let mut decoder = FrameDecoder::new();
        decoder.set_frame_max(frame_max);
        decoder
    } else {
        FrameDecoder::without_protocol_header(frame_max)
    }
}

/// Runs every check on one input; returns how many frames and errors the decoder produced.
pub fn run(data: &[u8]) -> (usize, usize) {
    let Some((&control, input)) = data.split_first() else {
        return (0, 0);
    };
    let chunk = usize::from(control >> 3) + 1;

    let mut whole = Vec::new();
    let mut frames = Vec::new();
    let mut decoder = decoder_for(control);
    let mut buf = BytesMut::from(input);
    drain(&mut decoder, &mut buf, &mut whole, &mut frames);

    let mut pieces = Vec::new();
    let mut ignored = Vec::new();
    let mut decoder = decoder_for(control);
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        if !drain(&mut decoder, &mut buf, &mut pieces, &mut ignored) {
            break;
        }
    }
    assert_eq!(whole, pieces, "chunked decoding differs (chunk {chunk})");
    let errors = whole.iter().filter(|outcome| outcome.is_err()).count();
    let decoded = whole.len() - errors;

    let mut channels: HashMap<u16, ContentAssembler> = HashMap::new();
    for frame in frames {
        if matches!(frame, Frame::ProtocolHeader(_) | Frame::Heartbeat) {
            continue;
        }
        let assembler = channels
            .entry(frame.channel())
            .or_insert_with(|| ContentAssembler::new(1 << 20));
        if let Err(error) = assembler.push(frame) {
            assert!(!error.reply_text().as_str().is_empty());
            assert!(!assembler.is_in_progress(), "an error resets the assembler");
        }
    }
    (decoded, errors)
}

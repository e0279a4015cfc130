//! Every truncation of a valid stream is "incomplete", never an error or a panic.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::*;
use warren_proto::amqp::{Frame, FrameDecoder, encode_frame};

/// The stream's frame boundaries: the end offset of the protocol header and of each frame.
fn boundaries() -> Vec<usize> {
    let mut ends = vec![8];
    let mut end = 8;
    for frame in sample_frames() {
        let mut buf = BytesMut::new();
        encode_frame(&frame, &mut buf).unwrap();
        end += buf.len();
        ends.push(end);
    }
    ends
}

#[test]
fn every_prefix_decodes_exactly_the_complete_frames() {
    let stream = sample_stream();
    let ends = boundaries();
    assert_eq!(*ends.last().unwrap(), stream.len());
    let all = decode_all(&mut FrameDecoder::new(), &stream);
    for cut in 0..=stream.len() {
        let mut decoder = FrameDecoder::new();
        let mut buf = BytesMut::from(&stream[..cut]);
        let mut frames = Vec::new();
        loop {
            let before = buf.clone();
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) consumed input at cut {cut}");
                    break;
                }
                Err(e) => panic!("prefix of {cut} octets gave an error: {e}"),
            }
        }
        let complete = ends.iter().filter(|&&end| end <= cut).count();
        assert_eq!(frames, all[..complete], "prefix of {cut} octets");
        // The rest of the stream completes the decoding.
        buf.extend_from_slice(&stream[cut..]);
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            frames.push(frame);
        }
        assert_eq!(frames, all, "prefix of {cut} octets then the rest");
        assert!(buf.is_empty());
    }
}

#[test]
fn octet_by_octet_feeding_yields_the_same_frames() {
    let stream = sample_stream();
    let mut decoder = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for &octet in &stream {
        buf.extend_from_slice(&[octet]);
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            frames.push(frame);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(
        frames[0],
        Frame::ProtocolHeader(warren_proto::amqp::ProtocolVersion::amqp_0_9_1())
    );
    assert_eq!(frames[1..], sample_frames()[..]);
}

#[test]
fn every_truncation_of_every_method_is_incomplete() {
    for method in all_methods() {
        let wire = method_frame(1, &method);
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let result = FrameDecoder::without_protocol_header(0).decode(&mut buf);
            assert!(
                matches!(result, Ok(None)),
                "{method:?} cut at {cut}: {result:?}"
            );
            assert_eq!(buf.len(), cut);
        }
    }
}

#[test]
fn truncated_protocol_header_is_incomplete() {
    for cut in 0..8 {
        let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09\x01"[..cut]);
        assert!(matches!(FrameDecoder::new().decode(&mut buf), Ok(None)));
        assert!(matches!(
            warren_proto::amqp::decode_protocol_header(&mut buf),
            Ok(None)
        ));
        assert_eq!(buf.len(), cut);
    }
}

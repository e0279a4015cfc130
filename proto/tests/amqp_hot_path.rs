//! The per-message fast encoders produce exactly what the generated encoders produce.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::*;
use warren_proto::amqp::{
    AMQPClass, ContentHeader, Frame, FrameDecoder, MessageBody, basic, encode_ack,
    encode_body_frames, encode_content, encode_content_header_raw, encode_deliver, encode_nack,
};

#[test]
fn deliver_matches_the_generated_encoder() {
    let long = "x".repeat(255);
    for (tag, exchange, key) in [
        ("ctag", "ex", "rk"),
        ("", "", ""),
        (&long[..], &long[..], &long[..]),
    ] {
        for redelivered in [false, true] {
            for delivery_tag in [0, 1, u64::MAX] {
                let mut fast = BytesMut::new();
                encode_deliver(7, tag, delivery_tag, redelivered, exchange, key, &mut fast)
                    .unwrap();
                let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: tag.into(),
                    delivery_tag,
                    redelivered,
                    exchange: exchange.into(),
                    routing_key: key.into(),
                }));
                assert_eq!(fast.to_vec(), method_frame(7, &method));
            }
        }
    }
    let too_long = "x".repeat(256);
    assert!(encode_deliver(1, &too_long, 1, false, "", "", &mut BytesMut::new()).is_err());
}

#[test]
fn ack_and_nack_match_the_generated_encoder() {
    for multiple in [false, true] {
        for delivery_tag in [1, 1 << 40] {
            let mut fast = BytesMut::new();
            encode_ack(3, delivery_tag, multiple, &mut fast);
            let ack = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag,
                multiple,
            }));
            assert_eq!(fast.to_vec(), method_frame(3, &ack));
            for requeue in [false, true] {
                let mut fast = BytesMut::new();
                encode_nack(3, delivery_tag, multiple, requeue, &mut fast);
                let nack = AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag,
                    multiple,
                    requeue,
                }));
                assert_eq!(fast.to_vec(), method_frame(3, &nack));
            }
        }
    }
}

#[test]
fn raw_content_matches_the_generic_content_encoder() {
    // A header as a publisher sent it, decoded; its raw properties re-sent by the fast path.
    let publish = method_by_ids(60, 40);
    let body: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
    let mut wire = BytesMut::new();
    let header = ContentHeader::new(body.len() as u64, full_properties());
    encode_content(
        1,
        &publish,
        &header,
        &MessageBody::from(body.clone()),
        4096,
        &mut wire,
    )
    .unwrap();
    let frames = decode_all(&mut FrameDecoder::without_protocol_header(0), &wire);
    let Frame::Header {
        header: decoded, ..
    } = &frames[1]
    else {
        panic!("no header")
    };
    let raw = decoded.raw_properties().unwrap();

    let mut fast = BytesMut::new();
    let deliver = method_by_ids(60, 60);
    warren_proto::amqp::encode_method(2, &deliver, &mut fast).unwrap();
    encode_content_header_raw(2, body.len() as u64, raw, &mut fast).unwrap();
    encode_body_frames(2, &body, 4096, &mut fast);

    let mut generic = BytesMut::new();
    encode_content(
        2,
        &deliver,
        decoded,
        &MessageBody::from(body),
        4096,
        &mut generic,
    )
    .unwrap();
    assert_eq!(fast, generic);
}

#[test]
fn body_frames_follow_frame_max() {
    let mut buf = BytesMut::new();
    encode_body_frames(1, &[], 4096, &mut buf);
    assert!(buf.is_empty());
    encode_body_frames(1, &[1; 4088 * 2 + 1], 4096, &mut buf);
    let frames = decode_all(&mut FrameDecoder::without_protocol_header(4096), &buf);
    let sizes: Vec<usize> = frames
        .iter()
        .map(|f| match f {
            Frame::Body { payload, .. } => payload.len(),
            _ => panic!("not a body"),
        })
        .collect();
    assert_eq!(sizes, [4088, 4088, 1]);
}

/// The generated parser's verdict on a method payload, for comparison.
fn generic(payload: &[u8]) -> Option<AMQPClass> {
    match amq_protocol::protocol::parse_class(payload) {
        Ok(([], method)) => Some(method),
        _ => None,
    }
}

#[test]
fn hot_decoders_agree_with_the_generated_parser() {
    let mut state = 0x0407_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut checked = (0, 0);
    for method_id in [40u16, 80, 90, 120] {
        for _ in 0..3000 {
            let mut payload = vec![0, 60];
            payload.extend_from_slice(&method_id.to_be_bytes());
            if method_id == 40 {
                payload.extend_from_slice(&[0, 0]);
                for _ in 0..2 {
                    let len = (next() % 6) as u8;
                    // Declared length sometimes off by one either way.
                    let declared = match next() % 8 {
                        0 => len.wrapping_add(1),
                        1 => len.wrapping_sub(1),
                        _ => len,
                    };
                    payload.push(declared);
                    for _ in 0..len {
                        // Mostly ASCII, sometimes invalid UTF-8 or multi-octet sequences.
                        payload.push(match next() % 10 {
                            0 => 0xFF,
                            1 => 0xC3,
                            2 => 0xA9,
                            _ => b'a' + (next() % 26) as u8,
                        });
                    }
                }
            } else {
                for _ in 0..8 {
                    payload.push(next() as u8);
                }
            }
            // Flag octet: usually present, sometimes missing or doubled.
            match next() % 6 {
                0 => {}
                1 => payload.extend_from_slice(&[next() as u8, next() as u8]),
                _ => payload.push(next() as u8),
            }
            let expected = generic(&payload);
            let decoded = FrameDecoder::without_protocol_header(0)
                .decode(&mut BytesMut::from(&raw_frame(1, 1, &payload)[..]));
            match (&expected, decoded) {
                (Some(method), Ok(Some(Frame::Method { method: got, .. }))) => {
                    assert_eq!(&got, method);
                    checked.0 += 1;
                }
                (None, Err(warren_proto::amqp::FrameError::MalformedMethod { .. })) => {
                    checked.1 += 1;
                }
                (expected, got) => panic!("{payload:?}: generated {expected:?}, hot {got:?}"),
            }
        }
    }
    assert!(checked.0 > 3000 && checked.1 > 3000, "{checked:?}");
}

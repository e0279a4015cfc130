//! Malformed input: each fault gives the reply RabbitMQ gives.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::*;
use warren_proto::amqp::{
    FRAME_MIN_SIZE, Frame, FrameDecoder, FrameError, PROTOCOL_HEADER, ProtocolVersion, ReplyCode,
    decode_protocol_header,
};

fn decode_one(wire: &[u8]) -> Result<Option<Frame>, FrameError> {
    FrameDecoder::without_protocol_header(0).decode(&mut BytesMut::from(wire))
}

fn error_of(wire: &[u8]) -> FrameError {
    decode_one(wire).unwrap_err()
}

#[test]
fn protocol_headers_rabbitmq_accepts() {
    let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09\x01rest"[..]);
    assert_eq!(
        decode_protocol_header(&mut buf).unwrap(),
        Some(ProtocolVersion::amqp_0_9_1())
    );
    assert_eq!(&buf[..], b"rest");
    // The AMQP 0-9 header is served as 0-9-1.
    let mut buf = BytesMut::from(&b"AMQP\x01\x01\x00\x09"[..]);
    let version = decode_protocol_header(&mut buf).unwrap().unwrap();
    assert_eq!((version.major, version.minor), (0, 9));
}

#[test]
fn bad_protocol_headers_are_refused() {
    for header in [
        &b"GET / HT"[..],                            // HTTP
        &[0x16, 0x03, 0x01, 0x00, 0xA5, 0x01, 0, 0], // TLS client hello
        b"AMQP\x00\x00\x08\x00",                     // AMQP 0-8
        b"AMQP\x00\x00\x09\x00",                     // wrong revision
        b"AMQP\x00\x01\x00\x00",                     // AMQP 1.0 (no SASL)
        b"AMQP\x03\x01\x00\x00",                     // AMQP 1.0 SASL
        b"\x01\x00\x00\x00\x00\x00\x04\x00",         // a frame instead of the header
    ] {
        let mut buf = BytesMut::from(header);
        let error = FrameDecoder::new().decode(&mut buf).unwrap_err();
        assert_eq!(
            error,
            FrameError::BadProtocolHeader {
                received: header.try_into().unwrap()
            }
        );
        assert!(error.is_fatal());
    }
    assert_eq!(&PROTOCOL_HEADER, b"AMQP\x00\x00\x09\x01");
}

#[test]
fn frame_max_is_enforced_before_the_payload_arrives() {
    // Only the 7-octet header of a frame announcing 4 GiB: refused at once, nothing reserved.
    let mut buf = BytesMut::with_capacity(7);
    buf.extend_from_slice(&[3, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF]);
    let capacity = buf.capacity();
    let mut decoder = FrameDecoder::without_protocol_header(131_072);
    let error = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(
        error,
        FrameError::FrameTooLarge {
            frame_type: 3,
            channel: 1,
            size: u32::MAX,
            frame_max: 131_072
        }
    );
    assert_eq!(buf.capacity(), capacity);
    assert_eq!(buf.len(), 7);
    assert!(error.is_fatal());
    assert_eq!(error.reply_code(), ReplyCode::FrameError);
    assert_eq!(
        error.reply_text().as_str(),
        "FRAME_ERROR - type 3, all octets = <<>>: {frame_too_large,4294967295,131064}"
    );
    // The decoder stays failed: the stream is out of sync.
    buf.clear();
    buf.extend_from_slice(&heartbeat_bytes());
    assert_eq!(decoder.decode(&mut buf).unwrap_err(), error);
}

#[test]
fn payload_may_reach_frame_max_but_not_exceed_it() {
    // RabbitMQ tolerates payloads up to frame_max itself (clients forget the 8 octets).
    let mut decoder = FrameDecoder::new();
    let mut buf = BytesMut::from(&PROTOCOL_HEADER[..]);
    assert!(matches!(
        decoder.decode(&mut buf),
        Ok(Some(Frame::ProtocolHeader(_)))
    ));
    assert_eq!(decoder.frame_max(), FRAME_MIN_SIZE);
    buf.extend_from_slice(&raw_frame(3, 1, &vec![0; FRAME_MIN_SIZE as usize]));
    assert!(matches!(
        decoder.decode(&mut buf),
        Ok(Some(Frame::Body { .. }))
    ));
    buf.extend_from_slice(&raw_frame(3, 1, &vec![0; FRAME_MIN_SIZE as usize + 1]));
    assert!(matches!(
        decoder.clone().decode(&mut buf),
        Err(FrameError::FrameTooLarge {
            size: 8193,
            frame_max: 8192,
            ..
        })
    ));
    decoder.set_frame_max(131_072);
    assert!(matches!(
        decoder.decode(&mut buf),
        Ok(Some(Frame::Body { .. }))
    ));
}

#[test]
fn bad_frame_end_is_fatal() {
    let mut wire = heartbeat_bytes();
    *wire.last_mut().unwrap() = 0;
    let error = error_of(&wire);
    assert_eq!(
        error,
        FrameError::BadFrameEnd {
            frame_type: 8,
            channel: 0,
            found: 0,
            snippet: "all octets = <<>>".into()
        }
    );
    assert!(error.is_fatal());
    assert_eq!(
        error.reply_text().as_str(),
        "FRAME_ERROR - type 8, all octets = <<>>: {invalid_frame_end_marker,0}"
    );
    let mut wire = raw_frame(3, 1, b"0123456789abcdefXYZ");
    *wire.last_mut().unwrap() = 0xCD;
    assert_eq!(
        error_of(&wire).to_string(),
        "type 3, first 16 octets = <<\"0123456789abcdef\">>: {invalid_frame_end_marker,205}"
    );
}

#[test]
fn unknown_frame_types_and_bad_heartbeats_are_frame_errors() {
    let error = error_of(&raw_frame(9, 0, &[1, 2]));
    assert_eq!(error.reply_code(), ReplyCode::FrameError);
    assert_eq!(
        error.to_string(),
        "type 9, all octets = <<1,2>>: unknown_frame"
    );
    assert!(!error.is_fatal());
    // A heartbeat with a payload.
    let error = error_of(&raw_frame(8, 0, &[0]));
    assert!(matches!(
        error,
        FrameError::UnknownFrame { frame_type: 8, .. }
    ));
    // Method and header payloads too short for their fixed fields.
    assert!(matches!(
        error_of(&raw_frame(1, 1, &[0, 60, 0])),
        FrameError::UnknownFrame { .. }
    ));
    assert!(matches!(
        error_of(&raw_frame(2, 1, &[0; 11])),
        FrameError::UnknownFrame { .. }
    ));
}

#[test]
fn frames_on_the_wrong_channel_are_unexpected() {
    let error = error_of(&raw_frame(8, 1, &[]));
    assert_eq!(error.reply_code(), ReplyCode::UnexpectedFrame);
    assert_eq!(
        error.reply_text().as_str(),
        "UNEXPECTED_FRAME - type 8, all octets = <<>>"
    );
    assert!(matches!(
        error_of(&raw_frame(3, 0, b"x")),
        FrameError::UnexpectedFrame { .. }
    ));
    let header = [0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert!(matches!(
        error_of(&raw_frame(2, 0, &header)),
        FrameError::UnexpectedFrame { .. }
    ));
}

#[test]
fn unknown_method_ids_are_not_implemented() {
    for (class_id, method_id) in [(60u16, 999u16), (99, 10), (0, 0), (10, 12), (65535, 65535)] {
        let mut payload = class_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&method_id.to_be_bytes());
        payload.extend_from_slice(&[0; 8]);
        let error = error_of(&raw_frame(1, 1, &payload));
        assert_eq!(
            error,
            FrameError::UnknownMethod {
                channel: 1,
                class_id,
                method_id
            }
        );
        assert_eq!(error.reply_code(), ReplyCode::NotImplemented);
        assert_eq!(error.method_ids(), (class_id, method_id));
        assert!(!error.is_fatal());
    }
}

#[test]
fn rabbitmq_only_methods_are_command_invalid() {
    for method_id in [200u16, 201, 202] {
        let mut payload = vec![0, 60];
        payload.extend_from_slice(&method_id.to_be_bytes());
        let error = error_of(&raw_frame(1, 1, &payload));
        assert_eq!(error.reply_code(), ReplyCode::CommandInvalid);
        assert_eq!(
            error.reply_text().as_str(),
            "COMMAND_INVALID - unimplemented method"
        );
    }
}

#[test]
fn every_known_method_is_recognised_even_when_its_arguments_are_bad() {
    for (class_id, method_id, name) in RABBITMQ_METHODS {
        if class_id == 60 && method_id >= 200 {
            continue;
        }
        // 100 octets of 0xFF: no method's arguments decode from that (lengths run past
        // the end, or octets are left over).
        let mut payload = class_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&method_id.to_be_bytes());
        payload.extend_from_slice(&[0xFF; 100]);
        let error = error_of(&raw_frame(1, 1, &payload));
        assert!(
            matches!(error, FrameError::MalformedMethod { .. }),
            "{name}: {error:?}"
        );
        assert_eq!(error.method_ids(), (class_id, method_id), "{name}");
        assert_eq!(error.reply_code(), ReplyCode::FrameError, "{name}");
    }
}

#[test]
fn malformed_method_arguments_are_frame_errors() {
    let publish = method_frame(1, &method_by_ids(60, 40));
    let payload = &publish[7..publish.len() - 1];
    // Trailing octet.
    let mut longer = payload.to_vec();
    longer.push(0);
    let error = error_of(&raw_frame(1, 1, &longer));
    assert!(matches!(
        error,
        FrameError::MalformedMethod {
            class_id: 60,
            method_id: 40,
            ..
        }
    ));
    assert!(
        error
            .reply_text()
            .as_str()
            .starts_with("FRAME_ERROR - cannot decode <<")
    );
    // Truncated arguments inside a complete frame.
    let error = error_of(&raw_frame(1, 1, &payload[..payload.len() - 2]));
    assert!(matches!(error, FrameError::MalformedMethod { .. }));
    // Malformed UTF-8 in a short string (RabbitMQ: "Malformed UTF-8 in shortstr", 501).
    let error = error_of(&raw_frame(1, 1, &[0, 60, 0, 40, 0, 0, 1, 0xFF, 0, 0]));
    assert_eq!(error.reply_code(), ReplyCode::FrameError);
    // A field table with an unknown type tag.
    let error = error_of(&raw_frame(
        1,
        1,
        &[0, 50, 0, 10, 0, 0, 1, b'q', 0, 0, 0, 0, 3, 1, b'k', b'Z'],
    ));
    assert!(matches!(
        error,
        FrameError::MalformedMethod {
            class_id: 50,
            method_id: 10,
            ..
        }
    ));
}

#[test]
fn nonzero_prefetch_size_is_not_implemented() {
    let error = error_of(&raw_frame(1, 3, &[0, 60, 0, 10, 0, 0, 0, 1, 0, 5, 0]));
    assert_eq!(
        error,
        FrameError::PrefetchSizeNotImplemented {
            channel: 3,
            prefetch_size: 1
        }
    );
    assert_eq!(
        error.reply_text().as_str(),
        "NOT_IMPLEMENTED - prefetch_size!=0 (1)"
    );
    assert_eq!(error.method_ids(), (60, 10));
}

#[test]
fn malformed_properties_are_frame_errors() {
    // Flags announce a content-type that is not there.
    let payload = [0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x80, 0];
    let error = error_of(&raw_frame(2, 1, &payload));
    assert!(matches!(
        error,
        FrameError::MalformedProperties {
            channel: 1,
            class_id: 60,
            ..
        }
    ));
    assert_eq!(error.reply_code(), ReplyCode::FrameError);
    // No property flags at all.
    let error = error_of(&raw_frame(2, 1, &payload[..12]));
    assert!(matches!(error, FrameError::MalformedProperties { .. }));
}

#[test]
fn decoding_goes_on_after_a_non_fatal_error() {
    let mut wire = raw_frame(9, 0, &[]);
    wire.extend_from_slice(&heartbeat_bytes());
    let mut decoder = FrameDecoder::without_protocol_header(0);
    let mut buf = BytesMut::from(&wire[..]);
    assert!(decoder.decode(&mut buf).is_err());
    assert_eq!(decoder.decode(&mut buf).unwrap(), Some(Frame::Heartbeat));
}

#[test]
fn reply_texts_are_cut_to_a_short_string() {
    let text = ReplyCode::NotFound.reply_text(&"é".repeat(300));
    assert!(text.as_str().len() <= 255);
    assert!(text.as_str().starts_with("NOT_FOUND - éé"));
}

#[test]
fn reply_codes_match_the_spec() {
    let expected = [
        (200, "OK", false),
        (311, "CONTENT_TOO_LARGE", false),
        (312, "NO_ROUTE", false),
        (313, "NO_CONSUMERS", false),
        (320, "CONNECTION_FORCED", true),
        (402, "INVALID_PATH", true),
        (403, "ACCESS_REFUSED", false),
        (404, "NOT_FOUND", false),
        (405, "RESOURCE_LOCKED", false),
        (406, "PRECONDITION_FAILED", false),
        (501, "FRAME_ERROR", true),
        (502, "SYNTAX_ERROR", true),
        (503, "COMMAND_INVALID", true),
        (504, "CHANNEL_ERROR", true),
        (505, "UNEXPECTED_FRAME", true),
        (506, "RESOURCE_ERROR", true),
        (530, "NOT_ALLOWED", true),
        (540, "NOT_IMPLEMENTED", true),
        (541, "INTERNAL_ERROR", true),
    ];
    for (code, name, hard) in expected {
        let reply = ReplyCode::from_code(code).unwrap();
        assert_eq!(
            (reply.code(), reply.name(), reply.is_hard()),
            (code, name, hard)
        );
        if code != 200 {
            // amq-protocol's generated table agrees on which errors are hard.
            assert_eq!(
                amq_protocol::protocol::AMQPHardError::from_id(code).is_some(),
                hard,
                "{name}"
            );
            assert_eq!(
                amq_protocol::protocol::AMQPSoftError::from_id(code).is_some(),
                !hard,
                "{name}"
            );
        }
    }
    assert_eq!(ReplyCode::from_code(999), None);
}

/// `queue.declare` whose arguments hold `k` = arrays (or tables) nested `depth` deep.
fn deeply_nested_declare(depth: usize, tag: u8) -> Vec<u8> {
    let mut value: Vec<u8> = Vec::new();
    for _ in 0..depth {
        let mut outer = vec![tag];
        let contents = if tag == b'F' && !value.is_empty() {
            [&[1, b'k'][..], &value].concat()
        } else {
            value.clone()
        };
        outer.extend_from_slice(&(contents.len() as u32).to_be_bytes());
        outer.extend_from_slice(&contents);
        value = outer;
    }
    let entry = [&[1, b'k'][..], &value].concat();
    let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    payload.extend_from_slice(&(entry.len() as u32).to_be_bytes());
    payload.extend_from_slice(&entry);
    raw_frame(1, 1, &payload)
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    use warren_proto::amqp::MAX_FIELD_NESTING;
    for tag in [b'A', b'F'] {
        // Thousands of levels in a few kilobytes: would overflow the stack if parsed.
        for depth in [MAX_FIELD_NESTING + 1, 3000] {
            let error = error_of(&deeply_nested_declare(depth, tag));
            assert_eq!(
                error,
                FrameError::NestingTooDeep {
                    channel: 1,
                    class_id: 50,
                    method_id: 10
                }
            );
            assert_eq!(error.reply_code(), ReplyCode::FrameError);
        }
        // The limit itself parses, within a small stack.
        let wire = deeply_nested_declare(MAX_FIELD_NESTING, tag);
        let ok = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || matches!(decode_one(&wire), Ok(Some(Frame::Method { .. }))))
            .unwrap()
            .join()
            .unwrap();
        assert!(ok);
    }
}

#[test]
fn deep_nesting_in_headers_is_refused() {
    let mut value: Vec<u8> = Vec::new();
    for _ in 0..500 {
        let mut outer = vec![b'A'];
        outer.extend_from_slice(&(value.len() as u32).to_be_bytes());
        outer.extend_from_slice(&value);
        value = outer;
    }
    let entry = [&[1, b'k'][..], &value].concat();
    let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0];
    payload.extend_from_slice(&(entry.len() as u32).to_be_bytes());
    payload.extend_from_slice(&entry);
    let error = error_of(&raw_frame(2, 1, &payload));
    assert!(matches!(
        error,
        FrameError::NestingTooDeep { channel: 1, .. }
    ));
}

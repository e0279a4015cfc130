//! Content assembly: the frame sequences RabbitMQ accepts and the errors it gives otherwise.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use warren_proto::amqp::{
    AMQPClass, BasicProperties, Command, ContentAssembler, ContentHeader, DEFAULT_MAX_MESSAGE_SIZE,
    Frame, FrameDecoder, FrameError, MAX_MESSAGE_SIZE_LIMIT, MessageBody, ReplyCode,
    encode_content,
};

fn publish() -> AMQPClass {
    method_by_ids(60, 40)
}

fn method(channel: u16, method: AMQPClass) -> Frame {
    Frame::Method { channel, method }
}

fn header(channel: u16, body_size: u64) -> Frame {
    Frame::Header {
        channel,
        header: Box::new(ContentHeader::new(body_size, BasicProperties::default())),
    }
}

fn body(channel: u16, octets: &'static [u8]) -> Frame {
    Frame::Body {
        channel,
        payload: Bytes::from_static(octets),
    }
}

#[test]
fn methods_without_content_pass_straight_through() {
    let mut assembler = ContentAssembler::default();
    let ack = method_by_ids(60, 80);
    assert_eq!(
        assembler.push(method(1, ack.clone())).unwrap(),
        Some(Command::Method(ack))
    );
    assert!(!assembler.is_in_progress());
}

#[test]
fn publish_header_and_bodies_make_one_message() {
    let mut assembler = ContentAssembler::default();
    assert_eq!(assembler.push(method(1, publish())).unwrap(), None);
    assert!(assembler.is_in_progress());
    assert_eq!(assembler.push(header(1, 10)).unwrap(), None);
    assert_eq!(assembler.push(body(1, b"hello")).unwrap(), None);
    assert_eq!(assembler.buffered(), 5);
    assert_eq!(assembler.push(body(1, b"")).unwrap(), None);
    let Some(Command::Content(content)) = assembler.push(body(1, b"world")).unwrap() else {
        panic!("no message")
    };
    assert_eq!(content.method, publish());
    assert_eq!(content.header.body_size, 10);
    assert_eq!(content.body.to_bytes(), Bytes::from_static(b"helloworld"));
    assert_eq!(
        content.body.chunks().len(),
        2,
        "empty body frames are not kept"
    );
    assert!(!assembler.is_in_progress());
}

#[test]
fn empty_body_completes_at_the_header() {
    let mut assembler = ContentAssembler::default();
    assembler.push(method(1, publish())).unwrap();
    let Some(Command::Content(content)) = assembler.push(header(1, 0)).unwrap() else {
        panic!("no message")
    };
    assert!(content.body.is_empty());
}

#[test]
fn body_or_header_without_a_method_is_unexpected() {
    for frame in [header(1, 1), body(1, b"x")] {
        let error = ContentAssembler::default().push(frame).unwrap_err();
        assert_eq!(error, FrameError::ExpectedMethod { channel: 1 });
        assert_eq!(error.reply_code(), ReplyCode::UnexpectedFrame);
        assert_eq!(error.method_ids(), (0, 0));
        assert_eq!(
            error.reply_text().as_str(),
            "UNEXPECTED_FRAME - expected method frame, got non method frame instead"
        );
    }
}

#[test]
fn body_without_header_is_unexpected() {
    let mut assembler = ContentAssembler::default();
    assembler.push(method(1, publish())).unwrap();
    let error = assembler.push(body(1, b"x")).unwrap_err();
    assert_eq!(
        error.reply_text().as_str(),
        "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
    );
    assert_eq!(error.method_ids(), (60, 40));
    assert!(!assembler.is_in_progress(), "reset after an error");
}

#[test]
fn another_method_instead_of_the_header_is_unexpected() {
    let mut assembler = ContentAssembler::default();
    assembler.push(method(1, publish())).unwrap();
    let error = assembler.push(method(1, publish())).unwrap_err();
    assert!(matches!(error, FrameError::ExpectedHeader { .. }));
}

#[test]
fn header_with_weight_or_wrong_class_is_unexpected() {
    let mut assembler = ContentAssembler::default();
    assembler.push(method(1, publish())).unwrap();
    let mut weighted = ContentHeader::new(1, BasicProperties::default());
    weighted.weight = 1;
    let error = assembler
        .push(Frame::Header {
            channel: 1,
            header: Box::new(weighted),
        })
        .unwrap_err();
    assert!(matches!(error, FrameError::ExpectedHeader { .. }));

    assembler.push(method(1, publish())).unwrap();
    let mut other_class = ContentHeader::new(1, BasicProperties::default());
    other_class.class_id = 50;
    let error = assembler
        .push(Frame::Header {
            channel: 1,
            header: Box::new(other_class),
        })
        .unwrap_err();
    assert_eq!(
        error.reply_text().as_str(),
        "UNEXPECTED_FRAME - expected content header for class 60, got one for class 50 instead"
    );
}

#[test]
fn method_during_a_body_is_unexpected() {
    let mut assembler = ContentAssembler::default();
    assembler.push(method(1, publish())).unwrap();
    assembler.push(header(1, 2)).unwrap();
    assembler.push(body(1, b"x")).unwrap();
    let error = assembler
        .push(method(1, method_by_ids(60, 80)))
        .unwrap_err();
    assert_eq!(
        error.reply_text().as_str(),
        "UNEXPECTED_FRAME - expected content body, got non content body frame instead"
    );
}

#[test]
fn body_longer_than_announced_is_a_frame_error() {
    let mut assembler = ContentAssembler::default();
    assembler.push(method(1, publish())).unwrap();
    assembler.push(header(1, 3)).unwrap();
    assembler.push(body(1, b"ab")).unwrap();
    let error = assembler.push(body(1, b"cd")).unwrap_err();
    assert_eq!(
        error.reply_text().as_str(),
        "FRAME_ERROR - content body frame exceeds remaining content size"
    );
    assert!(error.reply_code().is_hard());
}

#[test]
fn message_over_max_message_size_is_refused_at_the_header() {
    let mut assembler = ContentAssembler::default();
    assert_eq!(assembler.max_message_size(), 134_217_728);
    assembler.push(method(5, publish())).unwrap();
    let error = assembler
        .push(header(5, DEFAULT_MAX_MESSAGE_SIZE + 1))
        .unwrap_err();
    assert_eq!(error.reply_code(), ReplyCode::PreconditionFailed);
    assert!(error.is_channel_error());
    assert_eq!(error.channel(), 5);
    assert_eq!(error.method_ids(), (60, 40));
    assert_eq!(
        error.reply_text().as_str(),
        "PRECONDITION_FAILED - message size 134217729 is larger than configured max size 134217728"
    );
    // Exactly the limit is accepted.
    assembler.push(method(5, publish())).unwrap();
    assert_eq!(
        assembler.push(header(5, DEFAULT_MAX_MESSAGE_SIZE)).unwrap(),
        None
    );
}

#[test]
fn configured_limit_and_absolute_limit() {
    let mut small = ContentAssembler::new(10);
    small.push(method(1, publish())).unwrap();
    assert!(matches!(
        small.push(header(1, 11)).unwrap_err(),
        FrameError::MessageTooLarge {
            size: 11,
            max: 10,
            ..
        }
    ));
    // The configured limit cannot exceed RabbitMQ's absolute 512 MiB.
    let mut huge = ContentAssembler::new(u64::MAX);
    assert_eq!(huge.max_message_size(), MAX_MESSAGE_SIZE_LIMIT);
    huge.push(method(1, publish())).unwrap();
    let error = huge
        .push(header(1, MAX_MESSAGE_SIZE_LIMIT + 1))
        .unwrap_err();
    assert_eq!(error.reply_code(), ReplyCode::FrameError);
    assert_eq!(
        error.reply_text().as_str(),
        "FRAME_ERROR - content body size 536870913 exceeds maximum allowed size 536870912"
    );
    huge.push(method(1, publish())).unwrap();
    let error = huge.push(header(1, u64::MAX)).unwrap_err();
    assert!(matches!(error, FrameError::BodyTooLarge { .. }));
}

#[test]
fn decoder_and_assembler_carry_a_large_message_split_by_frame_max() {
    let frame_max = 4096;
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let properties = full_properties();
    let header = ContentHeader::new(payload.len() as u64, properties.clone());
    let mut wire = BytesMut::new();
    // A body given in uneven fragments still makes frames of exactly frame_max - 8.
    let mut message = MessageBody::new();
    message.push(Bytes::copy_from_slice(&payload[..1]));
    message.push(Bytes::copy_from_slice(&payload[1..70_000]));
    message.push(Bytes::copy_from_slice(&payload[70_000..]));
    encode_content(1, &publish(), &header, &message, frame_max, &mut wire).unwrap();
    let mut decoder = FrameDecoder::without_protocol_header(frame_max);
    let mut assembler = ContentAssembler::default();
    let mut body_frames = Vec::new();
    let mut result = None;
    while let Some(frame) = decoder.decode(&mut wire).unwrap() {
        if let Frame::Body { payload, .. } = &frame {
            body_frames.push(payload.len());
        }
        if let Some(command) = assembler.push(frame).unwrap() {
            result = Some(command);
        }
    }
    let max_chunk = (frame_max - 8) as usize;
    assert_eq!(body_frames.len(), payload.len().div_ceil(max_chunk));
    assert!(
        body_frames[..body_frames.len() - 1]
            .iter()
            .all(|&n| n == max_chunk)
    );
    let Some(Command::Content(content)) = result else {
        panic!("no message")
    };
    assert_eq!(content.body.to_bytes(), Bytes::from(payload));
    assert_eq!(content.header.properties(), &properties);
}

#[test]
fn encode_content_rejects_a_size_mismatch_and_sends_no_body_frame_for_empty_bodies() {
    let mut buf = BytesMut::new();
    let header = ContentHeader::new(3, BasicProperties::default());
    assert!(
        encode_content(
            1,
            &publish(),
            &header,
            &MessageBody::from(&b"ab"[..]),
            0,
            &mut buf
        )
        .is_err()
    );
    let mut buf = BytesMut::new();
    let header = ContentHeader::new(0, BasicProperties::default());
    encode_content(
        1,
        &publish(),
        &header,
        &MessageBody::new(),
        131_072,
        &mut buf,
    )
    .unwrap();
    let frames = decode_all(&mut FrameDecoder::without_protocol_header(0), &buf);
    assert_eq!(frames.len(), 2);
    // frame_max 0: the whole body in one frame, as RabbitMQ does.
    let mut buf = BytesMut::new();
    let body = MessageBody::from(vec![1u8; 300_000]);
    let header = ContentHeader::new(body.len(), BasicProperties::default());
    encode_content(1, &publish(), &header, &body, 0, &mut buf).unwrap();
    assert_eq!(
        decode_all(&mut FrameDecoder::without_protocol_header(0), &buf).len(),
        3
    );
}

#[test]
fn deliver_and_get_ok_carry_content_too() {
    for method_ids in [(60, 60), (60, 71), (60, 50)] {
        let m = method_by_ids(method_ids.0, method_ids.1);
        let wire = content_bytes(2, &m, b"abc", 131_072);
        let frames = decode_all(&mut FrameDecoder::without_protocol_header(0), &wire);
        let mut assembler = ContentAssembler::default();
        let mut out = None;
        for frame in frames {
            out = assembler.push(frame).unwrap();
        }
        let Some(Command::Content(content)) = out else {
            panic!("no content for {method_ids:?}")
        };
        assert_eq!(content.method, m);
    }
}

#[test]
fn errors_build_the_close_rabbitmq_sends() {
    use warren_proto::amqp::{channel as ch, connection};
    // Soft error on channel 5: channel.close on channel 5.
    let mut assembler = ContentAssembler::new(10);
    assembler.push(method(5, publish())).unwrap();
    let error = assembler.push(header(5, 11)).unwrap_err();
    let (on, close) = error.close_method().unwrap();
    assert_eq!(on, 5);
    assert_eq!(
        close,
        AMQPClass::Channel(ch::AMQPMethod::Close(ch::Close {
            reply_code: 406,
            reply_text:
                "PRECONDITION_FAILED - message size 11 is larger than configured max size 10".into(),
            class_id: 60,
            method_id: 40,
        }))
    );
    // Hard error on channel 5: connection.close on channel 0.
    let error = ContentAssembler::default().push(body(5, b"x")).unwrap_err();
    let (on, close) = error.close_method().unwrap();
    assert_eq!(on, 0);
    assert_eq!(
        close,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 505,
            reply_text: "UNEXPECTED_FRAME - expected method frame, got non method frame instead"
                .into(),
            class_id: 0,
            method_id: 0,
        }))
    );
    // A bad protocol header gets no close method.
    let error = FrameError::BadProtocolHeader {
        received: *b"GET / HT",
    };
    assert_eq!(error.close_method(), None);
    // A soft error on channel 0 still closes the connection.
    let (on, close) =
        warren_proto::amqp::close_method(0, ReplyCode::NotFound, "no vhost", (10, 40));
    assert_eq!(on, 0);
    assert!(matches!(close, AMQPClass::Connection(_)));
}

#[test]
fn compact_bodies_do_not_share_the_read_buffer() {
    let wire = raw_frame(3, 1, b"tiny body");
    let mut buf = BytesMut::with_capacity(64 * 1024);
    buf.extend_from_slice(&wire);
    let Some(Frame::Body { payload, .. }) = FrameDecoder::without_protocol_header(0)
        .decode(&mut buf)
        .unwrap()
    else {
        panic!("not a body")
    };
    let body = MessageBody::from(payload.clone());
    assert_eq!(
        body.to_bytes().as_ptr(),
        payload.as_ptr(),
        "to_bytes shares"
    );
    let compact = body.to_compact_bytes();
    assert_eq!(compact, payload);
    assert_ne!(
        compact.as_ptr(),
        payload.as_ptr(),
        "to_compact_bytes copies"
    );
}

#[test]
fn compact_headers_do_not_share_the_read_buffer() {
    let mut wire = BytesMut::new();
    let header = ContentHeader::new(0, full_properties());
    warren_proto::amqp::encode_content_header(1, &header, &mut wire).unwrap();
    let Some(Frame::Header {
        header: mut decoded,
        ..
    }) = FrameDecoder::without_protocol_header(0)
        .decode(&mut wire)
        .unwrap()
    else {
        panic!("not a header")
    };
    let shared = decoded.raw_properties().unwrap().clone();
    decoded.compact();
    let own = decoded.raw_properties().unwrap();
    assert_eq!(own, &shared);
    assert_ne!(own.as_ptr(), shared.as_ptr());
    assert_eq!(*decoded, header);
}

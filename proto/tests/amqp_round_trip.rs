//! Round trips: every method, every frame kind, every field type, all properties.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use warren_proto::amqp::{
    AMQPClass, AMQPValue, BasicProperties, ContentHeader, FieldTable, Frame, FrameDecoder,
    ProtocolVersion, basic, encode_frame,
};

fn round_trip(frame: &Frame) -> Frame {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf).unwrap();
    let mut decoder = FrameDecoder::without_protocol_header(0);
    let decoded = decoder.decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    decoded
}

#[test]
fn generated_table_matches_rabbitmq_method_table() {
    let methods = all_methods();
    let ids: Vec<(u16, u16)> = methods
        .iter()
        .map(|m| (m.get_amqp_class_id(), m.get_amqp_method_id()))
        .collect();
    let expected: Vec<(u16, u16)> = RABBITMQ_METHODS
        .iter()
        .filter(|(c, m, _)| !(*c == 60 && *m >= 200))
        .map(|(c, m, _)| (*c, *m))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "duplicate sample methods");
    let mut expected_sorted = expected.clone();
    expected_sorted.sort_unstable();
    assert_eq!(sorted, expected_sorted);
}

#[test]
fn every_method_round_trips_on_every_channel_kind() {
    for method in all_methods() {
        for channel in [0u16, 1, 65535] {
            let frame = Frame::Method {
                channel,
                method: method.clone(),
            };
            assert_eq!(round_trip(&frame), frame, "{method:?}");
        }
    }
}

#[test]
fn encoding_is_stable_through_a_round_trip() {
    for method in all_methods() {
        let first = method_frame(3, &method);
        let decoded = FrameDecoder::without_protocol_header(0)
            .decode(&mut BytesMut::from(&first[..]))
            .unwrap()
            .unwrap();
        let mut second = BytesMut::new();
        encode_frame(&decoded, &mut second).unwrap();
        assert_eq!(first, second.to_vec(), "{method:?}");
    }
}

#[test]
fn content_header_with_all_properties_round_trips() {
    let header = ContentHeader::new(1 << 40, full_properties());
    let frame = Frame::Header {
        channel: 7,
        header: Box::new(header.clone()),
    };
    let Frame::Header {
        channel,
        header: decoded,
    } = round_trip(&frame)
    else {
        panic!("not a header")
    };
    assert_eq!(channel, 7);
    assert_eq!(decoded.class_id, 60);
    assert_eq!(decoded.weight, 0);
    assert_eq!(decoded.body_size, 1 << 40);
    assert_eq!(decoded.properties(), &full_properties());
    assert!(decoded.raw_properties().is_some());
}

#[test]
fn each_single_property_round_trips() {
    let full = full_properties();
    let singles: Vec<BasicProperties> = vec![
        BasicProperties::default(),
        BasicProperties::default().with_content_type(full.content_type().clone().unwrap()),
        BasicProperties::default().with_content_encoding(full.content_encoding().clone().unwrap()),
        BasicProperties::default().with_headers(all_types_table()),
        BasicProperties::default().with_delivery_mode(1),
        BasicProperties::default().with_priority(9),
        BasicProperties::default().with_correlation_id("x".into()),
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        BasicProperties::default().with_expiration("0".into()),
        BasicProperties::default().with_message_id("id".into()),
        BasicProperties::default().with_timestamp(u64::MAX),
        BasicProperties::default().with_type("kind".into()),
        BasicProperties::default().with_user_id("u".into()),
        BasicProperties::default().with_app_id("a".into()),
        BasicProperties::default().with_cluster_id("c".into()),
    ];
    for properties in singles {
        let frame = Frame::Header {
            channel: 1,
            header: Box::new(ContentHeader::new(3, properties.clone())),
        };
        let Frame::Header { header, .. } = round_trip(&frame) else {
            panic!("not a header")
        };
        assert_eq!(header.properties(), &properties);
    }
}

#[test]
fn raw_properties_are_resent_verbatim() {
    // Hand-made headers table whose key order ("b" before "a"), duplicate key and 'L' type
    // tag a re-serialization would change: flags 0x2000 (headers only), then the table.
    let table: &[u8] = &[
        1, b'b', b'I', 0, 0, 0, 1, //
        1, b'a', b'L', 0, 0, 0, 0, 0, 0, 0, 2, //
        1, b'a', b't', 1,
    ];
    let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0x00];
    payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
    payload.extend_from_slice(table);
    let wire = raw_frame(2, 1, &payload);
    let frame = FrameDecoder::without_protocol_header(0)
        .decode(&mut BytesMut::from(&wire[..]))
        .unwrap()
        .unwrap();
    let Frame::Header { header, .. } = &frame else {
        panic!("not a header")
    };
    let headers = header.properties().headers().clone().unwrap();
    assert_eq!(headers.inner().get("a"), Some(&AMQPValue::Boolean(true)));
    assert_eq!(headers.inner().get("b"), Some(&AMQPValue::LongInt(1)));
    let mut out = BytesMut::new();
    encode_frame(&frame, &mut out).unwrap();
    assert_eq!(out.to_vec(), wire);

    // Replacing the properties re-serializes them.
    let mut changed = (**header).clone();
    changed.set_properties(BasicProperties::default().with_priority(1));
    assert!(changed.raw_properties().is_none());
    let mut out = BytesMut::new();
    encode_frame(
        &Frame::Header {
            channel: 1,
            header: Box::new(changed),
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(&out[7 + 12..out.len() - 1], &[0x08, 0x00, 1]);
}

#[test]
fn field_tables_with_every_type_round_trip() {
    let method = AMQPClass::Queue(warren_proto::amqp::queue::AMQPMethod::Declare(
        warren_proto::amqp::queue::Declare {
            queue: "q".into(),
            arguments: all_types_table(),
            ..Default::default()
        },
    ));
    let frame = Frame::Method { channel: 1, method };
    assert_eq!(round_trip(&frame), frame);
}

#[test]
fn rabbitmq_integer_tags_decode_as_rabbitmq_does() {
    // 'L' (spec: unsigned 64) and 'l' are both signed 64-bit in RabbitMQ; 'U' is accepted as
    // a signed 16-bit like 's'.
    let mut table = Vec::new();
    table.extend_from_slice(&[
        1, b'L', b'L', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    table.extend_from_slice(&[1, b'l', b'l', 0, 0, 0, 0, 0, 0, 0, 5]);
    table.extend_from_slice(&[1, b's', b's', 0xff, 0xfe]);
    table.extend_from_slice(&[1, b'U', b'U', 0xff, 0xfd]);
    let mut args = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    args.extend_from_slice(&(table.len() as u32).to_be_bytes());
    args.extend_from_slice(&table);
    let wire = raw_frame(1, 1, &args);
    let frame = FrameDecoder::without_protocol_header(0)
        .decode(&mut BytesMut::from(&wire[..]))
        .unwrap()
        .unwrap();
    let Frame::Method {
        method: AMQPClass::Queue(warren_proto::amqp::queue::AMQPMethod::Declare(declare)),
        ..
    } = frame
    else {
        panic!("not queue.declare")
    };
    let t: &FieldTable = &declare.arguments;
    assert_eq!(t.inner().get("L"), Some(&AMQPValue::LongLongInt(-1)));
    assert_eq!(t.inner().get("l"), Some(&AMQPValue::LongLongInt(5)));
    assert_eq!(t.inner().get("s"), Some(&AMQPValue::ShortInt(-2)));
    assert_eq!(t.inner().get("U"), Some(&AMQPValue::ShortInt(-3)));
}

#[test]
fn body_heartbeat_and_protocol_header_round_trip() {
    for frame in [
        Frame::Body {
            channel: 9,
            payload: Bytes::from_static(b"payload"),
        },
        Frame::Body {
            channel: 9,
            payload: Bytes::new(),
        },
        Frame::Heartbeat,
    ] {
        assert_eq!(round_trip(&frame), frame);
    }
    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()),
        &mut buf,
    )
    .unwrap();
    let decoded = FrameDecoder::new().decode(&mut buf).unwrap().unwrap();
    assert_eq!(
        decoded,
        Frame::ProtocolHeader(ProtocolVersion::amqp_0_9_1())
    );
}

#[test]
fn sample_stream_decodes_to_the_sample_frames() {
    let frames = decode_all(&mut FrameDecoder::new(), &sample_stream());
    assert_eq!(
        frames[0],
        Frame::ProtocolHeader(ProtocolVersion::amqp_0_9_1())
    );
    assert_eq!(frames[1..], sample_frames()[..]);
}

#[test]
fn body_frames_share_the_read_buffer() {
    let wire = raw_frame(3, 1, &[42u8; 1000]);
    let mut buf = BytesMut::from(&wire[..]);
    let base = buf.as_ptr() as usize;
    let Some(Frame::Body { payload, .. }) = FrameDecoder::without_protocol_header(0)
        .decode(&mut buf)
        .unwrap()
    else {
        panic!("not a body")
    };
    assert_eq!(
        payload.as_ptr() as usize,
        base + 7,
        "the payload was copied"
    );
}

#[test]
fn publish_method_is_content_bearing() {
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish::default()));
    assert!(warren_proto::amqp::method_has_content(&publish));
    let ack = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack::default()));
    assert!(!warren_proto::amqp::method_has_content(&ack));
}

#[test]
fn encoders_append_to_a_buffer_already_holding_frames() {
    let mut shared = BytesMut::from(&b"earlier frames"[..]);
    let mut expected = b"earlier frames".to_vec();
    for method in all_methods() {
        warren_proto::amqp::encode_method(4, &method, &mut shared).unwrap();
        expected.extend_from_slice(&method_frame(4, &method));
    }
    let header = Frame::Header {
        channel: 4,
        header: Box::new(ContentHeader::new(9, full_properties())),
    };
    encode_frame(&header, &mut shared).unwrap();
    let mut alone = BytesMut::new();
    encode_frame(&header, &mut alone).unwrap();
    expected.extend_from_slice(&alone);
    assert_eq!(shared.to_vec(), expected);
}

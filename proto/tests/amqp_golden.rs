//! Golden bytes: hand-checked wire images of frames, decoded and encoded.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::full_properties;
use warren_proto::amqp::{
    AMQPClass, AMQPValue, ContentHeader, FieldTable, Frame, FrameDecoder, LongString, basic,
    connection, encode_frame, encode_heartbeat,
};

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn check(frame: &Frame, wire: &[u8]) {
    let mut out = BytesMut::new();
    encode_frame(frame, &mut out).unwrap();
    assert_eq!(out.to_vec(), wire, "encoding of {frame:?}");
    let mut buf = BytesMut::from(wire);
    let decoded = FrameDecoder::without_protocol_header(0)
        .decode(&mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(&decoded, frame);
    assert!(buf.is_empty());
}

#[test]
fn heartbeat() {
    let wire = [8, 0, 0, 0, 0, 0, 0, 0xCE];
    check(&Frame::Heartbeat, &wire);
    let mut buf = BytesMut::new();
    encode_heartbeat(&mut buf);
    assert_eq!(&buf[..], &wire);
}

#[test]
fn connection_start() {
    let mut server_properties = FieldTable::default();
    server_properties.insert("product".into(), AMQPValue::LongString("Warren".into()));
    let frame = Frame::Method {
        channel: 0,
        method: AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties,
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        })),
    };
    let wire = concat(&[
        &[1, 0, 0, 0, 0, 0, 56], // method frame, channel 0, 56 octets
        &[0, 10, 0, 10],         // connection.start
        &[0, 9],                 // version 0-9
        &[0, 0, 0, 19, 7],       // table of 19 octets; key of 7
        b"product",
        b"S",
        &[0, 0, 0, 6],
        b"Warren",
        &[0, 0, 0, 14],
        b"PLAIN AMQPLAIN",
        &[0, 0, 0, 5],
        b"en_US",
        &[0xCE],
    ]);
    check(&frame, &wire);
}

#[test]
fn connection_tune() {
    let frame = Frame::Method {
        channel: 0,
        method: AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
        })),
    };
    let wire = [
        1, 0, 0, 0, 0, 0, 12, // header
        0, 10, 0, 30, // connection.tune
        0x07, 0xFF, // channel-max 2047
        0, 2, 0, 0, // frame-max 131072
        0, 60, // heartbeat
        0xCE,
    ];
    check(&frame, &wire);
}

#[test]
fn connection_start_ok_with_plain_response() {
    let frame = Frame::Method {
        channel: 0,
        method: AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: LongString::from(b"\0guest\0guest".to_vec()),
            locale: "en_US".into(),
        })),
    };
    let wire = concat(&[
        &[1, 0, 0, 0, 0, 0, 36],
        &[0, 10, 0, 11],
        &[0, 0, 0, 0], // empty client-properties
        &[5],
        b"PLAIN",
        &[0, 0, 0, 12],
        b"\0guest\0guest",
        &[5],
        b"en_US",
        &[0xCE],
    ]);
    check(&frame, &wire);
}

#[test]
fn basic_publish() {
    let frame = Frame::Method {
        channel: 1,
        method: AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "ex".into(),
            routing_key: "rk".into(),
            mandatory: true,
            immediate: false,
        })),
    };
    let wire = [
        1, 0, 1, 0, 0, 0, 13, // method frame, channel 1, 13 octets
        0, 60, 0, 40, // basic.publish
        0, 0, // ticket
        2, b'e', b'x', // exchange
        2, b'r', b'k', // routing key
        0b01, // mandatory=1, immediate=0
        0xCE,
    ];
    check(&frame, &wire);
}

#[test]
fn basic_deliver() {
    let frame = Frame::Method {
        channel: 2,
        method: AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: 258,
            redelivered: true,
            exchange: "".into(),
            routing_key: "q".into(),
        })),
    };
    let wire = [
        1, 0, 2, 0, 0, 0, 18, //
        0, 60, 0, 60, // basic.deliver
        1, b'c', // consumer tag
        0, 0, 0, 0, 0, 0, 1, 2, // delivery tag 258
        1, // redelivered
        0, // exchange ""
        1, b'q', // routing key
        0xCE,
    ];
    check(&frame, &wire);
}

#[test]
fn basic_qos_reserved_prefetch_size_is_zero() {
    let frame = Frame::Method {
        channel: 1,
        method: AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 10,
            global: false,
        })),
    };
    let wire = [
        1, 0, 1, 0, 0, 0, 11, 0, 60, 0, 10, 0, 0, 0, 0, 0, 10, 0, 0xCE,
    ];
    check(&frame, &wire);
}

#[test]
fn content_header_with_all_14_properties() {
    let frame = Frame::Header {
        channel: 1,
        header: Box::new(ContentHeader::new(3, full_properties())),
    };
    let wire = concat(&[
        &[2, 0, 1, 0, 0, 0, 69],   // header frame, channel 1, 69 octets
        &[0, 60],                  // class basic
        &[0, 0],                   // weight
        &[0, 0, 0, 0, 0, 0, 0, 3], // body size
        &[0xFF, 0xFC],             // all 14 property flags
        &[3],
        b"a/b", // content-type
        &[2],
        b"gz",                                    // content-encoding
        &[0, 0, 0, 7, 1, b'k', b'I', 0, 0, 0, 1], // headers {k: I 1}
        &[2],                                     // delivery-mode
        &[5],                                     // priority
        &[1, b'c'],                               // correlation-id
        &[1, b'r'],                               // reply-to
        &[5],
        b"60000",                              // expiration
        &[1, b'm'],                            // message-id
        &[0, 0, 0, 0, 0x65, 0x53, 0xF1, 0x00], // timestamp 1700000000
        &[1, b't'],                            // type
        &[5],
        b"guest", // user-id
        &[3],
        b"app", // app-id
        &[2],
        b"cl", // cluster-id
        &[0xCE],
    ]);
    check(&frame, &wire);
}

#[test]
fn content_header_without_properties_and_body() {
    let frame = Frame::Header {
        channel: 1,
        header: Box::new(ContentHeader::new(0, Default::default())),
    };
    let wire = [
        2, 0, 1, 0, 0, 0, 14, 0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xCE,
    ];
    check(&frame, &wire);
    let body = Frame::Body {
        channel: 1,
        payload: bytes::Bytes::from_static(b"hi"),
    };
    check(&body, &[3, 0, 1, 0, 0, 0, 2, b'h', b'i', 0xCE]);
}

#[test]
fn field_values_use_rabbitmq_type_tags() {
    // One entry per type; the expected octets follow RabbitMQ's rabbit_binary_generator.
    let cases: Vec<(AMQPValue, Vec<u8>)> = vec![
        (AMQPValue::Boolean(true), vec![b't', 1]),
        (AMQPValue::ShortShortInt(-1), vec![b'b', 0xFF]),
        (AMQPValue::ShortShortUInt(200), vec![b'B', 200]),
        (AMQPValue::ShortInt(-2), vec![b's', 0xFF, 0xFE]),
        (AMQPValue::ShortUInt(513), vec![b'u', 2, 1]),
        (AMQPValue::LongInt(-3), vec![b'I', 0xFF, 0xFF, 0xFF, 0xFD]),
        (AMQPValue::LongUInt(4), vec![b'i', 0, 0, 0, 4]),
        (
            AMQPValue::LongLongInt(5),
            vec![b'l', 0, 0, 0, 0, 0, 0, 0, 5],
        ),
        (AMQPValue::Float(1.0), vec![b'f', 0x3F, 0x80, 0, 0]),
        (
            AMQPValue::Double(1.0),
            vec![b'd', 0x3F, 0xF0, 0, 0, 0, 0, 0, 0],
        ),
        (
            AMQPValue::DecimalValue(warren_proto::amqp::DecimalValue { scale: 2, value: 7 }),
            vec![b'D', 2, 0, 0, 0, 7],
        ),
        (
            AMQPValue::LongString("ab".into()),
            vec![b'S', 0, 0, 0, 2, b'a', b'b'],
        ),
        (
            AMQPValue::FieldArray(vec![AMQPValue::Void].into()),
            vec![b'A', 0, 0, 0, 1, b'V'],
        ),
        (AMQPValue::Timestamp(6), vec![b'T', 0, 0, 0, 0, 0, 0, 0, 6]),
        (
            AMQPValue::FieldTable(FieldTable::default()),
            vec![b'F', 0, 0, 0, 0],
        ),
        (
            AMQPValue::ByteArray(vec![9u8].into()),
            vec![b'x', 0, 0, 0, 1, 9],
        ),
        (AMQPValue::Void, vec![b'V']),
    ];
    for (value, octets) in cases {
        let mut table = FieldTable::default();
        table.insert("k".into(), value.clone());
        let properties = warren_proto::amqp::BasicProperties::default().with_headers(table);
        let frame = Frame::Header {
            channel: 1,
            header: Box::new(ContentHeader::new(0, properties)),
        };
        let entry = concat(&[&[1, b'k'], &octets]);
        let payload = concat(&[
            &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0],
            &(entry.len() as u32).to_be_bytes(),
            &entry,
        ]);
        let wire = concat(&[
            &[2, 0, 1],
            &(payload.len() as u32).to_be_bytes(),
            &payload,
            &[0xCE],
        ]);
        check(&frame, &wire);
    }
}

//! Smoke test: a publish round-trips through the encoder, decoder and assembler.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use warren_proto::amqp::{
    AMQPClass, BasicProperties, Command, ContentAssembler, ContentHeader, Frame, FrameDecoder,
    MessageBody, basic, encode_content,
};

#[test]
fn publish_round_trip() {
    let method = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "amq.direct".into(),
        routing_key: "rk".into(),
        mandatory: true,
        immediate: false,
    }));
    let body = MessageBody::from(Bytes::from(vec![7u8; 20_000]));
    let header = ContentHeader::new(body.len(), BasicProperties::default().with_delivery_mode(2));
    let mut buf = BytesMut::new();
    encode_content(1, &method, &header, &body, 8192, &mut buf).unwrap();
    let mut decoder = FrameDecoder::without_protocol_header(8192);
    let mut assembler = ContentAssembler::default();
    let mut out = None;
    let mut frames = 0;
    while let Some(frame) = decoder.decode(&mut buf).unwrap() {
        frames += 1;
        assert!(matches!(
            frame,
            Frame::Method { .. } | Frame::Header { .. } | Frame::Body { .. }
        ));
        if let Some(command) = assembler.push(frame).unwrap() {
            out = Some(command);
        }
    }
    assert_eq!(frames, 2 + 3);
    let Some(Command::Content(content)) = out else {
        panic!("no content")
    };
    assert_eq!(content.method, method);
    assert_eq!(content.body.to_bytes(), body.to_bytes());
    assert_eq!(content.header.properties(), header.properties());
}

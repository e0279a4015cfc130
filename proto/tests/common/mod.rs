//! Sample frames shared by the AMQP codec tests.
#![allow(dead_code, clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use warren_proto::amqp::{
    AMQPClass, AMQPValue, BasicProperties, ByteArray, ContentHeader, DecimalValue, FieldArray,
    FieldTable, Frame, FrameDecoder, LongString, MessageBody, access, basic, channel, confirm,
    connection, encode_content, encode_frame, encode_heartbeat, encode_method, exchange, queue, tx,
};

/// RabbitMQ's AMQP 0-9-1 method table (`rabbit_framing_amqp_0_9_1:lookup_method_name/1`).
pub const RABBITMQ_METHODS: [(u16, u16, &str); 69] = [
    (60, 10, "basic.qos"),
    (60, 11, "basic.qos_ok"),
    (60, 20, "basic.consume"),
    (60, 21, "basic.consume_ok"),
    (60, 30, "basic.cancel"),
    (60, 31, "basic.cancel_ok"),
    (60, 40, "basic.publish"),
    (60, 50, "basic.return"),
    (60, 60, "basic.deliver"),
    (60, 70, "basic.get"),
    (60, 71, "basic.get_ok"),
    (60, 72, "basic.get_empty"),
    (60, 80, "basic.ack"),
    (60, 90, "basic.reject"),
    (60, 100, "basic.recover_async"),
    (60, 110, "basic.recover"),
    (60, 111, "basic.recover_ok"),
    (60, 120, "basic.nack"),
    (60, 200, "basic.credit"),
    (60, 201, "basic.credit_ok"),
    (60, 202, "basic.credit_drained"),
    (10, 10, "connection.start"),
    (10, 11, "connection.start_ok"),
    (10, 20, "connection.secure"),
    (10, 21, "connection.secure_ok"),
    (10, 30, "connection.tune"),
    (10, 31, "connection.tune_ok"),
    (10, 40, "connection.open"),
    (10, 41, "connection.open_ok"),
    (10, 50, "connection.close"),
    (10, 51, "connection.close_ok"),
    (10, 60, "connection.blocked"),
    (10, 61, "connection.unblocked"),
    (10, 70, "connection.update_secret"),
    (10, 71, "connection.update_secret_ok"),
    (20, 10, "channel.open"),
    (20, 11, "channel.open_ok"),
    (20, 20, "channel.flow"),
    (20, 21, "channel.flow_ok"),
    (20, 40, "channel.close"),
    (20, 41, "channel.close_ok"),
    (30, 10, "access.request"),
    (30, 11, "access.request_ok"),
    (40, 10, "exchange.declare"),
    (40, 11, "exchange.declare_ok"),
    (40, 20, "exchange.delete"),
    (40, 21, "exchange.delete_ok"),
    (40, 30, "exchange.bind"),
    (40, 31, "exchange.bind_ok"),
    (40, 40, "exchange.unbind"),
    (40, 51, "exchange.unbind_ok"),
    (50, 10, "queue.declare"),
    (50, 11, "queue.declare_ok"),
    (50, 20, "queue.bind"),
    (50, 21, "queue.bind_ok"),
    (50, 30, "queue.purge"),
    (50, 31, "queue.purge_ok"),
    (50, 40, "queue.delete"),
    (50, 41, "queue.delete_ok"),
    (50, 50, "queue.unbind"),
    (50, 51, "queue.unbind_ok"),
    (90, 10, "tx.select"),
    (90, 11, "tx.select_ok"),
    (90, 20, "tx.commit"),
    (90, 21, "tx.commit_ok"),
    (90, 30, "tx.rollback"),
    (90, 31, "tx.rollback_ok"),
    (85, 10, "confirm.select"),
    (85, 11, "confirm.select_ok"),
];

/// A field table with every value type RabbitMQ's table parser accepts, nested.
pub fn all_types_table() -> FieldTable {
    let mut inner = FieldTable::default();
    inner.insert("x-match".into(), AMQPValue::LongString("all".into()));
    inner.insert(
        "deep".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
    );
    let array = FieldArray::from(vec![
        AMQPValue::Boolean(true),
        AMQPValue::LongInt(-7),
        AMQPValue::LongString("in array".into()),
        AMQPValue::FieldTable(inner.clone()),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Double(0.5)])),
        AMQPValue::Timestamp(1),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255])),
        AMQPValue::Void,
    ]);
    let mut t = FieldTable::default();
    t.insert("bool".into(), AMQPValue::Boolean(true));
    t.insert("i8".into(), AMQPValue::ShortShortInt(-128));
    t.insert("u8".into(), AMQPValue::ShortShortUInt(255));
    t.insert("i16".into(), AMQPValue::ShortInt(-32768));
    t.insert("u16".into(), AMQPValue::ShortUInt(65535));
    t.insert("i32".into(), AMQPValue::LongInt(i32::MIN));
    t.insert("u32".into(), AMQPValue::LongUInt(u32::MAX));
    t.insert("i64".into(), AMQPValue::LongLongInt(i64::MIN));
    t.insert("f32".into(), AMQPValue::Float(1.5));
    t.insert("f64".into(), AMQPValue::Double(-2.25e300));
    t.insert(
        "decimal".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    t.insert(
        "longstr".into(),
        AMQPValue::LongString(LongString::from(vec![0u8, 1, 2, 0xff])),
    );
    t.insert("array".into(), AMQPValue::FieldArray(array));
    t.insert("timestamp".into(), AMQPValue::Timestamp(1_700_000_000));
    t.insert("table".into(), AMQPValue::FieldTable(inner));
    t.insert(
        "bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
    );
    t.insert("void".into(), AMQPValue::Void);
    t.insert(
        "empty-table".into(),
        AMQPValue::FieldTable(FieldTable::default()),
    );
    t.insert(
        "empty-array".into(),
        AMQPValue::FieldArray(FieldArray::default()),
    );
    t
}

/// Basic properties with all 14 fields set.
pub fn full_properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("k".into(), AMQPValue::LongInt(1));
    BasicProperties::default()
        .with_content_type("a/b".into())
        .with_content_encoding("gz".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("c".into())
        .with_reply_to("r".into())
        .with_expiration("60000".into())
        .with_message_id("m".into())
        .with_timestamp(1_700_000_000)
        .with_type("t".into())
        .with_user_id("guest".into())
        .with_app_id("app".into())
        .with_cluster_id("cl".into())
}

/// One instance of every method in the generated table, with non-default arguments.
pub fn all_methods() -> Vec<AMQPClass> {
    use AMQPClass as C;
    let t = all_types_table;
    vec![
        C::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 300,
            global: true,
        })),
        C::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
        C::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "q".into(),
            consumer_tag: "ctag".into(),
            no_local: false,
            no_ack: true,
            exclusive: false,
            nowait: true,
            arguments: t(),
        })),
        C::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: "ctag".into(),
        })),
        C::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: "ctag".into(),
            nowait: true,
        })),
        C::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
            consumer_tag: "ctag".into(),
        })),
        C::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "ex".into(),
            routing_key: "rk".into(),
            mandatory: true,
            immediate: true,
        })),
        C::Basic(basic::AMQPMethod::Return(basic::Return {
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
            exchange: "ex".into(),
            routing_key: "rk".into(),
        })),
        C::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "ctag".into(),
            delivery_tag: u64::MAX,
            redelivered: true,
            exchange: "".into(),
            routing_key: "q".into(),
        })),
        C::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: "q".into(),
            no_ack: true,
        })),
        C::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: 9,
            redelivered: false,
            exchange: "ex".into(),
            routing_key: "rk".into(),
            message_count: 77,
        })),
        C::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
        C::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 5,
            multiple: true,
        })),
        C::Basic(basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: 6,
            requeue: true,
        })),
        C::Basic(basic::AMQPMethod::RecoverAsync(basic::RecoverAsync {
            requeue: true,
        })),
        C::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
        C::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
        C::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: 7,
            multiple: true,
            requeue: false,
        })),
        C::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: t(),
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        })),
        C::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: t(),
            mechanism: "PLAIN".into(),
            response: LongString::from(b"\0guest\0guest".to_vec()),
            locale: "en_US".into(),
        })),
        C::Connection(connection::AMQPMethod::Secure(connection::Secure {
            challenge: "c".into(),
        })),
        C::Connection(connection::AMQPMethod::SecureOk(connection::SecureOk {
            response: "r".into(),
        })),
        C::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
        })),
        C::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
        })),
        C::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
        C::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        C::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 320,
            reply_text: "CONNECTION_FORCED - bye".into(),
            class_id: 0,
            method_id: 0,
        })),
        C::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        C::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
            reason: "low on memory".into(),
        })),
        C::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
        C::Connection(connection::AMQPMethod::UpdateSecret(
            connection::UpdateSecret {
                new_secret: "token".into(),
                reason: "refresh".into(),
            },
        )),
        C::Connection(connection::AMQPMethod::UpdateSecretOk(
            connection::UpdateSecretOk {},
        )),
        C::Channel(channel::AMQPMethod::Open(channel::Open {})),
        C::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        C::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
        C::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
            active: true,
        })),
        C::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 404,
            reply_text: "NOT_FOUND - no queue 'q' in vhost '/'".into(),
            class_id: 50,
            method_id: 10,
        })),
        C::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        C::Access(access::AMQPMethod::Request(access::Request {
            realm: "/data".into(),
            exclusive: false,
            passive: true,
            active: true,
            write: true,
            read: true,
        })),
        C::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
        C::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: "ex".into(),
            kind: "topic".into(),
            passive: false,
            durable: true,
            auto_delete: false,
            internal: true,
            nowait: false,
            arguments: t(),
        })),
        C::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
        C::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
            exchange: "ex".into(),
            if_unused: true,
            nowait: false,
        })),
        C::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
        C::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: "d".into(),
            source: "s".into(),
            routing_key: "a.#".into(),
            nowait: true,
            arguments: t(),
        })),
        C::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
        C::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
            destination: "d".into(),
            source: "s".into(),
            routing_key: "a.#".into(),
            nowait: false,
            arguments: FieldTable::default(),
        })),
        C::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
        C::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            passive: false,
            durable: true,
            exclusive: true,
            auto_delete: false,
            nowait: false,
            arguments: t(),
        })),
        C::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
            queue: "amq.gen-x".into(),
            message_count: 3,
            consumer_count: 4,
        })),
        C::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: "q".into(),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            nowait: true,
            arguments: t(),
        })),
        C::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
        C::Queue(queue::AMQPMethod::Purge(queue::Purge {
            queue: "q".into(),
            nowait: true,
        })),
        C::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
            message_count: 10,
        })),
        C::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "q".into(),
            if_unused: true,
            if_empty: true,
            nowait: false,
        })),
        C::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
            message_count: 11,
        })),
        C::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
            queue: "q".into(),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            arguments: t(),
        })),
        C::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
        C::Tx(tx::AMQPMethod::Select(tx::Select {})),
        C::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
        C::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
        C::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
        C::Tx(tx::AMQPMethod::Rollback(tx::Rollback {})),
        C::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
        C::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: true,
        })),
        C::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
    ]
}

/// The sample method with these ids.
pub fn method_by_ids(class_id: u16, method_id: u16) -> AMQPClass {
    all_methods()
        .into_iter()
        .find(|m| m.get_amqp_class_id() == class_id && m.get_amqp_method_id() == method_id)
        .unwrap()
}

/// A realistic client stream after the protocol header: open, declare, publish (split
/// over several body frames), a heartbeat, an empty-bodied publish, close.
pub fn sample_frames() -> Vec<Frame> {
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: "q".into(),
        mandatory: false,
        immediate: false,
    }));
    vec![
        Frame::Method {
            channel: 0,
            method: method_by_ids(10, 11),
        },
        Frame::Method {
            channel: 1,
            method: AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        },
        Frame::Method {
            channel: 1,
            method: method_by_ids(50, 10),
        },
        Frame::Method {
            channel: 1,
            method: publish.clone(),
        },
        Frame::Header {
            channel: 1,
            header: Box::new(ContentHeader::new(10, full_properties())),
        },
        Frame::Body {
            channel: 1,
            payload: Bytes::from_static(b"hello"),
        },
        Frame::Body {
            channel: 1,
            payload: Bytes::from_static(b"world"),
        },
        Frame::Heartbeat,
        Frame::Method {
            channel: 2,
            method: publish,
        },
        Frame::Header {
            channel: 2,
            header: Box::new(ContentHeader::new(0, BasicProperties::default())),
        },
        Frame::Method {
            channel: 0,
            method: method_by_ids(10, 50),
        },
    ]
}

/// The protocol header followed by [`sample_frames`], as octets.
pub fn sample_stream() -> Vec<u8> {
    let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09\x01"[..]);
    for frame in sample_frames() {
        encode_frame(&frame, &mut buf).unwrap();
    }
    buf.to_vec()
}

/// Decodes a whole buffer; panics on error or leftover bytes.
pub fn decode_all(decoder: &mut FrameDecoder, bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = decoder.decode(&mut buf).unwrap() {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "{} octets left over", buf.len());
    frames
}

/// Encodes one method frame.
pub fn method_frame(channel: u16, method: &AMQPClass) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_method(channel, method, &mut buf).unwrap();
    buf.to_vec()
}

/// A raw frame with the given type, channel and payload.
pub fn raw_frame(frame_type: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![frame_type];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
    out
}

/// Encodes a content message, for assembler tests.
pub fn content_bytes(channel: u16, method: &AMQPClass, body: &[u8], frame_max: u32) -> Vec<u8> {
    let body = MessageBody::from(body.to_vec());
    let header = ContentHeader::new(body.len(), BasicProperties::default());
    let mut buf = BytesMut::new();
    encode_content(channel, method, &header, &body, frame_max, &mut buf).unwrap();
    buf.to_vec()
}

/// A heartbeat frame.
pub fn heartbeat_bytes() -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_heartbeat(&mut buf);
    buf.to_vec()
}

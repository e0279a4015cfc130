//! The compute node against a real AMQP client (lapin), over real sockets. Each test starts
//! its own node on a free port. Expectations are RabbitMQ's documented behaviour.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Broker;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::timeout;

/// Bound on any single step, so a hang fails the test instead of blocking CI.
const STEP: Duration = Duration::from_secs(30);

async fn connect(url: &str) -> Connection {
    timeout(
        STEP,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

async fn channel(conn: &Connection) -> Channel {
    conn.create_channel().await.unwrap()
}

async fn declare(ch: &Channel, name: &str) -> lapin::Queue {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap()
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .unwrap();
}

/// The reply code of a protocol error.
fn code(e: &lapin::Error) -> u16 {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_id(),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .map(|m| m.delivery.data.clone())
}

#[tokio::test]
async fn publish_consume_ack_on_the_default_exchange() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    declare(&ch, "q").await;
    publish(&ch, "", "q", b"hello").await;
    let mut consumer = ch
        .basic_consume(
            "q".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = timeout(STEP, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"hello");
    assert_eq!(d.routing_key.as_str(), "q");
    assert!(!d.redelivered);
    d.ack(BasicAckOptions::default()).await.unwrap();
    ch.basic_cancel("c1".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let q = ch
        .queue_declare(
            "q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn every_exchange_type_routes_like_rabbitmq() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    for (x, kind) in [
        ("d", ExchangeKind::Direct),
        ("f", ExchangeKind::Fanout),
        ("t", ExchangeKind::Topic),
        ("h", ExchangeKind::Headers),
    ] {
        ch.exchange_declare(
            x.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    for q in ["q1", "q2", "q3"] {
        declare(&ch, q).await;
    }
    let bind = |q: &'static str, x: &'static str, key: &'static str, args: FieldTable| {
        let ch = ch.clone();
        async move {
            ch.queue_bind(
                q.into(),
                x.into(),
                key.into(),
                QueueBindOptions::default(),
                args,
            )
            .await
            .unwrap()
        }
    };
    bind("q1", "d", "red", FieldTable::default()).await;
    bind("q2", "d", "blue", FieldTable::default()).await;
    bind("q1", "f", "", FieldTable::default()).await;
    bind("q2", "f", "", FieldTable::default()).await;
    bind("q1", "t", "stock.*.nyse", FieldTable::default()).await;
    bind("q2", "t", "stock.#", FieldTable::default()).await;
    let mut any = FieldTable::default();
    any.insert("x-match".into(), AMQPValue::LongString("any".into()));
    any.insert("format".into(), AMQPValue::LongString("pdf".into()));
    any.insert("type".into(), AMQPValue::LongString("report".into()));
    bind("q3", "h", "", any).await;
    bind("q1", "amq.direct", "k", FieldTable::default()).await;

    // (exchange, routing key, headers, which queues get it)
    type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        ("d", "red", None, &["q1"]),
        ("d", "blue", None, &["q2"]),
        ("d", "green", None, &[]),
        ("f", "whatever", None, &["q1", "q2"]),
        ("t", "stock.usd.nyse", None, &["q1", "q2"]),
        ("t", "stock.eur", None, &["q2"]),
        ("t", "bond.usd.nyse", None, &[]),
        ("h", "", Some(("format", "pdf")), &["q3"]),
        ("h", "", Some(("format", "zip")), &[]),
        ("amq.direct", "k", None, &["q1"]),
        ("", "q3", None, &["q3"]),
    ];
    for (i, (x, key, header, expect)) in cases.into_iter().enumerate() {
        let body = format!("m{i}");
        let mut props = BasicProperties::default();
        if let Some((k, v)) = header {
            let mut h = FieldTable::default();
            h.insert(k.into(), AMQPValue::LongString(v.into()));
            props = props.with_headers(h);
        }
        ch.basic_publish(
            x.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        for q in ["q1", "q2", "q3"] {
            if let Some(b) = get_body(&ch, q).await {
                assert_eq!(b, body.as_bytes(), "case {i} queue {q}");
                got.push(q);
            }
        }
        assert_eq!(got, expect, "case {i}: {x} {key}");
    }
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries_per_consumer() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let slow = channel(&conn).await;
    let fast = channel(&conn).await;
    declare(&slow, "work").await;
    slow.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut slow_c = slow
        .basic_consume(
            "work".into(),
            "slow".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut fast_c = fast
        .basic_consume(
            "work".into(),
            "fast".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10 {
        publish(&fast, "", "work", format!("{i}").as_bytes()).await;
    }
    // The slow consumer never acks: with prefetch 1 it holds one message, the rest go to
    // the fast consumer.
    let first = timeout(STEP, slow_c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut fast_got = 0;
    while fast_got < 9 {
        let d = timeout(STEP, fast_c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        fast_got += 1;
    }
    // Acking the slow consumer's message leaves nothing more for it: all 10 are accounted.
    first.ack(BasicAckOptions::default()).await.unwrap();
    let q = fast
        .queue_declare(
            "work".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
}

#[tokio::test]
async fn mandatory_unroutable_message_is_returned_with_312() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "no-such-queue".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let returned = confirm.take_message().expect("basic.return");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.data, b"lost");
}

#[tokio::test]
async fn five_megabyte_message_with_frame_max_4096() {
    let broker = Broker::start().await;
    let conn = connect(&format!("{}?frame_max=4096", broker.url())).await;
    let ch = channel(&conn).await;
    declare(&ch, "big").await;
    let body: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    publish(&ch, "", "big", &body).await;
    let got = timeout(STEP, get_body(&ch, "big")).await.unwrap().unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got == body);
}

#[tokio::test]
async fn ten_thousand_messages_arrive_in_order_with_confirms() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    declare(&ch, "ordered").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..10_000u32 {
        ch.basic_publish(
            "".into(),
            "ordered".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let returned = timeout(STEP, ch.wait_for_confirms())
        .await
        .unwrap()
        .unwrap();
    assert!(returned.is_empty());
    let consumer_ch = channel(&conn).await;
    consumer_ch
        .basic_qos(500, BasicQosOptions::default())
        .await
        .unwrap();
    let mut c = consumer_ch
        .basic_consume(
            "ordered".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10_000u32 {
        let d = timeout(STEP, c.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(d.data, i.to_be_bytes(), "message {i}");
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
}

#[tokio::test]
async fn basic_get_reports_message_count_and_get_empty() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    declare(&ch, "g").await;
    assert!(
        ch.basic_get("g".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .is_none()
    );
    for b in [b"a", b"b", b"c"] {
        publish(&ch, "", "g", b).await;
    }
    let m = ch
        .basic_get("g".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"a");
    assert_eq!(m.message_count, 2);
    m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    let purged = ch
        .queue_purge("g".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 2);
    assert!(
        ch.basic_get("g".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn nack_with_requeue_redelivers_with_the_flag_set() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    declare(&ch, "n").await;
    publish(&ch, "", "n", b"x").await;
    let m = ch
        .basic_get("n".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert!(!m.delivery.redelivered);
    m.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let m = ch
        .basic_get("n".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert!(m.delivery.redelivered);
    m.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    assert!(
        ch.basic_get("n".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn unacked_messages_come_back_redelivered_when_the_channel_closes() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    declare(&ch, "r").await;
    publish(&ch, "", "r", b"x").await;
    let m = ch
        .basic_get("r".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert!(!m.delivery.redelivered);
    ch.close(200, "bye".into()).await.unwrap();
    let ch2 = channel(&conn).await;
    let m = ch2
        .basic_get("r".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert!(m.delivery.redelivered);
}

#[tokio::test]
async fn declare_errors_have_rabbitmqs_codes() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;

    let ch = channel(&conn).await;
    let e = ch
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 404);

    let ch = channel(&conn).await;
    let e = ch
        .exchange_declare(
            "missing".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 404);

    let ch = channel(&conn).await;
    declare(&ch, "plain").await;
    let e = ch
        .queue_declare(
            "plain".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 406);

    let ch = channel(&conn).await;
    ch.exchange_declare(
        "x".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = ch
        .exchange_declare(
            "x".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 406);

    let ch = channel(&conn).await;
    let e = ch
        .queue_declare(
            "amq.mine".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 403);

    // An exclusive queue is locked to its connection.
    let ch = channel(&conn).await;
    ch.queue_declare(
        "mine".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let other = connect(&broker.url()).await;
    let och = channel(&other).await;
    let e = och
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 405);

    // The connection survives channel errors.
    let ch = channel(&conn).await;
    declare(&ch, "still-works").await;
}

#[tokio::test]
async fn server_named_exclusive_queue_goes_away_with_its_connection() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = q.name().to_string();
    assert!(name.starts_with("amq.gen-"), "{name}");
    conn.close(200, "bye".into()).await.unwrap();
    let conn2 = connect(&broker.url()).await;
    let ch2 = channel(&conn2).await;
    // The connection's cleanup runs after close-ok: poll (bounded) until it has.
    let mut gone = false;
    for _ in 0..100 {
        let ch = channel(&conn2).await;
        match ch
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Err(e) => {
                assert_eq!(code(&e), 404);
                gone = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(gone, "exclusive queue outlived its connection");
    drop(ch2);
}

#[tokio::test]
async fn confirms_cover_every_publish_exactly_once() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    declare(&ch, "c1").await;
    declare(&ch, "c2").await;
    ch.exchange_declare(
        "fan".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for q in ["c1", "c2"] {
        ch.queue_bind(
            q.into(),
            "fan".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..500u32 {
        let x = if i % 3 == 0 { "" } else { "fan" };
        confirms.push(
            ch.basic_publish(
                x.into(),
                "c1".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap(),
        );
    }
    let mut acked = BTreeSet::new();
    for (i, c) in confirms.into_iter().enumerate() {
        let r = timeout(STEP, c).await.unwrap().unwrap();
        assert!(r.is_ack(), "publish {i}");
        acked.insert(i);
    }
    assert_eq!(acked.len(), 500);
}

#[tokio::test]
async fn wrong_password_is_refused_and_other_connections_are_unaffected() {
    let broker = Broker::start().await;
    let good = connect(&broker.url()).await;
    let bad_url = broker.url().replacen("guest:guest@", "guest:wrong@", 1);
    let r = timeout(
        STEP,
        Connection::connect(&bad_url, ConnectionProperties::default()),
    )
    .await
    .unwrap();
    let Err(e) = r else {
        panic!("login with a wrong password must fail");
    };
    if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
        assert_eq!(p.get_id(), 403);
    }
    let ch = channel(&good).await;
    declare(&ch, "ok").await;
}

#[tokio::test]
async fn server_properties_look_like_rabbitmq() {
    use amq_protocol::frame::{AMQPFrame, parse_frame};
    use amq_protocol::protocol::{AMQPClass, connection};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let broker = Broker::start().await;
    let mut sock = tokio::net::TcpStream::connect(broker.addr()).await.unwrap();
    sock.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = Vec::new();
    let start = loop {
        let mut chunk = [0u8; 4096];
        let n = timeout(STEP, sock.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "server closed before connection.start");
        buf.extend_from_slice(&chunk[..n]);
        if let Ok((_, frame)) = parse_frame(buf.as_slice()) {
            break frame;
        }
    };
    let AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(start))) = start
    else {
        panic!("expected connection.start, got {start:?}");
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    assert_eq!(start.mechanisms.to_string(), "PLAIN AMQPLAIN");
    assert_eq!(start.locales.to_string(), "en_US");
    let props = start.server_properties;
    let get = |k: &str| props.inner().get(k).cloned();
    assert_eq!(
        get("product"),
        Some(AMQPValue::LongString("RabbitMQ".into()))
    );
    let Some(AMQPValue::FieldTable(caps)) = get("capabilities") else {
        panic!("no capabilities table");
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "{cap}"
        );
    }
    assert!(get("warren_version").is_some());
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn drain(ch: &Channel, q: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(b) = get_body(ch, q).await {
        out.push(b);
    }
    out
}

#[tokio::test]
async fn queue_arguments_ttl_priority_max_length_and_dead_lettering() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    // Rejected messages go to the dead-letter exchange with an x-death entry.
    declare(&ch, "dlq").await;
    ch.queue_declare(
        "work".into(),
        QueueDeclareOptions::default(),
        table(&[
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString("dlq".into()),
            ),
        ]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "work".into(),
        BasicPublishOptions::default(),
        b"poison",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let m = ch
        .basic_get("work".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    m.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let mut dead = None;
    for _ in 0..200 {
        if let Some(m) = ch
            .basic_get("dlq".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            dead = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dead = dead.expect("dead-lettered message");
    assert_eq!(dead.delivery.data, b"poison");
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death: {headers:?}");
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!("x-death entry is not a table");
    };
    assert_eq!(
        death.inner().get("reason"),
        Some(&AMQPValue::LongString("rejected".into()))
    );
    assert_eq!(
        death.inner().get("queue"),
        Some(&AMQPValue::LongString("work".into()))
    );

    // A per-message expiration of 0 drops a message nobody waits for.
    declare(&ch, "exp").await;
    ch.basic_publish(
        "".into(),
        "exp".into(),
        BasicPublishOptions::default(),
        b"expired",
        BasicProperties::default().with_expiration("0".into()),
    )
    .await
    .unwrap();
    publish(&ch, "", "exp", b"kept").await;
    ch.wait_for_confirms().await.unwrap();
    assert_eq!(drain(&ch, "exp").await, vec![b"kept".to_vec()]);

    // Priorities above x-max-priority count as the maximum; equal ones keep FIFO order.
    ch.queue_declare(
        "prio".into(),
        QueueDeclareOptions::default(),
        table(&[("x-max-priority", AMQPValue::LongInt(10))]),
    )
    .await
    .unwrap();
    for (body, p) in [
        ("low", Some(1)),
        ("none", None),
        ("high", Some(9)),
        ("mid", Some(5)),
        ("high2", Some(9)),
        ("over", Some(200)),
    ] {
        let mut props = BasicProperties::default();
        if let Some(p) = p {
            props = props.with_priority(p);
        }
        ch.basic_publish(
            "".into(),
            "prio".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await
        .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    let got: Vec<String> = drain(&ch, "prio")
        .await
        .into_iter()
        .map(|b| String::from_utf8(b).unwrap())
        .collect();
    assert_eq!(got, vec!["over", "high", "high2", "mid", "low", "none"]);

    // x-max-length drops from the head.
    ch.queue_declare(
        "short".into(),
        QueueDeclareOptions::default(),
        table(&[("x-max-length", AMQPValue::LongInt(2))]),
    )
    .await
    .unwrap();
    for i in 0..5 {
        publish(&ch, "", "short", format!("{i}").as_bytes()).await;
    }
    ch.wait_for_confirms().await.unwrap();
    assert_eq!(
        drain(&ch, "short").await,
        vec![b"3".to_vec(), b"4".to_vec()]
    );
}

#[tokio::test]
async fn transactions_commit_and_rollback() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    declare(&ch, "txq").await;
    ch.tx_select().await.unwrap();
    publish(&ch, "", "txq", b"rolled back").await;
    let q = ch
        .queue_declare(
            "txq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    ch.tx_rollback().await.unwrap();
    publish(&ch, "", "txq", b"committed").await;
    ch.tx_commit().await.unwrap();
    let m = ch
        .basic_get("txq".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"committed");
    // An ack inside a transaction takes effect at commit; a rollback undoes it.
    m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    ch.tx_rollback().await.unwrap();
    m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    ch.tx_commit().await.unwrap();
    assert!(get_body(&ch, "txq").await.is_none());
    let e = ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), 406);
}

#[tokio::test]
async fn direct_reply_to_round_trip() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let client = channel(&conn).await;
    let server = channel(&conn).await;
    declare(&server, "rpc").await;
    let mut replies = client
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    client
        .basic_publish(
            "".into(),
            "rpc".into(),
            BasicPublishOptions::default(),
            b"ping",
            BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .unwrap();
    let req = timeout(STEP, async {
        loop {
            if let Some(m) = server
                .basic_get("rpc".into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let reply_to = req.delivery.properties.reply_to().clone().unwrap();
    assert!(
        reply_to.as_str().starts_with("amq.rabbitmq.reply-to."),
        "{reply_to}"
    );
    server
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions::default(),
            b"pong",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let d = timeout(STEP, replies.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"pong");

    // Without a reply consumer on the channel, the request is refused with 406.
    let other = channel(&conn).await;
    other
        .basic_publish(
            "".into(),
            "rpc".into(),
            BasicPublishOptions::default(),
            b"ping",
            BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .unwrap();
    // The channel is closed by then; lapin reports either the 406 itself or, if it already
    // processed the close, that the channel is in its error state.
    let r = other
        .queue_declare(
            "after".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    match r {
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => assert_eq!(p.get_id(), 406),
            lapin::ErrorKind::InvalidChannelState(..) => {}
            other => panic!("unexpected error {other:?}"),
        },
        Ok(_) => panic!("the channel should have been closed with 406"),
    }
}

#[tokio::test]
async fn unused_queue_with_x_expires_is_deleted() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    ch.queue_declare(
        "short-lived".into(),
        QueueDeclareOptions::default(),
        table(&[("x-expires", AMQPValue::LongInt(50))]),
    )
    .await
    .unwrap();
    // Each check counts as a use, so checks are spaced well beyond x-expires.
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ch = channel(&conn).await;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if let Err(e) = ch
            .queue_declare("short-lived".into(), passive, FieldTable::default())
            .await
        {
            assert_eq!(code(&e), 404);
            gone = true;
            break;
        }
    }
    assert!(gone, "queue with x-expires was never deleted");
}

/// A raw client: the handshake by hand, so it can then stay silent.
mod raw {
    use amq_protocol::frame::{AMQPFrame, gen_frame, parse_frame};
    use amq_protocol::protocol::{AMQPClass, connection};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub async fn send(sock: &mut TcpStream, frame: AMQPFrame) {
        let (buf, _) = gen_frame(&frame)(Vec::new().into()).unwrap().into_inner();
        sock.write_all(&buf).await.unwrap();
    }

    pub async fn recv(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<AMQPFrame> {
        loop {
            if let Ok((rest, frame)) = parse_frame(buf.as_slice()) {
                let used = buf.len() - rest.len();
                buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Connect and open with the given heartbeat; returns the socket and leftover bytes.
    pub async fn open(addr: std::net::SocketAddr, heartbeat: u16) -> (TcpStream, Vec<u8>) {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut buf = Vec::new();
        recv(&mut sock, &mut buf).await.unwrap();
        let start_ok = connection::StartOk {
            client_properties: Default::default(),
            mechanism: "PLAIN".into(),
            response: "\0guest\0guest".into(),
            locale: "en_US".into(),
        };
        send(
            &mut sock,
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
            ),
        )
        .await;
        let tune = recv(&mut sock, &mut buf).await.unwrap();
        let AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) = tune
        else {
            panic!("expected connection.tune, got {tune:?}");
        };
        assert_eq!(
            (tune.channel_max, tune.frame_max, tune.heartbeat),
            (2047, 131072, 60)
        );
        let tune_ok = connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat,
        };
        send(
            &mut sock,
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
            ),
        )
        .await;
        let open = connection::Open {
            virtual_host: "/".into(),
        };
        send(
            &mut sock,
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Open(open))),
        )
        .await;
        let ok = recv(&mut sock, &mut buf).await.unwrap();
        assert!(
            matches!(
                ok,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))
            ),
            "{ok:?}"
        );
        (sock, buf)
    }
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_two_missed_heartbeats_and_hears_heartbeats_first() {
    let broker = Broker::start().await;
    let (mut sock, mut buf) = raw::open(broker.addr(), 1).await;
    // The server heartbeats an idle connection, then closes it when nothing comes back.
    let mut heartbeats = 0;
    let closed = timeout(Duration::from_secs(30), async {
        while let Some(f) = raw::recv(&mut sock, &mut buf).await {
            assert_eq!(
                f,
                amq_protocol::frame::AMQPFrame::Heartbeat,
                "only heartbeats are expected"
            );
            heartbeats += 1;
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a silent connection open");
    assert!(heartbeats >= 1, "no heartbeat before closing");
}

#[tokio::test]
async fn a_client_that_heartbeats_stays_connected() {
    use tokio::io::AsyncWriteExt;
    let broker = Broker::start().await;
    let (mut sock, mut buf) = raw::open(broker.addr(), 1).await;
    // Answer every server heartbeat for a while; the connection must stay up throughout.
    for _ in 0..4 {
        let f = timeout(Duration::from_secs(30), raw::recv(&mut sock, &mut buf))
            .await
            .unwrap();
        assert_eq!(f, Some(amq_protocol::frame::AMQPFrame::Heartbeat));
        sock.write_all(&[8, 0, 0, 0, 0, 0, 0, 0xCE]).await.unwrap();
    }
}

#[tokio::test]
async fn reject_publish_overflow_nacks_when_full() {
    let broker = Broker::start().await;
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    ch.queue_declare(
        "full".into(),
        QueueDeclareOptions::default(),
        table(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    for body in [b"first", b"secnd"] {
        let c = ch
            .basic_publish(
                "".into(),
                "full".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
        outcomes.push(timeout(STEP, c).await.unwrap().unwrap().is_ack());
    }
    assert_eq!(outcomes, vec![true, false]);
    assert_eq!(drain(&ch, "full").await, vec![b"first".to_vec()]);
}

//! Transient entities across compute nodes, real sockets and a real client: a non-durable
//! queue or exchange declared through one node is usable through every other (its queue
//! served by its home node), an exclusive queue answers RabbitMQ's 405 to every other
//! connection on every node, and all of them go with the node that declared them.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Storage, connect, node_url, start_two_nodes};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(60);

fn code(e: &lapin::Error) -> u16 {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_id(),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

fn transient() -> QueueDeclareOptions {
    QueueDeclareOptions::default()
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let confirm = timeout(STEP, confirm)
        .await
        .expect("confirm timed out")
        .unwrap();
    assert!(confirm.is_ack(), "publish to {exchange}/{key} confirmed");
}

async fn confirming(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch
}

/// The code of a passive declare of `queue` on a fresh channel (0 when it succeeds).
async fn passive_declare_code(conn: &Connection, queue: &str) -> u16 {
    let ch = conn.create_channel().await.unwrap();
    match ch
        .queue_declare(queue.into(), passive(), FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = ch.close(200, "done".into()).await;
            0
        }
        Err(e) => code(&e),
    }
}

/// Wait until a passive declare of `queue` through `conn` answers `want`.
async fn until_passive_declare_is(conn: &Connection, queue: &str, want: u16) {
    let mut last = 0;
    for _ in 0..200 {
        last = passive_declare_code(conn, queue).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("passive declare of {queue} answered {last}, not {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_queue_and_exchange_declared_on_one_node_are_used_through_another() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let on_a = connect(&node_url(&a)).await;
    let on_b = connect(&node_url(&b)).await;

    let cha = on_a.create_channel().await.unwrap();
    cha.queue_declare("jobs".into(), transient(), FieldTable::default())
        .await
        .unwrap();
    cha.exchange_declare(
        "events".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let pa = confirming(&on_a).await;
    publish(&pa, "", "jobs", b"from a").await;

    // Through b, at once (a declaration acknowledged on a is found on b).
    let chb = confirming(&on_b).await;
    let declared = chb
        .queue_declare("jobs".into(), passive(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 1, "b sees the queue a holds");
    chb.queue_bind(
        "jobs".into(),
        "events".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&chb, "events", "", b"routed on b").await;
    publish(&chb, "", "jobs", b"direct on b").await;

    let mut consumer = chb
        .basic_consume(
            "jobs".into(),
            "on-b".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let d = timeout(STEP, consumer.next())
            .await
            .expect("delivery timed out")
            .unwrap()
            .unwrap();
        bodies.push(String::from_utf8(d.data.clone()).unwrap());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(bodies, ["from a", "routed on b", "direct on b"]);

    // Deleted through b: gone on a too.
    let chd = on_b.create_channel().await.unwrap();
    chd.queue_delete("jobs".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    until_passive_declare_is(&on_a, "jobs", 404).await;

    on_a.close(200, "done".into()).await.unwrap();
    on_b.close(200, "done".into()).await.unwrap();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_queue_is_locked_to_its_connection_on_every_node() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let owner = connect(&node_url(&a)).await;
    let on_b = connect(&node_url(&b)).await;

    let ch = owner.create_channel().await.unwrap();
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
    let mut consumer = ch
        .basic_consume(
            "mine".into(),
            "owner".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // Every use by another connection on another node: 405 RESOURCE_LOCKED.
    assert_eq!(passive_declare_code(&on_b, "mine").await, 405);
    let other = on_b.create_channel().await.unwrap();
    let e = other
        .basic_consume(
            "mine".into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 405);
    let other = on_b.create_channel().await.unwrap();
    let e = other
        .queue_delete("mine".into(), QueueDeleteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), 405);
    let other = on_b.create_channel().await.unwrap();
    let e = other
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 405);

    // Publishing to it is open to anyone, as in RabbitMQ: it reaches the owner's consumer.
    let pb = confirming(&on_b).await;
    publish(&pb, "", "mine", b"for the owner").await;
    let d = timeout(STEP, consumer.next())
        .await
        .expect("delivery timed out")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"for the owner");

    // It goes with its connection.
    owner.close(200, "done".into()).await.unwrap();
    until_passive_declare_is(&on_b, "mine", 404).await;
    on_b.close(200, "done".into()).await.unwrap();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_entities_go_with_the_node_that_declared_them() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let on_a = connect(&node_url(&a)).await;
    let ch = on_a.create_channel().await.unwrap();
    ch.queue_declare(
        "kept".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare("fleeting".into(), transient(), FieldTable::default())
        .await
        .unwrap();
    ch.exchange_declare(
        "fleeting-x".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "kept".into(),
        "fleeting-x".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let on_b = connect(&node_url(&b)).await;
    assert_eq!(passive_declare_code(&on_b, "fleeting").await, 0);
    drop(ch);
    let _ = on_a.close(200, "done".into()).await;
    a.stop().await;

    // b removes what a declared, and keeps the durable queue.
    until_passive_declare_is(&on_b, "fleeting", 404).await;
    let mut exchange_code = 0;
    for _ in 0..200 {
        let ch = on_b.create_channel().await.unwrap();
        exchange_code = match ch
            .exchange_declare(
                "fleeting-x".into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => 0,
            Err(e) => code(&e),
        };
        if exchange_code == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        exchange_code, 404,
        "the transient exchange went with its node"
    );
    assert_eq!(passive_declare_code(&on_b, "kept").await, 0);

    // Declared again through b, it is a new, empty queue served by b.
    let ch = confirming(&on_b).await;
    let fresh = ch
        .queue_declare("fleeting".into(), transient(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(fresh.message_count(), 0);
    publish(&ch, "", "fleeting", b"again").await;
    let got = ch
        .basic_get("fleeting".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"again");
    on_b.close(200, "done".into()).await.unwrap();
    b.stop().await;
}

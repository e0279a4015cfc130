//! Durable queues over a real in-process storage cluster: confirmed persistent messages
//! survive the compute node, and a new compute node recovers them from the queue log.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Broker, Storage, publish_confirmed};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(60);

async fn connect(url: &str) -> Connection {
    timeout(
        STEP,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_persistent_messages_survive_a_new_compute_node() {
    let storage = Storage::start().await;
    let broker = Broker::start_with(&storage).await;
    let conn = connect(&broker.url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("orders".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.exchange_declare(
        "shop".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "orders".into(),
        "shop".into(),
        "order.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..200u32 {
        ch.basic_publish(
            "shop".into(),
            "order.created".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    assert!(
        timeout(STEP, ch.wait_for_confirms())
            .await
            .unwrap()
            .unwrap()
            .is_empty()
    );
    // Take one delivery and leave it unacked: it must come back redelivered.
    let first = ch
        .basic_get("orders".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.delivery.data, 0u32.to_be_bytes());
    // Ack the second one: it must not come back.
    let second = ch
        .basic_get("orders".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    second
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    // The ack's settlement record is written asynchronously; a declare round trip on the
    // same queue orders after it in the owner.
    ch.queue_declare("orders".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    drop(conn);
    broker.stop().await;

    // A new compute node (new identity) takes the queue over from the registers and log.
    let broker = Broker::start_with(&storage).await;
    let conn = connect(&broker.url()).await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare("orders".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(q.message_count(), 199);
    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut c = ch
        .basic_consume(
            "orders".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut expect: Vec<u32> = vec![0];
    expect.extend(2..200);
    for want in expect {
        let d = timeout(STEP, c.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(d.data, want.to_be_bytes());
        assert!(d.redelivered, "recovered messages are marked redelivered");
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // The exchange and binding came back from the registers too.
    ch.basic_publish(
        "shop".into(),
        "order.paid".into(),
        BasicPublishOptions::default(),
        b"after",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap();
    let d = timeout(STEP, c.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(d.data, b"after");
    assert!(!d.redelivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_confirmed_persistent_messages_in_order() {
    let storage = Storage::start().await;
    let broker = Broker::start_with(&storage).await;
    let conn = connect(&broker.url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("bulk".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..10_000u32 {
        ch.basic_publish(
            "".into(),
            "bulk".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    assert!(
        timeout(STEP, ch.wait_for_confirms())
            .await
            .unwrap()
            .unwrap()
            .is_empty()
    );
    let q = ch
        .queue_declare("bulk".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(q.message_count(), 10_000);
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut c = ch
        .basic_consume(
            "bulk".into(),
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
    // Publish a few more after the log was trimmed; a new compute node replays exactly them.
    for i in 10_000..10_010u32 {
        ch.basic_publish(
            "".into(),
            "bulk".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    assert!(
        timeout(STEP, ch.wait_for_confirms())
            .await
            .unwrap()
            .unwrap()
            .is_empty()
    );
    drop(conn);
    broker.stop().await;
    let broker = Broker::start_with(&storage).await;
    let conn = connect(&broker.url()).await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare("bulk".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(q.message_count(), 10, "exactly the unacked tail survives");
    for i in 10_000..10_010u32 {
        let m = ch
            .basic_get("bulk".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.delivery.data, i.to_be_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_topology_declared_on_one_compute_node_reaches_another() {
    let storage = Storage::start().await;
    let a = Broker::start_with(&storage).await;
    let b = Broker::start_with(&storage).await;
    let conn_a = connect(&a.url()).await;
    let ch_a = conn_a.create_channel().await.unwrap();
    ch_a.exchange_declare(
        "events".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let conn_b = connect(&b.url()).await;
    // Node b re-reads the registers periodically: wait (bounded) until it knows "events".
    let mut seen = false;
    for _ in 0..200 {
        let ch = conn_b.create_channel().await.unwrap();
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if ch
            .exchange_declare(
                "events".into(),
                lapin::ExchangeKind::Fanout,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok()
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "node b never saw the exchange declared on node a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_compute_nodes_on_one_queue_lose_no_confirmed_message() {
    let storage = Storage::start().await;
    let a = Broker::start_with(&storage).await;
    let b = Broker::start_with(&storage).await;
    let conn_a = connect(&a.url()).await;
    let conn_b = connect(&b.url()).await;
    let ch_a = conn_a.create_channel().await.unwrap();
    let ch_b = conn_b.create_channel().await.unwrap();
    ch_a.queue_declare("shared".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    // A durable exchange declared afterwards: once node b sees it, it sees the queue too
    // (same register), without touching (and so taking over) the queue yet.
    let durable_x = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch_a.exchange_declare(
        "marker".into(),
        lapin::ExchangeKind::Direct,
        durable_x,
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut seen = false;
    for _ in 0..200 {
        let ch = conn_b.create_channel().await.unwrap();
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if ch
            .exchange_declare(
                "marker".into(),
                lapin::ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok()
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen);
    // Alternate publishers so the queue's log changes hands while messages flow.
    let mut acked = std::collections::BTreeSet::new();
    ch_a.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch_b.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for round in 0..4u32 {
        for (k, ch) in [&ch_a, &ch_b].into_iter().enumerate() {
            let mut pending = Vec::new();
            for j in 0..25u32 {
                let i = round * 50 + k as u32 * 25 + j;
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        "shared".into(),
                        BasicPublishOptions::default(),
                        &i.to_be_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap();
                pending.push((i, confirm));
            }
            for (i, confirm) in pending {
                if timeout(STEP, confirm).await.unwrap().unwrap().is_ack() {
                    acked.insert(i);
                }
            }
        }
    }
    // Publishes a superseded owner could not store are handed to the new owner, so nacks
    // are rare; they are allowed (the publisher may retry), silent loss never is. The first
    // two turns (a, then b taking over) cannot meet a stale owner.
    assert!(
        acked.len() >= 50,
        "too few publishes were confirmed: {}",
        acked.len()
    );
    // Whichever node serves the queue, every confirmed message is there (at least once).
    let mut got = std::collections::BTreeSet::new();
    for _ in 0..400 {
        if acked.is_subset(&got) {
            break;
        }
        let ch = match conn_a.create_channel().await {
            Ok(ch) => ch,
            Err(_) => break,
        };
        match ch
            .basic_get("shared".into(), BasicGetOptions::default())
            .await
        {
            Ok(Some(m)) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(&m.delivery.data);
                got.insert(u32::from_be_bytes(b));
                m.delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let missing: Vec<u32> = acked.difference(&got).copied().collect();
    assert!(missing.is_empty(), "confirmed but lost: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_replayed_after_a_takeover_survives_the_next_owners_log_trims() {
    let storage = Storage::start().await;
    // The first owner stores one message.
    let broker = Broker::start_with(&storage).await;
    let conn = connect(&broker.url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("kept".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        "kept".into(),
        BasicPublishOptions::default(),
        b"old",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap();
    assert!(ch.wait_for_confirms().await.unwrap().is_empty());
    drop(conn);
    broker.stop().await;

    // The next owner replays it, holds it unacked, and settles enough newer messages to trim
    // its log: the old message's record, in a segment the previous owner wrote, must stay.
    let broker = Broker::start_with(&storage).await;
    let conn = connect(&broker.url()).await;
    let holder = conn.create_channel().await.unwrap();
    let old = holder
        .basic_get("kept".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("the replayed message");
    assert_eq!(old.delivery.data, b"old");
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            "kept".into(),
            "churn".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // More than the owner settles between two trims.
    const CHURN: u32 = 9_000;
    publish_confirmed(&ch, "kept", CHURN).await;
    for _ in 0..CHURN {
        let d = timeout(STEP, consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Settlements are written before the owner stops: a round trip through it.
    let q = ch
        .queue_declare("kept".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    drop(conn);
    broker.stop().await;

    // A third owner still has it.
    let broker = Broker::start_with(&storage).await;
    let conn = connect(&broker.url()).await;
    let ch = conn.create_channel().await.unwrap();
    let m = ch
        .basic_get("kept".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the old message survived two takeovers and the trims between them");
    assert_eq!(m.delivery.data, b"old");
    assert!(m.delivery.redelivered);
    broker.stop().await;
}

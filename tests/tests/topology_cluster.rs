//! Topology across compute nodes: what a client declared through one node is there, at once,
//! for a client of another node, as on a RabbitMQ cluster (declare-ok means every node has it).
#![allow(clippy::unwrap_used)]

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use std::time::{Duration, Instant};
use warren_tests::raw::RawConn;
use warren_tests::{ClusterOpts, WarrenDev, amqp_addr};

/// The `warren_cluster_nodes` server property a node offers in connection.start (the live
/// compute nodes in its membership view), as text.
fn advertised_nodes(url: &str) -> String {
    let mut conn = RawConn::connect(&amqp_addr(url).unwrap()).unwrap();
    conn.send_raw(b"AMQP\x00\x00\x09\x01").unwrap();
    let (_, _, _, args) = conn.read_method().unwrap();
    String::from_utf8_lossy(&args).into_owned()
}

/// A two-node cluster whose nodes count each other as live members (each view follows the
/// registry within a lease renewal), and a connection to each.
async fn two_nodes() -> (WarrenDev, Connection, Connection) {
    let dev = WarrenDev::start_cluster(ClusterOpts::new(2, 3)).unwrap();
    let urls = dev.amqp_urls();
    let deadline = Instant::now() + Duration::from_secs(30);
    for url in urls {
        while !urls
            .iter()
            .all(|u| advertised_nodes(url).contains(&amqp_addr(u).unwrap()))
        {
            assert!(Instant::now() < deadline, "{url} never saw both nodes");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let a = Connection::connect(&urls[0], ConnectionProperties::default())
        .await
        .unwrap();
    let b = Connection::connect(&urls[1], ConnectionProperties::default())
        .await
        .unwrap();
    (dev, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declarations_through_one_node_are_usable_at_once_through_another() {
    let (_dev, a, b) = two_nodes().await;
    let on_a = a.create_channel().await.unwrap();
    let on_b = b.create_channel().await.unwrap();
    on_b.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Many rounds, each well inside the nodes' periodic topology refresh: every one must
    // find the new names without waiting for it.
    for i in 0..20 {
        let queue = format!("topo-q-{i}");
        let exchange = format!("topo-x-{i}");
        on_a.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        on_a.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        on_a.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

        // Through the other node: the queue exists (passive declare), a mandatory publish
        // to the exchange is routed (confirmed, not returned), and the message is there.
        let declared = on_b
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("round {i}: passive declare through node b: {e}"));
        assert_eq!(declared.message_count(), 0);
        let confirm = on_b
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "round {i}: {confirm:?}");
        assert!(
            confirm.take_message().is_none(),
            "round {i}: the publish came back unroutable"
        );
        let got = on_b
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("round {i}: the routed message is not in the queue"));
        assert_eq!(got.delivery.data, format!("m{i}").as_bytes());
    }
    let _ = a.close(200, "OK".into()).await;
    let _ = b.close(200, "OK".into()).await;
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Publish `body` to `exchange` through `ch` (in confirm mode) and wait for its confirm.
async fn publish_confirmed(ch: &lapin::Channel, exchange: &str, body: &str) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{body}: {confirm:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_changed_through_one_node_routes_at_once_through_another() {
    let (_dev, a, b) = two_nodes().await;
    let on_a = a.create_channel().await.unwrap();
    let on_b = b.create_channel().await.unwrap();
    on_b.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let exchange = "fan-out";
    on_a.exchange_declare(
        exchange.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    on_a.queue_declare("first".into(), durable_queue(), FieldTable::default())
        .await
        .unwrap();
    on_a.queue_bind(
        "first".into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Node b routes the exchange somewhere already, so no miss makes it look again: only
    // the change itself can tell it about the bindings below.
    publish_confirmed(&on_b, exchange, "warm-up").await;
    for i in 0..10 {
        let queue = format!("later-{i}");
        on_a.queue_declare(
            queue.as_str().into(),
            durable_queue(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        on_a.queue_bind(
            queue.as_str().into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        publish_confirmed(&on_b, exchange, &format!("bound-{i}")).await;
        let got = on_b
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("round {i}: node b did not route to the new binding"));
        assert_eq!(got.delivery.data, format!("bound-{i}").as_bytes());

        on_a.queue_unbind(
            queue.as_str().into(),
            exchange.into(),
            "".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        publish_confirmed(&on_b, exchange, &format!("unbound-{i}")).await;
        let got = on_b
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        assert!(
            got.is_none(),
            "round {i}: node b still routed to a removed binding"
        );
    }
    let _ = a.close(200, "OK".into()).await;
    let _ = b.close(200, "OK".into()).await;
}

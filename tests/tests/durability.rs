//! No confirmed message is ever lost (invariant 1), whatever process is killed with SIGKILL;
//! unacked deliveries come back with `redelivered=true` (at-least-once).
//!
//! These tests need process control. Those that only kill and restart the broker as a whole
//! run against `warren dev`, or with `WARREN_TEST_REFERENCE=rabbitmq` against a throwaway
//! RabbitMQ (`scripts/test.sh --against-rabbitmq` does that), which proves the expectations:
//! after a SIGKILL every confirmed message comes back in order and every unacked one has
//! `redelivered=true`. Acks given just before the kill may be lost (RabbitMQ 3.10 brings such
//! messages back), and RabbitMQ marks even never-delivered recovered messages as redelivered,
//! so neither is asserted. The storage-node tests are Warren's alone.
#![allow(clippy::unwrap_used)]

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;
use tokio::time::timeout;
use warren_tests::WarrenDev;

/// Generous bound on any single broker round trip, so a hang fails instead of blocking CI.
const STEP: Duration = Duration::from_secs(60);

/// Upper bound on a whole test, so that a broker that stops answering fails the test (with
/// the stage it reached on stderr) instead of hanging the run.
const TEST_LIMIT: Duration = Duration::from_secs(300);

async fn bounded(test: impl std::future::Future<Output = ()>) {
    timeout(TEST_LIMIT, test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {TEST_LIMIT:?}"));
}

/// Await one broker operation, failing the test if it takes longer than [`STEP`].
async fn step<T>(what: &str, op: impl std::future::Future<Output = lapin::Result<T>>) -> T {
    eprintln!("stage: {what}");
    match timeout(STEP, op).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {STEP:?}"),
    }
}

async fn connect(url: &str) -> Connection {
    timeout(
        STEP,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

async fn durable_queue(channel: &Channel, name: &str) {
    timeout(
        STEP,
        channel.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.declare timed out")
    .expect("queue.declare");
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

type ConfirmResult = Result<lapin::Result<lapin::Confirmation>, tokio::time::error::Elapsed>;

/// The outcome of a stream of confirmed publishes.
#[derive(Default, Debug)]
struct Published {
    acked: BTreeSet<u64>,
    nacked: BTreeSet<u64>,
    error: Option<String>,
}

/// Publish messages `from..to` (body = decimal id) with up to `window` confirms in flight,
/// calling `at(i)` just before message `i` is published.
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    ids: std::ops::Range<u64>,
    window: usize,
    mut at: impl FnMut(u64),
) -> Published {
    let mut out = Published::default();
    let mut in_flight: VecDeque<(u64, PublisherConfirm)> = VecDeque::new();
    let settle = |id: u64, result: ConfirmResult, out: &mut Published| match result {
        Ok(Ok(c)) if c.is_ack() => {
            out.acked.insert(id);
        }
        Ok(Ok(_)) => {
            out.nacked.insert(id);
        }
        Ok(Err(e)) => {
            out.error.get_or_insert(format!("confirm of {id}: {e}"));
        }
        Err(_) => {
            out.error
                .get_or_insert(format!("confirm of {id} timed out"));
        }
    };
    for id in ids {
        at(id);
        if out.error.is_some() {
            break;
        }
        let publish = timeout(
            STEP,
            channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                id.to_string().as_bytes(),
                persistent(),
            ),
        )
        .await;
        match publish {
            Ok(Ok(confirm)) => in_flight.push_back((id, confirm)),
            Ok(Err(e)) => {
                out.error = Some(format!("publish of {id}: {e}"));
                break;
            }
            Err(_) => {
                out.error = Some(format!("publish of {id} timed out"));
                break;
            }
        }
        while in_flight.len() >= window {
            let (id, confirm) = in_flight.pop_front().unwrap();
            let result = timeout(STEP, confirm).await;
            settle(id, result, &mut out);
        }
    }
    // One deadline for the whole tail, so that a broker that stopped confirming costs one
    // STEP, not one per message in flight.
    let drain_until = tokio::time::Instant::now() + STEP;
    while let Some((id, confirm)) = in_flight.pop_front() {
        let result = tokio::time::timeout_at(drain_until, confirm).await;
        settle(id, result, &mut out);
    }
    out
}

/// One delivery as the tests see it.
#[derive(Debug, Clone, Copy)]
struct Got {
    id: u64,
    redelivered: bool,
}

/// Consume from `queue` with manual acks until every id in `want` was seen, acking each.
/// Fails if no progress is made for [`STEP`].
async fn consume_until(channel: &Channel, queue: &str, want: &BTreeSet<u64>) -> Vec<Got> {
    timeout(STEP, channel.basic_qos(500, BasicQosOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let mut consumer = timeout(
        STEP,
        channel.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let mut got = Vec::new();
    let mut missing = want.clone();
    eprintln!("stage: consuming {} messages", want.len());
    while !missing.is_empty() {
        let next = timeout(STEP, consumer.next()).await.unwrap_or_else(|_| {
            panic!(
                "no delivery for {STEP:?}; {} of {} wanted messages missing, first {:?}",
                missing.len(),
                want.len(),
                missing.iter().take(10).collect::<Vec<_>>()
            )
        });
        let delivery = next.expect("consumer ended").expect("delivery");
        let id: u64 = std::str::from_utf8(&delivery.data)
            .unwrap()
            .parse()
            .unwrap();
        missing.remove(&id);
        got.push(Got {
            id,
            redelivered: delivery.redelivered,
        });
        step("basic.ack", delivery.ack(BasicAckOptions::default())).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_node_killed_during_confirmed_publishes_loses_nothing() {
    bounded(async {
        let dev = WarrenDev::start().unwrap();
        let conn = connect(dev.amqp_url()).await;
        let channel = step("channel.open", conn.create_channel()).await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let queue = warren_tests::unique_name("kill-one-storage");
        durable_queue(&channel, &queue).await;

        const TOTAL: u64 = 3000;
        const KILL_AT: u64 = 1000;
        let mut killed = false;
        let published = publish_confirmed(&channel, &queue, 0..TOTAL, 64, |id| {
            if id == KILL_AT {
                eprintln!("stage: SIGKILL storage-1 after {id} publishes");
                dev.kill_storage(1).unwrap();
                killed = true;
            }
        })
        .await;
        assert!(killed);
        assert!(
            published.error.is_none(),
            "publishing stopped after a storage node was killed: {:?} ({} acked)",
            published.error,
            published.acked.len()
        );

        let consumer_channel = step("channel.open", conn.create_channel()).await;
        let got = consume_until(&consumer_channel, &queue, &published.acked).await;
        let seen: BTreeSet<u64> = got.iter().map(|g| g.id).collect();
        assert!(published.acked.is_subset(&seen));
        assert!(
            published.nacked.is_empty(),
            "{} publishes were nacked after losing one of three storage nodes (first {:?})",
            published.nacked.len(),
            published.nacked.iter().take(10).collect::<Vec<_>>()
        );
        step("connection.close", conn.close(200, "bye".into())).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_kill_all_recovers_confirmed_in_order_and_redelivers_unacked() {
    bounded(async {
        let mut dev = warren_tests::start_restartable().unwrap();
        let queue = warren_tests::unique_name("kill-all");
        const TOTAL: u64 = 1000;
        const ACKED: u64 = 200;
        const UNACKED: u64 = 100;
        {
            let conn = connect(dev.amqp_url()).await;
            let channel = step("channel.open", conn.create_channel()).await;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            durable_queue(&channel, &queue).await;
            let published = publish_confirmed(&channel, &queue, 0..TOTAL, 100, |_| {}).await;
            assert!(published.error.is_none(), "{:?}", published.error);
            assert_eq!(published.acked.len() as u64, TOTAL, "{published:?}");

            // Take ACKED + UNACKED deliveries, ack the first ACKED, hold the rest unacked.
            let consumer_channel = step("channel.open", conn.create_channel()).await;
            consumer_channel
                .basic_qos((ACKED + UNACKED) as u16, BasicQosOptions::default())
                .await
                .unwrap();
            let mut consumer = consumer_channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            for expected in 0..ACKED + UNACKED {
                let delivery = timeout(STEP, consumer.next())
                    .await
                    .expect("delivery timed out")
                    .unwrap()
                    .unwrap();
                assert_eq!(delivery.data, expected.to_string().as_bytes());
                assert!(!delivery.redelivered);
                if expected < ACKED {
                    step("basic.ack", delivery.ack(BasicAckOptions::default())).await;
                }
            }
            // A synchronous method after the acks: the broker has processed them in order.
            consumer_channel
                .basic_qos((ACKED + UNACKED) as u16, BasicQosOptions::default())
                .await
                .unwrap();

            dev.kill_all_sigkill().unwrap();
            drop(consumer);
        }

        dev.restart().unwrap();
        let conn = connect(dev.amqp_url()).await;
        let channel = step("channel.open", conn.create_channel()).await;
        let want: BTreeSet<u64> = (ACKED..TOTAL).collect();
        let got = consume_until(&channel, &queue, &want).await;
        // Acks are not confirmed in AMQP, so acked messages may come back (at-least-once), but
        // every message not acked must, once, in publish order.
        let rest: Vec<Got> = got.iter().copied().filter(|g| g.id >= ACKED).collect();
        let ids: Vec<u64> = rest.iter().map(|g| g.id).collect();
        assert_eq!(
            ids,
            want.iter().copied().collect::<Vec<_>>(),
            "order or duplicates"
        );
        for g in &rest {
            if g.id < ACKED + UNACKED {
                assert!(
                    g.redelivered,
                    "unacked message {} not marked redelivered",
                    g.id
                );
            }
        }
        step("connection.close", conn.close(200, "bye".into())).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_all_during_confirmed_publishes_keeps_every_confirmed_message() {
    bounded(async {
        let mut dev = warren_tests::start_restartable().unwrap();
        let queue = warren_tests::unique_name("kill-all-publishing");
        let published = {
            let conn = connect(dev.amqp_url()).await;
            let channel = step("channel.open", conn.create_channel()).await;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            durable_queue(&channel, &queue).await;
            const KILL_AT: u64 = 1500;
            let dev_ref = &mut *dev;
            let published = publish_confirmed(&channel, &queue, 0..1_000_000, 64, |id| {
                if id == KILL_AT {
                    dev_ref.kill_all_sigkill().unwrap();
                }
            })
            .await;
            assert!(
                published.error.is_some(),
                "publishing went on after every process was killed"
            );
            published
        };
        assert!(
            published.acked.len() >= 1000,
            "too few confirms before the kill: {}",
            published.acked.len()
        );

        dev.restart().unwrap();
        let conn = connect(dev.amqp_url()).await;
        let channel = step("channel.open", conn.create_channel()).await;
        let got = consume_until(&channel, &queue, &published.acked).await;
        let ids: Vec<u64> = got.iter().map(|g| g.id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "recovered messages out of order or duplicated"
        );
        step("connection.close", conn.close(200, "bye".into())).await;
    })
    .await;
}

/// The publish and consume helpers above on a healthy broker (also runs against
/// `WARREN_TEST_AMQP_URL`): persistent confirmed messages to a durable queue, all back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_persistent_stream_round_trips_in_order() {
    bounded(async {
        let broker = warren_tests::Broker::from_env_or_start().unwrap();
        let conn = connect(broker.url()).await;
        let channel = step("channel.open", conn.create_channel()).await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let queue = warren_tests::unique_name("stream");
        durable_queue(&channel, &queue).await;
        let published = publish_confirmed(&channel, &queue, 0..3000, 64, |_| {}).await;
        assert!(published.error.is_none(), "{:?}", published.error);
        assert!(published.nacked.is_empty(), "{:?}", published.nacked);
        assert_eq!(published.acked.len(), 3000);
        let got = consume_until(&channel, &queue, &published.acked).await;
        let ids: Vec<u64> = got.iter().map(|g| g.id).collect();
        assert_eq!(ids, (0..3000).collect::<Vec<_>>());
        assert!(got.iter().all(|g| !g.redelivered));
        channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .unwrap();
        step("connection.close", conn.close(200, "bye".into())).await;
    })
    .await;
}

/// With two of three storage nodes gone, no write can reach the ack quorum (2), so no
/// publish may be confirmed: a confirm now would be a lie that the next failure exposes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_ack_quorum_no_publish_is_confirmed() {
    bounded(async {
        let dev = WarrenDev::start().unwrap();
        let conn = connect(dev.amqp_url()).await;
        let channel = step("channel.open", conn.create_channel()).await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let queue = warren_tests::unique_name("no-quorum");
        durable_queue(&channel, &queue).await;
        let before = publish_confirmed(&channel, &queue, 0..100, 10, |_| {}).await;
        assert_eq!(before.acked.len(), 100, "{before:?}");

        dev.kill_storage(1).unwrap();
        dev.kill_storage(2).unwrap();
        let mut confirms = Vec::new();
        for id in 100..110u64 {
            let publish = timeout(
                STEP,
                channel.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    id.to_string().as_bytes(),
                    persistent(),
                ),
            )
            .await
            .expect("basic.publish must not block the client");
            match publish {
                Ok(confirm) => confirms.push(confirm),
                Err(_) => break, // the broker closed the channel or connection: not a confirm
            }
        }
        // Whatever happens within this window (waiting, nacks, a closed channel), it is not an
        // ack.
        let window_end = tokio::time::Instant::now() + Duration::from_secs(5);
        for confirm in confirms {
            if let Ok(Ok(c)) = tokio::time::timeout_at(window_end, confirm).await {
                assert!(
                    !c.is_ack(),
                    "a publish was confirmed with only one storage node alive"
                );
            }
        }
        // Losing storage must not cost the client its connection (like a RabbitMQ quorum queue
        // without a majority, publishes just stay unconfirmed).
        assert!(
            conn.status().connected(),
            "the connection did not survive the loss of two storage nodes"
        );
    })
    .await;
}

/// Durable exchanges, queues and bindings survive a restart; transient ones do not (as in
/// RabbitMQ, where non-durable entities are gone after a node restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_durable_topology_and_drops_transient_topology() {
    bounded(async {
        use lapin::ExchangeKind;
        use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
        let mut dev = warren_tests::start_restartable().unwrap();
        let durable_x = warren_tests::unique_name("durable-x");
        let transient_x = warren_tests::unique_name("transient-x");
        let durable_q = warren_tests::unique_name("durable-q");
        let transient_q = warren_tests::unique_name("transient-q");
        {
            let conn = connect(dev.amqp_url()).await;
            let ch = step("channel.open", conn.create_channel()).await;
            for (name, durable) in [(&durable_x, true), (&transient_x, false)] {
                ch.exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            }
            durable_queue(&ch, &durable_q).await;
            ch.queue_declare(
                transient_q.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            ch.queue_bind(
                durable_q.as_str().into(),
                durable_x.as_str().into(),
                "orders.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            step("connection.close", conn.close(200, "bye".into())).await;
        }

        dev.stop().unwrap();
        dev.restart().unwrap();

        let conn = connect(dev.amqp_url()).await;
        let ch = step("channel.open", conn.create_channel()).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // The binding is still there: routing through the durable exchange reaches the queue.
        let confirm = ch
            .basic_publish(
                durable_x.as_str().into(),
                "orders.eu.new".into(),
                BasicPublishOptions::default(),
                b"routed after restart",
                persistent(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let got = timeout(
            STEP,
            ch.basic_get(
                durable_q.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            ),
        )
        .await
        .unwrap()
        .unwrap()
        .expect("message routed through the recovered binding");
        assert_eq!(got.delivery.data, b"routed after restart");

        for (what, result) in [
            (
                "transient queue",
                ch.queue_declare(
                    transient_q.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|_| ()),
            ),
            (
                "transient exchange",
                conn.create_channel()
                    .await
                    .unwrap()
                    .exchange_declare(
                        transient_x.as_str().into(),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await,
            ),
        ] {
            let err = result.expect_err(&format!("the {what} survived a restart"));
            assert!(
                format!("{err}").contains("NOT_FOUND") || format!("{err:?}").contains("404"),
                "{what}: {err:?}"
            );
        }
    })
    .await;
}

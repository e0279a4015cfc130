//! Several compute nodes over one in-process storage cluster, real sockets and a real
//! client: a queue has one owner, and clients of every other node reach it through the
//! peer transport (publish and confirm, consume, deliver and ack, get, purge, delete);
//! when the owner stops, another node takes the queue over and redelivers what was unacked.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Storage, connect, converge, node_url, publish_confirmed, start_cluster_node, start_two_nodes,
};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use tokio::time::timeout;
use warren_compute::ComputeNode;
use warren_compute::node::{Node, QueueDescriptor};

const STEP: Duration = Duration::from_secs(60);

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

async fn descriptor(storage: &Storage, node: &Arc<Node>, queue: &str) -> Option<QueueDescriptor> {
    let log = node.topology.snapshot("/")?.queues.get(queue)?.log_id;
    let raw = storage
        .client()
        .await
        .registers()
        .get(&format!("warren/queue-owner/{log}"))
        .await
        .unwrap()?;
    serde_json::from_slice(&raw).ok()
}

/// The owner of `queue` among `nodes` (by its descriptor), and the index of a non-owner,
/// once every node's topology knows the queue (nodes re-read topology every second).
async fn owner_index(storage: &Storage, nodes: &[&ComputeNode], queue: &str) -> (usize, usize) {
    for _ in 0..600 {
        if nodes.iter().all(|n| {
            n.node()
                .topology
                .snapshot("/")
                .is_some_and(|t| t.queues.contains_key(queue))
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = descriptor(storage, nodes[0].node(), queue)
        .await
        .expect("a durable queue in use has a descriptor");
    let owner = nodes
        .iter()
        .position(|n| n.node().node_id == d.owner)
        .expect("the owner is one of the nodes");
    (owner, (owner + 1) % nodes.len())
}

/// Declare durable `queue` through `nodes[0]`, publish `n` confirmed persistent messages to
/// it through a node that does not own it, and return a connection to that node.
async fn through_a_non_owner(
    storage: &Storage,
    nodes: &[&ComputeNode],
    queue: &str,
    n: u32,
) -> lapin::Connection {
    let ch = connect(&node_url(nodes[0]))
        .await
        .create_channel()
        .await
        .unwrap();
    ch.queue_declare(queue.into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let (_, other) = owner_index(storage, nodes, queue).await;
    let conn = connect(&node_url(nodes[other])).await;
    let pch = conn.create_channel().await.unwrap();
    publish_confirmed(&pch, queue, n).await;
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_through_a_node_that_does_not_own_the_queue() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let nodes = [&a, &b];
    let setup = connect(&node_url(&a)).await;
    let ch = setup.create_channel().await.unwrap();
    ch.queue_declare("orders".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let (owner, other) = owner_index(&storage, &nodes, "orders").await;
    let before = descriptor(&storage, a.node(), "orders").await.unwrap();

    // Publisher and consumer both on the node that does not own the queue.
    let conn = connect(&node_url(nodes[other])).await;
    let pch = conn.create_channel().await.unwrap();
    publish_confirmed(&pch, "orders", 200).await;
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "orders".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..200u32 {
        let d = timeout(STEP, consumer.next())
            .await
            .expect("delivery timed out")
            .unwrap()
            .unwrap();
        assert_eq!(d.data, i.to_be_bytes(), "in order");
        assert!(!d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Acks reached the owner: the queue is empty there, and nothing moved.
    let och = connect(&node_url(nodes[owner]))
        .await
        .create_channel()
        .await
        .unwrap();
    let mut empty = false;
    for _ in 0..100 {
        let q = och
            .queue_declare(
                "orders".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if q.message_count() == 0 && q.consumer_count() == 1 {
            empty = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(empty, "the owner saw every ack and the remote consumer");
    let after = descriptor(&storage, a.node(), "orders").await.unwrap();
    assert_eq!(
        before, after,
        "one owner, no takeover, while both nodes were used"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_purge_and_delete_through_a_non_owner() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let nodes = [&a, &b];
    let ch = connect(&node_url(&a)).await.create_channel().await.unwrap();
    ch.queue_declare("jobs".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let (_, other) = owner_index(&storage, &nodes, "jobs").await;
    let ch = connect(&node_url(nodes[other]))
        .await
        .create_channel()
        .await
        .unwrap();
    publish_confirmed(&ch, "jobs", 10).await;
    let q = ch
        .queue_declare("jobs".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(q.message_count(), 10);
    let got = ch
        .basic_get("jobs".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, 0u32.to_be_bytes());
    assert_eq!(got.message_count, 9);
    got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    let purged = ch
        .queue_purge("jobs".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 9);
    let empty = ch
        .basic_get("jobs".into(), BasicGetOptions::default())
        .await
        .unwrap();
    assert!(empty.is_none());
    publish_confirmed(&ch, "jobs", 3).await;
    let deleted = ch
        .queue_delete("jobs".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    let err = ch
        .queue_declare(
            "jobs".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(err.is_err(), "the queue is gone");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_stops_and_another_node_redelivers_the_unacked() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let ch = connect(&node_url(&a)).await.create_channel().await.unwrap();
    ch.queue_declare("work".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let (owner, _) = owner_index(&storage, &[&a, &b], "work").await;
    // Read through the declaring node: the other's topology snapshot may lag a moment.
    let before = descriptor(&storage, a.node(), "work").await.unwrap();
    let (owner_node, survivor) = if owner == 0 { (a, b) } else { (b, a) };

    let conn = connect(&node_url(&survivor)).await;
    let pch = conn.create_channel().await.unwrap();
    publish_confirmed(&pch, "work", 20).await;
    let cch = conn.create_channel().await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "work".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..20 {
        let d = timeout(STEP, consumer.next())
            .await
            .expect("delivery timed out")
            .unwrap()
            .unwrap();
        assert!(!d.redelivered);
    }
    owner_node.stop().await;
    // The consumer is cancelled by the server (its queue's node went away).
    let end = timeout(STEP, consumer.next())
        .await
        .expect("cancel timed out");
    assert!(end.is_none() || end.unwrap().is_err(), "consumer cancelled");

    // A fresh consumer on the surviving node gets every unacked message back, redelivered.
    let mut seen = Vec::new();
    'retry: for _ in 0..120 {
        let Ok(ch) = conn.create_channel().await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let Ok(mut consumer) = ch
            .basic_consume(
                "work".into(),
                "c2".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        while seen.len() < 20 {
            match timeout(STEP, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    assert!(d.redelivered, "unacked messages come back redelivered");
                    seen.push(u32::from_be_bytes(d.data[..4].try_into().unwrap()));
                    d.ack(BasicAckOptions::default()).await.unwrap();
                }
                _ => continue 'retry,
            }
        }
        break;
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..20).collect::<Vec<u32>>());
    let after = descriptor(&storage, survivor.node(), "work").await.unwrap();
    assert_eq!(
        after.owner,
        survivor.node().node_id,
        "the survivor owns the queue"
    );
    assert!(after.epoch > before.epoch, "taken over with a higher epoch");
    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_queues_move_to_a_joining_node_without_redelivered_flags() {
    let storage = Storage::start().await;
    let a = start_cluster_node(&storage, "compute-0").await;
    converge(&[&a]).await;
    let conn = connect(&node_url(&a)).await;
    let ch = conn.create_channel().await.unwrap();
    let names: Vec<String> = (0..16).map(|i| format!("idle-{i}")).collect();
    for name in &names {
        ch.queue_declare(name.as_str().into(), durable(), FieldTable::default())
            .await
            .unwrap();
        publish_confirmed(&ch, name, 2).await;
        // Deliver the first message once and put it back: it is redelivered from now on.
        let got = ch
            .basic_get(name.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        got.delivery
            .reject(BasicRejectOptions { requeue: true })
            .await
            .unwrap();
    }
    let before: Vec<QueueDescriptor> = {
        let mut v = Vec::new();
        for name in &names {
            v.push(descriptor(&storage, a.node(), name).await.unwrap());
        }
        v
    };
    assert!(before.iter().all(|d| d.owner == a.node().node_id));

    let b = start_cluster_node(&storage, "compute-1").await;
    converge(&[&a, &b]).await;
    let view = a.node().membership.as_ref().unwrap().view();
    let movers: Vec<usize> = (0..names.len())
        .filter(|i| {
            warren_compute::cluster::ownership::owner_of(
                &view,
                &warren_compute::cluster::ownership::queue_key("/", &names[*i]),
            ) == Some(b.node().node_id)
        })
        .collect();
    assert!(!movers.is_empty(), "some queue hashes to the new node");
    for &i in &movers {
        let mut moved = false;
        for _ in 0..300 {
            let d = descriptor(&storage, a.node(), &names[i]).await.unwrap();
            if d.owner == b.node().node_id {
                moved = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(moved, "idle queue {} handed off to the new node", names[i]);
    }
    // Through either node, the moved queues kept their messages and their flags: only the
    // message delivered before is redelivered.
    let bch = connect(&node_url(&b)).await.create_channel().await.unwrap();
    for (n, &i) in movers.iter().enumerate() {
        let ch = if n % 2 == 0 { &bch } else { &ch };
        let first = ch
            .basic_get(names[i].as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("first message kept");
        assert_eq!(first.delivery.data, 0u32.to_be_bytes());
        assert!(first.delivery.redelivered, "delivered before the hand-off");
        let second = ch
            .basic_get(names[i].as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("second message kept");
        assert_eq!(second.delivery.data, 1u32.to_be_bytes());
        assert!(
            !second.delivery.redelivered,
            "never delivered: a graceful hand-off does not flag it"
        );
        assert_eq!(second.message_count, 0);
        let d = descriptor(&storage, a.node(), &names[i]).await.unwrap();
        assert_eq!(d.owner, b.node().node_id, "the new node serves it");
    }
    // Queues that hash to the old node stayed there, with no takeover.
    for (i, name) in names.iter().enumerate() {
        if !movers.contains(&i) {
            let d = descriptor(&storage, a.node(), name).await.unwrap();
            assert_eq!(d, before[i], "{name} did not move");
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_garbage_loses_its_stream_and_nothing_else() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let view = a.node().membership.as_ref().unwrap().view();
    let peer_addr = view.members[&a.node().node_id].peer_addr;
    // A cluster member (it holds a cluster certificate) that speaks nonsense.
    let endpoint =
        warren_compute::cluster::peer::endpoint(&storage.tls(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let conn = endpoint
        .connect(peer_addr, warren_common::tls::CLUSTER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 3, 0x7f, 1, 2]).await.unwrap();
    let mut buf = [0u8; 64];
    let end = timeout(STEP, recv.read(&mut buf))
        .await
        .expect("stream closed");
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "the bad stream is closed without an answer: {end:?}"
    );
    // A second, well-formed session on the same connection still works: only the stream
    // was closed. It asks for a queue that does not exist and is refused politely.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut frame = bytes::BytesMut::new();
    warren_proto::internal::peer::encode_request(
        &warren_proto::internal::peer::PeerRequest::Open {
            vhost: "/".into(),
            queue: "missing".into(),
        },
        &mut frame,
    );
    send.write_all(&frame).await.unwrap();
    let answer = timeout(STEP, recv.read_to_end(1 << 16))
        .await
        .expect("answer")
        .unwrap();
    let mut answer = bytes::BytesMut::from(&answer[..]);
    assert!(matches!(
        warren_proto::internal::peer::decode_event(&mut answer).unwrap(),
        Some(warren_proto::internal::peer::PeerEvent::Refused { .. })
    ));
    // Clients of both nodes are unaffected: forwarding between them still works.
    let ch = connect(&node_url(&a)).await.create_channel().await.unwrap();
    ch.queue_declare("after".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let nodes = [&a, &b];
    let (_, other) = owner_index(&storage, &nodes, "after").await;
    let ch = connect(&node_url(nodes[other]))
        .await
        .create_channel()
        .await
        .unwrap();
    publish_confirmed(&ch, "after", 5).await;
    let got = ch
        .basic_get("after".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.message_count, 4);
    endpoint.close(0u32.into(), b"done");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_used_through_three_nodes_at_once_keeps_one_owner() {
    let storage = Storage::start().await;
    let a = start_cluster_node(&storage, "compute-0").await;
    let b = start_cluster_node(&storage, "compute-1").await;
    let c = start_cluster_node(&storage, "compute-2").await;
    let nodes = [&a, &b, &c];
    converge(&nodes).await;
    let ch = connect(&node_url(&a)).await.create_channel().await.unwrap();
    ch.queue_declare("shared".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    owner_index(&storage, &nodes, "shared").await;
    let before = descriptor(&storage, a.node(), "shared").await.unwrap();
    // A consumer on every node, then a publisher on every node.
    let mut conns = Vec::new();
    let mut consumers = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let conn = connect(&node_url(n)).await;
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
        consumers.push(
            ch.basic_consume(
                "shared".into(),
                format!("c{i}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap(),
        );
        conns.push(conn);
    }
    let mut publishers = Vec::new();
    for (i, conn) in conns.iter().enumerate() {
        let ch = conn.create_channel().await.unwrap();
        publishers.push(tokio::spawn(async move {
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut confirms = Vec::new();
            for j in 0..100u32 {
                let id = i as u32 * 1000 + j;
                confirms.push(
                    ch.basic_publish(
                        "".into(),
                        "shared".into(),
                        BasicPublishOptions::default(),
                        &id.to_be_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
                );
            }
            for c in confirms {
                assert!(timeout(STEP, c).await.unwrap().unwrap().is_ack());
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    // Every message is delivered exactly once across the three consumers.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for mut consumer in consumers {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let id = u32::from_be_bytes(d.data[..4].try_into().unwrap());
                assert!(!d.redelivered, "no takeover, so nothing is redelivered");
                d.ack(BasicAckOptions::default()).await.unwrap();
                if tx.send(id).is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut seen = Vec::new();
    while seen.len() < 300 {
        let id = timeout(STEP, rx.recv())
            .await
            .expect("deliveries timed out")
            .unwrap();
        seen.push(id);
    }
    seen.sort_unstable();
    let want: Vec<u32> = (0..3u32)
        .flat_map(|i| (0..100).map(move |j| i * 1000 + j))
        .collect();
    assert_eq!(seen, want, "each message delivered once");
    let after = descriptor(&storage, a.node(), "shared").await.unwrap();
    assert_eq!(before, after, "one owner and one epoch throughout");
    for t in tasks {
        t.abort();
    }
    drop(conns);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_wide_prefetch_holds_for_a_remote_queue() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let nodes = [&a, &b];
    let conn = through_a_non_owner(&storage, &nodes, "limited", 20).await;
    let pch = conn.create_channel().await.unwrap();
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(5, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut consumer = cch
        .basic_consume(
            "limited".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(
            timeout(STEP, consumer.next())
                .await
                .expect("delivery timed out")
                .unwrap()
                .unwrap(),
        );
    }
    // The owner handed out exactly the channel's credit: 15 stay ready.
    let q = pch
        .queue_declare(
            "limited".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 15);
    // Acks give the credit back across nodes: the rest arrives.
    for d in held.drain(..) {
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    for _ in 0..15 {
        let d = timeout(STEP, consumer.next())
            .await
            .expect("delivery after acks timed out")
            .unwrap()
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    a.stop().await;
    b.stop().await;
}

/// An RPC server consuming `queue` on node `server_node` and a requester on node
/// `requester_node` consuming its direct reply-to name (no-ack), across two nodes.
struct RpcAcrossNodes {
    _server: lapin::Connection,
    server: Channel,
    requests: lapin::Consumer,
    _requester: lapin::Connection,
    requester: Channel,
    replies: lapin::Consumer,
}

async fn rpc_across_nodes(
    storage: &Storage,
    requester_node: &ComputeNode,
    server_node: &ComputeNode,
    queue: &str,
) -> RpcAcrossNodes {
    let server_conn = connect(&node_url(server_node)).await;
    let server = server_conn.create_channel().await.unwrap();
    server
        .queue_declare(queue.into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let requests = server
        .basic_consume(
            queue.into(),
            "server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    owner_index(storage, &[requester_node, server_node], queue).await;
    let requester_conn = connect(&node_url(requester_node)).await;
    let requester = requester_conn.create_channel().await.unwrap();
    let replies = requester
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "requester".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    RpcAcrossNodes {
        _server: server_conn,
        server,
        requests,
        _requester: requester_conn,
        requester,
        replies,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_reaches_a_requester_on_another_node() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;

    // The RPC server on node B; the requester on node A.
    let RpcAcrossNodes {
        _server: _server_conn,
        server: sch,
        mut requests,
        _requester: _requester_conn,
        requester: rch,
        mut replies,
    } = rpc_across_nodes(&storage, &a, &b, "rpc").await;
    for i in 0..3u32 {
        rch.basic_publish(
            "".into(),
            "rpc".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id(format!("req-{i}").into()),
        )
        .await
        .unwrap();

        let req = timeout(STEP, requests.next())
            .await
            .expect("request timed out")
            .unwrap()
            .unwrap();
        assert_eq!(req.data, i.to_be_bytes());
        let reply_to = req.properties.reply_to().clone().unwrap().to_string();
        let home = a.node().node_id.0.simple().to_string();
        assert!(
            reply_to.starts_with(&format!("amq.rabbitmq.reply-to.{home}.")),
            "the reply name carries its home node: {reply_to}"
        );
        sch.basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions::default(),
            format!("reply-{i}").as_bytes(),
            BasicProperties::default()
                .with_correlation_id(req.properties.correlation_id().clone().unwrap()),
        )
        .await
        .unwrap();
        req.ack(BasicAckOptions::default()).await.unwrap();

        let reply = timeout(STEP, replies.next())
            .await
            .expect("reply timed out")
            .unwrap()
            .unwrap();
        assert_eq!(reply.data, format!("reply-{i}").as_bytes());
        assert_eq!(
            reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some(format!("req-{i}").as_str())
        );
    }
    a.stop().await;
    b.stop().await;
}

/// The ready count of `queue`, asked through `ch`.
async fn ready(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

async fn next_delivery(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    timeout(STEP, consumer.next())
        .await
        .expect("delivery timed out")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_wide_prefetch_changed_after_consuming_reaches_the_remote_owner() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let nodes = [&a, &b];
    let conn = through_a_non_owner(&storage, &nodes, "requalified", 20).await;
    let pch = conn.create_channel().await.unwrap();
    let cch = conn.create_channel().await.unwrap();
    let global = BasicQosOptions { global: true };
    cch.basic_qos(1, global).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "requalified".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut held = vec![next_delivery(&mut consumer).await];

    // Raised after the consume: the owner hands out two more.
    cch.basic_qos(3, global).await.unwrap();
    for _ in 0..2 {
        held.push(next_delivery(&mut consumer).await);
    }
    // A qos round trip on the consuming channel: everything it sent before has reached
    // the queue's proxy, so the count asked next is taken after the owner acted on it.
    cch.basic_qos(3, global).await.unwrap();
    assert_eq!(ready(&pch, "requalified").await, 17, "exactly 3 unacked");

    // Lowered to 2 while 3 are held: two acks free room for one more, not two.
    cch.basic_qos(2, global).await.unwrap();
    for d in held.drain(..2) {
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    held.push(next_delivery(&mut consumer).await);
    cch.basic_qos(2, global).await.unwrap();
    assert_eq!(ready(&pch, "requalified").await, 16, "exactly 2 unacked");

    // Lifted: the rest arrives.
    cch.basic_qos(0, global).await.unwrap();
    for _ in 0..16 {
        held.push(next_delivery(&mut consumer).await);
    }
    assert_eq!(held.len(), 18);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_consumer_prefetch_changed_after_consuming_applies_to_later_consumers_only() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let nodes = [&a, &b];
    let conn = through_a_non_owner(&storage, &nodes, "per-consumer", 20).await;
    let pch = conn.create_channel().await.unwrap();
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut first = cch
        .basic_consume(
            "per-consumer".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _held = next_delivery(&mut first).await;
    // As in RabbitMQ, a per-consumer prefetch set now is for consumers created from now on.
    cch.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    assert_eq!(
        ready(&pch, "per-consumer").await,
        19,
        "the first consumer keeps 1"
    );
    let mut second = cch
        .basic_consume(
            "per-consumer".into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut later = Vec::new();
    for _ in 0..3 {
        later.push(next_delivery(&mut second).await);
    }
    assert_eq!(ready(&pch, "per-consumer").await, 16, "1 + 3 unacked");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_replies_from_another_node_arrive_in_publish_order() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;

    // The RPC server on node B; the requester on node A.
    let RpcAcrossNodes {
        _server: _server_conn,
        server: sch,
        mut requests,
        _requester: _requester_conn,
        requester: rch,
        mut replies,
    } = rpc_across_nodes(&storage, &a, &b, "rpc-stream").await;
    rch.basic_publish(
        "".into(),
        "rpc-stream".into(),
        BasicPublishOptions::default(),
        b"stream me",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    let req = next_delivery(&mut requests).await;
    let reply_to = req.properties.reply_to().clone().unwrap().to_string();
    req.ack(BasicAckOptions::default()).await.unwrap();

    // Published back to back on node B, each crossing to node A.
    for i in 0..200u32 {
        sch.basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    for i in 0..200u32 {
        let reply = next_delivery(&mut replies).await;
        assert_eq!(reply.data, i.to_be_bytes(), "reply {i} in publish order");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_stream_delivers_in_order_and_closes_on_anything_but_replies() {
    use warren_proto::internal::peer::{PeerRequest, WireMessage, encode_request};
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;

    // A requester on node A; its reply name, read back from its request.
    let requester = connect(&node_url(&a)).await;
    let rch = requester.create_channel().await.unwrap();
    rch.queue_declare("rpc-raw".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let mut replies = rch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "requester".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    rch.basic_publish(
        "".into(),
        "rpc-raw".into(),
        BasicPublishOptions::default(),
        b"req",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    let mut req = None;
    for _ in 0..100 {
        req = rch
            .basic_get("rpc-raw".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if req.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let name = req
        .expect("the request")
        .properties
        .reply_to()
        .clone()
        .unwrap()
        .to_string();
    let reply = |body: &'static [u8]| PeerRequest::DirectReply {
        name: name.clone(),
        msg: WireMessage {
            exchange: String::new(),
            routing_key: name.clone(),
            persistent: false,
            priority: None,
            expiration_ms: None,
            resent: false,
            properties: bytes::Bytes::from_static(&[0, 0]),
            body: bytes::Bytes::from_static(body),
        },
    };

    // A cluster member writing a reply stream to node A by hand, a frame per write.
    let view = a.node().membership.as_ref().unwrap().view();
    let peer_addr = view.members[&a.node().node_id].peer_addr;
    let endpoint =
        warren_compute::cluster::peer::endpoint(&storage.tls(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let conn = endpoint
        .connect(peer_addr, warren_common::tls::CLUSTER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    for body in [&b"one"[..], b"two", b"three"] {
        let mut frame = bytes::BytesMut::new();
        encode_request(&reply(body), &mut frame);
        send.write_all(&frame).await.unwrap();
        let got = next_delivery(&mut replies).await;
        assert_eq!(got.data, body, "replies arrive as the stream carries them");
    }
    // Anything but a reply ends the stream (the home node stops reading it).
    let mut frame = bytes::BytesMut::new();
    encode_request(
        &PeerRequest::Open {
            vhost: "/".into(),
            queue: "rpc-raw".into(),
        },
        &mut frame,
    );
    send.write_all(&frame).await.unwrap();
    let stopped = timeout(STEP, send.stopped())
        .await
        .expect("the stream is stopped");
    assert!(
        matches!(stopped, Ok(Some(_))),
        "stopped by the home node: {stopped:?}"
    );
    // A new reply stream on the same connection still works.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut frame = bytes::BytesMut::new();
    encode_request(&reply(b"four"), &mut frame);
    send.write_all(&frame).await.unwrap();
    assert_eq!(next_delivery(&mut replies).await.data, b"four");
    endpoint.close(0u32.into(), b"done");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_wide_prefetch_counts_remote_deliveries_against_local_queues() {
    let storage = Storage::start().await;
    let (a, b) = start_two_nodes(&storage).await;
    let nodes = [&a, &b];
    // One queue owned by node A and one by node B (ownership is by hashing).
    let ch = connect(&node_url(&a)).await.create_channel().await.unwrap();
    let (mut on_a, mut on_b) = (None, None);
    for i in 0..32 {
        let name = format!("mixed-{i}");
        ch.queue_declare(name.as_str().into(), durable(), FieldTable::default())
            .await
            .unwrap();
        let (owner, _) = owner_index(&storage, &nodes, &name).await;
        let slot = if owner == 0 { &mut on_a } else { &mut on_b };
        slot.get_or_insert(name);
        if on_a.is_some() && on_b.is_some() {
            break;
        }
    }
    let (remote, local) = (on_a.unwrap(), on_b.unwrap());
    // Clients of node B: `remote` is forwarded to node A, `local` is served here.
    let conn = connect(&node_url(&b)).await;
    let pch = conn.create_channel().await.unwrap();
    publish_confirmed(&pch, &remote, 5).await;
    publish_confirmed(&pch, &local, 5).await;
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(2, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut from_remote = cch
        .basic_consume(
            remote.as_str().into(),
            "r".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let held = [
        next_delivery(&mut from_remote).await,
        next_delivery(&mut from_remote).await,
    ];
    // The channel holds its limit already: the local queue hands out nothing.
    let mut from_local = cch
        .basic_consume(
            local.as_str().into(),
            "l".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        ready(&pch, &local).await,
        5,
        "nothing beyond the channel's limit"
    );
    // Acking the remote deliveries gives the channel its credit back, here too. The remote
    // consumer goes first: otherwise the remote queue may take the credit back first (it
    // has messages too), which the shared limit allows.
    cch.basic_cancel("r".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    for d in held {
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let d = next_delivery(&mut from_local).await;
    d.ack(BasicAckOptions::default()).await.unwrap();
    a.stop().await;
    b.stop().await;
}

//! Compute membership over a real in-process storage cluster: generations at join and
//! restart, eviction of a member whose lease lapsed, and what an evicted node does (drops
//! its clients with 320, joins again with a fresh generation, and serves again).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Storage;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::{Instant, timeout};
use warren_common::{Generation, NodeId, Zone};
use warren_compute::cluster::membership::Membership;
use warren_compute::config::ClusterConfig;
use warren_compute::meta::Meta;
use warren_compute::{ComputeConfig, ComputeNode};
use warren_storage::StorageError;
use warren_storage::client::Registers;
use warren_storage::meta::{
    self, COMPUTE_NODES_KEY, ComputeRecord, ComputeRegistry, MemberState, NODES_KEY, NodeRecord,
    NodeRegistry,
};

/// Bound on anything that takes a few lease periods; loops end as soon as it happened.
const DEADLINE: Duration = Duration::from_secs(60);

/// Short leases so that tests see evictions quickly. Not shorter: every renewal is a
/// CASPaxos round on one register, fsync'd by three acceptors that share this test's disk,
/// and at ten renewals a second per member, rounds on a slow disk time out for seconds, so
/// that a live member looks lapsed.
fn short_leases() -> ClusterConfig {
    ClusterConfig {
        renew_ms: 200,
        lease_ms: 1_000,
        storage_lease_ms: 30_000,
    }
}

fn config(storage: &Storage, name: &str) -> ComputeConfig {
    let mut config = ComputeConfig::new(storage.tls());
    config.node_name = name.into();
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    config.peer_listen = "127.0.0.1:0".parse().unwrap();
    config.storage_seeds = storage.seeds();
    config.cluster = short_leases();
    config
}

async fn start(storage: &Storage, name: &str, id: NodeId) -> ComputeNode {
    ComputeNode::start_as(config(storage, name), storage.client().await, id)
        .await
        .unwrap()
}

fn registers(storage: &Storage) -> Registers {
    Registers::connect(&storage.seeds(), &storage.tls()).unwrap()
}

/// The compute registry as the test observes it. Members renew every 100 ms here, so on a
/// loaded machine a read can lose every round to their writes: it is simply tried again.
async fn registry(regs: &Registers) -> ComputeRegistry {
    let mut attempts = 0;
    loop {
        match regs.get(COMPUTE_NODES_KEY).await {
            Ok(Some(b)) => return meta::decode(&b).unwrap(),
            Ok(None) => return ComputeRegistry::default(),
            Err(e) => {
                attempts += 1;
                assert!(attempts < 20, "the compute registry stayed unreadable: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

/// Wait (bounded) until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < DEADLINE, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_generation_one_and_restarts_with_generation_two() {
    let storage = Storage::start().await;
    let regs = registers(&storage);
    let id = NodeId::random();
    let node = start(&storage, "compute-0", id).await;
    let m = node.node().membership.clone().unwrap();
    assert_eq!(m.me(), id);
    assert_eq!(m.generation(), Generation(1));
    assert!(m.view().members.contains_key(&id));
    let rec = registry(&regs).await.nodes[&id].clone();
    assert_eq!(
        (rec.generation, rec.state, rec.name.as_str()),
        (Generation(1), MemberState::Active, "compute-0")
    );
    assert_eq!(rec.amqp_addr, node.local_addr());
    eventually("the heartbeat moves", || async {
        registry(&regs).await.nodes[&id].heartbeat > 0
    })
    .await;

    node.stop().await;
    assert_eq!(
        registry(&regs).await.nodes[&id].state,
        MemberState::Leaving,
        "a graceful stop leaves the cluster"
    );

    let node = start(&storage, "compute-0", id).await;
    let m = node.node().membership.clone().unwrap();
    assert_eq!(m.generation(), Generation(2));
    let rec = registry(&regs).await.nodes[&id].clone();
    assert_eq!(
        (rec.generation, rec.state),
        (Generation(2), MemberState::Active)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_renewing_is_evicted_after_its_lease() {
    warren_common::telemetry::init_logging();
    let storage = Storage::start().await;
    let regs = registers(&storage);
    let observer = start(&storage, "compute-0", NodeId::random()).await;
    let view = observer.node().membership.clone().unwrap();

    // A second member that will stop renewing, as a paused or cut-off process does.
    let other = NodeId::random();
    let record = ComputeRecord {
        name: "compute-1".into(),
        zone: Zone("zone-b".into()),
        amqp_addr: "127.0.0.1:1".parse().unwrap(),
        peer_addr: "127.0.0.1:2".parse().unwrap(),
        generation: Generation(0),
        state: MemberState::Active,
        heartbeat: 0,
    };
    let member = Membership::join(
        Meta::Registers(storage.client().await.registers()),
        other,
        record,
        &short_leases(),
    )
    .await
    .unwrap();
    assert_eq!(member.generation(), Generation(1));
    let mut views = view.subscribe();
    eventually("the observer sees the new member", || {
        let seen = view.view().members.contains_key(&other);
        async move { seen }
    })
    .await;
    // Alive for several lease periods: renewing keeps it a member.
    let heartbeat = registry(&regs).await.nodes[&other].heartbeat;
    eventually("the member renews many times", || async {
        registry(&regs).await.nodes[&other].heartbeat >= heartbeat + 12
    })
    .await;
    assert_eq!(
        registry(&regs).await.nodes[&other].state,
        MemberState::Active
    );

    // Its process stops: nothing renews its lease any more.
    let last = member.generation();
    drop(member);
    eventually("the lapsed member is evicted", || async {
        let r = registry(&regs).await.nodes[&other].clone();
        r.state == MemberState::Evicted && r.generation == Generation(last.0 + 1)
    })
    .await;
    eventually("the observer's view drops it", || {
        let gone = !views.borrow_and_update().members.contains_key(&other);
        async move { gone }
    })
    .await;
    // The observer itself stays a member.
    assert!(view.view().members.contains_key(&view.me()));
    observer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_node_drops_its_clients_with_320_and_serves_again_with_a_new_generation() {
    let storage = Storage::start().await;
    let regs = registers(&storage);
    let id = NodeId::random();
    let node = start(&storage, "compute-0", id).await;
    let m = node.node().membership.clone().unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", node.local_addr());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let mut events = conn.events_listener();
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("jobs".into(), durable, FieldTable::default())
        .await
        .unwrap();

    // Evicted by hand, as `warren ctl evict` does.
    regs.update(COMPUTE_NODES_KEY, |cur| {
        let mut reg: ComputeRegistry = meta::decode(cur.unwrap())?;
        let r = reg.nodes.get_mut(&id).unwrap();
        r.generation = Generation(r.generation.0 + 1);
        r.state = MemberState::Evicted;
        Ok::<_, StorageError>(Some(meta::encode(&reg)))
    })
    .await
    .unwrap()
    .unwrap();

    let closed = timeout(DEADLINE, async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event
                && let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
            {
                return Some(amqp.get_id());
            }
        }
        None
    })
    .await
    .expect("the client was never disconnected");
    assert_eq!(closed, Some(320), "CONNECTION_FORCED");

    eventually("the node joins again with a fresh generation", || {
        let g = m.generation();
        async move { g == Generation(3) }
    })
    .await;
    let rec = registry(&regs).await.nodes[&id].clone();
    assert_eq!(
        (rec.generation, rec.state),
        (Generation(3), MemberState::Active)
    );

    // It serves again, and storage takes its writes under the new generation.
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare("jobs".into(), durable, FieldTable::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            b"after re-join",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let got = ch
        .basic_get("jobs".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the confirmed message is there");
    assert_eq!(&got.delivery.data[..], b"after re-join");
    conn.close(200, "bye".into()).await.unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_node_that_stops_renewing_is_evicted_after_the_storage_lease() {
    let storage = Storage::start().await;
    let regs = registers(&storage);
    let mut config = config(&storage, "compute-0");
    // Storage nodes renew every second; five of them make a lease no live node misses.
    config.cluster.storage_lease_ms = 5_000;
    let node = ComputeNode::start(config, storage.client().await)
        .await
        .unwrap();
    let m = node.node().membership.clone().unwrap();

    // A storage node that registered and then died: its record never moves again.
    let dead = NodeId::random();
    regs.update(NODES_KEY, |cur| {
        let mut reg: NodeRegistry = meta::decode(cur.unwrap())?;
        reg.nodes.insert(
            dead,
            NodeRecord {
                name: "storage-9".into(),
                zone: Zone("zone-a".into()),
                data_addr: "127.0.0.1:9".parse().unwrap(),
                control_addr: "127.0.0.1:9".parse().unwrap(),
                generation: Generation(1),
                state: MemberState::Active,
                heartbeat: 0,
            },
        );
        Ok::<_, StorageError>(Some(meta::encode(&reg)))
    })
    .await
    .unwrap()
    .unwrap();

    let storage_registry = || async {
        let b = regs.get(NODES_KEY).await.unwrap().unwrap();
        meta::decode::<NodeRegistry>(&b).unwrap()
    };
    eventually("the dead storage node is evicted", || async {
        let r = storage_registry().await.nodes[&dead].clone();
        r.state == MemberState::Evicted && r.generation == Generation(2)
    })
    .await;
    // The live storage nodes are Active (a live node evicted on a loaded machine registers
    // again at once), and the view lists exactly them.
    eventually("the view holds the live storage nodes only", || async {
        let live: Vec<NodeId> = storage_registry()
            .await
            .nodes
            .iter()
            .filter(|(id, r)| **id != dead && r.state == MemberState::Active)
            .map(|(id, _)| *id)
            .collect();
        let seen: Vec<NodeId> = m.view().storage.keys().copied().collect();
        live.len() == 3 && seen == live
    })
    .await;
    node.stop().await;
}

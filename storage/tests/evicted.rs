//! Membership on the storage side, over a real in-process cluster: storage nodes renew their
//! lease and register again when evicted; writes from an evicted compute generation are
//! refused by the storage nodes themselves, even from a writer no one fenced.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Cluster;
use warren_common::{Generation, LogId, NodeId, Zone};
use warren_storage::StorageError;
use warren_storage::client::Registers;
use warren_storage::meta::{
    self, COMPUTE_NODES_KEY, ComputeRecord, ComputeRegistry, MemberState, NODES_KEY, NodeRegistry,
};

/// Generous bound for things that take a few lease periods; the loop ends as soon as they
/// happen.
const DEADLINE: Duration = Duration::from_secs(60);

async fn set_compute(regs: &Registers, id: NodeId, generation: u64, state: MemberState) {
    regs.update(COMPUTE_NODES_KEY, |cur| {
        let mut reg: ComputeRegistry = match cur {
            Some(b) => meta::decode(b)?,
            None => ComputeRegistry::default(),
        };
        reg.nodes.insert(
            id,
            ComputeRecord {
                name: "compute-0".into(),
                zone: Zone("zone-a".into()),
                amqp_addr: "127.0.0.1:1".parse().unwrap(),
                peer_addr: "127.0.0.1:2".parse().unwrap(),
                generation: Generation(generation),
                state,
                heartbeat: 0,
            },
        );
        Ok::<_, StorageError>(Some(meta::encode(&reg)))
    })
    .await
    .unwrap()
    .unwrap();
}

async fn storage_registry(regs: &Registers) -> NodeRegistry {
    meta::decode(&regs.get(NODES_KEY).await.unwrap().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_an_evicted_compute_generation_are_refused_even_without_fencing() {
    common::init_tracing();
    let cluster = Cluster::start(3).await;
    let regs = Registers::connect(&cluster.seeds, &cluster.client_tls).unwrap();
    let compute = NodeId::random();
    set_compute(&regs, compute, 1, MemberState::Active).await;

    let client = cluster.client().await;
    client.set_identity(compute, Generation(1));
    let log = LogId::random();
    let writer = client.acquire_log(log).await.unwrap();
    writer.append(Bytes::from_static(b"before")).await.unwrap();

    // Evicted by the registry alone: nobody took the log over, so no fence stands in the
    // writer's way; only the storage nodes' check of the compute registry can stop it.
    set_compute(&regs, compute, 2, MemberState::Evicted).await;
    let started = tokio::time::Instant::now();
    let refused = loop {
        match writer.append(Bytes::from_static(b"after")).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    started.elapsed() < DEADLINE,
                    "storage never refused the evicted generation"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        matches!(&refused, StorageError::Fenced(m) if m.contains("evicted")),
        "{refused:?}"
    );
    // The writer stays stopped, as after a fence.
    assert!(matches!(
        writer.append(Bytes::from_static(b"again")).await,
        Err(StorageError::Fenced(_))
    ));

    // Connections that never said Hello (tools, storage's own clients) are not checked.
    let anonymous = cluster.client().await;
    let w = anonymous.acquire_log(LogId::random()).await.unwrap();
    w.append(Bytes::from_static(b"tool")).await.unwrap();

    // The same node, joined again with a newer generation, writes again; the client says
    // the new generation on the connections it already has.
    set_compute(&regs, compute, 3, MemberState::Active).await;
    client.set_identity(compute, Generation(3));
    let w = client.acquire_log(log).await.unwrap();
    w.append(Bytes::from_static(b"rejoined")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_node_renews_its_lease_and_registers_again_when_evicted() {
    common::init_tracing();
    let cluster = Cluster::start(3).await;
    let regs = Registers::connect(&cluster.seeds, &cluster.client_tls).unwrap();
    let (id, first) = {
        let reg = storage_registry(&regs).await;
        let (id, r) = reg.nodes.iter().next().unwrap();
        (*id, r.clone())
    };
    let started = tokio::time::Instant::now();
    loop {
        let now = storage_registry(&regs).await.nodes[&id].clone();
        if now.heartbeat > first.heartbeat {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "heartbeat never moved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut evicted_at = Generation(0);
    regs.update(NODES_KEY, |cur| {
        let mut reg: NodeRegistry = meta::decode(cur.unwrap())?;
        let r = reg.nodes.get_mut(&id).unwrap();
        r.generation = Generation(r.generation.0 + 1);
        r.state = MemberState::Evicted;
        evicted_at = r.generation;
        Ok::<_, StorageError>(Some(meta::encode(&reg)))
    })
    .await
    .unwrap()
    .unwrap();

    let started = tokio::time::Instant::now();
    loop {
        let now = storage_registry(&regs).await.nodes[&id].clone();
        if now.state == MemberState::Active && now.generation > evicted_at {
            assert_eq!(now.data_addr, first.data_addr, "same identity, same node");
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the evicted node never registered again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

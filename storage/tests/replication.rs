//! The storage tier under node loss (RFC 0003): storage nodes that come back with or
//! without their disk, re-replication off evicted nodes, the loss of a whole zone, and the
//! strict profile. Real storage nodes in-process, real clients over QUIC and gRPC.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::Cluster;
use std::time::Duration;
use warren_common::config::Replication;
use warren_common::{Generation, LogId, NodeId};
use warren_storage::StorageError;
use warren_storage::client::{
    LogPosition, LogWriter, Registers, StorageClient, StorageClientConfig,
};
use warren_storage::meta::{self, LogMeta, MemberState, NODES_KEY, NodeRegistry};

async fn append_all(w: &LogWriter, payloads: &[Bytes]) -> Vec<LogPosition> {
    let futs: Vec<_> = payloads.iter().map(|p| w.append(p.clone())).collect();
    let mut out = Vec::new();
    for f in futs {
        out.push(f.await.unwrap());
    }
    out
}

async fn read_all(w: &LogWriter) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut pos = w.start();
    loop {
        let batch = w.read(pos, 37).await.unwrap();
        let Some(last) = batch.last() else { break };
        pos = LogPosition {
            segment: last.position.segment,
            entry: last.position.entry + 1,
        };
        out.extend(batch.into_iter().map(|e| e.payload));
    }
    out
}

/// Payloads of 100 bytes, so that a small roll size seals a segment every few entries.
fn payloads(prefix: &str, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(format!("{prefix}-{i:0>96}")))
        .collect()
}

async fn client_with(cluster: &Cluster, replication: Replication) -> StorageClient {
    StorageClient::connect(StorageClientConfig {
        replication,
        ..cluster.client_config()
    })
    .await
    .unwrap()
}

async fn registry(regs: &Registers) -> NodeRegistry {
    meta::decode(&regs.get(NODES_KEY).await.unwrap().unwrap()).unwrap()
}

async fn descriptor(regs: &Registers, log: LogId) -> LogMeta {
    meta::decode(&regs.get(&meta::log_key(log)).await.unwrap().unwrap()).unwrap()
}

/// The id the registry holds for the cluster node at `index` (its newest identity).
async fn id_of(cluster: &Cluster, regs: &Registers, index: usize) -> NodeId {
    let name = &cluster.nodes[index].config.name;
    let reg = registry(regs).await;
    reg.nodes
        .iter()
        .filter(|(_, r)| &r.name == name && r.state != MemberState::Evicted)
        .max_by_key(|(_, r)| r.generation)
        .map(|(id, _)| *id)
        .unwrap()
}

/// Evict a storage node identity as an operator (or a compute node's observer) does: one
/// CAS on the registry marking it evicted and raising its generation.
async fn evict(regs: &Registers, id: NodeId) {
    regs.update(NODES_KEY, |cur| {
        let mut reg: NodeRegistry = meta::decode(cur.unwrap()).unwrap();
        let r = reg.nodes.get_mut(&id).unwrap();
        r.state = MemberState::Evicted;
        r.generation = Generation(r.generation.0 + 1);
        Ok::<_, ()>(Some(meta::encode(&reg)))
    })
    .await
    .unwrap()
    .unwrap();
}

/// Wait until node identity `id` registered again with a generation above `generation`.
async fn wait_rejoined(regs: &Registers, id: NodeId, generation: Generation) {
    for _ in 0..300 {
        if registry(regs).await.nodes[&id].generation > generation {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("storage node {id} never registered again");
}

/// Wait until the register acceptor of node `i` answers on its own (it caught up).
async fn wait_acceptor_serving(cluster: &Cluster, i: usize) {
    let alone =
        Registers::connect(&[cluster.nodes[i].config.control_addr], &cluster.client_tls).unwrap();
    for _ in 0..600 {
        if alone.get(NODES_KEY).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the register acceptor of node {i} never caught up");
}

/// Wait until no sealed segment of `log` names `gone` or is flagged under-replicated,
/// running a repair pass through `client` each round if one is given.
async fn wait_repaired(
    regs: &Registers,
    log: LogId,
    gone: NodeId,
    client: Option<&StorageClient>,
) -> LogMeta {
    for _ in 0..300 {
        if let Some(c) = client {
            c.repair_logs(&[log]).await;
        }
        let d = descriptor(regs, log).await;
        let sealed = d.segments.iter().filter(|s| s.end.is_some());
        if sealed
            .clone()
            .all(|s| !s.ensemble.contains(&gone) && !s.under_replicated)
            && d.repair.is_none()
        {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "log {log} never repaired: {:?}",
        descriptor(regs, log).await.segments
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_rejoins_as_a_new_identity_and_its_copies_are_rebuilt_once_evicted() {
    let mut cluster = Cluster::start(3).await;
    let (x, a, b) = (0, 1, 2);
    let log = LogId::random();
    let data = payloads("w", 30);
    let old_x = {
        let client = cluster.client().await;
        client.set_segment_roll_bytes(500);
        let regs = client.registers();
        let old_x = id_of(&cluster, &regs, x).await;
        let b_id = id_of(&cluster, &regs, b).await;
        let b_generation = registry(&regs).await.nodes[&b_id].generation;
        let w = client.acquire_log(log).await.unwrap();
        // b misses everything: every entry is on x and a only, in segments sealed while b
        // was down. Without re-replication, losing x and then a would lose them.
        cluster.stop(b).await;
        append_all(&w, &data).await;
        cluster.restart(b).await;
        wait_rejoined(&regs, b_id, b_generation).await;
        old_x
        // The owner goes away with its writer.
    };

    // x loses its disk and comes back as a new identity.
    cluster.stop(x).await;
    cluster.wipe(x);
    cluster.restart(x).await;
    cluster.wait_identities(4).await;
    // Its register acceptor catches up from both others before it serves; until then the
    // registers cannot lose another node.
    wait_acceptor_serving(&cluster, x).await;
    let client = cluster.client().await;
    let regs = client.registers();
    let name = &cluster.nodes[x].config.name;
    let reg = registry(&regs).await;
    let new_x = *reg
        .nodes
        .iter()
        .find(|(id, r)| &r.name == name && **id != old_x)
        .expect("a wiped node must come back under a new identity")
        .0;

    // The old identity is evicted; placement never chooses it again, even by a client
    // that has never seen it fail.
    evict(&regs, old_x).await;
    let fresh = cluster.client().await;
    for _ in 0..5 {
        let other = LogId::random();
        let _w = fresh.acquire_log(other).await.unwrap();
        let d = descriptor(&regs, other).await;
        assert!(!d.segments[0].ensemble.contains(&old_x));
    }

    // A new owner takes over (its open segment lost x: a and b answer the fence), and
    // any node's repair rebuilds x's copies on the new identity and refills b.
    let w = client.acquire_log(log).await.unwrap();
    let d = wait_repaired(&regs, log, old_x, Some(&client)).await;
    assert!(
        d.segments
            .iter()
            .filter(|s| s.end.is_some())
            .all(|s| s.ensemble.contains(&new_x)),
        "copies not placed on the only node outside the ensemble: {:?}",
        d.segments
    );

    // Repeating the repair changes nothing.
    let again = client.repair_logs(&[log]).await;
    assert_eq!((again.replaced, again.copied, again.pending), (0, 0, 0));
    assert_eq!(descriptor(&regs, log).await, d);

    // a, the only node that had every entry from the start, is lost too.
    cluster.stop(a).await;
    assert_eq!(read_all(&w).await, data);
    let w2 = cluster.client().await.acquire_log(log).await.unwrap();
    assert_eq!(read_all(&w2).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_disk_keeps_its_identity_and_answers_for_its_segments() {
    // Fixed data addresses: at the end the restarted node is read alone, with no register
    // majority to look an address up in.
    let mut cluster = Cluster::start_with_fixed_data_ports(3).await;
    let (x, y, z) = (0, 1, 2);
    let client = cluster.client().await;
    let regs = client.registers();
    let before = id_of(&cluster, &regs, x).await;
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    append_all(&w, &payloads("a", 10)).await;
    // With y down, every acknowledged entry is on both x and z.
    cluster.stop(y).await;
    let second = payloads("b", 20);
    let positions = append_all(&w, &second).await;

    let generation = registry(&regs).await.nodes[&before].generation;
    cluster.stop(x).await;
    cluster.restart(x).await;
    // It registers again under the same identity, with a new generation.
    wait_rejoined(&regs, before, generation).await;
    assert_eq!(
        registry(&regs).await.nodes.len(),
        3,
        "a restart with its disk made a new identity"
    );

    // x alone serves what it acknowledged before its restart.
    cluster.stop(z).await;
    let got = w.read(positions[0], second.len()).await.unwrap();
    let got: Vec<Bytes> = got.into_iter().map(|e| e.payload).collect();
    assert_eq!(got, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_moves_to_a_joining_node_in_the_lost_zone_and_repairs_after_eviction() {
    // Three nodes in zones a, b, c, and a fourth in zone a that joins later.
    let mut cluster = Cluster::start_with_late_nodes(3, 1).await;
    let (lost, late) = (0, 3);
    assert_eq!(
        cluster.nodes[lost].config.zone,
        cluster.nodes[late].config.zone
    );
    let client = cluster.client().await;
    let regs = client.registers();
    let lost_id = id_of(&cluster, &regs, lost).await;
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    let first = payloads("a", 20);
    append_all(&w, &first).await;
    // No spare node: the writer goes on with two members.
    cluster.stop(lost).await;
    let second = payloads("b", 20);
    append_all(&w, &second).await;

    // A node joins in the lost member's zone: the running owner moves its open segment.
    cluster.start_late(late);
    cluster.wait_registered(4).await;
    let late_id = id_of(&cluster, &regs, late).await;
    let mut moved = None;
    for _ in 0..300 {
        let d = descriptor(&regs, log).await;
        let open = d.segments.last().unwrap();
        if open.end.is_none() && open.ensemble.contains(&late_id) {
            moved = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = moved.expect("the owner never moved off the failed member");
    assert!(!d.segments.last().unwrap().ensemble.contains(&lost_id));
    assert!(
        d.segments[..d.segments.len() - 1]
            .iter()
            .any(|s| s.under_replicated && s.ensemble.contains(&lost_id))
    );

    // Once the lost node is evicted, the owner's own repair moves its copies.
    evict(&regs, lost_id).await;
    wait_repaired(&regs, log, lost_id, None).await;

    // Every sealed entry is now on the new node: read it with only that node left up.
    // (Nothing was appended since the move, so all data is in sealed segments.)
    cluster.stop(1).await;
    cluster.stop(2).await;
    let all: Vec<Bytes> = first.into_iter().chain(second).collect();
    assert_eq!(read_all(&w).await, all);
}

/// Append `n` entries one after another while `stop` runs, checking that every one
/// resolves; returns the payloads.
async fn append_through(
    w: &std::sync::Arc<LogWriter>,
    prefix: &str,
    n: usize,
    stop: impl Future<Output = ()>,
) -> Vec<Bytes> {
    let data = payloads(prefix, n);
    let appender = {
        let (w, data) = (w.clone(), data.clone());
        tokio::spawn(async move {
            for (i, p) in data.iter().enumerate() {
                if let Err(e) = w.append(p.clone()).await {
                    panic!("append {i} failed: {e}");
                }
            }
        })
    };
    stop.await;
    appender.await.unwrap();
    data
}

async fn zone_loss_leaves_appends_and_reads_going(
    nodes: usize,
    replication: Replication,
    extra_losses: &[usize],
) {
    let mut cluster = Cluster::start(nodes).await;
    let zone_a: Vec<usize> = (0..nodes).filter(|i| i % 3 == 0).collect();
    let client = client_with(&cluster, replication).await;
    let log = LogId::random();
    let w = std::sync::Arc::new(client.acquire_log(log).await.unwrap());
    let mut all = append_through(&w, "before", 20, async {}).await;
    // The whole zone goes while appends are in flight, then more nodes if asked.
    let losses: Vec<usize> = zone_a.iter().chain(extra_losses).copied().collect();
    let during = append_through(&w, "during", 60, async {
        for i in &losses {
            cluster.stop(*i).await;
        }
    })
    .await;
    all.extend(during);
    all.extend(append_through(&w, "after", 20, async {}).await);
    assert_eq!(read_all(&w).await, all);
    // A new owner takes over without the zone and finds everything.
    let w2 = client_with(&cluster, replication)
        .await
        .acquire_log(log)
        .await
        .unwrap();
    assert_eq!(read_all(&w2).await, all);
    w2.append(Bytes::from_static(b"new owner")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_zone_of_one_node_leaves_appends_and_reads_going() {
    zone_loss_leaves_appends_and_reads_going(3, Replication::default(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_zone_of_two_nodes_leaves_appends_and_reads_going() {
    zone_loss_leaves_appends_and_reads_going(6, Replication::default(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_profile_losing_a_zone_leaves_appends_and_reads_going() {
    zone_loss_leaves_appends_and_reads_going(6, Replication::strict(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_profile_losing_a_zone_and_one_more_node_leaves_appends_and_reads_going() {
    // Three zones of three nodes: six copies, two per zone. Zone a (nodes 0, 3, 6) and
    // node 1 of zone b go; five nodes remain, a majority of the nine register acceptors.
    zone_loss_leaves_appends_and_reads_going(9, Replication::strict(), &[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_profile_on_six_nodes_loses_nothing_with_a_zone_and_one_more_node_down() {
    // With exactly six nodes every one holds a copy: after a zone and one more node, three
    // copies of everything remain (reads go on) but an append needs four, so appends wait
    // for a node to come back rather than fail.
    let mut cluster = Cluster::start_with_fixed_data_ports(6).await;
    let client = client_with(&cluster, Replication::strict()).await;
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    let d = descriptor(&client.registers(), log).await;
    assert_eq!(d.segments[0].ensemble.len(), 6);
    assert_eq!(d.segments[0].ack_quorum, 4);
    let mut all = payloads("a", 30);
    append_all(&w, &all).await;
    cluster.stop(0).await;
    cluster.stop(3).await;
    let zone_down = payloads("b", 30);
    append_all(&w, &zone_down).await;
    all.extend(zone_down);

    cluster.stop(1).await;
    assert_eq!(read_all(&w).await, all);
    let waiting: Vec<_> = payloads("c", 10).into_iter().map(|p| w.append(p)).collect();
    cluster.restart(1).await;
    for f in waiting {
        f.await.unwrap();
    }
    all.extend(payloads("c", 10));
    assert_eq!(read_all(&w).await, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_settings_are_validated_by_the_client() {
    let cluster = Cluster::start(3).await;
    let bad = Replication {
        write_quorum: 6,
        ack_quorum: 4,
        per_zone: 0,
    };
    match StorageClient::connect(StorageClientConfig {
        replication: bad,
        ..cluster.client_config()
    })
    .await
    {
        Err(StorageError::Invalid(m)) => assert!(m.contains("replication.per_zone"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an invalid profile was accepted"),
    }
    // The strict profile needs six nodes: with three, a log waits (retryably) for more.
    let strict = client_with(&cluster, Replication::strict()).await;
    match strict.acquire_log(LogId::random()).await {
        Err(e @ StorageError::Unavailable(_)) => assert!(e.is_retryable()),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a strict log opened on three nodes"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repairs_swap_each_lost_copy_once_and_respect_claims() {
    use warren_storage::meta::RepairClaim;
    let mut cluster = Cluster::start(4).await;
    let log = LogId::random();
    let data = payloads("r", 40);
    let regs = cluster.client().await.registers();
    {
        let client = cluster.client().await;
        client.set_segment_roll_bytes(500);
        let w = client.acquire_log(log).await.unwrap();
        append_all(&w, &data).await;
    }
    // The node holding the most sealed segments is lost for good (placement varies per
    // segment, so the first segment's first member may hold only that one).
    let d = descriptor(&regs, log).await;
    let holds = |n: &NodeId| {
        d.segments
            .iter()
            .filter(|s| s.end.is_some() && s.ensemble.contains(n))
            .count()
    };
    let lost = d
        .segments
        .iter()
        .flat_map(|s| s.ensemble.iter())
        .max_by_key(|n| holds(n))
        .copied()
        .unwrap();
    let index = registry(&regs).await.nodes[&lost].name.clone();
    let index = cluster
        .nodes
        .iter()
        .position(|n| n.config.name == index)
        .unwrap();
    cluster.stop(index).await;
    evict(&regs, lost).await;
    let expected = d
        .segments
        .iter()
        .filter(|s| s.end.is_some() && s.ensemble.contains(&lost))
        .count();
    assert!(expected >= 2, "{:?}", d.segments);

    let set_claim = |claim: Option<RepairClaim>| {
        let regs = regs.clone();
        async move {
            regs.update(&meta::log_key(log), |cur| {
                let mut d: LogMeta = meta::decode(cur.unwrap()).unwrap();
                d.repair = claim;
                Ok::<_, ()>(Some(meta::encode(&d)))
            })
            .await
            .unwrap()
            .unwrap();
        }
    };
    // Another node's claim, renewed or not, holds every other repair off for its lease.
    set_claim(Some(RepairClaim {
        by: NodeId::random(),
        token: 1,
    }))
    .await;
    let first = cluster.client().await;
    let r = first.repair_logs(&[log]).await;
    assert_eq!((r.replaced, r.copied), (0, 0));
    assert!(r.pending >= expected);
    assert_eq!(descriptor(&regs, log).await.segments, d.segments);

    // A claim this node's earlier process left is taken over at once, while the others
    // keep waiting for it to lapse.
    let config = cluster.client_config();
    set_claim(Some(RepairClaim {
        by: config.node_id,
        token: 2,
    }))
    .await;
    let clients = [
        StorageClient::connect(config).await.unwrap(),
        first,
        cluster.client().await,
    ];
    let mut replaced = 0;
    for _ in 0..100 {
        let passes: Vec<_> = clients
            .iter()
            .map(|c| {
                let c = c.clone();
                tokio::spawn(async move { c.repair_logs(&[log]).await })
            })
            .collect();
        for p in passes {
            replaced += p.await.unwrap().replaced;
        }
        let now = descriptor(&regs, log).await;
        if now.repair.is_none()
            && now
                .segments
                .iter()
                .filter(|s| s.end.is_some())
                .all(|s| !s.ensemble.contains(&lost))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        replaced, expected,
        "a lost copy was swapped more or less than once"
    );
    let now = descriptor(&regs, log).await;
    for s in now.segments.iter().filter(|s| s.end.is_some()) {
        let distinct: std::collections::BTreeSet<_> = s.ensemble.iter().collect();
        assert_eq!(distinct.len(), 3, "{:?}", s.ensemble);
        assert!(!s.ensemble.contains(&lost));
    }
    let w = cluster.client().await.acquire_log(log).await.unwrap();
    assert_eq!(read_all(&w).await, data);
}

//! End-to-end tests of the storage tier: three real storage nodes, real clients, QUIC and
//! gRPC with mutual TLS on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::Cluster;
use warren_common::LogId;
use warren_storage::StorageError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_stay_linearizable_under_concurrent_proposers() {
    let cluster = Cluster::start(3).await;
    let mut tasks = Vec::new();
    // Each update appends its own token unless it is already there: idempotent, as every
    // change function must be (a proposal that timed out may still have been accepted, and
    // the retry must not apply it twice).
    for task in 0..4u8 {
        // Separate clients: separate proposer ids, dueling ballots.
        let regs = cluster.client().await.registers();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..10u8 {
                let token = task * 10 + i;
                let v = regs
                    .update("counter", |cur| {
                        let mut list = cur.map_or_else(Vec::new, |b| b.to_vec());
                        if !list.contains(&token) {
                            list.push(token);
                        }
                        Ok::<_, ()>(Some(Bytes::from(list)))
                    })
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert!(
                    v.contains(&token),
                    "an update's result lacks its own change"
                );
                seen.push(v);
            }
            seen
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    let regs = cluster.client().await.registers();
    let last = regs.get("counter").await.unwrap().unwrap();
    // Linearizable: every result is a state the register really went through, so each is a
    // prefix of the final value; and every change landed exactly once.
    for r in &results {
        assert!(last.starts_with(r), "{r:?} is not a prefix of {last:?}");
    }
    let mut tokens = last.to_vec();
    tokens.sort_unstable();
    assert_eq!(tokens, (0..40).collect::<Vec<u8>>());
    let v = last;
    // An aborted change writes nothing.
    let r = regs
        .update("counter", |_| Err::<Option<Bytes>, _>("no"))
        .await
        .unwrap();
    assert_eq!(r, Err("no"));
    assert_eq!(regs.get("counter").await.unwrap(), Some(v));
    assert_eq!(regs.get("missing").await.unwrap(), None);
}

async fn append_all(
    w: &warren_storage::client::LogWriter,
    payloads: &[Bytes],
) -> Vec<warren_storage::client::LogPosition> {
    let futs: Vec<_> = payloads.iter().map(|p| w.append(p.clone())).collect();
    let mut out = Vec::new();
    for f in futs {
        out.push(f.await.unwrap());
    }
    out
}

async fn read_all(w: &warren_storage::client::LogWriter) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut pos = w.start();
    loop {
        let batch = w.read(pos, 37).await.unwrap();
        let Some(last) = batch.last() else { break };
        pos = warren_storage::client::LogPosition {
            segment: last.position.segment,
            entry: last.position.entry + 1,
        };
        out.extend(batch.into_iter().map(|e| e.payload));
    }
    out
}

fn payloads(prefix: &str, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(format!("{prefix}-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_acknowledged_in_order_and_read_back() {
    let cluster = Cluster::start(3).await;
    let client = cluster.client().await;
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    let data = payloads("m", 200);
    let positions = append_all(&w, &data).await;
    assert!(positions.windows(2).all(|p| p[0] < p[1]));
    assert_eq!(read_all(&w).await, data);
    // Group commit: the journals did fewer fsyncs than they stored records.
    let stats = client.node_stats().await.unwrap();
    assert_eq!(stats.len(), 3);
    let records: u64 = stats.iter().map(|(_, s)| s.records).sum();
    assert!(records >= 2 * 200, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_go_on_when_one_node_stops() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client().await;
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    let first = payloads("a", 50);
    append_all(&w, &first).await;
    cluster.stop(1).await;
    let second = payloads("b", 50);
    append_all(&w, &second).await;
    let all: Vec<Bytes> = first.into_iter().chain(second).collect();
    assert_eq!(read_all(&w).await, all);
    // And a new owner can take over with the node still down.
    let w2 = cluster.client().await.acquire_log(log).await.unwrap();
    assert_eq!(read_all(&w2).await, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_opens_only_once_a_full_write_quorum_of_nodes_registered() {
    use warren_storage::meta::{self, LogMeta};
    // Two nodes registered of the three a segment needs, as while a cluster starts.
    let mut cluster = Cluster::start_with_late_nodes(2, 1).await;
    let client = cluster.client().await;
    let log = LogId::random();
    // A segment on two nodes with an ack quorum of two could lose neither: no appends and
    // no takeover after one failure. The takeover waits for a third node instead.
    match client.acquire_log(log).await {
        Err(e @ StorageError::Unavailable(_)) => assert!(e.is_retryable()),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a log was opened on fewer nodes than its write quorum"),
    }

    cluster.start_late(2);
    cluster.wait_registered(3).await;
    let w = client.acquire_log(log).await.unwrap();
    let regs = client.registers();
    let desc: LogMeta =
        meta::decode(&regs.get(&meta::log_key(log)).await.unwrap().unwrap()).unwrap();
    assert_eq!(desc.segments.last().unwrap().ensemble.len(), 3);
    let first = payloads("a", 50);
    append_all(&w, &first).await;

    // Any one member may now fail: appends go on and a new owner recovers everything.
    cluster.stop(2).await;
    let second = payloads("b", 50);
    append_all(&w, &second).await;
    let all: Vec<Bytes> = first.into_iter().chain(second).collect();
    assert_eq!(read_all(&w).await, all);
    let w2 = cluster.client().await.acquire_log(log).await.unwrap();
    assert_eq!(read_all(&w2).await, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_owner_fences_the_first_and_keeps_everything_acknowledged() {
    let cluster = Cluster::start(3).await;
    let c1 = cluster.client().await;
    let c2 = cluster.client().await;
    let log = LogId::random();
    let w1 = c1.acquire_log(log).await.unwrap();
    append_all(&w1, &payloads("before", 20)).await;

    // The old owner keeps appending while the new owner takes over.
    let appender = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut fenced = false;
        for i in 0..100_000 {
            let p = Bytes::from(format!("during-{i}"));
            match w1.append(p.clone()).await {
                Ok(_) => acked.push(p),
                Err(StorageError::Fenced(_)) => {
                    fenced = true;
                    break;
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        (w1, acked, fenced)
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let w2 = c2.acquire_log(log).await.unwrap();
    let (w1, acked, fenced) = appender.await.unwrap();
    assert!(fenced, "the old owner was never fenced");
    assert!(matches!(
        w1.append(Bytes::from_static(b"late")).await,
        Err(StorageError::Fenced(_))
    ));
    let replay = read_all(&w2).await;
    let mut expected: Vec<Bytes> = payloads("before", 20);
    expected.extend(acked);
    // Every acknowledged entry is there, in order; unacknowledged ones may follow.
    assert!(replay.len() >= expected.len());
    assert_eq!(&replay[..expected.len()], &expected[..]);
    assert!(replay.len() <= expected.len() + 1);
    // The new owner writes after the replayed tail.
    w2.append(Bytes::from_static(b"new")).await.unwrap();
    assert_eq!(
        read_all(&w2).await.last().unwrap(),
        &Bytes::from_static(b"new")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_a_restart_of_all_nodes() {
    let mut cluster = Cluster::start(3).await;
    let log = LogId::random();
    let data = payloads("p", 30);
    {
        let client = cluster.client().await;
        let w = client.acquire_log(log).await.unwrap();
        append_all(&w, &data).await;
        client
            .registers()
            .update("k", |_| Ok::<_, ()>(Some(Bytes::from_static(b"v"))))
            .await
            .unwrap()
            .unwrap();
    }
    for i in 0..3 {
        cluster.stop(i).await;
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    cluster.wait_registered_gen(3, 2).await;
    let client = cluster.client().await;
    assert_eq!(
        client.registers().get("k").await.unwrap(),
        Some(Bytes::from_static(b"v"))
    );
    let w = client.acquire_log(log).await.unwrap();
    assert_eq!(read_all(&w).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_log_fences_its_writer_and_cannot_be_acquired() {
    let cluster = Cluster::start(3).await;
    let client = cluster.client().await;
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    append_all(&w, &payloads("x", 5)).await;
    client.delete_log(log).await.unwrap();
    assert!(matches!(
        w.append(Bytes::from_static(b"after")).await,
        Err(StorageError::Fenced(_))
    ));
    assert!(matches!(
        client.acquire_log(log).await,
        Err(StorageError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_member_is_replaced_by_a_spare_node() {
    use warren_storage::meta::{self, LogMeta, NODES_KEY, NodeRegistry};
    let mut cluster = Cluster::start(4).await;
    let client = cluster.client().await;
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    let first = payloads("a", 30);
    append_all(&w, &first).await;

    // Which cluster nodes hold the open segment?
    let regs = client.registers();
    let registry: NodeRegistry =
        meta::decode(&regs.get(NODES_KEY).await.unwrap().unwrap()).unwrap();
    let desc: LogMeta =
        meta::decode(&regs.get(&meta::log_key(log)).await.unwrap().unwrap()).unwrap();
    let index_of = |id: &warren_common::NodeId| {
        let name = &registry.nodes[id].name;
        cluster
            .nodes
            .iter()
            .position(|n| &n.config.name == name)
            .unwrap()
    };
    let first_ensemble = desc.segments.last().unwrap().ensemble.clone();
    let members: Vec<usize> = desc
        .segments
        .last()
        .unwrap()
        .ensemble
        .iter()
        .map(index_of)
        .collect();
    assert_eq!(members.len(), 3);

    cluster.stop(members[0]).await;
    let second = payloads("b", 30);
    append_all(&w, &second).await;
    let desc: LogMeta =
        meta::decode(&regs.get(&meta::log_key(log)).await.unwrap().unwrap()).unwrap();
    assert!(desc.segments.len() >= 2, "no ensemble change recorded");
    let stopped = first_ensemble[0];
    assert!(!desc.segments.last().unwrap().ensemble.contains(&stopped));
    // Losing a second original member leaves only one copy of the old ensemble: appends
    // can only go on because the first loss moved the log to a new ensemble.
    cluster.stop(members[1]).await;
    let third = payloads("c", 30);
    tokio::time::timeout(std::time::Duration::from_secs(120), append_all(&w, &third))
        .await
        .expect("appends stalled: the failed member was not replaced");

    // With two of four nodes down the registers have no majority, but the data plane
    // needs none: reads and appends go on.
    let all: Vec<Bytes> = first.into_iter().chain(second).chain(third).collect();
    assert_eq!(read_all(&w).await, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_segments_roll_over_and_trim_frees_whole_segments() {
    let cluster = Cluster::start(3).await;
    let client = cluster.client().await;
    client.set_segment_roll_bytes(1000);
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    let data: Vec<Bytes> = (0..60).map(|i| Bytes::from(format!("{i:0>100}"))).collect();
    let positions = append_all(&w, &data).await;
    assert!(positions.windows(2).all(|p| p[0] < p[1]));
    let segments = positions.last().unwrap().segment - positions[0].segment + 1;
    assert!(segments >= 4, "only {segments} segments for 6000 bytes");
    assert_eq!(read_all(&w).await, data);

    // Trim below the 30th entry: whole segments before its segment go.
    let cut = positions[30];
    w.trim(cut).await.unwrap();
    assert_eq!(w.start().segment, cut.segment);
    let rest = read_all(&w).await;
    let kept = positions
        .iter()
        .filter(|p| p.segment >= cut.segment)
        .count();
    assert_eq!(rest, data[data.len() - kept..].to_vec());
    // A new owner replays from the trim point.
    let w2 = cluster.client().await.acquire_log(log).await.unwrap();
    assert_eq!(w2.start().segment, cut.segment);
    assert_eq!(read_all(&w2).await, rest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_never_answers_for_its_old_identity() {
    use warren_storage::meta::{self, LogMeta, NODES_KEY, NodeRegistry};
    // Five nodes, so that registers keep a majority through everything below.
    let mut cluster = Cluster::start_with_fixed_data_ports(5).await;
    let log = LogId::random();
    let data = payloads("x", 20);
    let client = cluster.client().await;
    let regs = client.registers();
    let w = client.acquire_log(log).await.unwrap();
    let registry: NodeRegistry =
        meta::decode(&regs.get(NODES_KEY).await.unwrap().unwrap()).unwrap();
    let desc: LogMeta =
        meta::decode(&regs.get(&meta::log_key(log)).await.unwrap().unwrap()).unwrap();
    let ensemble: Vec<usize> = desc.segments[0]
        .ensemble
        .iter()
        .map(|id| {
            let name = &registry.nodes[id].name;
            cluster
                .nodes
                .iter()
                .position(|n| &n.config.name == name)
                .unwrap()
        })
        .collect();
    let (x, y, z) = (ensemble[0], ensemble[1], ensemble[2]);
    let others: Vec<usize> = (0..5).filter(|i| !ensemble.contains(i)).collect();

    // Member x misses every entry: they are acknowledged by y and z only. (The other two
    // nodes are down too, so the writer cannot move to a new ensemble: it tries, finds no
    // metadata majority, and writes on with y and z.)
    for o in &others {
        cluster.stop(*o).await;
    }
    cluster.stop(x).await;
    append_all(&w, &data).await;
    drop(w);
    drop(client);
    // y goes down; z loses its disk and comes back on the same addresses under a new
    // identity; x comes back.
    cluster.stop(y).await;
    cluster.stop(z).await;
    cluster.wipe(z);
    cluster.restart(z).await;
    cluster.restart(x).await;
    for o in &others {
        cluster.restart(*o).await;
    }
    cluster.wait_identities(6).await;

    // The only copies are on y. The new z must not pass for the old one: taking it as a
    // fenced member that lacks the entries would seal the segment empty and lose them.
    let client = cluster.client().await;
    match client.acquire_log(log).await {
        Err(StorageError::Unavailable(_)) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(w) => panic!(
            "takeover without the node holding the data; log now {:?}",
            read_all(&w).await
        ),
    }
    cluster.restart(y).await;
    let w = client.acquire_log(log).await.unwrap();
    assert_eq!(read_all(&w).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_sealed_while_a_member_was_down_are_repaired() {
    use warren_storage::meta::{self, LogMeta};
    // Fixed addresses: at the end node 1 is read alone, without a registers majority to
    // look up a new address in.
    let mut cluster = Cluster::start_with_fixed_data_ports(3).await;
    let client = cluster.client().await;
    client.set_segment_roll_bytes(500);
    let log = LogId::random();
    let w = client.acquire_log(log).await.unwrap();
    // Node 1 misses everything written now; full segments are sealed meanwhile.
    cluster.stop(1).await;
    let data: Vec<Bytes> = (0..30).map(|i| Bytes::from(format!("{i:0>100}"))).collect();
    append_all(&w, &data).await;
    let regs = client.registers();
    let desc: LogMeta =
        meta::decode(&regs.get(&meta::log_key(log)).await.unwrap().unwrap()).unwrap();
    assert!(desc.segments.iter().any(|s| s.under_replicated));

    // Node 1 comes back; the owner copies what it missed into the sealed segments.
    cluster.restart(1).await;
    let mut repaired = false;
    for _ in 0..300 {
        let desc: LogMeta =
            meta::decode(&regs.get(&meta::log_key(log)).await.unwrap().unwrap()).unwrap();
        if desc.segments.iter().all(|s| !s.under_replicated) {
            repaired = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(repaired, "sealed segments were never repaired");
    // Every sealed entry can now be read from node 1 alone.
    let sealed: usize = desc
        .segments
        .iter()
        .map(|s| s.end.unwrap_or(0) as usize)
        .sum();
    cluster.stop(0).await;
    cluster.stop(2).await;
    let got = read_all(&w).await;
    assert!(got.len() >= sealed);
    assert_eq!(&got[..sealed], &data[..sealed]);
}

//! Start a compute node on a free loopback port for one test, optionally over a real
//! in-process storage cluster (three storage nodes in three zones, mutual TLS, temporary
//! directories).
#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warren_common::config::{Replication, TlsPaths};
use warren_common::{NodeId, Zone};
use warren_compute::{ComputeConfig, ComputeNode};
use warren_storage::client::{StorageClient, StorageClientConfig};
use warren_storage::config::StorageNodeConfig;

/// A real storage cluster running in this process.
pub struct Storage {
    dir: tempfile::TempDir,
    seeds: Vec<SocketAddr>,
    client_tls: TlsPaths,
    nodes: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Storage {
    /// Three storage nodes in three zones on free ports.
    pub async fn start() -> Storage {
        let dir = tempfile::tempdir().unwrap();
        let names = ["storage-1", "storage-2", "storage-3", "compute"];
        let mut tls =
            warren_common::tls::create_dev_cluster_tls(&dir.path().join("tls"), &names).unwrap();
        let client_tls = tls.pop().unwrap();
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let seeds: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let zones = ["zone-a", "zone-b", "zone-c"];
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let config = StorageNodeConfig {
                name: names[i].into(),
                zone: Zone(zones[i].into()),
                data_dir: dir.path().join(names[i]),
                data_addr: "127.0.0.1:0".parse().unwrap(),
                control_addr: seeds[i],
                advertise_data_addr: None,
                advertise_control_addr: None,
                tls: tls[i].clone(),
                seeds: seeds.clone(),
                max_batch_bytes: 8 * 1024 * 1024,
            };
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (tx, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let r = warren_storage::node::run_with_control_listener(config, listener, async {
                    let _ = rx.await;
                })
                .await;
                if let Err(e) = r {
                    panic!("storage node failed: {e}");
                }
            });
            nodes.push((tx, task));
        }
        let storage = Storage {
            dir,
            seeds,
            client_tls,
            nodes,
        };
        storage.wait_ready().await;
        storage
    }

    /// Wait (bounded) until the cluster accepts a log: every node registered.
    async fn wait_ready(&self) {
        for _ in 0..600 {
            if let Ok(c) = StorageClient::connect(self.client_config()).await
                && c.acquire_log(warren_common::LogId::random()).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("storage cluster did not become ready");
    }

    /// How a compute node reaches this cluster.
    pub fn client_config(&self) -> StorageClientConfig {
        StorageClientConfig {
            node_id: NodeId::random(),
            zone: Zone("zone-a".into()),
            seeds: self.seeds.clone(),
            replication: Replication::default(),
            tls: self.client_tls.clone(),
        }
    }

    /// A fresh client.
    pub async fn client(&self) -> StorageClient {
        StorageClient::connect(self.client_config()).await.unwrap()
    }

    /// The TLS material a compute node uses.
    pub fn tls(&self) -> TlsPaths {
        self.client_tls.clone()
    }

    /// Storage seed addresses.
    pub fn seeds(&self) -> Vec<SocketAddr> {
        self.seeds.clone()
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        for (tx, task) in self.nodes.drain(..) {
            let _ = tx.send(());
            task.abort();
        }
        let _ = &self.dir;
    }
}

/// A compute node serving one test.
pub struct Broker {
    node: Option<ComputeNode>,
}

fn test_config(tls: TlsPaths) -> ComputeConfig {
    let mut config = ComputeConfig::new(tls);
    config.amqp_listen = "127.0.0.1:0".parse().expect("loopback address");
    config.peer_listen = "127.0.0.1:0".parse().expect("loopback address");
    config
}

impl Broker {
    /// A node with every queue in memory (no storage tier).
    pub async fn start() -> Broker {
        let config = test_config(TlsPaths {
            ca_cert: "unused".into(),
            cert: "unused".into(),
            key: "unused".into(),
        });
        let node = ComputeNode::start_in_memory(config)
            .await
            .expect("compute node starts");
        Broker { node: Some(node) }
    }

    /// A node over a real storage cluster.
    pub async fn start_with(storage: &Storage) -> Broker {
        let mut config = test_config(storage.tls());
        config.storage_seeds = storage.seeds();
        let node = ComputeNode::start(config, storage.client().await)
            .await
            .expect("compute node starts");
        Broker { node: Some(node) }
    }

    fn node(&self) -> &ComputeNode {
        self.node.as_ref().expect("broker is running")
    }

    /// The node's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.node().local_addr()
    }

    /// The AMQP URL of the node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr())
    }

    /// Stop the node (connections get 320 CONNECTION_FORCED).
    pub async fn stop(mut self) {
        if let Some(n) = self.node.take() {
            n.stop().await;
        }
    }
}

/// One of several compute nodes named `name` over `storage`, on free loopback ports.
pub async fn start_cluster_node(storage: &Storage, name: &str) -> ComputeNode {
    let mut config = test_config(storage.tls());
    config.node_name = name.into();
    config.storage_seeds = storage.seeds();
    ComputeNode::start(config, storage.client().await)
        .await
        .expect("compute node starts")
}

/// The AMQP URL of a compute node.
pub fn node_url(n: &ComputeNode) -> String {
    format!("amqp://guest:guest@{}/%2f", n.local_addr())
}

/// Wait until every node sees exactly `nodes` as the live members.
pub async fn converge(nodes: &[&ComputeNode]) {
    let want: Vec<NodeId> = nodes.iter().map(|n| n.node().node_id).collect();
    for _ in 0..600 {
        let all = nodes.iter().all(|n| {
            let view = n.node().membership.as_ref().unwrap().view();
            view.members.len() == want.len() && want.iter().all(|id| view.members.contains_key(id))
        });
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("membership did not converge");
}

/// A lapin connection, failing the test after a minute.
pub async fn connect(url: &str) -> lapin::Connection {
    tokio::time::timeout(
        Duration::from_secs(60),
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

/// Two compute nodes, compute-0 and compute-1, over `storage`, each seeing both as members.
pub async fn start_two_nodes(storage: &Storage) -> (ComputeNode, ComputeNode) {
    let a = start_cluster_node(storage, "compute-0").await;
    let b = start_cluster_node(storage, "compute-1").await;
    converge(&[&a, &b]).await;
    (a, b)
}

/// Put `ch` in confirm mode and publish `n` persistent messages (bodies 0, 1, ... as u32)
/// to `queue` through the default exchange, each confirmed.
pub async fn publish_confirmed(ch: &lapin::Channel, queue: &str, n: u32) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..n {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        let c = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("confirm timed out")
            .unwrap();
        assert!(c.is_ack(), "every publish is confirmed");
    }
}

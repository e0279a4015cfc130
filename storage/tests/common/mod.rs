//! A real storage cluster in-process: storage nodes on free loopback ports with temporary
//! data directories, mutual TLS from a fresh cluster CA, and real clients over QUIC/gRPC.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warren_common::config::{Replication, TlsPaths};
use warren_common::{NodeId, Zone};
use warren_storage::StorageError;
use warren_storage::client::{StorageClient, StorageClientConfig};
use warren_storage::config::StorageNodeConfig;
use warren_storage::meta::{self, NODES_KEY, NodeRegistry};

pub struct Node {
    pub config: StorageNodeConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), StorageError>>>,
    // The control listener of a node that has not started yet, holding its port.
    reserved: Option<std::net::TcpListener>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub seeds: Vec<SocketAddr>,
    pub client_tls: TlsPaths,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, false).await
    }

    /// Nodes keep their data-plane address across restarts (as with a fixed port in a
    /// config file), instead of picking a new free port at every start.
    pub async fn start_with_fixed_data_ports(n: usize) -> Cluster {
        Self::start_with(n, true).await
    }

    /// `n` seed nodes started now, and `late` more (indexes `n..n + late`) that join the
    /// running cluster only when [`Cluster::start_late`] is called. Late nodes are not
    /// register acceptors, so the registers work without them.
    pub async fn start_with_late_nodes(n: usize, late: usize) -> Cluster {
        Self::start_nodes(n, late, false).await
    }

    async fn start_with(n: usize, fixed_data_ports: bool) -> Cluster {
        Self::start_nodes(n, 0, fixed_data_ports).await
    }

    async fn start_nodes(n: usize, late: usize, fixed_data_ports: bool) -> Cluster {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let mut names: Vec<String> = (1..=n + late).map(|i| format!("storage-{i}")).collect();
        names.push("compute".into());
        let name_refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let mut tls =
            warren_common::tls::create_dev_cluster_tls(&dir.path().join("tls"), &name_refs)
                .unwrap();
        let client_tls = tls.pop().unwrap();
        let listeners: Vec<std::net::TcpListener> = (0..n + late)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let seeds: Vec<SocketAddr> = listeners[..n]
            .iter()
            .map(|l| l.local_addr().unwrap())
            .collect();
        let zones = ["zone-a", "zone-b", "zone-c"];
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let config = StorageNodeConfig {
                name: names[i].clone(),
                zone: Zone(zones[i % zones.len()].into()),
                data_dir: dir.path().join(&names[i]),
                data_addr: if fixed_data_ports {
                    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    socket.local_addr().unwrap()
                } else {
                    "127.0.0.1:0".parse().unwrap()
                },
                control_addr: listener.local_addr().unwrap(),
                advertise_data_addr: None,
                advertise_control_addr: None,
                tls: tls[i].clone(),
                seeds: seeds.clone(),
                max_batch_bytes: 8 * 1024 * 1024,
            };
            let mut node = Node {
                config,
                stop: None,
                task: None,
                reserved: None,
            };
            if i < n {
                node.spawn(Some(listener));
            } else {
                node.reserved = Some(listener);
            }
            nodes.push(node);
        }
        let cluster = Cluster {
            dir,
            nodes,
            seeds,
            client_tls,
        };
        cluster.wait_registered(n).await;
        cluster
    }

    pub fn client_config(&self) -> StorageClientConfig {
        StorageClientConfig {
            node_id: NodeId::random(),
            zone: Zone("zone-a".into()),
            seeds: self.seeds.clone(),
            replication: Replication::default(),
            tls: self.client_tls.clone(),
        }
    }

    pub async fn client(&self) -> StorageClient {
        StorageClient::connect(self.client_config()).await.unwrap()
    }

    /// Wait until `n` nodes with a generation of at least `min_generation` are registered.
    pub async fn wait_registered_gen(&self, n: usize, min_generation: u64) {
        let regs =
            warren_storage::client::Registers::connect(&self.seeds, &self.client_tls).unwrap();
        for _ in 0..600 {
            if let Ok(Some(b)) = regs.get(NODES_KEY).await {
                let reg: NodeRegistry = meta::decode(&b).unwrap();
                if reg
                    .nodes
                    .values()
                    .filter(|r| r.generation.0 >= min_generation)
                    .count()
                    >= n
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("storage nodes did not register");
    }

    pub async fn wait_registered(&self, n: usize) {
        self.wait_registered_gen(n, 1).await
    }

    pub async fn stop(&mut self, i: usize) {
        self.nodes[i].stop().await;
    }

    /// Start a node set aside by [`Cluster::start_with_late_nodes`].
    pub fn start_late(&mut self, i: usize) {
        let listener = self.nodes[i]
            .reserved
            .take()
            .expect("a late node not started yet");
        self.nodes[i].spawn(Some(listener));
    }

    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].spawn(None);
    }

    /// Lose a stopped node's disk.
    pub fn wipe(&mut self, i: usize) {
        std::fs::remove_dir_all(&self.nodes[i].config.data_dir).unwrap();
    }

    /// Wait until the registry lists at least `n` node identities.
    pub async fn wait_identities(&self, n: usize) {
        let regs =
            warren_storage::client::Registers::connect(&self.seeds, &self.client_tls).unwrap();
        for _ in 0..600 {
            if let Ok(Some(b)) = regs.get(NODES_KEY).await {
                let reg: NodeRegistry = meta::decode(&b).unwrap();
                if reg.nodes.len() >= n {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{n} storage node identities never registered");
    }
}

impl Node {
    fn spawn(&mut self, listener: Option<std::net::TcpListener>) {
        let listener = listener
            .unwrap_or_else(|| std::net::TcpListener::bind(self.config.control_addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (tx, rx) = oneshot::channel();
        let config = self.config.clone();
        self.task = Some(tokio::spawn(async move {
            warren_storage::node::run_with_control_listener(config, listener, async {
                let _ = rx.await;
            })
            .await
        }));
        self.stop = Some(tx);
    }

    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(tx) = n.stop.take() {
                let _ = tx.send(());
            }
            if let Some(t) = n.task.take() {
                t.abort();
            }
        }
    }
}

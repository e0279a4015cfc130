//! The storage client used by compute nodes.
//!
//! This is the whole contract between compute and storage:
//! - [`StorageClient::acquire_log`] makes the caller the single writer of a queue log
//!   (raise epoch, fence, recover the tail, open a new segment) and hands back a
//!   [`LogWriter`];
//! - [`LogWriter::append`] is a quorum append that resolves once `ack_quorum` storage nodes
//!   have the entry fsync'd; [`LogWriter::read`] pages through the live log for replay;
//!   [`LogWriter::trim`] lets storage free everything below a position;
//! - [`Registers`] are linearizable single-key registers (CASPaxos) for metadata;
//! - [`StorageClient::repair_logs`] (or the loop [`StorageClient::spawn_repair`]) rebuilds
//!   copies of sealed segments lost with evicted storage nodes (RFC 0003).
//!
//! The protocol itself (RFC 0001) lives in the I/O-free state machines of
//! [`crate::protocol`]; this module drives them over the network.

mod log;
mod registers;
mod repair;
pub(crate) mod transport;

use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warren_common::config::Replication;
use warren_common::{LogId, NodeId, Zone};
use warren_proto::internal::data::{Request, Response};

pub use log::LogWriter;
pub use registers::Registers;
pub use repair::RepairReport;

use crate::StorageError;
use crate::meta::{self, MemberState, NODES_KEY, NodeRegistry};
use crate::protocol::placement::Candidate;
use transport::{Conn, DataClient};

/// Position of an entry in a queue log. Totally ordered; later appends get larger positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogPosition {
    /// Index of the segment in the log's segment list.
    pub segment: u32,
    /// Entry number within that segment, from 0.
    pub entry: u64,
}

/// One entry read back from a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Where the entry is.
    pub position: LogPosition,
    /// The bytes the writer appended.
    pub payload: Bytes,
}

/// How a compute node reaches the storage tier.
#[derive(Clone, Debug)]
pub struct StorageClientConfig {
    /// This compute node's identity (used in owner records and for fencing diagnostics).
    pub node_id: NodeId,
    /// This compute node's zone.
    pub zone: Zone,
    /// Control-plane (gRPC) addresses of the storage nodes that hold the metadata registers.
    pub seeds: Vec<SocketAddr>,
    /// Replication settings for new segments.
    pub replication: Replication,
    /// Cluster TLS material (CA, this node's cert and key).
    pub tls: warren_common::config::TlsPaths,
}

/// Journal counters of one storage node, for benchmarks (entries per fsync).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// fsyncs since the node started.
    pub fsyncs: u64,
    /// Records (entries, fences, seals, deletes) made durable since the node started.
    pub records: u64,
    /// Journal bytes written since the node started.
    pub bytes: u64,
}

/// A connection to the storage tier. Cheap to clone; all clones share connections.
#[derive(Clone)]
pub struct StorageClient {
    inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    config: StorageClientConfig,
    registers: Registers,
    data: DataClient,
    registry: Mutex<NodeRegistry>,
    // When each node last failed to answer; placement avoids recently failed nodes.
    failed: Mutex<HashMap<NodeId, Instant>>,
    refreshed_at: Mutex<Option<Instant>>,
    segment_roll_bytes: AtomicU64,
    repairs: Mutex<repair::RepairClaims>,
}

/// A segment is sealed and its log continues in a new one once this many payload bytes
/// were appended to it, so that trimming can free whole segments (ARCHITECTURE.md §5).
pub const DEFAULT_SEGMENT_ROLL_BYTES: u64 = 64 * 1024 * 1024;

/// The registry is re-read at most this often when looking for a moved node.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A node that failed this recently is not chosen for new ensembles if others exist.
const FAILED_MEMORY: Duration = Duration::from_secs(10);

impl StorageClient {
    /// Connect to the storage tier described by `config`.
    pub async fn connect(config: StorageClientConfig) -> Result<Self, StorageError> {
        config
            .replication
            .validate("replication")
            .map_err(|e| StorageError::Invalid(e.to_string()))?;
        let registers = Registers::connect(&config.seeds, &config.tls)?;
        let data = DataClient::new(&config.tls)?;
        let client = StorageClient {
            inner: Arc::new(ClientInner {
                config,
                registers,
                data,
                registry: Mutex::new(NodeRegistry::default()),
                failed: Mutex::new(HashMap::new()),
                refreshed_at: Mutex::new(None),
                segment_roll_bytes: AtomicU64::new(DEFAULT_SEGMENT_ROLL_BYTES),
                repairs: Mutex::new(repair::RepairClaims::new()),
            }),
        };
        client.inner.refresh_registry().await?;
        Ok(client)
    }

    /// Seal segments of logs written through this client at this many payload bytes
    /// (default [`DEFAULT_SEGMENT_ROLL_BYTES`]); smaller segments let trim free space sooner.
    pub fn set_segment_roll_bytes(&self, bytes: u64) {
        self.inner
            .segment_roll_bytes
            .store(bytes.max(1), Ordering::Relaxed);
    }

    /// Say on every data-plane connection that this client speaks for compute process
    /// `node` at `generation` (storage refuses writes from evicted generations). Call it
    /// after every (re-)join of the cluster; connections say the new one before their next
    /// request.
    pub fn set_identity(&self, node: NodeId, generation: warren_common::Generation) {
        self.inner.data.set_identity(node, generation.0);
    }

    /// The metadata registers.
    pub fn registers(&self) -> Registers {
        self.inner.registers.clone()
    }

    /// Become the only writer of `log` (creating it if it does not exist): raise its epoch,
    /// fence the previous writer's open segment, recover and seal its tail, and open a new
    /// segment at the new epoch. After this returns, no older writer can get an append
    /// acknowledged.
    pub async fn acquire_log(&self, log: LogId) -> Result<LogWriter, StorageError> {
        log::acquire(self.inner.clone(), log).await
    }

    /// Delete a log and all its segments (queue.delete). Fences any writer first.
    pub async fn delete_log(&self, log: LogId) -> Result<(), StorageError> {
        log::delete(&self.inner, log).await
    }

    /// Re-replicate the sealed segments of `logs` that lost a member for good (an evicted
    /// storage node) or were sealed while a member was down: copy the missing entries from
    /// the surviving members to a node chosen by placement (same zone first), fsync'd there,
    /// then swap it into the segment's ensemble. Each log's repair is claimed by a CAS on
    /// its descriptor, so any number of compute nodes may call this for the same logs; a
    /// log claimed by a running repair elsewhere is skipped (counted as pending). Safe to
    /// repeat: a pass with nothing to do only reads each descriptor.
    pub async fn repair_logs(&self, logs: &[LogId]) -> RepairReport {
        repair::repair_logs(&self.inner, logs).await
    }

    /// Run [`StorageClient::repair_logs`] every `interval` over the logs `logs()` names
    /// (e.g. every durable queue this compute node knows of), until the handle is aborted.
    /// A log's owner also repairs it on its own while it writes.
    pub fn spawn_repair<F>(&self, interval: Duration, logs: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Vec<LogId> + Send + 'static,
    {
        let client = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let logs = logs();
                if logs.is_empty() {
                    continue;
                }
                let r = client.repair_logs(&logs).await;
                if r.replaced > 0 || r.repaired > 0 {
                    tracing::info!(
                        repaired = r.repaired,
                        replaced = r.replaced,
                        copied = r.copied,
                        pending = r.pending,
                        "re-replication pass"
                    );
                }
            }
        })
    }

    /// Journal counters of every registered storage node that answers.
    pub async fn node_stats(&self) -> Result<Vec<(NodeId, NodeStats)>, StorageError> {
        let registry = self.inner.refresh_registry().await?;
        let mut out = Vec::new();
        for (id, rec) in registry.nodes {
            if let Ok(Response::Stats {
                fsyncs,
                records,
                bytes,
            }) = self.inner.data.request(rec.data_addr, Request::Stats).await
            {
                out.push((
                    id,
                    NodeStats {
                        fsyncs,
                        records,
                        bytes,
                    },
                ));
            }
        }
        Ok(out)
    }
}

impl ClientInner {
    /// Re-read the node registry.
    async fn refresh_registry(&self) -> Result<NodeRegistry, StorageError> {
        let reg: NodeRegistry = match self.registers.get(NODES_KEY).await? {
            Some(b) => meta::decode(&b)?,
            None => NodeRegistry::default(),
        };
        *self.registry.lock().unwrap_or_else(|e| e.into_inner()) = reg.clone();
        *self.refreshed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(reg)
    }

    /// The registry, re-read only if the cached copy is older than [`REFRESH_INTERVAL`].
    async fn registry_if_stale(&self) -> Result<NodeRegistry, StorageError> {
        let fresh = self
            .refreshed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < REFRESH_INTERVAL);
        let cached = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if fresh {
            return Ok(cached);
        }
        // Only a hint for finding a moved node: do not wait long for a metadata majority,
        // and do not ask again at once if there is none.
        *self.refreshed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let reg: NodeRegistry = match self.registers.get_with_attempts(NODES_KEY, 2).await {
            Ok(Some(b)) => meta::decode(&b)?,
            Ok(None) => NodeRegistry::default(),
            Err(e) => {
                tracing::debug!(error = %e, "node registry unreachable; using the cached copy");
                return Ok(cached);
            }
        };
        *self.registry.lock().unwrap_or_else(|e| e.into_inner()) = reg.clone();
        Ok(reg)
    }

    fn addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .nodes
            .get(&node)
            .map(|r| r.data_addr)
    }

    fn mark_failed(&self, node: NodeId) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, Instant::now());
    }

    /// `nodes` with the ones that failed recently moved to the end, so reads try healthy
    /// replicas first.
    fn by_health(&self, nodes: &[NodeId]) -> Vec<NodeId> {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = nodes.to_vec();
        v.sort_by_key(|n| failed.get(n).is_some_and(|t| t.elapsed() < FAILED_MEMORY));
        v
    }

    fn repair_claims(&self) -> std::sync::MutexGuard<'_, repair::RepairClaims> {
        self.repairs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Placement candidates from the cached registry. Evicted identities are gone for good
    /// (a restarted node with its disk registers again; one without rejoins under a new id)
    /// and are never chosen.
    fn candidates(&self) -> Vec<Candidate> {
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .nodes
            .iter()
            .filter(|(_, r)| r.state != MemberState::Evicted)
            .map(|(id, r)| Candidate {
                id: *id,
                zone: r.zone.clone(),
                live: failed.get(id).is_none_or(|t| t.elapsed() > FAILED_MEMORY),
            })
            .collect()
    }

    /// The connection to a node, re-reading the registry once if its address is unknown or
    /// unreachable (nodes may restart on new addresses). The node must prove its identity:
    /// a node that lost its disk restarts under a new id, possibly on the old address, and
    /// must never answer (a fence, a read) for the id it replaced.
    async fn node_conn(&self, node: NodeId) -> Result<Arc<Conn>, StorageError> {
        let first = self.addr_of(node);
        if let Some(addr) = first {
            match self.verified_conn(addr, node).await {
                Ok(c) => return Ok(c),
                Err(e) => tracing::debug!(%node, error = %e, "storage node unreachable"),
            }
        }
        let fresh = self.registry_if_stale().await?;
        let result = match fresh.nodes.get(&node) {
            Some(r) if Some(r.data_addr) != first || first.is_none() => {
                self.verified_conn(r.data_addr, node).await
            }
            Some(r) => Err(StorageError::Unavailable(format!(
                "storage node {node} at {} unreachable",
                r.data_addr
            ))),
            None => Err(StorageError::Unavailable(format!(
                "storage node {node} is not in the registry"
            ))),
        };
        if result.is_err() {
            self.mark_failed(node);
        }
        result
    }

    async fn verified_conn(
        &self,
        addr: SocketAddr,
        node: NodeId,
    ) -> Result<Arc<Conn>, StorageError> {
        let conn = self.data.conn(addr).await?;
        let id = match conn.identity.get() {
            Some(id) => *id,
            None => match conn.request(Request::Identify).await? {
                Response::Identity { node } => {
                    let id = NodeId(uuid::Uuid::from_bytes(node));
                    let _ = conn.identity.set(id);
                    id
                }
                other => {
                    return Err(StorageError::Unavailable(format!(
                        "storage node at {addr} did not identify itself: {other:?}"
                    )));
                }
            },
        };
        if id != node {
            return Err(StorageError::Unavailable(format!(
                "{addr} now serves storage node {id}, not {node}"
            )));
        }
        Ok(conn)
    }

    /// One request to a node.
    async fn node_request(&self, node: NodeId, req: Request) -> Result<Response, StorageError> {
        let r = self.node_conn(node).await?.request(req).await;
        if r.is_err() {
            self.mark_failed(node);
        }
        r
    }
}

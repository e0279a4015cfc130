//! The compute node's shared state: configuration, topology, storage access, and the
//! queue owners running on this node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use warren_common::{Epoch, LogId, NodeId};
use warren_storage::client::StorageClient;

use crate::config::ComputeConfig;
use crate::error::AmqpError;
use crate::meta::Meta;
use crate::queue::log::{DurableLog, MemoryLog};
use crate::queue::owner::{self, ExitReason};
use crate::queue::{QueueEngine, QueueHandle};
use crate::topology::{QueueDef, Topology};

/// Who owns a queue's log: written to the metadata store before the owner serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueDescriptor {
    /// The queue's log.
    pub log_id: LogId,
    /// The compute node serving it.
    pub owner: NodeId,
    /// The owner's epoch; every takeover raises it.
    pub epoch: Epoch,
}

fn descriptor_key(log: LogId) -> String {
    format!("warren/queue-owner/{log}")
}

/// State shared by every connection on this node.
pub struct Node {
    /// The configuration.
    pub config: ComputeConfig,
    /// This node's identity.
    pub node_id: NodeId,
    /// Exchanges, queues and bindings.
    pub topology: Topology,
    /// The storage tier, if this node has one (durable queues need it).
    pub storage: Option<StorageClient>,
    meta: Meta,
    queues: Mutex<HashMap<(String, String), QueueHandle>>,
    opening: tokio::sync::Mutex<()>,
    ids: AtomicU64,
    this: Weak<Node>,
    /// Set to true when the node stops: connections close with 320 CONNECTION_FORCED.
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

impl Node {
    /// Build a node and load the default vhost's topology.
    pub async fn new(
        config: ComputeConfig,
        storage: Option<StorageClient>,
    ) -> Result<Arc<Node>, AmqpError> {
        let meta = match &storage {
            Some(s) => Meta::Registers(s.registers()),
            None => Meta::memory(),
        };
        let node = Arc::new_cyclic(|this| Node {
            config,
            node_id: NodeId::random(),
            topology: Topology::new(meta.clone()),
            storage,
            meta,
            queues: Mutex::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
            ids: AtomicU64::new(1),
            this: this.clone(),
            shutdown: tokio::sync::watch::channel(false).0,
        });
        node.topology.load("/").await?;
        Ok(node)
    }

    /// A node-unique number (connection ids, channel serials, consumer ids).
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    fn running(&self, vhost: &str, name: &str) -> Option<QueueHandle> {
        let map = match self.queues.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(&(vhost.to_string(), name.to_string()))
            .filter(|h| !h.is_closed())
            .cloned()
    }

    /// The owner of a declared queue, starting it (and taking over its log) if needed.
    pub async fn queue(&self, vhost: &str, def: &Arc<QueueDef>) -> Result<QueueHandle, AmqpError> {
        if let Some(h) = self.running(vhost, &def.name) {
            return Ok(h);
        }
        let _guard = self.opening.lock().await;
        if let Some(h) = self.running(vhost, &def.name) {
            return Ok(h);
        }
        let id = self.next_id();
        let key = (vhost.to_string(), def.name.clone());
        let this = self.this.clone();
        let vh = vhost.to_string();
        let qname = def.name.clone();
        let log_id = def.log_id;
        let on_exit: owner::OwnerExit = Box::new(move |reason| {
            if let Some(node) = this.upgrade() {
                node.owner_exited(id, vh, qname, log_id, reason);
            }
        });
        let parts = (id, vhost.to_string(), def.name.clone(), def.durable);
        let handle = match (&self.storage, def.durable && !def.exclusive) {
            (Some(storage), true) => {
                let writer = storage.acquire_log(def.log_id).await?;
                let epoch = writer.epoch();
                self.claim(def.log_id, epoch).await?;
                let mut log = DurableLog::new(writer);
                let records = crate::queue::log::QueueLog::replay(&mut log).await?;
                let n = records.len();
                let engine = owner::replay(records)
                    .map_err(|e| AmqpError::internal(format!("queue log unreadable: {e}")))?;
                info!(queue = %def.name, vhost, %epoch, records = n, ready = engine.ready_count(), "queue owner started");
                owner::spawn(engine, log, parts, def.auto_delete, on_exit)
            }
            _ => owner::spawn(
                QueueEngine::new(),
                MemoryLog,
                parts,
                def.auto_delete,
                on_exit,
            ),
        };
        let mut map = match self.queues.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.insert(key, handle.clone());
        Ok(handle)
    }

    /// Record this node as the queue's owner at `epoch` (epochs only move forward).
    async fn claim(&self, log_id: LogId, epoch: Epoch) -> Result<(), AmqpError> {
        let me = self.node_id;
        self.meta
            .update(&descriptor_key(log_id), |cur: Option<&Bytes>| {
                let prev: Option<QueueDescriptor> =
                    cur.and_then(|b| serde_json::from_slice(b).ok());
                let epoch = match prev {
                    Some(p) if p.epoch > epoch => p.epoch,
                    _ => epoch,
                };
                let d = QueueDescriptor {
                    log_id,
                    owner: me,
                    epoch,
                };
                serde_json::to_vec(&d).ok().map(Bytes::from)
            })
            .await?;
        Ok(())
    }

    fn owner_exited(
        &self,
        id: u64,
        vhost: String,
        name: String,
        log_id: LogId,
        reason: ExitReason,
    ) {
        {
            let mut map = match self.queues.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let key = (vhost.clone(), name.clone());
            if map.get(&key).is_some_and(|h| h.shared().id == id) {
                map.remove(&key);
            }
        }
        if reason == ExitReason::AutoDeleted
            && let Some(node) = self.this.upgrade()
        {
            tokio::spawn(async move {
                if let Err(e) = node.forget_queue(&vhost, &name, Some(log_id)).await {
                    warn!(queue = %name, error = %e, "auto-delete of queue failed");
                }
            });
        }
    }

    /// Remove a queue from the topology and free its log (after its owner stopped).
    pub async fn forget_queue(
        &self,
        vhost: &str,
        name: &str,
        log_id: Option<LogId>,
    ) -> Result<(), AmqpError> {
        let durable = self
            .topology
            .edit(vhost, |e| {
                let def = e.topo.queues.get(name).cloned();
                // A queue redeclared since (new log id) is not ours to delete.
                if let (Some(d), Some(l)) = (&def, log_id)
                    && d.log_id != l
                {
                    return Ok(None);
                }
                e.delete_queue(name);
                Ok(def)
            })
            .await?;
        if let (Some(def), Some(storage)) = (durable, &self.storage)
            && def.durable
            && !def.exclusive
            && let Err(e) = storage.delete_log(def.log_id).await
        {
            warn!(queue = %name, error = %e, "could not free the log of a deleted queue");
        }
        Ok(())
    }
}

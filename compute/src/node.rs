//! The compute node's shared state: configuration, topology, storage access, and the
//! queue owners running on this node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use warren_common::{Epoch, Generation, LogId, NodeId};
use warren_storage::client::StorageClient;
use warren_storage::protocol::ownership as rules;

use crate::cluster::membership::Incarnation;
use crate::cluster::{ownership, peer};
use crate::config::ComputeConfig;
use crate::error::AmqpError;
use crate::message::{Message, encode_properties};
use crate::meta::Meta;
use crate::queue::QueueCmd;
use crate::queue::engine::{DeadReason, Entry, QueuePolicy};
use crate::queue::log::{DurableLog, MemoryLog};
use crate::queue::owner::{self, ExitReason};
use crate::queue::{QueueEngine, QueueHandle};
use crate::routing;
use crate::topology::{Home, QueueDef, Topology};
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};

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

/// A direct reply-to consumer, reachable by its reply name.
#[derive(Clone, Debug)]
pub struct ReplyConsumer {
    /// Its connection.
    pub sink: crate::queue::ConnSink,
    /// Its channel.
    pub channel: crate::queue::ChannelKey,
    /// Its consumer tag.
    pub tag: Arc<str>,
}

/// A queue by vhost and name.
type QueueKey = (String, String);
/// Held while a queue's owner is being started.
type OpenLock = Arc<tokio::sync::Mutex<()>>;

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
    /// This node's cluster membership (None when running without storage).
    pub membership: Option<crate::cluster::membership::Membership>,
    /// Connections to other compute nodes, for queues they own.
    peers: OnceLock<Arc<peer::Peers>>,
    meta: Meta,
    queues: Mutex<HashMap<(String, String), QueueHandle>>,
    reply_to: Mutex<HashMap<String, ReplyConsumer>>,
    /// One lock per queue being opened: a long replay of one queue must not hold up others.
    opening: Mutex<HashMap<QueueKey, OpenLock>>,
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
        node_id: NodeId,
        membership: Option<crate::cluster::membership::Membership>,
    ) -> Result<Arc<Node>, AmqpError> {
        let meta = match &storage {
            Some(s) => Meta::Registers(s.registers()),
            None => Meta::memory(),
        };
        let node = Arc::new_cyclic(|this| Node {
            config,
            node_id,
            topology: Topology::new(meta.clone()),
            storage,
            membership,
            peers: OnceLock::new(),
            meta,
            queues: Mutex::new(HashMap::new()),
            reply_to: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(1),
            this: this.clone(),
            shutdown: tokio::sync::watch::channel(false).0,
        });
        node.topology.load("/").await?;
        // What this node's previous process (or any other ended one) declared as transient
        // is gone before the first client can see it.
        node.sweep_ended("/").await?;
        if node.storage.is_some() {
            tokio::spawn(refresh_topology(Arc::downgrade(&node)));
            tokio::spawn(watch_ownership(Arc::downgrade(&node)));
        }
        if let Some(storage) = &node.storage {
            let weak = Arc::downgrade(&node);
            // The task ends with the process; a node's storage client lives as long.
            drop(
                storage.spawn_repair(REPAIR_INTERVAL, move || match weak.upgrade() {
                    Some(node) => node.logs_to_repair(),
                    None => Vec::new(),
                }),
            );
        }
        Ok(node)
    }

    /// This process, as the home of the transient exchanges and queues it declares.
    pub fn home(&self) -> Home {
        Home {
            node: self.node_id,
            generation: self
                .membership
                .as_ref()
                .map_or(Generation(1), |m| m.generation()),
        }
    }

    /// Whether the process `home` still runs, as far as this node's view knows (without a
    /// cluster, only this process runs).
    pub fn incarnation(&self, home: &Home) -> Incarnation {
        match &self.membership {
            Some(m) => m.view().incarnation(home.node, home.generation),
            None if *home == self.home() => Incarnation::Live,
            None => Incarnation::Ended,
        }
    }

    /// Whether the process `home` is known to be gone for good.
    pub fn has_ended(&self, home: &Home) -> bool {
        self.incarnation(home) == Incarnation::Ended
    }

    /// Remove the transient entities of `vhost` whose home process ended, as this node's
    /// membership view tells (nothing without a cluster: only this process runs).
    async fn sweep_ended(&self, vhost: &str) -> Result<(), AmqpError> {
        let Some(membership) = &self.membership else {
            return Ok(());
        };
        let view = membership.view();
        self.topology
            .sweep(vhost, |h| {
                view.incarnation(h.node, h.generation) == Incarnation::Ended
            })
            .await
    }

    /// Wait, at most two compute leases, until this node's view tells whether the process
    /// `home` still runs: one that just failed is known to be gone once its lease lapsed,
    /// and one that just joined is seen at the next membership read.
    pub async fn settle(&self, home: &Home) -> Incarnation {
        self.await_incarnation(home, |i| i != Incarnation::Unknown)
            .await
    }

    /// Wait, at most two compute leases, until `done` holds for the incarnation of `home`
    /// in this node's view; returns the last one seen.
    pub async fn await_incarnation(
        &self,
        home: &Home,
        done: impl Fn(Incarnation) -> bool,
    ) -> Incarnation {
        let Some(membership) = &self.membership else {
            return self.incarnation(home);
        };
        let patience = std::time::Duration::from_millis(self.config.cluster.lease_ms * 2);
        let deadline = tokio::time::Instant::now() + patience;
        let mut view = membership.subscribe();
        loop {
            let now = self.incarnation(home);
            if done(now) {
                return now;
            }
            if !matches!(
                tokio::time::timeout_at(deadline, view.changed()).await,
                Ok(Ok(()))
            ) {
                return self.incarnation(home);
            }
        }
    }

    /// The logs this node keeps fully replicated in the background: those of the durable
    /// queues whose rendezvous owner it is, whether or not they are open (an open queue's
    /// owner also repairs its log as it writes). Each log has one such node, and the
    /// repair claim in the log descriptor keeps two nodes from repairing it at once.
    fn logs_to_repair(&self) -> Vec<LogId> {
        let Some(membership) = &self.membership else {
            return Vec::new();
        };
        let view = membership.view();
        let mut logs = Vec::new();
        for vhost in self.topology.vhosts() {
            let Some(topo) = self.topology.snapshot(&vhost) else {
                continue;
            };
            for def in topo.queues.values() {
                if def.durable
                    && !def.exclusive
                    && crate::cluster::ownership::owner_of(
                        &view,
                        &crate::cluster::ownership::queue_key(&vhost, &def.name),
                    ) == Some(self.node_id)
                {
                    logs.push(def.log_id);
                }
            }
        }
        logs
    }

    /// Stop every queue owner on this node (it was evicted: other nodes take its queues).
    pub fn stop_owners(&self) {
        let owners: Vec<QueueHandle> = {
            let map = match self.queues.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            map.values().cloned().collect()
        };
        for owner in owners {
            tokio::spawn(async move { owner.send(QueueCmd::Superseded).await });
        }
    }

    /// A node-unique number (connection ids, channel serials, consumer ids).
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Make a reply name reach a direct reply-to consumer.
    pub fn register_reply_to(&self, name: String, consumer: ReplyConsumer) {
        let mut map = match self.reply_to.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.insert(name, consumer);
    }

    /// Forget a reply name.
    pub fn unregister_reply_to(&self, name: &str) {
        let mut map = match self.reply_to.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.remove(name);
    }

    /// Whether a reply name has a consumer.
    pub fn has_reply_to(&self, name: &str) -> bool {
        self.reply_consumer(name).is_some()
    }

    /// The consumer behind a reply name.
    pub fn reply_consumer(&self, name: &str) -> Option<ReplyConsumer> {
        let map = match self.reply_to.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(name).cloned()
    }

    /// Hand a reply to the local consumer of `name`; false if it has none (or it is gone).
    pub fn deliver_direct_reply(&self, name: &str, msg: Arc<Message>) -> bool {
        match self.reply_consumer(name) {
            Some(c) => c
                .sink
                .send(crate::queue::ConnEvent::DirectReply {
                    channel: c.channel,
                    tag: c.tag,
                    msg,
                })
                .is_ok(),
            None => false,
        }
    }

    /// The peer address of the home of reply name `name` when that is another live
    /// compute member.
    fn reply_home_peer(&self, name: &str) -> Option<SocketAddr> {
        let home = crate::handlers::reply_to::reply_home(name)?;
        if home == self.node_id {
            return None;
        }
        let view = self.membership.as_ref()?.view();
        view.members.get(&home).map(|r| r.peer_addr)
    }

    /// Whether reply name `name` is homed on another live compute member.
    pub fn reply_home_is_peer(&self, name: &str) -> bool {
        self.peers.get().is_some() && self.reply_home_peer(name).is_some()
    }

    /// Send a reply to the home node of `name` if that is another live member (in the
    /// background: the publisher does not wait). False if it is not: the reply cannot be
    /// delivered. Whether the home node still has the consumer is not known here; if it
    /// has not, the reply is dropped there.
    pub fn send_direct_reply(&self, name: &str, msg: &Message) -> bool {
        let (Some(peers), Some(addr)) = (self.peers.get(), self.reply_home_peer(name)) else {
            return false;
        };
        // Queued, in publish order, for the home node's one sender.
        if let Err(e) = peers.send_direct_reply(addr, name.to_string(), peer::to_wire(msg)) {
            debug!(%addr, error = %e, "direct reply to a peer dropped");
        }
        true
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

    /// The owner of a declared queue: a local owner if this node owns it (starting it and
    /// taking over its log if needed), else a proxy forwarding to the owning node.
    pub async fn queue(&self, vhost: &str, def: &Arc<QueueDef>) -> Result<QueueHandle, AmqpError> {
        // A queue whose owner just died is unreachable until the owner's lease lapses and
        // another node takes it over; a queue whose storage lost its quorum, until the
        // quorum is back. Wait through that (as a RabbitMQ quorum queue waits for a new
        // leader) before telling the client the queue is down.
        let patience = std::time::Duration::from_millis(self.config.cluster.lease_ms * 2);
        let deadline = tokio::time::Instant::now() + patience;
        let mut view = self.membership.as_ref().map(|m| m.subscribe());
        loop {
            let e = match self.queue_for(vhost, def, false).await {
                Ok(h) => return Ok(h),
                Err(e) => e,
            };
            let retry = e.code == crate::error::ReplyCode::InternalError
                && self.storage.is_some()
                && !*self.shutdown.borrow()
                && tokio::time::Instant::now() < deadline;
            if !retry {
                return Err(if e.code == crate::error::ReplyCode::InternalError {
                    // RabbitMQ's answer for a durable queue whose home is unreachable: a
                    // 404 on the channel, so the connection (and its other channels) live.
                    AmqpError::not_found(format!(
                        "queue '{}' in vhost '{vhost}' is down or inaccessible ({})",
                        def.name, e.text
                    ))
                } else {
                    e
                });
            }
            tracing::debug!(queue = %def.name, vhost, error = %e, "queue unavailable; retrying");
            let pause = std::time::Duration::from_millis(250);
            // A membership change (the dead owner evicted) is worth an attempt at once.
            let followed = match view.as_mut() {
                Some(v) => !matches!(tokio::time::timeout(pause, v.changed()).await, Ok(Err(_))),
                None => false,
            };
            if !followed {
                view = None;
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// The local owner of a queue for a peer's session: never a proxy (a peer that asks
    /// this node believes it is the owner; if it is not, the peer is told so).
    pub async fn open_for_peer(&self, vhost: &str, name: &str) -> Result<QueueHandle, String> {
        let mut def = self
            .topology
            .snapshot(vhost)
            .and_then(|t| t.queues.get(name).cloned());
        if def.is_none() {
            // Declared on another node a moment ago: this node's snapshot may lag.
            let _ = self.topology.refresh_after_miss(vhost).await;
            def = self
                .topology
                .snapshot(vhost)
                .and_then(|t| t.queues.get(name).cloned());
        }
        let Some(def) = def else {
            return Err(format!("no queue '{name}' in vhost '{vhost}'"));
        };
        if let Some(home) = def.home
            && home != self.home()
        {
            return Err(format!(
                "queue '{name}' in vhost '{vhost}' lives on node {}, not here",
                home.node
            ));
        }
        self.queue_for(vhost, &def, true)
            .await
            .map_err(|e| e.text.to_string())
    }

    async fn queue_for(
        &self,
        vhost: &str,
        def: &Arc<QueueDef>,
        from_peer: bool,
    ) -> Result<QueueHandle, AmqpError> {
        if let Some(h) = self.running(vhost, &def.name) {
            if from_peer && h.shared().remote {
                return Err(AmqpError::internal("this node is not the queue's owner"));
            }
            return Ok(h);
        }
        let lock = {
            let mut map = match self.opening.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            map.entry((vhost.to_string(), def.name.clone()))
                .or_default()
                .clone()
        };
        let guard = lock.lock().await;
        let result = self.open_queue(vhost, def, from_peer).await;
        drop(guard);
        {
            let mut map = match self.opening.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let key = (vhost.to_string(), def.name.clone());
            // Forget the lock once nobody else waits on it.
            if map.get(&key).is_some_and(|l| Arc::strong_count(l) <= 2) {
                map.remove(&key);
            }
        }
        result
    }

    async fn open_queue(
        &self,
        vhost: &str,
        def: &Arc<QueueDef>,
        from_peer: bool,
    ) -> Result<QueueHandle, AmqpError> {
        if let Some(h) = self.running(vhost, &def.name) {
            if from_peer && h.shared().remote {
                return Err(AmqpError::internal("this node is not the queue's owner"));
            }
            return Ok(h);
        }
        let id = self.next_id();
        let key = (vhost.to_string(), def.name.clone());
        if let Some((owner, addr)) = self.remote_owner(vhost, def).await? {
            if from_peer {
                return Err(AmqpError::internal(format!(
                    "node {owner} owns this queue, not this node"
                )));
            }
            let Some(peers) = self.peers.get() else {
                return Err(AmqpError::internal("no peer transport"));
            };
            let view = self.membership.as_ref().map(|m| m.subscribe());
            let handle = peers
                .open_proxy(owner, addr, view, vhost, &def.name, def.durable, id)
                .await?;
            let mut map = match self.queues.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            map.insert(key, handle.clone());
            return Ok(handle);
        }
        let this = self.this.clone();
        let vh = vhost.to_string();
        let qname = def.name.clone();
        let log_id = def.log_id;
        let on_exit: owner::OwnerExit = Box::new(move |reason| {
            if let Some(node) = this.upgrade() {
                node.owner_exited(id, vh, qname, log_id, reason);
            }
        });
        let policy = QueuePolicy::from_args(&def.arguments);
        let dead_letter = self.dead_letter_fn(vhost, def);
        let mut config = owner::OwnerConfig {
            id,
            vhost: vhost.to_string(),
            name: def.name.clone(),
            durable: def.durable,
            auto_delete: def.auto_delete,
            on_exit,
            dead_letter,
            expires: match def.arguments.inner().get("x-expires") {
                Some(v) => crate::handlers::int_arg(v).and_then(|n| u64::try_from(n).ok()),
                None => None,
            },
            log_id: None,
        };
        let handle = match (&self.storage, def.durable && !def.exclusive) {
            (Some(storage), true) => {
                let writer = match storage.acquire_log(def.log_id).await {
                    Ok(w) => w,
                    Err(e) => {
                        if matches!(e, warren_storage::StorageError::NotFound(_)) {
                            // Deleted through another node since this node's topology
                            // snapshot was taken: catch up now, so a redeclaration creates
                            // a fresh queue instead of reopening the deleted one.
                            let _ = self.topology.refresh(vhost).await;
                        }
                        return Err(e.into());
                    }
                };
                let epoch = writer.epoch();
                self.claim(def.log_id, epoch).await?;
                config.log_id = Some(def.log_id);
                let mut log = DurableLog::new(writer);
                let records = crate::queue::log::QueueLog::replay(&mut log).await?;
                let n = records.len();
                let (engine, handed_off) = owner::replay_handoff(records, policy)
                    .map_err(|e| AmqpError::internal(format!("queue log unreadable: {e}")))?;
                if handed_off {
                    // Written before the first delivery: a later replay must not trust the
                    // hand-off mark once this owner may have delivered messages.
                    crate::queue::log::QueueLog::append(
                        &mut log,
                        crate::queue::record::encode_settle(&[]),
                    )
                    .await?;
                }
                info!(queue = %def.name, vhost, %epoch, records = n, ready = engine.ready_count(), "queue owner started");
                owner::spawn(engine, log, config)
            }
            _ => owner::spawn(QueueEngine::with_policy(policy), MemoryLog, config),
        };
        let mut map = match self.queues.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.insert(key, handle.clone());
        Ok(handle)
    }

    /// The node that should own `def` and its peer address, when that is not this node.
    /// A transient queue is owned by its home process, for as long as that runs. A durable
    /// queue's owner is sticky: the owner recorded in the queue's descriptor keeps the queue
    /// while it is a live member; otherwise rendezvous hashing over the live members
    /// decides. An error when this node is not a live member itself.
    async fn remote_owner(
        &self,
        vhost: &str,
        def: &QueueDef,
    ) -> Result<Option<(NodeId, SocketAddr)>, AmqpError> {
        if let Some(home) = def.home {
            return match self.incarnation(&home) {
                Incarnation::Live if home.node == self.node_id => Ok(None),
                Incarnation::Live => {
                    let addr = self
                        .membership
                        .as_ref()
                        .and_then(|m| m.view().members.get(&home.node).map(|r| r.peer_addr));
                    match (addr, self.peers.get()) {
                        (Some(addr), Some(_)) => Ok(Some((home.node, addr))),
                        _ => Err(AmqpError::internal("the queue's home node is unreachable")),
                    }
                }
                // RabbitMQ deletes a transient queue whose node went down.
                Incarnation::Ended => Err(AmqpError::not_found(format!(
                    "queue '{}' in vhost '{vhost}' was deleted with its node",
                    def.name
                ))),
                // The home may have joined a moment ago, or be about to be evicted: the
                // caller waits for the view to tell.
                Incarnation::Unknown => Err(AmqpError::internal(
                    "the queue's home node is not a live member yet",
                )),
            };
        }
        let (Some(membership), Some(_)) = (&self.membership, self.peers.get()) else {
            return Ok(None);
        };
        let view = membership.view();
        if *self.shutdown.borrow() || !view.members.contains_key(&self.node_id) {
            // Stopping, leaving, or evicted and not yet joined again: this node must not
            // take queues over (a leaving node is not refused by storage, and would fence
            // the live owner), and it has no view to route by.
            return Err(AmqpError::internal(
                "this compute node is not a live cluster member",
            ));
        }
        let recorded = match self.meta.get(&descriptor_key(def.log_id)).await {
            Ok(Some(raw)) => serde_json::from_slice::<QueueDescriptor>(&raw)
                .ok()
                .map(|d| d.owner),
            _ => None,
        };
        let key = ownership::queue_key(vhost, &def.name);
        let Some(owner) = ownership::sticky_owner(view.members.keys(), &key, recorded) else {
            return Ok(None);
        };
        if owner == self.node_id {
            return Ok(None);
        }
        Ok(view.members.get(&owner).map(|r| (owner, r.peer_addr)))
    }

    /// Give an idle queue this node owns to `to`: the owner stops once its hand-off mark is
    /// durable, then the descriptor names `to` (which takes the queue over when it is next
    /// used). Openings of the queue on this node wait meanwhile, so none of them takes it
    /// back. A busy queue stays (tried again at the next check).
    async fn hand_off(&self, handle: &QueueHandle, log_id: LogId, to: NodeId) {
        let shared = handle.shared();
        let key = (shared.vhost.clone(), shared.name.clone());
        let lock = {
            let mut map = match self.opening.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock().await;
        if self
            .running(&key.0, &key.1)
            .is_some_and(|h| h.shared().id == shared.id)
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let handed = handle.send(QueueCmd::HandOff { reply: tx }).await
                && matches!(
                    tokio::time::timeout(std::time::Duration::from_secs(10), rx).await,
                    Ok(Ok(true))
                );
            if handed {
                let me = self.node_id;
                let moved = self
                    .meta
                    .update(&descriptor_key(log_id), |cur: Option<&Bytes>| {
                        // `None` would delete the register: anything not ours stays as is.
                        let cur = cur?.clone();
                        match serde_json::from_slice::<QueueDescriptor>(&cur) {
                            Ok(mut d) if d.owner == me => {
                                d.owner = to;
                                serde_json::to_vec(&d).ok().map(Bytes::from).or(Some(cur))
                            }
                            _ => Some(cur),
                        }
                    })
                    .await;
                match moved {
                    Ok(_) => {
                        info!(queue = %key.1, vhost = %key.0, to = %to, "idle queue handed off to its rendezvous owner")
                    }
                    Err(e) => {
                        warn!(queue = %key.1, error = %e, "hand-off not recorded; the next user takes the queue over")
                    }
                }
            }
        }
        drop(guard);
        let mut map = match self.opening.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.get(&key).is_some_and(|l| Arc::strong_count(l) <= 2) {
            map.remove(&key);
        }
    }

    /// Serve peers on `endpoint` (bound before joining, so its address is advertised).
    pub fn start_peers(self: &Arc<Self>, endpoint: quinn::Endpoint) {
        tokio::spawn(peer::serve(Arc::downgrade(self), endpoint.clone()));
        let _ = self.peers.set(Arc::new(peer::Peers::new(endpoint)));
        let weak = Arc::downgrade(self);
        self.topology
            .set_announcer(Arc::new(move |vhost: String, version: u64| {
                let weak = weak.clone();
                Box::pin(async move {
                    if let Some(node) = weak.upgrade() {
                        node.announce_topology(&vhost, version).await;
                    }
                })
            }));
    }

    /// Tell every other live compute node that this node wrote `version` of `vhost`'s
    /// topology, and wait until each routes by it: then a client told declare-ok or bind-ok
    /// here finds the change through any node at once, as on a RabbitMQ cluster. A node
    /// that does not answer within [`ANNOUNCE_TIMEOUT`] (failing, or cut off) is left to its
    /// own refresh.
    async fn announce_topology(&self, vhost: &str, version: u64) {
        let (Some(membership), Some(peers)) = (&self.membership, self.peers.get()) else {
            return;
        };
        let view = membership.view();
        let mut tells = tokio::task::JoinSet::new();
        for (id, record) in &view.members {
            if *id == self.node_id {
                continue;
            }
            let peers = peers.clone();
            let addr = record.peer_addr;
            let vhost = vhost.to_string();
            tells.spawn(async move {
                let told = tokio::time::timeout(
                    ANNOUNCE_TIMEOUT,
                    peers.announce_topology(addr, &vhost, version),
                )
                .await;
                match told {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(%addr, error = %e, "topology change not acknowledged"),
                    Err(_) => debug!(%addr, "topology change not acknowledged in time"),
                }
            });
        }
        while tells.join_next().await.is_some() {}
    }

    /// Stop serving peers and close every peer connection (the node is stopping).
    pub fn close_peers(&self) {
        if let Some(p) = self.peers.get() {
            p.close();
        }
    }

    fn dead_letter_fn(&self, vhost: &str, def: &QueueDef) -> Option<owner::DeadLetterFn> {
        let dlx = match def.arguments.inner().get("x-dead-letter-exchange")? {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            AMQPValue::ShortString(s) => s.to_string(),
            _ => return None,
        };
        let dlrk = match def.arguments.inner().get("x-dead-letter-routing-key") {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
            _ => None,
        };
        let this = self.this.clone();
        let vhost = vhost.to_string();
        let queue = def.name.clone();
        Some(Arc::new(move |dead| {
            let Some(node) = this.upgrade() else {
                return;
            };
            let (vhost, queue, dlx, dlrk) =
                (vhost.clone(), queue.clone(), dlx.clone(), dlrk.clone());
            tokio::spawn(async move {
                node.dead_letter(&vhost, &queue, &dlx, dlrk.as_deref(), dead)
                    .await;
            });
        }))
    }

    /// Republish removed messages to a dead-letter exchange with RabbitMQ's `x-death`
    /// headers.
    async fn dead_letter(
        &self,
        vhost: &str,
        queue: &str,
        dlx: &str,
        dlrk: Option<&str>,
        dead: Vec<(Entry, DeadReason)>,
    ) {
        let Some(topo) = self.topology.snapshot(vhost) else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut targets = Vec::new();
        for (entry, reason) in dead {
            let msg = dead_lettered(&entry.msg, queue, reason, dlrk, now);
            targets.clear();
            if dlx.is_empty() {
                if topo.queues.contains_key(&msg.routing_key) {
                    targets.push(msg.routing_key.clone());
                }
            } else if let Some(x) = topo.exchanges.get(dlx) {
                let headers = msg.headers();
                routing::route(
                    &topo.exchanges,
                    x,
                    &msg.routing_key,
                    headers.as_ref(),
                    &mut targets,
                );
            }
            let msg = Arc::new(msg);
            for name in &targets {
                let Some(def) = topo.queues.get(name) else {
                    continue;
                };
                match self.queue(vhost, def).await {
                    Ok(q) => {
                        q.send(QueueCmd::Publish {
                            msg: msg.clone(),
                            confirm: None,
                        })
                        .await;
                    }
                    Err(e) => warn!(queue = %name, error = %e, "dead-lettering failed"),
                }
            }
        }
    }

    /// Record this node as the queue's owner at `epoch` (epochs only move forward).
    async fn claim(&self, log_id: LogId, epoch: Epoch) -> Result<(), AmqpError> {
        let me = self.node_id;
        let mut superseded = None;
        self.meta
            .update(&descriptor_key(log_id), |cur: Option<&Bytes>| {
                let prev: Option<QueueDescriptor> =
                    cur.and_then(|b| serde_json::from_slice(b).ok());
                let recorded = rules::claim(
                    prev.map(|p| rules::OwnerClaim {
                        owner: p.owner,
                        epoch: p.epoch,
                    }),
                    me,
                    epoch,
                );
                // A newer takeover already happened: its owner stays recorded (writing
                // ourselves here would send the queue back to a fenced node).
                superseded = (recorded.epoch != epoch).then_some(recorded.epoch);
                if superseded.is_some() {
                    return cur.cloned();
                }
                let d = QueueDescriptor {
                    log_id,
                    owner: me,
                    epoch,
                };
                serde_json::to_vec(&d).ok().map(Bytes::from)
            })
            .await?;
        if let Some(newer) = superseded {
            return Err(AmqpError::internal(format!(
                "taken over at epoch {newer} by another compute node meanwhile"
            )));
        }
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

/// How long a topology change waits for another compute node to acknowledge it.
const ANNOUNCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a node looks for under-replicated segments in the logs it looks after.
const REPAIR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a node re-reads the topology registers for other nodes' changes (and removes
/// the transient entities of nodes that are gone).
const TOPOLOGY_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

async fn refresh_topology(node: Weak<Node>) {
    let mut tick = tokio::time::interval(TOPOLOGY_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut views = node
        .upgrade()
        .and_then(|n| n.membership.as_ref().map(|m| m.subscribe()));
    loop {
        // A membership change may end a home: sweep at once, not at the next tick.
        match views.as_mut() {
            Some(v) => tokio::select! {
                _ = tick.tick() => {}
                changed = v.changed() => {
                    if changed.is_err() {
                        views = None;
                    }
                }
            },
            None => {
                tick.tick().await;
            }
        }
        let Some(node) = node.upgrade() else {
            return;
        };
        if *node.shutdown.borrow() {
            return;
        }
        for vhost in node.topology.vhosts() {
            if let Err(e) = node.topology.refresh(&vhost).await {
                tracing::debug!(vhost, error = %e, "topology refresh failed; will retry");
            }
            // Transient entities of processes that are gone go with them, whichever node
            // notices first.
            if let Err(e) = node.sweep_ended(&vhost).await {
                tracing::debug!(vhost, error = %e, "removing transient entities of ended nodes failed; will retry");
            }
        }
    }
}

/// How often a node checks that the durable queues it serves are still its own, and offers
/// misplaced idle queues a hand-off.
const OWNERSHIP_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// With a membership view, descriptors are read when the view changes (the only time
/// another live node may decide to take a queue over) and otherwise every this many checks.
const DESCRIPTOR_SWEEP_EVERY: u64 = 15;

/// Stop serving queues another compute node took over, and hand idle queues to their
/// rendezvous owner. Fencing already keeps a superseded owner from writing; the check also
/// keeps it from serving stale reads until its next write.
async fn watch_ownership(node: Weak<Node>) {
    let mut tick = tokio::time::interval(OWNERSHIP_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_view: Option<Arc<crate::cluster::membership::ClusterView>> = None;
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let Some(node) = node.upgrade() else {
            return;
        };
        if *node.shutdown.borrow() {
            return;
        }
        let owned: Vec<(QueueHandle, LogId)> = {
            let map = match node.queues.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            map.values()
                .filter(|h| h.shared().durable && !h.is_closed())
                .filter_map(|h| h.log_id().map(|l| (h.clone(), l)))
                .collect()
        };
        let view = node.membership.as_ref().map(|m| m.view());
        let view_changed = match (&view, &last_view) {
            (Some(v), Some(l)) => !Arc::ptr_eq(v, l),
            _ => true,
        };
        last_view.clone_from(&view);
        let sweep = view.is_none() || view_changed || ticks.is_multiple_of(DESCRIPTOR_SWEEP_EVERY);
        for (handle, log) in owned {
            if sweep
                && let Ok(Some(raw)) = node.meta.get(&descriptor_key(log)).await
                && let Ok(d) = serde_json::from_slice::<QueueDescriptor>(&raw)
                && d.owner != node.node_id
            {
                handle.send(QueueCmd::Superseded).await;
                continue;
            }
            // Rebalance: a queue whose rendezvous owner is another live member goes there
            // once it is idle (nothing unacked, no consumer), without redelivery.
            if let Some(view) = &view
                && view.members.contains_key(&node.node_id)
            {
                let shared = handle.shared();
                let key = ownership::queue_key(&shared.vhost, &shared.name);
                if let Some(natural) = ownership::owner_of(view, &key)
                    && natural != node.node_id
                {
                    node.hand_off(&handle, log, natural).await;
                }
            }
        }
    }
}

/// A copy of `msg` as RabbitMQ dead-letters it: an `x-death` entry for (queue, reason)
/// counted and moved to the front, `x-first-death-*` set once, the expiration moved to
/// `original-expiration`, and the dead-letter routing key applied.
fn dead_lettered(
    msg: &Message,
    queue: &str,
    reason: DeadReason,
    dlrk: Option<&str>,
    now_secs: u64,
) -> Message {
    let mut props = msg.properties().unwrap_or_default();
    let mut headers = props.headers().clone().unwrap_or_default();
    let s = |v: &str| AMQPValue::LongString(v.into());
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        t.inner().get("queue") == Some(&s(queue))
            && t.inner().get("reason") == Some(&s(reason.as_str()))
    };
    let mut entry = None;
    if let Some(i) = deaths
        .iter()
        .position(|d| matches!(d, AMQPValue::FieldTable(t) if same(t)))
        && let AMQPValue::FieldTable(mut t) = deaths.remove(i)
    {
        let count = match t.inner().get("count") {
            Some(AMQPValue::LongLongInt(n)) => *n,
            _ => 0,
        };
        t.insert("count".into(), AMQPValue::LongLongInt(count + 1));
        t.insert("time".into(), AMQPValue::Timestamp(now_secs));
        entry = Some(t);
    }
    let entry = entry.unwrap_or_else(|| {
        let mut t = FieldTable::default();
        t.insert("count".into(), AMQPValue::LongLongInt(1));
        t.insert("reason".into(), s(reason.as_str()));
        t.insert("queue".into(), s(queue));
        t.insert("time".into(), AMQPValue::Timestamp(now_secs));
        t.insert("exchange".into(), s(&msg.exchange));
        let mut keys = FieldArray::default();
        keys.push(s(&msg.routing_key));
        t.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
        if let Some(exp) = props.expiration() {
            t.insert("original-expiration".into(), s(exp.as_str()));
        }
        t
    });
    deaths.insert(0, AMQPValue::FieldTable(entry));
    let mut arr = FieldArray::default();
    for d in deaths {
        arr.push(d);
    }
    headers.insert("x-death".into(), AMQPValue::FieldArray(arr));
    for (k, v) in [
        ("x-first-death-exchange", s(&msg.exchange)),
        ("x-first-death-queue", s(queue)),
        ("x-first-death-reason", s(reason.as_str())),
    ] {
        if !headers.contains_key(k) {
            headers.insert(k.into(), v);
        }
    }
    headers.insert("x-last-death-exchange".into(), s(&msg.exchange));
    headers.insert("x-last-death-queue".into(), s(queue));
    headers.insert("x-last-death-reason".into(), s(reason.as_str()));
    props = props.with_headers(headers);
    // The expiration moved into x-death: the dead-lettered copy must not expire again.
    let props_no_exp = without_expiration(&props);
    let routing_key = dlrk.unwrap_or(&msg.routing_key).to_string();
    Message::new(
        msg.exchange.clone(),
        routing_key,
        encode_properties(&props_no_exp),
        &props_no_exp,
        msg.body.clone(),
    )
}

/// `props` without its expiration. amq-protocol has no way to unset one property, so the
/// others are copied onto a fresh value.
fn without_expiration(
    props: &amq_protocol::protocol::BasicProperties,
) -> amq_protocol::protocol::BasicProperties {
    if props.expiration().is_none() {
        return props.clone();
    }
    let mut out = amq_protocol::protocol::BasicProperties::default();
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

//! Exchanges, queues and bindings per vhost: the truth is a register per vhost in the
//! metadata store (as JSON); each node keeps an immutable snapshot per vhost that
//! connections read without locks and that writers replace whole.
//!
//! Transient entities (non-durable exchanges and queues, exclusive queues) are in the
//! register too, so every node sees them, but each names its [`Home`]: the process that
//! declared it. Like RabbitMQ's, they do not outlive that process: once its generation has
//! ended, any node removes them ([`Topology::sweep`]), with every binding that involves them.

use amq_protocol::types::FieldTable;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tracing::warn;
use warren_common::{Generation, LogId, NodeId};

use crate::error::AmqpError;
use crate::meta::Meta;
use crate::routing::{BindingDef, Destination, Exchange, ExchangeDef, ExchangeKind};

/// The process incarnation a transient exchange or queue lives and dies with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Home {
    /// The compute node that declared it.
    pub node: NodeId,
    /// That node's generation when it did.
    pub generation: Generation,
}

/// A queue's declaration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    /// Its name.
    pub name: String,
    /// Survives restarts (its persistent messages are replicated).
    pub durable: bool,
    /// Owned by one connection, deleted with it.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declaration arguments (`x-*`), stored as given.
    pub arguments: FieldTable,
    /// Its log in storage; a redeclared queue gets a new one.
    pub log_id: LogId,
    /// The owning connection of an exclusive queue (an id on its home node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_conn: Option<u64>,
    /// Where a transient queue (non-durable or exclusive) lives; `None` for durable ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<Home>,
}

impl QueueDef {
    /// Whether connection `conn` of the process `home` may not use it: RabbitMQ's 405 for
    /// an exclusive queue of another connection.
    pub fn locked_for(&self, home: Home, conn: u64) -> bool {
        self.exclusive && (self.home != Some(home) || self.owner_conn != Some(conn))
    }
}

/// One vhost's topology at one moment.
#[derive(Clone, Debug, Default)]
pub struct VhostTopology {
    /// Exchanges by name (the default exchange is "").
    pub exchanges: HashMap<String, Arc<Exchange>>,
    /// Queues by name.
    pub queues: HashMap<String, Arc<QueueDef>>,
}

/// What the register of a vhost holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Stored {
    /// Raised by every write, so a reader never replaces newer state with older.
    #[serde(default)]
    version: u64,
    exchanges: Vec<ExchangeDef>,
    queues: Vec<QueueDef>,
    bindings: Vec<BindingDef>,
}

/// One idempotent change to a vhost's topology.
#[derive(Clone, Debug)]
enum Change {
    PutExchange(ExchangeDef),
    DelExchange(String),
    PutQueue(QueueDef),
    DelQueue(String),
    PutBinding(BindingDef),
    DelBinding(BindingDef),
}

impl Stored {
    fn apply(&mut self, c: &Change) {
        match c {
            Change::PutExchange(d) => {
                self.exchanges.retain(|x| x.name != d.name);
                self.exchanges.push(d.clone());
            }
            Change::DelExchange(n) => {
                self.exchanges.retain(|x| &x.name != n);
                let dest = Destination::Exchange(n.clone());
                self.bindings
                    .retain(|b| &b.source != n && b.destination != dest);
            }
            Change::PutQueue(q) => {
                self.queues.retain(|x| x.name != q.name);
                self.queues.push(q.clone());
            }
            Change::DelQueue(n) => {
                self.queues.retain(|x| &x.name != n);
                let dest = Destination::Queue(n.clone());
                self.bindings.retain(|b| b.destination != dest);
            }
            Change::PutBinding(b) => {
                if !self.bindings.iter().any(|x| x.same(b)) {
                    self.bindings.push(b.clone());
                }
            }
            Change::DelBinding(b) => self.bindings.retain(|x| !x.same(b)),
        }
    }

    /// Remove every exchange and queue whose home has `ended`, with every binding from or
    /// to them, and then every auto-delete exchange that lost its last binding that way (as
    /// deleting them one by one would). Returns whether anything was removed.
    fn sweep(&mut self, ended: impl Fn(&Home) -> bool) -> bool {
        let gone = |home: &Option<Home>| home.as_ref().is_some_and(&ended);
        let mut removed_x: Vec<String> = self
            .exchanges
            .iter()
            .filter(|x| gone(&x.home))
            .map(|x| x.name.clone())
            .collect();
        let removed_q: Vec<String> = self
            .queues
            .iter()
            .filter(|q| gone(&q.home))
            .map(|q| q.name.clone())
            .collect();
        if removed_x.is_empty() && removed_q.is_empty() {
            return false;
        }
        let before = self.bindings.clone();
        for q in removed_q {
            self.apply(&Change::DelQueue(q));
        }
        while let Some(x) = removed_x.pop() {
            self.apply(&Change::DelExchange(x));
        }
        // Auto-delete exchanges whose last binding went with the removals above (one never
        // bound stays, as in RabbitMQ).
        let mut lost_binding: Vec<String> = before
            .iter()
            .filter(|b| !self.bindings.iter().any(|x| x.same(b)))
            .map(|b| b.source.clone())
            .collect();
        while let Some(source) = lost_binding.pop() {
            let emptied = self
                .exchanges
                .iter()
                .any(|x| x.name == source && x.auto_delete)
                && !self.bindings.iter().any(|b| b.source == source);
            if emptied {
                let dest = Destination::Exchange(source.clone());
                lost_binding.extend(
                    self.bindings
                        .iter()
                        .filter(|b| b.destination == dest)
                        .map(|b| b.source.clone()),
                );
                self.apply(&Change::DelExchange(source));
            }
        }
        true
    }
}

fn register_key(vhost: &str) -> String {
    format!("warren/topology/{vhost}")
}

/// The exchanges every vhost has, as RabbitMQ predeclares them.
pub fn predeclared() -> Vec<ExchangeDef> {
    let x = |name: &str, kind, internal| ExchangeDef {
        name: name.into(),
        kind,
        durable: true,
        auto_delete: false,
        internal,
        arguments: FieldTable::default(),
        home: None,
    };
    vec![
        x("", ExchangeKind::Direct, false),
        x("amq.direct", ExchangeKind::Direct, false),
        x("amq.fanout", ExchangeKind::Fanout, false),
        x("amq.topic", ExchangeKind::Topic, false),
        x("amq.headers", ExchangeKind::Headers, false),
        x("amq.match", ExchangeKind::Headers, false),
        x("amq.rabbitmq.trace", ExchangeKind::Topic, true),
    ]
}

fn stored_version(raw: Option<&Bytes>) -> u64 {
    #[derive(Deserialize)]
    struct Version {
        #[serde(default)]
        version: u64,
    }
    raw.and_then(|b| serde_json::from_slice::<Version>(b).ok())
        .map_or(0, |v| v.version)
}

/// A vhost's topology from its register value `raw`, plus the predeclared exchanges.
fn merge(vhost: &str, raw: Option<&Bytes>) -> VhostTopology {
    let stored: Stored = match raw {
        Some(b) => serde_json::from_slice(b).unwrap_or_else(|e| {
            warn!(vhost, error = %e, "stored topology is unreadable; ignoring it");
            Stored::default()
        }),
        None => Stored::default(),
    };
    let mut topo = VhostTopology::default();
    for d in predeclared().into_iter().chain(stored.exchanges) {
        topo.exchanges
            .insert(d.name.clone(), Arc::new(Exchange::new(d)));
    }
    for q in stored.queues {
        topo.queues.insert(q.name.clone(), Arc::new(q));
    }
    for b in stored.bindings {
        let dest_exists = match &b.destination {
            Destination::Queue(q) => topo.queues.contains_key(q),
            Destination::Exchange(e) => topo.exchanges.contains_key(e),
        };
        if dest_exists && let Some(x) = topo.exchanges.get_mut(&b.source) {
            Arc::make_mut(x).bind(b);
        }
    }
    topo
}

/// Tells the other compute nodes that this node wrote a version of a vhost's topology, and
/// completes once they route by it (or were given up on).
pub type Announcer =
    Arc<dyn Fn(String, u64) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Every vhost's snapshot plus the metadata store behind them.
pub struct Topology {
    meta: Meta,
    announcer: std::sync::OnceLock<Announcer>,
    vhosts: RwLock<HashMap<String, Arc<VhostTopology>>>,
    /// The register value each snapshot's durable part was built from.
    seen: std::sync::Mutex<HashMap<String, Option<Bytes>>>,
    version: AtomicU64,
    write: tokio::sync::Mutex<()>,
    /// Register reads made because something was missing: (reads started, the start number
    /// of the last one finished), per vhost.
    miss_reads: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    miss_lock: tokio::sync::Mutex<()>,
}

/// A mutation being prepared on a copy of a vhost's snapshot.
pub struct Edit {
    /// The copy to change.
    pub topo: VhostTopology,
    changes: Vec<Change>,
}

impl Edit {
    /// Add or replace an exchange.
    pub fn put_exchange(&mut self, def: ExchangeDef) {
        self.changes.push(Change::PutExchange(def.clone()));
        let bindings = self
            .topo
            .exchanges
            .get(&def.name)
            .map(|x| x.bindings.clone())
            .unwrap_or_default();
        let mut x = Exchange::new(def);
        for b in bindings {
            x.bind(b);
        }
        self.topo.exchanges.insert(x.def.name.clone(), Arc::new(x));
    }

    /// Remove an exchange and every binding from or to it.
    pub fn delete_exchange(&mut self, name: &str) {
        if self.topo.exchanges.remove(name).is_some() {
            self.changes.push(Change::DelExchange(name.to_string()));
        }
        self.remove_bindings_to(&Destination::Exchange(name.to_string()));
    }

    /// Add a queue.
    pub fn put_queue(&mut self, def: QueueDef) {
        self.changes.push(Change::PutQueue(def.clone()));
        self.topo.queues.insert(def.name.clone(), Arc::new(def));
    }

    /// Remove a queue and every binding to it.
    pub fn delete_queue(&mut self, name: &str) {
        if self.topo.queues.remove(name).is_some() {
            self.changes.push(Change::DelQueue(name.to_string()));
        }
        self.remove_bindings_to(&Destination::Queue(name.to_string()));
    }

    /// Add a binding (the source must exist).
    pub fn bind(&mut self, b: BindingDef) {
        if let Some(x) = self.topo.exchanges.get_mut(&b.source) {
            self.changes.push(Change::PutBinding(b.clone()));
            Arc::make_mut(x).bind(b);
        }
    }

    /// Remove a binding, auto-deleting its source exchange if that was its last binding.
    pub fn unbind(&mut self, b: &BindingDef) {
        let mut auto_delete = None;
        if let Some(x) = self.topo.exchanges.get_mut(&b.source) {
            let x = Arc::make_mut(x);
            if x.unbind(b) {
                self.changes.push(Change::DelBinding(b.clone()));
                if x.def.auto_delete && x.bindings.is_empty() {
                    auto_delete = Some(x.def.name.clone());
                }
            }
        }
        if let Some(n) = auto_delete {
            self.delete_exchange(&n);
        }
    }

    fn remove_bindings_to(&mut self, dest: &Destination) {
        let mut emptied = Vec::new();
        for x in self.topo.exchanges.values_mut() {
            if x.bindings.iter().any(|b| &b.destination == dest) {
                let x = Arc::make_mut(x);
                x.unbind_destination(dest);
                if x.def.auto_delete && x.bindings.is_empty() {
                    emptied.push(x.def.name.clone());
                }
            }
        }
        for n in emptied {
            self.delete_exchange(&n);
        }
    }
}

impl Topology {
    /// An empty topology over `meta`; call [`Topology::load`] for each vhost.
    pub fn new(meta: Meta) -> Self {
        Topology {
            meta,
            announcer: std::sync::OnceLock::new(),
            vhosts: RwLock::new(HashMap::new()),
            seen: std::sync::Mutex::new(HashMap::new()),
            version: AtomicU64::new(1),
            write: tokio::sync::Mutex::new(()),
            miss_reads: std::sync::Mutex::new(HashMap::new()),
            miss_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Re-read a vhost's register because an exchange, queue or route was missing from the
    /// snapshot: another compute node may have declared it a moment ago, and a client that
    /// saw declare-ok there must find it here, as on a RabbitMQ cluster. The read starts
    /// after the miss (so it sees every declaration acknowledged before it), and concurrent
    /// misses share one read: at most one such read per vhost is in flight.
    pub async fn refresh_after_miss(&self, vhost: &str) -> Result<(), AmqpError> {
        if matches!(self.meta, Meta::Memory(_)) {
            return Ok(());
        }
        let counts = |this: &Self| {
            let map = match this.miss_reads.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            map.get(vhost).copied().unwrap_or((0, 0))
        };
        // Any read numbered above the ones started so far begins after this miss.
        let wanted = counts(self).0 + 1;
        let _turn = self.miss_lock.lock().await;
        if counts(self).1 >= wanted {
            return Ok(());
        }
        let number = {
            let mut map = match self.miss_reads.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let entry = map.entry(vhost.to_string()).or_default();
            entry.0 += 1;
            entry.0
        };
        let result = self.refresh(vhost).await;
        let mut map = match self.miss_reads.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(vhost.to_string()).or_default().1 = number;
        result
    }

    /// Tell other nodes about every change this node writes from now on.
    pub fn set_announcer(&self, announcer: Announcer) {
        let _ = self.announcer.set(announcer);
    }

    /// Make sure this node routes by `version` of `vhost`'s topology or a newer one (another
    /// node wrote it, so a read of the register now sees it).
    pub async fn catch_up(&self, vhost: &str, version: u64) -> Result<(), AmqpError> {
        if !self.has_vhost(vhost) || stored_version(self.seen(vhost).as_ref()) >= version {
            return Ok(());
        }
        self.refresh(vhost).await
    }

    async fn announce(&self, vhost: &str, written: Option<u64>) {
        if let (Some(version), Some(announce)) = (written, self.announcer.get()) {
            announce(vhost.to_string(), version).await;
        }
    }

    /// Read a vhost's topology from the store and add the predeclared exchanges.
    pub async fn load(&self, vhost: &str) -> Result<(), AmqpError> {
        let raw = self.meta.get(&register_key(vhost)).await?;
        let _guard = self.write.lock().await;
        self.adopt(vhost, raw);
        Ok(())
    }

    /// Pick up changes other compute nodes made to a vhost's topology.
    pub async fn refresh(&self, vhost: &str) -> Result<(), AmqpError> {
        let raw = self.meta.get(&register_key(vhost)).await?;
        let _guard = self.write.lock().await;
        // An edit may have installed a newer value while this read was in flight.
        if stored_version(raw.as_ref()) <= stored_version(self.seen(vhost).as_ref()) {
            return Ok(());
        }
        self.adopt(vhost, raw);
        Ok(())
    }

    /// The vhosts this node has loaded.
    pub fn vhosts(&self) -> Vec<String> {
        let map = match self.vhosts.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.keys().cloned().collect()
    }

    fn seen(&self, vhost: &str) -> Option<Bytes> {
        let map = match self.seen.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(vhost).cloned().flatten()
    }

    /// Route by the register value `raw` from now on; returns its version.
    fn adopt(&self, vhost: &str, raw: Option<Bytes>) -> u64 {
        let version = stored_version(raw.as_ref());
        self.install(vhost, merge(vhost, raw.as_ref()));
        self.remember(vhost, raw);
        version
    }

    fn remember(&self, vhost: &str, raw: Option<Bytes>) {
        let mut map = match self.seen.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.insert(vhost.to_string(), raw);
    }

    fn install(&self, vhost: &str, topo: VhostTopology) {
        let mut map = match self.vhosts.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.insert(vhost.to_string(), Arc::new(topo));
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes whenever any snapshot is replaced; connections compare it to refresh caches.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current snapshot of a vhost.
    pub fn snapshot(&self, vhost: &str) -> Option<Arc<VhostTopology>> {
        let map = match self.vhosts.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(vhost).cloned()
    }

    /// Whether the vhost exists.
    pub fn has_vhost(&self, vhost: &str) -> bool {
        self.snapshot(vhost).is_some()
    }

    /// Run `f` on a copy of the vhost's snapshot; if it returns `Ok`, write its changes to
    /// the register and install the result. The write is conditional on the register still
    /// holding the value the snapshot was built from: if another node changed it meanwhile,
    /// the snapshot is rebuilt from the register and `f` runs again on it, so a decision
    /// (declare or not, equivalent or not, exclusive to whom) is never taken on stale state.
    /// Writers on this node are serialized; readers never wait. A change written is
    /// announced to the other nodes before this returns.
    pub async fn edit<T>(
        &self,
        vhost: &str,
        f: impl FnMut(&mut Edit) -> Result<T, AmqpError>,
    ) -> Result<T, AmqpError> {
        let (out, written) = self.edit_serialized(vhost, f).await?;
        self.announce(vhost, written).await;
        Ok(out)
    }

    /// [`Topology::edit`] under this node's write lock; also returns the version written.
    async fn edit_serialized<T>(
        &self,
        vhost: &str,
        mut f: impl FnMut(&mut Edit) -> Result<T, AmqpError>,
    ) -> Result<(T, Option<u64>), AmqpError> {
        let _guard = self.write.lock().await;
        for _ in 0..EDIT_ATTEMPTS {
            let current = self
                .snapshot(vhost)
                .ok_or_else(|| AmqpError::not_found(format!("no vhost '{vhost}'")))?;
            let base = stored_version(self.seen(vhost).as_ref());
            let mut edit = Edit {
                topo: (*current).clone(),
                changes: Vec::new(),
            };
            let out = f(&mut edit)?;
            if edit.changes.is_empty() {
                return Ok((out, None));
            }
            let changes = edit.changes;
            let mut stale = false;
            let written = self
                .meta
                .update(&register_key(vhost), |cur: Option<&Bytes>| {
                    stale = stored_version(cur) != base;
                    if stale {
                        return cur.cloned();
                    }
                    let mut stored: Stored = cur
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or_default();
                    for c in &changes {
                        stored.apply(c);
                    }
                    stored.version += 1;
                    serde_json::to_vec(&stored).ok().map(Bytes::from)
                })
                .await?;
            let version = self.adopt(vhost, written);
            if !stale {
                return Ok((out, Some(version)));
            }
        }
        Err(AmqpError::internal(format!(
            "the topology of vhost '{vhost}' changed under {EDIT_ATTEMPTS} attempts to edit it"
        )))
    }

    /// Remove the transient exchanges and queues of `vhost` whose home process `ended`,
    /// with their bindings. Any node may do it, any number of times: the removal is
    /// idempotent and judged again on the register's own value.
    pub async fn sweep(
        &self,
        vhost: &str,
        ended: impl Fn(&Home) -> bool + Send + Sync,
    ) -> Result<(), AmqpError> {
        let Some(topo) = self.snapshot(vhost) else {
            return Ok(());
        };
        let due = topo
            .queues
            .values()
            .any(|q| q.home.as_ref().is_some_and(&ended))
            || topo
                .exchanges
                .values()
                .any(|x| x.def.home.as_ref().is_some_and(&ended));
        if !due {
            return Ok(());
        }
        let guard = self.write.lock().await;
        let mut swept = false;
        let written = self
            .meta
            .update(&register_key(vhost), |cur: Option<&Bytes>| {
                swept = false;
                let mut stored: Stored = match cur.map(|b| serde_json::from_slice(b)) {
                    Some(Ok(s)) => s,
                    Some(Err(_)) | None => return cur.cloned(),
                };
                if !stored.sweep(&ended) {
                    return cur.cloned();
                }
                swept = true;
                stored.version += 1;
                serde_json::to_vec(&stored).ok().map(Bytes::from)
            })
            .await?;
        let version = self.adopt(vhost, written);
        drop(guard);
        self.announce(vhost, swept.then_some(version)).await;
        Ok(())
    }
}

/// How many times [`Topology::edit`] re-reads a register that other nodes keep changing.
const EDIT_ATTEMPTS: usize = 20;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HOME: Home = Home {
        node: NodeId(uuid::Uuid::nil()),
        generation: Generation(1),
    };

    fn qdef(name: &str, durable: bool) -> QueueDef {
        QueueDef {
            name: name.into(),
            durable,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
            log_id: LogId::random(),
            owner_conn: None,
            home: (!durable).then_some(HOME),
        }
    }

    fn xdef(name: &str, durable: bool, auto_delete: bool) -> ExchangeDef {
        ExchangeDef {
            name: name.into(),
            kind: ExchangeKind::Fanout,
            durable,
            auto_delete,
            internal: false,
            arguments: FieldTable::default(),
            home: (!durable).then_some(HOME),
        }
    }

    fn to_queue(source: &str, queue: &str) -> BindingDef {
        BindingDef {
            source: source.into(),
            destination: Destination::Queue(queue.into()),
            routing_key: "k".into(),
            arguments: FieldTable::default(),
        }
    }

    #[tokio::test]
    async fn transient_entities_are_shared_until_their_home_ends() {
        let meta = Meta::memory();
        let t = Topology::new(meta.clone());
        t.load("/").await.unwrap();
        t.edit("/", |e| {
            e.put_queue(qdef("dq", true));
            e.put_queue(qdef("tq", false));
            e.put_exchange(xdef("tx", false, false));
            e.put_exchange(xdef("dx-auto", true, true));
            e.put_exchange(xdef("dx-never-bound", true, true));
            e.bind(to_queue("amq.direct", "dq"));
            e.bind(to_queue("amq.direct", "tq"));
            e.bind(to_queue("tx", "dq"));
            e.bind(to_queue("dx-auto", "tq"));
            Ok(())
        })
        .await
        .unwrap();
        // Another node sees all of it.
        let other = Topology::new(meta);
        other.load("/").await.unwrap();
        let s = other.snapshot("/").unwrap();
        assert_eq!(s.queues["tq"].home, Some(HOME));
        assert!(s.exchanges.contains_key("tx"));
        assert_eq!(s.exchanges["amq.direct"].bindings.len(), 2);

        // A home still running is left alone.
        other.sweep("/", |_| false).await.unwrap();
        assert!(other.snapshot("/").unwrap().queues.contains_key("tq"));

        other.sweep("/", |h| *h == HOME).await.unwrap();
        t.refresh("/").await.unwrap();
        for topo in [other.snapshot("/").unwrap(), t.snapshot("/").unwrap()] {
            assert!(topo.queues.contains_key("dq"));
            assert!(!topo.queues.contains_key("tq"));
            assert!(!topo.exchanges.contains_key("tx"));
            // Its only binding went with tq.
            assert!(!topo.exchanges.contains_key("dx-auto"));
            // Never bound: not auto-deleted.
            assert!(topo.exchanges.contains_key("dx-never-bound"));
            assert_eq!(topo.exchanges["amq.direct"].bindings.len(), 1);
        }
    }

    #[tokio::test]
    async fn an_edit_on_a_stale_snapshot_is_decided_again_on_the_register() {
        let meta = Meta::memory();
        let a = Topology::new(meta.clone());
        let b = Topology::new(meta);
        a.load("/").await.unwrap();
        b.load("/").await.unwrap();
        let first = qdef("q", true);
        a.edit("/", |e| {
            e.put_queue(first.clone());
            Ok(())
        })
        .await
        .unwrap();
        // b has not seen it: its declare must find a's queue, not replace it with its own.
        let mut runs = 0;
        let found = b
            .edit("/", |e| {
                runs += 1;
                if let Some(q) = e.topo.queues.get("q") {
                    return Ok(q.log_id);
                }
                let mine = qdef("q", true);
                let id = mine.log_id;
                e.put_queue(mine);
                Ok(id)
            })
            .await
            .unwrap();
        assert_eq!(runs, 2);
        assert_eq!(found, first.log_id);
        a.refresh("/").await.unwrap();
        assert_eq!(a.snapshot("/").unwrap().queues["q"].log_id, first.log_id);
    }

    #[tokio::test]
    async fn deleting_a_queue_removes_its_bindings_and_auto_deletes_exchanges() {
        let t = Topology::new(Meta::memory());
        t.load("/").await.unwrap();
        t.edit("/", |e| {
            e.put_exchange(xdef("ad", false, true));
            e.put_queue(qdef("q", false));
            e.bind(to_queue("ad", "q"));
            Ok(())
        })
        .await
        .unwrap();
        t.edit("/", |e| {
            e.delete_queue("q");
            Ok(())
        })
        .await
        .unwrap();
        let s = t.snapshot("/").unwrap();
        assert!(!s.exchanges.contains_key("ad"));
    }

    #[tokio::test]
    async fn another_nodes_changes_arrive_on_refresh() {
        let meta = Meta::memory();
        let a = Topology::new(meta.clone());
        let b = Topology::new(meta);
        a.load("/").await.unwrap();
        b.load("/").await.unwrap();
        b.edit("/", |e| {
            e.put_queue(qdef("b-transient", false));
            Ok(())
        })
        .await
        .unwrap();
        a.edit("/", |e| {
            e.put_queue(qdef("shared", true));
            e.bind(to_queue("amq.fanout", "shared"));
            Ok(())
        })
        .await
        .unwrap();
        b.refresh("/").await.unwrap();
        let s = b.snapshot("/").unwrap();
        assert!(s.queues.contains_key("shared"));
        assert!(s.queues.contains_key("b-transient"));
        assert_eq!(s.exchanges["amq.fanout"].bindings.len(), 1);
    }
}

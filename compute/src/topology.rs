//! Exchanges, queues and bindings per vhost: the truth is a register per vhost in the
//! metadata store (durable entities only, as JSON); each node keeps an immutable snapshot
//! per vhost that connections read without locks and that writers replace whole.
//!
//! Transient entities (non-durable exchanges and queues, exclusive queues, and bindings
//! that involve them) live only in the snapshot of the node that declared them: like in
//! RabbitMQ, they do not outlive that node.

use amq_protocol::types::FieldTable;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tracing::warn;
use warren_common::LogId;

use crate::error::AmqpError;
use crate::meta::Meta;
use crate::routing::{BindingDef, Destination, Exchange, ExchangeDef, ExchangeKind};

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
    /// The owning connection of an exclusive queue (node-local).
    #[serde(skip)]
    pub owner_conn: Option<u64>,
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

/// One idempotent change to a vhost's durable topology.
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

/// A vhost's topology: the durable part from the register value `raw`, plus this node's
/// transient exchanges, queues and bindings from `local`.
fn merge(vhost: &str, raw: Option<&Bytes>, local: Option<&VhostTopology>) -> VhostTopology {
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
    let mut bindings = stored.bindings;
    if let Some(local) = local {
        for x in local.exchanges.values() {
            if !x.def.durable && !topo.exchanges.contains_key(&x.def.name) {
                topo.exchanges
                    .insert(x.def.name.clone(), Arc::new(Exchange::new(x.def.clone())));
            }
        }
        for q in local.queues.values() {
            if (!q.durable || q.exclusive) && !topo.queues.contains_key(&q.name) {
                topo.queues.insert(q.name.clone(), q.clone());
            }
        }
        // Bindings that involve a transient entity live only here.
        for x in local.exchanges.values() {
            for b in &x.bindings {
                let transient_end = !x.def.durable
                    || match &b.destination {
                        Destination::Queue(q) => local
                            .queues
                            .get(q)
                            .is_none_or(|q| !q.durable || q.exclusive),
                        Destination::Exchange(e) => {
                            local.exchanges.get(e).is_none_or(|e| !e.def.durable)
                        }
                    };
                if transient_end {
                    bindings.push(b.clone());
                }
            }
        }
    }
    for b in bindings {
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

/// Every vhost's snapshot plus the metadata store behind them.
pub struct Topology {
    meta: Meta,
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
        if def.durable {
            self.changes.push(Change::PutExchange(def.clone()));
        }
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
        if let Some(x) = self.topo.exchanges.remove(name)
            && x.def.durable
        {
            self.changes.push(Change::DelExchange(name.to_string()));
        }
        self.remove_bindings_to(&Destination::Exchange(name.to_string()));
    }

    /// Add a queue.
    pub fn put_queue(&mut self, def: QueueDef) {
        if def.durable && !def.exclusive {
            self.changes.push(Change::PutQueue(def.clone()));
        }
        self.topo.queues.insert(def.name.clone(), Arc::new(def));
    }

    /// Remove a queue and every binding to it.
    pub fn delete_queue(&mut self, name: &str) {
        if let Some(q) = self.topo.queues.remove(name)
            && q.durable
            && !q.exclusive
        {
            self.changes.push(Change::DelQueue(name.to_string()));
        }
        self.remove_bindings_to(&Destination::Queue(name.to_string()));
    }

    fn is_durable(&self, d: &Destination) -> bool {
        match d {
            Destination::Queue(q) => self
                .topo
                .queues
                .get(q)
                .is_some_and(|q| q.durable && !q.exclusive),
            Destination::Exchange(x) => self.topo.exchanges.get(x).is_some_and(|x| x.def.durable),
        }
    }

    /// Add a binding (the source must exist).
    pub fn bind(&mut self, b: BindingDef) {
        let durable = self.is_durable(&b.destination)
            && self
                .topo
                .exchanges
                .get(&b.source)
                .is_some_and(|x| x.def.durable);
        if let Some(x) = self.topo.exchanges.get_mut(&b.source) {
            if durable {
                self.changes.push(Change::PutBinding(b.clone()));
            }
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

    /// Read a vhost's durable topology from the store and add the predeclared exchanges.
    pub async fn load(&self, vhost: &str) -> Result<(), AmqpError> {
        let raw = self.meta.get(&register_key(vhost)).await?;
        let _guard = self.write.lock().await;
        let transient = self.snapshot(vhost);
        self.install(vhost, merge(vhost, raw.as_ref(), transient.as_deref()));
        self.remember(vhost, raw);
        Ok(())
    }

    /// Pick up changes other compute nodes made to a vhost's durable topology.
    pub async fn refresh(&self, vhost: &str) -> Result<(), AmqpError> {
        let raw = self.meta.get(&register_key(vhost)).await?;
        let _guard = self.write.lock().await;
        // An edit may have installed a newer value while this read was in flight.
        if stored_version(raw.as_ref()) <= stored_version(self.seen(vhost).as_ref()) {
            return Ok(());
        }
        let transient = self.snapshot(vhost);
        self.install(vhost, merge(vhost, raw.as_ref(), transient.as_deref()));
        self.remember(vhost, raw);
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

    /// Run `f` on a copy of the vhost's snapshot; if it returns `Ok`, persist its durable
    /// changes and install the copy. Writers are serialized; readers never wait.
    pub async fn edit<T>(
        &self,
        vhost: &str,
        f: impl FnOnce(&mut Edit) -> Result<T, AmqpError>,
    ) -> Result<T, AmqpError> {
        let _guard = self.write.lock().await;
        let current = self
            .snapshot(vhost)
            .ok_or_else(|| AmqpError::not_found(format!("no vhost '{vhost}'")))?;
        let mut edit = Edit {
            topo: (*current).clone(),
            changes: Vec::new(),
        };
        let out = f(&mut edit)?;
        if edit.changes.is_empty() {
            self.install(vhost, edit.topo);
            return Ok(out);
        }
        let changes = edit.changes;
        let written = self
            .meta
            .update(&register_key(vhost), |cur: Option<&Bytes>| {
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
        // The register now holds other nodes' changes too: rebuild from it.
        self.install(vhost, merge(vhost, written.as_ref(), Some(&edit.topo)));
        self.remember(vhost, written);
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn qdef(name: &str, durable: bool) -> QueueDef {
        QueueDef {
            name: name.into(),
            durable,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
            log_id: LogId::random(),
            owner_conn: None,
        }
    }

    #[tokio::test]
    async fn durable_entities_survive_a_reload_and_transient_ones_do_not() {
        let meta = Meta::memory();
        let t = Topology::new(meta.clone());
        t.load("/").await.unwrap();
        t.edit("/", |e| {
            e.put_queue(qdef("dq", true));
            e.put_queue(qdef("tq", false));
            e.bind(BindingDef {
                source: "amq.direct".into(),
                destination: Destination::Queue("dq".into()),
                routing_key: "k".into(),
                arguments: FieldTable::default(),
            });
            e.bind(BindingDef {
                source: "amq.direct".into(),
                destination: Destination::Queue("tq".into()),
                routing_key: "k".into(),
                arguments: FieldTable::default(),
            });
            Ok(())
        })
        .await
        .unwrap();
        let t2 = Topology::new(meta);
        t2.load("/").await.unwrap();
        let s = t2.snapshot("/").unwrap();
        assert!(s.queues.contains_key("dq"));
        assert!(!s.queues.contains_key("tq"));
        assert_eq!(s.exchanges["amq.direct"].bindings.len(), 1);
        assert_eq!(s.exchanges.len(), predeclared().len());
    }

    #[tokio::test]
    async fn deleting_a_queue_removes_its_bindings_and_auto_deletes_exchanges() {
        let t = Topology::new(Meta::memory());
        t.load("/").await.unwrap();
        t.edit("/", |e| {
            e.put_exchange(ExchangeDef {
                name: "ad".into(),
                kind: ExchangeKind::Fanout,
                durable: false,
                auto_delete: true,
                internal: false,
                arguments: FieldTable::default(),
            });
            e.put_queue(qdef("q", false));
            e.bind(BindingDef {
                source: "ad".into(),
                destination: Destination::Queue("q".into()),
                routing_key: String::new(),
                arguments: FieldTable::default(),
            });
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
    async fn another_nodes_durable_changes_arrive_on_refresh_and_keep_local_transients() {
        let meta = Meta::memory();
        let a = Topology::new(meta.clone());
        let b = Topology::new(meta);
        a.load("/").await.unwrap();
        b.load("/").await.unwrap();
        b.edit("/", |e| {
            e.put_queue(qdef("b-local", false));
            Ok(())
        })
        .await
        .unwrap();
        a.edit("/", |e| {
            e.put_queue(qdef("shared", true));
            e.bind(BindingDef {
                source: "amq.fanout".into(),
                destination: Destination::Queue("shared".into()),
                routing_key: String::new(),
                arguments: FieldTable::default(),
            });
            Ok(())
        })
        .await
        .unwrap();
        b.refresh("/").await.unwrap();
        let s = b.snapshot("/").unwrap();
        assert!(s.queues.contains_key("shared"));
        assert!(s.queues.contains_key("b-local"));
        assert_eq!(s.exchanges["amq.fanout"].bindings.len(), 1);
    }
}

//! Compute node membership: registration with a fresh generation, lease renewal, eviction.
//!
//! Every process start registers in the compute registry with the next generation. A node
//! then raises its `heartbeat` every `renew_ms`, and watches every other member of both
//! registries (compute and storage): a member whose heartbeat this node has seen unchanged
//! for the lease (judged on this node's monotonic clock alone, never by comparing clocks
//! across nodes) is evicted by a compare-and-swap that checks the heartbeat is still the
//! one seen, marks the member evicted and raises its generation, so storage refuses it.
//! A node that finds itself evicted tells its listeners (which drop its clients and queue
//! owners) and joins again with a fresh generation.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use warren_common::{Generation, NodeId};
use warren_storage::StorageError;
use warren_storage::meta::{
    self, COMPUTE_NODES_KEY, ComputeRecord, ComputeRegistry, MemberState, NODES_KEY, NodeRecord,
    NodeRegistry,
};

use crate::config::ClusterConfig;
use crate::error::AmqpError;
use crate::meta::Meta;

/// The live cluster as this node sees it.
#[derive(Clone, Debug)]
pub struct ClusterView {
    /// Active compute members whose lease is current (this node included while Active).
    /// Records are as of the last change of membership (heartbeats are not kept current).
    pub members: BTreeMap<NodeId, ComputeRecord>,
    /// Active storage nodes whose lease is current.
    pub storage: BTreeMap<NodeId, NodeRecord>,
    /// This node.
    pub me: NodeId,
    /// This node's generation; `Generation(0)` while it is evicted and not yet joined again.
    pub generation: Generation,
    /// For every compute node in the registry, the newest of its generations known to be
    /// over (evicted, left, or replaced by a newer process): what it declared in those
    /// generations died with it.
    pub ended: BTreeMap<NodeId, Generation>,
}

/// Whether one process incarnation of a compute node (a node id and a generation) still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incarnation {
    /// A live member of the view.
    Live,
    /// Evicted, left or superseded: it will never serve again.
    Ended,
    /// Neither yet: a member this view has not caught up with, or one whose lease is
    /// lapsing and that nobody has evicted yet.
    Unknown,
}

impl Default for ClusterView {
    /// No members (the nil node id as `me`): for tests and for building views by hand.
    fn default() -> Self {
        ClusterView {
            members: BTreeMap::new(),
            storage: BTreeMap::new(),
            me: NodeId(uuid::Uuid::nil()),
            generation: Generation(0),
            ended: BTreeMap::new(),
        }
    }
}

impl ClusterView {
    /// Whether `node` in `generation` still runs, as far as this view knows.
    pub fn incarnation(&self, node: NodeId, generation: Generation) -> Incarnation {
        if node == self.me {
            return if generation == self.generation && generation.0 > 0 {
                Incarnation::Live
            } else if generation < self.generation || generation.0 == 0 {
                Incarnation::Ended
            } else {
                // A generation of this node newer than its own: not this process.
                Incarnation::Unknown
            };
        }
        if self.ended.get(&node).is_some_and(|e| *e >= generation) {
            Incarnation::Ended
        } else if self
            .members
            .get(&node)
            .is_some_and(|r| r.generation == generation)
        {
            Incarnation::Live
        } else {
            Incarnation::Unknown
        }
    }

    /// Note what a registry record says has ended.
    fn note_ended(&mut self, id: NodeId, r: &ComputeRecord) {
        let over = if r.state == MemberState::Active {
            Generation(r.generation.0.saturating_sub(1))
        } else {
            r.generation
        };
        let e = self.ended.entry(id).or_insert(over);
        *e = (*e).max(over);
    }

    /// Same members, generations and addresses (heartbeats aside).
    fn same_as(&self, other: &ClusterView) -> bool {
        fn key(r: &ComputeRecord) -> impl PartialEq + '_ {
            (&r.name, &r.zone, r.amqp_addr, r.peer_addr, r.generation)
        }
        fn skey(r: &NodeRecord) -> impl PartialEq + '_ {
            (&r.name, &r.zone, r.data_addr, r.control_addr, r.generation)
        }
        self.me == other.me
            && self.generation == other.generation
            && self.ended == other.ended
            && self.members.len() == other.members.len()
            && self.storage.len() == other.storage.len()
            && self
                .members
                .iter()
                .zip(&other.members)
                .all(|((a, ra), (b, rb))| a == b && key(ra) == key(rb))
            && self
                .storage
                .iter()
                .zip(&other.storage)
                .all(|((a, ra), (b, rb))| a == b && skey(ra) == skey(rb))
    }
}

/// What happened to this node's own membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// The cluster evicted this node's generation (its lease lapsed, or an operator did
    /// it): everything it serves must stop, since others now take its place.
    Evicted(Generation),
    /// A newer process registered under this node's identity: this one must stop serving
    /// for good (it does not join again, or the two would evict each other forever).
    Superseded(Generation),
    /// This node joined again after an eviction, with this fresh generation.
    Joined(Generation),
}

/// How long a graceful stop waits to mark the node Leaving.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

type Listener = Arc<dyn Fn(MembershipEvent) + Send + Sync>;

/// This node's membership of the compute cluster. Cheap to clone.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    meta: Meta,
    me: NodeId,
    record: ComputeRecord,
    config: ClusterConfig,
    generation: AtomicU64,
    view: watch::Sender<Arc<ClusterView>>,
    listeners: Mutex<Vec<Listener>>,
    stop: watch::Sender<bool>,
}

impl Membership {
    /// Register `me` in the compute registry with a fresh generation (previous + 1, or 1),
    /// and start renewing its lease and watching the other members.
    pub async fn join(
        meta: Meta,
        me: NodeId,
        record: ComputeRecord,
        config: &ClusterConfig,
    ) -> Result<Membership, AmqpError> {
        let (generation, registry) = register(&meta, me, &record).await?;
        let mut view = ClusterView {
            me,
            generation,
            ..ClusterView::default()
        };
        for (id, r) in &registry.nodes {
            view.note_ended(*id, r);
        }
        // Every Active member gets a full lease from now before this node judges it.
        view.members = registry
            .nodes
            .into_iter()
            .filter(|(_, r)| r.state == MemberState::Active)
            .collect();
        let inner = Arc::new(Inner {
            meta,
            me,
            record,
            config: config.clone(),
            generation: AtomicU64::new(generation.0),
            view: watch::channel(Arc::new(view)).0,
            listeners: Mutex::new(Vec::new()),
            stop: watch::channel(false).0,
        });
        info!(node = %me, generation = generation.0, "joined the compute cluster");
        tokio::spawn(keep(Arc::downgrade(&inner), inner.stop.subscribe()));
        Ok(Membership { inner })
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.inner.me
    }

    /// This node's current generation (`Generation(0)` while evicted and not yet back).
    pub fn generation(&self) -> Generation {
        Generation(self.inner.generation.load(Ordering::Acquire))
    }

    /// The live members now.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.view.borrow().clone()
    }

    /// The live members, notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.inner.view.subscribe()
    }

    /// Call `f` on every change of this node's own membership (eviction, re-join). It runs
    /// on the membership task before the next step (an evicted node joins again only after
    /// its listeners returned), so it must be quick and must not block.
    pub fn on_event(&self, f: impl Fn(MembershipEvent) + Send + Sync + 'static) {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(f));
    }

    /// Leave gracefully: stop renewing and mark this node Leaving, so that nobody counts
    /// it as a member any more (and nobody evicts it). Gives up after [`LEAVE_TIMEOUT`]
    /// (storage unreachable): the node is then evicted once its lease lapses.
    pub async fn leave(&self) -> Result<(), AmqpError> {
        let _ = self.inner.stop.send(true);
        let me = self.inner.me;
        let generation = self.generation();
        let marking = self.inner.meta.update(COMPUTE_NODES_KEY, |cur| {
            let Ok(mut reg) = decode_compute(cur) else {
                return cur.cloned();
            };
            match reg.nodes.get_mut(&me) {
                Some(r) if r.generation == generation && r.state == MemberState::Active => {
                    r.state = MemberState::Leaving;
                    Some(meta::encode(&reg))
                }
                _ => cur.cloned(),
            }
        });
        tokio::time::timeout(LEAVE_TIMEOUT, marking)
            .await
            .map_err(|_| AmqpError::internal("metadata unreachable while leaving"))??;
        self.inner.view.send_modify(|v| {
            let mut next = (**v).clone();
            next.members.remove(&me);
            *v = Arc::new(next);
        });
        info!(node = %me, generation = generation.0, "left the compute cluster");
        Ok(())
    }
}

impl Inner {
    fn emit(&self, event: MembershipEvent) {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for l in listeners {
            l(event);
        }
    }

    fn publish(&self, next: ClusterView) {
        self.view.send_if_modified(|v| {
            if v.same_as(&next) {
                false
            } else {
                *v = Arc::new(next);
                true
            }
        });
    }
}

fn decode_compute(cur: Option<&Bytes>) -> Result<ComputeRegistry, StorageError> {
    match cur {
        Some(b) => meta::decode(b),
        None => Ok(ComputeRegistry::default()),
    }
}

fn decode_storage(cur: Option<&Bytes>) -> Result<NodeRegistry, StorageError> {
    match cur {
        Some(b) => meta::decode(b),
        None => Ok(NodeRegistry::default()),
    }
}

/// Register `me` with the next generation; returns it and the registry written.
async fn register(
    meta: &Meta,
    me: NodeId,
    record: &ComputeRecord,
) -> Result<(Generation, ComputeRegistry), AmqpError> {
    let mut outcome: Result<Generation, StorageError> = Ok(Generation(1));
    let written = meta
        .update(COMPUTE_NODES_KEY, |cur| {
            let mut reg = match decode_compute(cur) {
                Ok(r) => r,
                Err(e) => {
                    outcome = Err(e);
                    return cur.cloned();
                }
            };
            let generation = reg
                .nodes
                .get(&me)
                .map_or(Generation(1), |r| Generation(r.generation.0 + 1));
            reg.nodes.insert(
                me,
                ComputeRecord {
                    generation,
                    state: MemberState::Active,
                    heartbeat: 0,
                    ..record.clone()
                },
            );
            outcome = Ok(generation);
            Some(meta::encode(&reg))
        })
        .await?;
    let generation = outcome?;
    Ok((generation, decode_compute(written.as_ref())?))
}

/// What a renewal found.
enum Renewal {
    /// Renewed; the registry as written.
    Renewed(ComputeRegistry),
    /// Our record is evicted (or gone): join again.
    Evicted,
    /// A newer process holds our identity.
    Superseded(Generation),
}

async fn renew(meta: &Meta, me: NodeId, generation: Generation) -> Result<Renewal, StorageError> {
    let mut outcome: Result<Option<Renewal>, StorageError> = Ok(None);
    let written = meta
        .update(COMPUTE_NODES_KEY, |cur| {
            let mut reg = match decode_compute(cur) {
                Ok(r) => r,
                Err(e) => {
                    outcome = Err(e);
                    return cur.cloned();
                }
            };
            match reg.nodes.get_mut(&me) {
                Some(r) if r.generation == generation && r.state == MemberState::Active => {
                    r.heartbeat += 1;
                    outcome = Ok(None);
                    Some(meta::encode(&reg))
                }
                Some(r) if r.generation > generation && r.state != MemberState::Evicted => {
                    outcome = Ok(Some(Renewal::Superseded(r.generation)));
                    cur.cloned()
                }
                _ => {
                    outcome = Ok(Some(Renewal::Evicted));
                    cur.cloned()
                }
            }
        })
        .await?;
    match outcome? {
        Some(r) => Ok(r),
        None => Ok(Renewal::Renewed(decode_compute(written.as_ref())?)),
    }
}

/// When this node last saw a member's record change.
struct Seen {
    generation: Generation,
    heartbeat: u64,
    state: MemberState,
    since: Instant,
}

/// Lease bookkeeping for one registry, on this node's monotonic clock.
#[derive(Default)]
struct Leases {
    seen: HashMap<NodeId, Seen>,
}

impl Leases {
    /// Note the member's current record; returns whether its lease lapsed (its record has
    /// not changed for `lease`).
    fn observe(
        &mut self,
        id: NodeId,
        generation: Generation,
        heartbeat: u64,
        state: MemberState,
        now: Instant,
        lease: Duration,
    ) -> bool {
        let s = self.seen.entry(id).or_insert(Seen {
            generation,
            heartbeat,
            state,
            since: now,
        });
        if s.generation != generation || s.heartbeat != heartbeat || s.state != state {
            *s = Seen {
                generation,
                heartbeat,
                state,
                since: now,
            };
        }
        now.duration_since(s.since) >= lease
    }

    fn retain(&mut self, keep: impl Fn(&NodeId) -> bool) {
        self.seen.retain(|id, _| keep(id));
    }
}

/// The membership task: renew, watch, evict; join again after an eviction. Ends when the
/// membership is dropped or left.
async fn keep(inner: Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let Some(period) = inner
        .upgrade()
        .map(|i| Duration::from_millis(i.config.renew_ms.max(1)))
    else {
        return;
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut compute = Leases::default();
    let mut storage = Leases::default();
    // Storage leases are long: reading their registry about ten times per lease is plenty,
    // and spares the register acceptors a round per compute node per tick.
    let storage_every = inner.upgrade().map_or(1, |i| {
        (i.config.storage_lease_ms / (10 * i.config.renew_ms.max(1))).max(1)
    });
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if *stop.borrow() {
            return;
        }
        let generation = Generation(inner.generation.load(Ordering::Acquire));
        let registry = match renew(&inner.meta, inner.me, generation).await {
            Ok(Renewal::Renewed(r)) => r,
            Ok(Renewal::Evicted) => {
                rejoin(&inner, generation).await;
                continue;
            }
            Ok(Renewal::Superseded(newer)) => {
                error!(node = %inner.me, generation = generation.0, newer = newer.0,
                    "another process registered under this node's identity; this one stops serving");
                inner.generation.store(0, Ordering::Release);
                inner.publish(ClusterView {
                    me: inner.me,
                    ..ClusterView::default()
                });
                inner.emit(MembershipEvent::Superseded(generation));
                return;
            }
            Err(e) => {
                debug!(error = %e, "lease renewal failed; will retry");
                continue;
            }
        };
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        let lease = Duration::from_millis(inner.config.lease_ms);
        let mut view = ClusterView {
            me: inner.me,
            generation,
            ..ClusterView::default()
        };
        let mut lapsed = Vec::new();
        view.ended = inner.view.borrow().ended.clone();
        for (id, r) in &registry.nodes {
            view.note_ended(*id, r);
            let late = compute.observe(*id, r.generation, r.heartbeat, r.state, now, lease);
            if r.state != MemberState::Active {
                continue;
            }
            if *id == inner.me {
                view.members.insert(*id, r.clone());
            } else if late {
                lapsed.push((*id, r.generation, r.heartbeat));
            } else {
                view.members.insert(*id, r.clone());
            }
        }
        compute.retain(|id| registry.nodes.contains_key(id));
        for (id, generation, heartbeat) in lapsed {
            evict_compute(&inner.meta, id, generation, heartbeat).await;
        }
        let due = ticks.is_multiple_of(storage_every);
        ticks += 1;
        let read_storage = if due {
            inner
                .meta
                .get(NODES_KEY)
                .await
                .map(|b| decode_storage(b.as_ref()))
        } else {
            Err(StorageError::Unavailable("not read this tick".into()))
        };
        match read_storage {
            Ok(Ok(nodes)) => {
                let storage_lease = Duration::from_millis(inner.config.storage_lease_ms);
                let mut lapsed = Vec::new();
                for (id, r) in &nodes.nodes {
                    let late = storage.observe(
                        *id,
                        r.generation,
                        r.heartbeat,
                        r.state,
                        now,
                        storage_lease,
                    );
                    if r.state != MemberState::Active {
                        continue;
                    }
                    if late {
                        lapsed.push((*id, r.generation, r.heartbeat));
                    } else {
                        view.storage.insert(*id, r.clone());
                    }
                }
                storage.retain(|id| nodes.nodes.contains_key(id));
                for (id, generation, heartbeat) in lapsed {
                    evict_storage(&inner.meta, id, generation, heartbeat).await;
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "storage node registry unreadable");
                view.storage = inner.view.borrow().storage.clone();
            }
            Err(e) => {
                if due {
                    debug!(error = %e, "storage node registry read failed; will retry");
                }
                view.storage = inner.view.borrow().storage.clone();
            }
        }
        inner.publish(view);
    }
}

/// This node found its generation evicted: tell the listeners, then join again.
async fn rejoin(inner: &Inner, lost: Generation) {
    warn!(node = %inner.me, generation = lost.0,
        "this compute node was evicted from the cluster; dropping its clients and queues and joining again");
    inner.generation.store(0, Ordering::Release);
    let mut view = (**inner.view.borrow()).clone();
    view.members.remove(&inner.me);
    view.generation = Generation(0);
    inner.publish(view);
    inner.emit(MembershipEvent::Evicted(lost));
    let mut delay = Duration::from_millis(50);
    loop {
        match register(&inner.meta, inner.me, &inner.record).await {
            Ok((generation, registry)) => {
                inner.generation.store(generation.0, Ordering::Release);
                info!(node = %inner.me, generation = generation.0, "joined the compute cluster again");
                inner.emit(MembershipEvent::Joined(generation));
                let mut view = (**inner.view.borrow()).clone();
                view.generation = generation;
                if let Some(r) = registry.nodes.get(&inner.me) {
                    view.members.insert(inner.me, r.clone());
                }
                inner.publish(view);
                return;
            }
            Err(e) => {
                debug!(error = %e, "joining again failed; will retry");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Evict a compute member if its record is still the one seen lapsing.
async fn evict_compute(meta: &Meta, id: NodeId, generation: Generation, heartbeat: u64) {
    let lapsing = Lapsing {
        id,
        generation,
        heartbeat,
    };
    evict::<ComputeRegistry, _>(meta, COMPUTE_NODES_KEY, "compute", lapsing, |reg| {
        reg.nodes
            .get_mut(&id)
            .map(|r| (&r.name, &mut r.state, &mut r.generation, r.heartbeat))
    })
    .await;
}

/// Evict a storage node if its record is still the one seen lapsing.
async fn evict_storage(meta: &Meta, id: NodeId, generation: Generation, heartbeat: u64) {
    let lapsing = Lapsing {
        id,
        generation,
        heartbeat,
    };
    evict::<NodeRegistry, _>(meta, NODES_KEY, "storage", lapsing, |reg| {
        reg.nodes
            .get_mut(&id)
            .map(|r| (&r.name, &mut r.state, &mut r.generation, r.heartbeat))
    })
    .await;
}

/// A member's record as an observer saw it lapse.
#[derive(Clone, Copy)]
struct Lapsing {
    id: NodeId,
    generation: Generation,
    heartbeat: u64,
}

/// The fields of a registry record that eviction reads and changes: name, state,
/// generation, heartbeat.
type MemberFields<'a> = (&'a String, &'a mut MemberState, &'a mut Generation, u64);

/// Mark a member Evicted with its generation raised, by CAS on the registry at `key`, but
/// only if its record is still the one seen lapsing (same generation and heartbeat, still
/// Active): a member that renewed or restarted meanwhile is left alone.
async fn evict<Reg, F>(meta: &Meta, key: &str, role: &str, lapsing: Lapsing, member: F)
where
    Reg: Default + serde::Serialize + serde::de::DeserializeOwned,
    F: for<'a> Fn(&'a mut Reg) -> Option<MemberFields<'a>> + Send + Sync,
{
    let mut evicted = None;
    let result = meta
        .update(key, |cur| {
            evicted = None;
            let mut reg: Reg = match cur {
                Some(b) => match meta::decode(b) {
                    Ok(r) => r,
                    Err(_) => return cur.cloned(),
                },
                None => Reg::default(),
            };
            match member(&mut reg) {
                Some((name, state, generation, heartbeat))
                    if *generation == lapsing.generation
                        && heartbeat == lapsing.heartbeat
                        && *state == MemberState::Active =>
                {
                    *state = MemberState::Evicted;
                    *generation = Generation(lapsing.generation.0 + 1);
                    evicted = Some(name.clone());
                }
                _ => return cur.cloned(),
            }
            Some(meta::encode(&reg))
        })
        .await;
    match (result, evicted) {
        (Ok(_), Some(name)) => {
            warn!(node = %lapsing.id, %name, role, generation = lapsing.generation.0, "evicted a node whose lease lapsed")
        }
        (Ok(_), None) => {}
        (Err(e), _) => {
            debug!(node = %lapsing.id, role, error = %e, "evicting a node failed; will retry")
        }
    }
}

/// The id a compute node named `name` ran under before, so that a restarted node keeps
/// its identity and gets the next generation instead of leaving a stale record behind.
pub async fn known_id(meta: &Meta, name: &str) -> Result<Option<NodeId>, StorageError> {
    let reg = decode_compute(meta.get(COMPUTE_NODES_KEY).await?.as_ref())?;
    Ok(reg
        .nodes
        .iter()
        .filter(|(_, r)| r.name == name)
        .max_by_key(|(_, r)| r.generation)
        .map(|(id, _)| *id))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_lease_lapses_only_after_the_heartbeat_stood_still_for_the_lease() {
        let mut leases = Leases::default();
        let id = NodeId::random();
        let lease = Duration::from_millis(500);
        let g = Generation(1);
        let t0 = Instant::now();
        assert!(!leases.observe(id, g, 1, MemberState::Active, t0, lease));
        let t1 = t0 + Duration::from_millis(400);
        assert!(!leases.observe(id, g, 1, MemberState::Active, t1, lease));
        // A renewal restarts the lease.
        assert!(!leases.observe(id, g, 2, MemberState::Active, t1, lease));
        let t2 = t1 + Duration::from_millis(499);
        assert!(!leases.observe(id, g, 2, MemberState::Active, t2, lease));
        let t3 = t1 + Duration::from_millis(500);
        assert!(leases.observe(id, g, 2, MemberState::Active, t3, lease));
        // A re-join (new generation, heartbeat back to 0) is a change too.
        assert!(!leases.observe(id, Generation(3), 0, MemberState::Active, t3, lease));
    }

    fn record(name: &str) -> ComputeRecord {
        ComputeRecord {
            name: name.into(),
            zone: warren_common::Zone("zone-a".into()),
            amqp_addr: "127.0.0.1:1".parse().unwrap(),
            peer_addr: "127.0.0.1:2".parse().unwrap(),
            generation: Generation(0),
            state: MemberState::Active,
            heartbeat: 0,
        }
    }

    #[tokio::test]
    async fn join_takes_the_next_generation_and_leave_marks_leaving() {
        let meta = Meta::memory();
        let me = NodeId::random();
        let config = ClusterConfig {
            renew_ms: 20,
            lease_ms: 100,
            storage_lease_ms: 100,
        };
        let m = Membership::join(meta.clone(), me, record("c0"), &config)
            .await
            .unwrap();
        assert_eq!(m.generation(), Generation(1));
        assert!(m.view().members.contains_key(&me));
        m.leave().await.unwrap();
        let m2 = Membership::join(meta.clone(), me, record("c0"), &config)
            .await
            .unwrap();
        assert_eq!(m2.generation(), Generation(2));
        assert_eq!(known_id(&meta, "c0").await.unwrap(), Some(me));
        m2.leave().await.unwrap();
        let reg = decode_compute(meta.get(COMPUTE_NODES_KEY).await.unwrap().as_ref()).unwrap();
        assert_eq!(reg.nodes[&me].state, MemberState::Leaving);
    }
}

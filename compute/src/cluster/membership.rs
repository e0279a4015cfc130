//! Compute node membership: registration with a fresh generation, lease renewal, eviction.
//!
//! Every process start registers in the compute registry with the next generation. A node
//! then raises its `heartbeat` every `renew_ms`, and watches every other member of both
//! registries (compute and storage): a member whose heartbeat this node has seen unchanged
//! for the lease (judged on this node's monotonic clock alone, never by comparing clocks
//! across nodes) is evicted by a compare-and-swap that checks the heartbeat is still the
//! one seen, marks the member evicted and raises its generation, so storage refuses it.
//! The rules (join, renew, lease observation, evict) are `warren_storage::protocol::ownership`'s,
//! the ones its deterministic simulation checks; this module does the I/O around them.
//! A node that finds itself evicted tells its listeners (which drop its clients and queue
//! owners) and joins again with a fresh generation.

use std::collections::{BTreeMap, BTreeSet};
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
    self, COMPUTE_NODES_KEY, ComputeRecord, ComputeRegistry, MemberRecord, MemberRegistry,
    MemberState, NODES_KEY, NodeRecord, NodeRegistry,
};
use warren_storage::protocol::ownership::{self, Lapsed, LeaseObserver, Standing};

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
            outcome = Ok(ownership::join(&mut reg, me, record.clone()));
            Some(meta::encode(&reg))
        })
        .await?;
    let generation = outcome?;
    Ok((generation, decode_compute(written.as_ref())?))
}

/// Renew this node's lease: where it stands, and (while a member) the registry as written.
async fn renew(
    meta: &Meta,
    me: NodeId,
    generation: Generation,
) -> Result<(Standing, ComputeRegistry), StorageError> {
    let mut outcome: Result<Standing, StorageError> = Ok(Standing::Member);
    let written = meta
        .update(COMPUTE_NODES_KEY, |cur| {
            let mut reg = match decode_compute(cur) {
                Ok(r) => r,
                Err(e) => {
                    outcome = Err(e);
                    return cur.cloned();
                }
            };
            let standing = ownership::renew(&mut reg, me, generation);
            outcome = Ok(standing);
            if standing == Standing::Member {
                Some(meta::encode(&reg))
            } else {
                cur.cloned()
            }
        })
        .await?;
    match outcome? {
        Standing::Member => Ok((Standing::Member, decode_compute(written.as_ref())?)),
        other => Ok((other, ComputeRegistry::default())),
    }
}

/// Milliseconds since `start` on this process's monotonic clock: what lease observers read.
fn clock_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The membership task: renew, watch, evict; join again after an eviction. Ends when the
/// membership is dropped or left.
async fn keep(inner: Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let Some(config) = inner.upgrade().map(|i| i.config.clone()) else {
        return;
    };
    let period = Duration::from_millis(config.renew_ms.max(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // The observers' clock: this process's monotonic time, never compared across nodes.
    let start = Instant::now();
    let mut compute = LeaseObserver::new(config.lease_ms);
    let mut storage = LeaseObserver::new(config.storage_lease_ms);
    // Storage leases are long: reading their registry about ten times per lease is plenty,
    // and spares the register acceptors a round per compute node per tick.
    let storage_every = (config.storage_lease_ms / (10 * config.renew_ms.max(1))).max(1);
    let mut ticks: u64 = 0;
    // When the lease was last renewed, and whether a failing renewal was reported since:
    // a node that cannot renew for a whole lease is about to be evicted, and sees no
    // membership change meanwhile, which an operator must be able to tell from its log.
    let mut renewed = Instant::now();
    let mut reported = false;
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
            Ok((Standing::Member, r)) => r,
            Ok((Standing::Evicted, _)) => {
                rejoin(&inner, generation).await;
                renewed = Instant::now();
                continue;
            }
            Ok((Standing::Superseded(newer), _)) => {
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
                let failing = renewed.elapsed();
                if !reported && failing >= Duration::from_millis(config.lease_ms) {
                    warn!(error = %e, failing_ms = failing.as_millis() as u64,
                        "lease renewal has failed for a whole lease; membership is frozen until the compute registry answers");
                    reported = true;
                } else {
                    debug!(error = %e, "lease renewal failed; will retry");
                }
                continue;
            }
        };
        if reported {
            info!(
                failed_ms = renewed.elapsed().as_millis() as u64,
                "lease renewal works again"
            );
            reported = false;
        }
        renewed = Instant::now();
        if *stop.borrow() {
            return;
        }
        let now_ms = clock_ms(start);
        let mut view = ClusterView {
            me: inner.me,
            generation,
            ..ClusterView::default()
        };
        view.ended = inner.view.borrow().ended.clone();
        for (id, r) in &registry.nodes {
            view.note_ended(*id, r);
        }
        let observed = compute.observe(now_ms, inner.me, generation, &registry);
        view.members = live_records(&registry, &observed.live);
        for l in &observed.lapsed {
            evict(&inner.meta, "compute", &registry, l).await;
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
                let leases = storage.observe_others(now_ms, &nodes);
                view.storage = live_records(&nodes, &leases.live);
                for l in &leases.lapsed {
                    evict(&inner.meta, "storage", &nodes, l).await;
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

/// The records of `live` members, as `registry` has them.
fn live_records<R>(registry: &R, live: &BTreeSet<NodeId>) -> BTreeMap<NodeId, R::Record>
where
    R: MemberRegistry,
    R::Record: Clone,
{
    registry
        .members()
        .iter()
        .filter(|(id, _)| live.contains(id))
        .map(|(id, r)| (*id, r.clone()))
        .collect()
}

/// Evict a member of the registry `observed` was read from, by CAS on that registry
/// ([`ownership::evict`]: only if its record is still the one seen lapsing, Active), so a
/// member that renewed, restarted or started leaving meanwhile is left alone.
async fn evict<R>(meta: &Meta, role: &str, observed: &R, lapsed: &Lapsed)
where
    R: MemberRegistry + Default + serde::Serialize + serde::de::DeserializeOwned,
{
    let name = observed
        .members()
        .get(&lapsed.id)
        .map(|r| r.name())
        .unwrap_or_default();
    let mut evicted = false;
    let result = meta
        .update(R::KEY, |cur| {
            evicted = false;
            let mut reg: R = match cur {
                Some(b) => match meta::decode(b) {
                    Ok(r) => r,
                    Err(_) => return cur.cloned(),
                },
                None => R::default(),
            };
            if !ownership::evict(&mut reg, lapsed) {
                return cur.cloned();
            }
            evicted = true;
            Some(meta::encode(&reg))
        })
        .await;
    match result {
        Ok(_) if evicted => {
            warn!(node = %lapsed.id, %name, role, generation = lapsed.generation.0, "evicted a node whose lease lapsed")
        }
        Ok(_) => {}
        Err(e) => {
            debug!(node = %lapsed.id, role, error = %e, "evicting a node failed; will retry")
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

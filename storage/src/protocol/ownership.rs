//! How a compute node decides it may own a queue (RFC 0004), as I/O-free rules: leases
//! judged on the observer's own clock, the change functions applied by compare-and-swap to
//! the membership registries (compute and storage nodes alike) and to a log's descriptor,
//! rendezvous choice of the owner among live members, and the takeover sequence (raise the
//! epoch, fence and recover the open segment, seal it and open a new one). The lease only
//! decides who *tries* to own a queue; whether the old owner can still get appends
//! acknowledged is decided by the storage nodes' fences.

use std::collections::{BTreeMap, BTreeSet};
use warren_common::{Epoch, Generation, NodeId, SegmentId};

use crate::meta::{LogMeta, MemberRecord, MemberRegistry, MemberState, SegmentMeta};
use crate::protocol::recovery::{
    EntryAnswer, FenceAnswer, Recovery, RecoveryAction, RecoveryFailure,
};

/// What an observer last saw of one member, and when on its own clock it first saw it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    generation: Generation,
    heartbeat: u64,
    state: MemberState,
    since_ms: u64,
}

/// A member whose heartbeat stood still for a whole lease: evict it with [`evict`], which
/// applies only if the record is still exactly what was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lapsed {
    /// The member.
    pub id: NodeId,
    /// Its generation when observed.
    pub generation: Generation,
    /// Its heartbeat when observed.
    pub heartbeat: u64,
}

/// The leases of a registry's other members, judged on the observer's clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leases {
    /// Active members whose lease is current.
    pub live: BTreeSet<NodeId>,
    /// Members to evict.
    pub lapsed: Vec<Lapsed>,
}

/// One reading of the registry the observer is a member of, judged on its clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Active members whose lease is current, the observer included while it is Active at
    /// its own generation. Owners are chosen among these.
    pub live: BTreeSet<NodeId>,
    /// Members to evict.
    pub lapsed: Vec<Lapsed>,
    /// Where the observer itself stands.
    pub standing: Standing,
}

/// Where a process stands in the registry, by its own generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Standing {
    /// Active (or leaving) at its generation.
    #[default]
    Member,
    /// Evicted, or its record is gone: stop every queue it owns, drop its clients, and join
    /// again with a fresh generation.
    Evicted,
    /// A newer process registered under the same node id (this one was stopped and
    /// replaced): stop serving for good.
    Superseded(Generation),
}

fn standing<R: MemberRegistry>(registry: &R, id: NodeId, generation: Generation) -> Standing {
    match registry.members().get(&id) {
        Some(r) if r.generation() == generation && r.state() != MemberState::Evicted => {
            Standing::Member
        }
        Some(r) if r.generation() > generation && r.state() != MemberState::Evicted => {
            Standing::Superseded(r.generation())
        }
        _ => Standing::Evicted,
    }
}

/// Judges other members' leases without comparing clocks across nodes: a member whose
/// `(generation, heartbeat, state)` this observer has seen unchanged for `lease_ms` on its
/// own monotonic clock has lapsed. One observer watches one registry.
#[derive(Clone, Debug)]
pub struct LeaseObserver {
    lease_ms: u64,
    seen: BTreeMap<NodeId, Seen>,
}

impl LeaseObserver {
    /// An observer that has seen nothing yet: every member gets a full lease from its first
    /// observation, so a restarted observer never evicts on old evidence.
    pub fn new(lease_ms: u64) -> Self {
        LeaseObserver {
            lease_ms,
            seen: BTreeMap::new(),
        }
    }

    /// Judge a read of the registry the observer `me` belongs to at `my_generation`.
    /// `now_ms` is the observer's monotonic clock when the read returned; a stale read
    /// judged late can only make a member look lapsed, and [`evict`] then finds its
    /// heartbeat moved and does nothing.
    pub fn observe<R: MemberRegistry>(
        &mut self,
        now_ms: u64,
        me: NodeId,
        my_generation: Generation,
        registry: &R,
    ) -> Observation {
        let standing = standing(registry, me, my_generation);
        let Leases { mut live, lapsed } = self.judge(now_ms, Some(me), registry);
        if standing == Standing::Member
            && registry
                .members()
                .get(&me)
                .is_some_and(|r| r.state() == MemberState::Active)
        {
            live.insert(me);
        }
        Observation {
            live,
            lapsed,
            standing,
        }
    }

    /// Judge a read of a registry the observer does not belong to (a compute node watching
    /// the storage nodes).
    pub fn observe_others<R: MemberRegistry>(&mut self, now_ms: u64, registry: &R) -> Leases {
        self.judge(now_ms, None, registry)
    }

    fn judge<R: MemberRegistry>(
        &mut self,
        now_ms: u64,
        me: Option<NodeId>,
        registry: &R,
    ) -> Leases {
        let mut out = Leases::default();
        self.seen
            .retain(|id, _| registry.members().contains_key(id));
        for (id, rec) in registry.members() {
            if Some(*id) == me {
                continue;
            }
            let (generation, heartbeat, state) = (rec.generation(), rec.heartbeat(), rec.state());
            let now = Seen {
                generation,
                heartbeat,
                state,
                since_ms: now_ms,
            };
            let seen = self.seen.entry(*id).or_insert(now);
            if (seen.generation, seen.heartbeat, seen.state) != (generation, heartbeat, state) {
                *seen = now;
            }
            // Only Active members own queues, and only they are evicted: a Leaving one
            // hands its queues off and removes itself.
            if state != MemberState::Active {
                continue;
            }
            if now_ms.saturating_sub(seen.since_ms) >= self.lease_ms {
                out.lapsed.push(Lapsed {
                    id: *id,
                    generation,
                    heartbeat,
                });
            } else {
                out.live.insert(*id);
            }
        }
        out
    }
}

/// Registry change for a process start: a fresh generation above any this id ever had,
/// state Active, heartbeat 0. Returns the generation the process must run with. Retrying
/// after a timed out write only skips a generation.
pub fn join<R: MemberRegistry>(registry: &mut R, id: NodeId, mut record: R::Record) -> Generation {
    let generation = Generation(
        registry
            .members()
            .get(&id)
            .map_or(1, |r| r.generation().0 + 1),
    );
    *record.generation_mut() = generation;
    *record.state_mut() = MemberState::Active;
    *record.heartbeat_mut() = 0;
    registry.members_mut().insert(id, record);
    generation
}

/// Registry change for a lease renewal: raise the heartbeat if the member still runs at
/// `generation`, Active, and say where it stands otherwise (then nothing changes; a
/// Leaving member is still [`Standing::Member`] but renews nothing).
pub fn renew<R: MemberRegistry>(registry: &mut R, id: NodeId, generation: Generation) -> Standing {
    match registry.members_mut().get_mut(&id) {
        Some(rec) if rec.generation() == generation && rec.state() == MemberState::Active => {
            *rec.heartbeat_mut() += 1;
            Standing::Member
        }
        _ => standing(registry, id, generation),
    }
}

/// Registry change for an eviction: only if the member is still Active exactly as
/// observed (a renewal or restart in between means its lease is current; a Leaving member
/// hands its queues off and removes itself), mark it Evicted and raise its generation so
/// storage refuses the old process. Returns whether it applied.
pub fn evict<R: MemberRegistry>(registry: &mut R, lapsed: &Lapsed) -> bool {
    match registry.members_mut().get_mut(&lapsed.id) {
        Some(rec)
            if rec.generation() == lapsed.generation
                && rec.heartbeat() == lapsed.heartbeat
                && rec.state() == MemberState::Active =>
        {
            *rec.state_mut() = MemberState::Evicted;
            *rec.generation_mut() = Generation(lapsed.generation.0 + 1);
            true
        }
        _ => false,
    }
}

/// The rendezvous weight of node `id` for `key`.
pub fn score(key: &str, id: &NodeId) -> u64 {
    // FNV-1a, a separator (so ("ab", id) and ("a", "b"+id) cannot collide by construction),
    // then SplitMix64's finalizer: stable across processes and versions (every node must
    // compute the same owner), and well mixed although keys and node ids share prefixes.
    let fnv = |mut h: u64, bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let h = fnv(0xcbf2_9ce4_8422_2325, key.as_bytes());
    let mut z = fnv(fnv(h, &[0xff]), id.0.as_bytes());
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The owner of `key` among `members` by rendezvous hashing: the member with the highest
/// score for the key (ties by id). A member joining or leaving moves only the keys it wins
/// or held.
pub fn owner_of<'a>(members: impl IntoIterator<Item = &'a NodeId>, key: &str) -> Option<NodeId> {
    members
        .into_iter()
        .map(|id| (score(key, id), *id))
        .max()
        .map(|(_, id)| id)
}

/// The owner a queue should have: the owner its descriptor names while that one is live
/// (sticky, so a join moves no queue in use), else [`owner_of`].
pub fn sticky_owner<'a>(
    members: impl IntoIterator<Item = &'a NodeId> + Clone,
    key: &str,
    recorded: Option<NodeId>,
) -> Option<NodeId> {
    match recorded {
        Some(r) if members.clone().into_iter().any(|m| *m == r) => Some(r),
        _ => owner_of(members, key),
    }
}

/// Who owns a queue as recorded once a takeover completed (compute's queue descriptor):
/// what sticky ownership reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerClaim {
    /// The owner.
    pub owner: NodeId,
    /// The epoch its takeover got.
    pub epoch: Epoch,
}

/// Descriptor change recording that `owner` completed a takeover at `epoch`. A claim that
/// arrives after a newer owner's (the takeover was slow, or its write timed out and landed
/// late) leaves the record alone: naming a fenced owner would send the queue back to it.
pub fn claim(cur: Option<OwnerClaim>, owner: NodeId, epoch: Epoch) -> OwnerClaim {
    match cur {
        Some(c) if c.epoch > epoch => c,
        _ => OwnerClaim { owner, epoch },
    }
}

/// Why a takeover ended without ownership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeoverFailure {
    /// A newer owner raised the epoch or fenced the segment: give the queue up.
    Superseded(Epoch),
    /// Too few storage nodes or registers answered; a later takeover may succeed.
    Unavailable,
    /// The log was deleted.
    Deleted,
}

/// Descriptor change for takeover step 1: raise the epoch and name the owner.
pub fn raise_epoch(meta: &mut LogMeta, owner: NodeId) -> Result<Epoch, TakeoverFailure> {
    if meta.deleted {
        return Err(TakeoverFailure::Deleted);
    }
    meta.epoch = meta.epoch.next();
    meta.owner = Some(owner);
    Ok(meta.epoch)
}

/// How the recovered open segment is sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seal {
    /// The segment that was open.
    pub segment: SegmentId,
    /// Its entries are `0..end`; `0` drops the segment.
    pub end: u64,
    /// Some member may lack entries below `end`.
    pub under_replicated: bool,
}

/// Descriptor change for takeover step 5, conditional on the epoch still being `epoch`:
/// seal the recovered segment (or drop it when empty) and append `new`.
pub fn seal_and_open(
    meta: &mut LogMeta,
    epoch: Epoch,
    seal: Option<Seal>,
    new: SegmentMeta,
) -> Result<(), TakeoverFailure> {
    if meta.deleted {
        return Err(TakeoverFailure::Deleted);
    }
    if meta.epoch != epoch {
        return Err(TakeoverFailure::Superseded(meta.epoch));
    }
    if let Some(s) = seal
        && let Some(last) = meta.segments.last_mut()
        && last.id == s.segment
    {
        if s.end == 0 {
            meta.segments.pop();
        } else {
            last.end.get_or_insert(s.end);
            last.under_replicated |= s.under_replicated;
        }
    }
    meta.segments.push(new);
    Ok(())
}

/// A step of a takeover for the driver to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TakeoverAction {
    /// Apply [`raise_epoch`] to the descriptor by CAS; feed the result to
    /// [`Takeover::on_raised`].
    RaiseEpoch,
    /// Send a fence, read or write to a member of [`Takeover::open_segment`] at
    /// [`Takeover::epoch`]; feed the answer to `on_fence`, `on_read` or `on_write`.
    Recover(RecoveryAction),
    /// Choose a fresh ensemble, apply [`seal_and_open`] by CAS; feed the result to
    /// [`Takeover::on_opened`].
    SealAndOpen {
        /// The epoch the change is conditional on.
        epoch: Epoch,
        /// The recovered segment, if one was open.
        seal: Option<Seal>,
    },
}

#[derive(Debug)]
enum Phase {
    Raising,
    Recovering {
        epoch: Epoch,
        segment: SegmentMeta,
        rec: Recovery,
        fenced: usize,
        last: Option<u64>,
    },
    Opening {
        epoch: Epoch,
    },
    Done(Result<Epoch, TakeoverFailure>),
}

/// One takeover of a queue's log (RFC 0001 "Takeover", RFC 0004): the only way a compute
/// node becomes the writer of a log. Leases decide when to start one; this decides whether
/// it succeeded.
#[derive(Debug)]
pub struct Takeover {
    phase: Phase,
    // Once `Qw - Qa + 1` members answered the fence: the highest entry any of them held.
    fenced_tail: Option<Option<u64>>,
}

impl Takeover {
    /// Start a takeover; the first action raises the epoch.
    pub fn start() -> (Self, Vec<TakeoverAction>) {
        (
            Takeover {
                phase: Phase::Raising,
                fenced_tail: None,
            },
            vec![TakeoverAction::RaiseEpoch],
        )
    }

    /// `Some(Ok(epoch))` once this node owns the log at `epoch`, `Some(Err(_))` if it failed.
    pub fn outcome(&self) -> Option<Result<Epoch, TakeoverFailure>> {
        match self.phase {
            Phase::Done(r) => Some(r),
            _ => None,
        }
    }

    /// The epoch raised, once known.
    pub fn epoch(&self) -> Option<Epoch> {
        match &self.phase {
            Phase::Recovering { epoch, .. } | Phase::Opening { epoch } => Some(*epoch),
            Phase::Done(Ok(epoch)) => Some(*epoch),
            _ => None,
        }
    }

    /// The open segment being fenced and recovered, while that goes on.
    pub fn open_segment(&self) -> Option<&SegmentMeta> {
        match &self.phase {
            Phase::Recovering { segment, .. } => Some(segment),
            _ => None,
        }
    }

    /// Once enough members are fenced that the old owner can get no more appends
    /// acknowledged: the highest entry those members held (`Some(None)`: none). No entry
    /// above it can ever have been acknowledged to the old owner.
    pub fn fenced_tail(&self) -> Option<Option<u64>> {
        self.fenced_tail
    }

    fn finish(&mut self, r: Result<Epoch, TakeoverFailure>) -> Vec<TakeoverAction> {
        self.phase = Phase::Done(r);
        Vec::new()
    }

    /// The result of the epoch CAS: the descriptor as written.
    pub fn on_raised(&mut self, written: Result<LogMeta, TakeoverFailure>) -> Vec<TakeoverAction> {
        if !matches!(self.phase, Phase::Raising) {
            return Vec::new();
        }
        let meta = match written {
            Ok(m) => m,
            Err(f) => return self.finish(Err(f)),
        };
        let epoch = meta.epoch;
        match meta.segments.last() {
            Some(last) if last.end.is_none() => {
                let ack_quorum = last.ack_quorum.clamp(1, last.ensemble.len().max(1));
                let (rec, actions) = Recovery::start(last.ensemble.len(), ack_quorum);
                self.phase = Phase::Recovering {
                    epoch,
                    segment: last.clone(),
                    rec,
                    fenced: 0,
                    last: None,
                };
                actions.into_iter().map(TakeoverAction::Recover).collect()
            }
            _ => {
                // Nothing open: no old owner can append anywhere.
                self.fenced_tail = Some(None);
                self.phase = Phase::Opening { epoch };
                vec![TakeoverAction::SealAndOpen { epoch, seal: None }]
            }
        }
    }

    /// A member's answer to the fence.
    pub fn on_fence(&mut self, member: usize, answer: FenceAnswer) -> Vec<TakeoverAction> {
        let Phase::Recovering {
            rec,
            fenced,
            last,
            segment,
            ..
        } = &mut self.phase
        else {
            return Vec::new();
        };
        if let FenceAnswer::Fenced { last_entry, .. } = answer
            && self.fenced_tail.is_none()
        {
            *fenced += 1;
            *last = (*last).max(last_entry);
            if *fenced >= segment.ensemble.len() + 1 - segment.ack_quorum.max(1) {
                self.fenced_tail = Some(*last);
            }
        }
        let actions = rec.on_fence(member, answer);
        self.after_recovery(actions)
    }

    /// A member's answer to a recovery read.
    pub fn on_read(
        &mut self,
        member: usize,
        entry: u64,
        answer: EntryAnswer,
    ) -> Vec<TakeoverAction> {
        let Phase::Recovering { rec, .. } = &mut self.phase else {
            return Vec::new();
        };
        let actions = rec.on_read(member, entry, answer);
        self.after_recovery(actions)
    }

    /// A member's answer to a recovery write.
    pub fn on_write(
        &mut self,
        member: usize,
        entry: u64,
        answer: EntryAnswer,
    ) -> Vec<TakeoverAction> {
        let Phase::Recovering { rec, .. } = &mut self.phase else {
            return Vec::new();
        };
        let actions = rec.on_write(member, entry, answer);
        self.after_recovery(actions)
    }

    fn after_recovery(&mut self, actions: Vec<RecoveryAction>) -> Vec<TakeoverAction> {
        let Phase::Recovering {
            epoch,
            segment,
            rec,
            ..
        } = &self.phase
        else {
            return Vec::new();
        };
        let epoch = *epoch;
        match rec.outcome() {
            None => actions.into_iter().map(TakeoverAction::Recover).collect(),
            Some(Ok(end)) => {
                let seal = Seal {
                    segment: segment.id,
                    end,
                    under_replicated: !rec.all_members_reached(end),
                };
                self.phase = Phase::Opening { epoch };
                vec![TakeoverAction::SealAndOpen {
                    epoch,
                    seal: Some(seal),
                }]
            }
            Some(Err(RecoveryFailure::Superseded(e))) => {
                self.finish(Err(TakeoverFailure::Superseded(Epoch(e))))
            }
            Some(Err(RecoveryFailure::Unavailable)) => {
                self.finish(Err(TakeoverFailure::Unavailable))
            }
        }
    }

    /// The result of the seal-and-open CAS.
    pub fn on_opened(&mut self, written: Result<(), TakeoverFailure>) -> Vec<TakeoverAction> {
        let Phase::Opening { epoch } = self.phase else {
            return Vec::new();
        };
        self.finish(written.map(|()| epoch))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::meta::{ComputeRecord, ComputeRegistry, NodeRecord, NodeRegistry};
    use warren_common::Zone;

    fn id(n: u128) -> NodeId {
        NodeId(uuid::Uuid::from_u128(n))
    }

    fn record() -> ComputeRecord {
        ComputeRecord {
            name: "c".into(),
            zone: Zone("a".into()),
            amqp_addr: "127.0.0.1:1".parse().unwrap(),
            peer_addr: "127.0.0.1:2".parse().unwrap(),
            generation: Generation(0),
            state: MemberState::Active,
            heartbeat: 0,
        }
    }

    #[test]
    fn a_member_lapses_after_a_lease_on_the_observers_clock_and_eviction_checks_it() {
        let mut reg = ComputeRegistry::default();
        let (a, b) = (id(1), id(2));
        let ga = join(&mut reg, a, record());
        let gb = join(&mut reg, b, record());
        let mut obs = LeaseObserver::new(300);
        let o = obs.observe(1_000, a, ga, &reg);
        assert_eq!(o.live, [a, b].into());
        assert!(o.lapsed.is_empty() && o.standing == Standing::Member);
        assert_eq!(renew(&mut reg, b, gb), Standing::Member);
        let o = obs.observe(1_299, a, ga, &reg);
        assert!(o.live.contains(&b), "renewed at 1299: a fresh lease");
        let o = obs.observe(1_599, a, ga, &reg);
        assert_eq!(o.lapsed.len(), 1);
        assert!(!o.live.contains(&b));
        // B renews before the eviction lands: the eviction must not apply.
        let stale = o.lapsed[0];
        assert_eq!(renew(&mut reg, b, gb), Standing::Member);
        assert!(!evict(&mut reg, &stale));
        let o = obs.observe(2_000, a, ga, &reg);
        let lapsed = obs.observe(2_300, a, ga, &reg).lapsed;
        assert!(o.live.contains(&b));
        assert!(evict(&mut reg, &lapsed[0]));
        assert!(!evict(&mut reg, &lapsed[0]), "idempotent");
        assert_eq!(
            renew(&mut reg, b, gb),
            Standing::Evicted,
            "an evicted member learns it at renewal"
        );
        let mut obs_b = LeaseObserver::new(300);
        assert_eq!(obs_b.observe(0, b, gb, &reg).standing, Standing::Evicted);
        let gb2 = join(&mut reg, b, record());
        assert!(
            gb2.0 > gb.0 + 1,
            "rejoining skips the generation eviction burned"
        );
        assert_eq!(obs_b.observe(0, b, gb2, &reg).standing, Standing::Member);
        // A process stopped and replaced under the same id learns it is superseded.
        let gb3 = join(&mut reg, b, record());
        assert_eq!(renew(&mut reg, b, gb2), Standing::Superseded(gb3));
    }

    #[test]
    fn a_lease_lapses_only_after_the_heartbeat_stood_still_for_the_lease() {
        let mut reg = ComputeRegistry::default();
        let (me, b) = (id(1), id(2));
        let g = join(&mut reg, me, record());
        let gb = join(&mut reg, b, record());
        let mut obs = LeaseObserver::new(500);
        assert!(obs.observe(0, me, g, &reg).live.contains(&b));
        assert!(obs.observe(400, me, g, &reg).live.contains(&b));
        // A renewal restarts the lease.
        renew(&mut reg, b, gb);
        assert!(obs.observe(400, me, g, &reg).live.contains(&b));
        assert!(obs.observe(899, me, g, &reg).live.contains(&b));
        let o = obs.observe(900, me, g, &reg);
        assert_eq!(
            o.lapsed,
            vec![Lapsed {
                id: b,
                generation: gb,
                heartbeat: 1
            }]
        );
        assert_eq!(o.live, [me].into());
        // A re-join (new generation, heartbeat back to 0) is a change too.
        join(&mut reg, b, record());
        assert!(obs.observe(900, me, g, &reg).live.contains(&b));
        // Leaving: no longer live, never lapsed, and not evicted on an older observation.
        let before = obs.observe(1_400, me, g, &reg).lapsed;
        assert_eq!(before.len(), 1);
        reg.nodes.get_mut(&b).unwrap().state = MemberState::Leaving;
        let o = obs.observe(5_000, me, g, &reg);
        assert!(o.lapsed.is_empty() && !o.live.contains(&b));
        assert!(
            !evict(&mut reg, &before[0]),
            "a Leaving member is not evicted"
        );
        assert_eq!(reg.nodes[&b].state, MemberState::Leaving);
        // Leaving at its own generation: still a member, but nothing is renewed.
        assert_eq!(renew(&mut reg, me, g), Standing::Member);
        reg.nodes.get_mut(&me).unwrap().state = MemberState::Leaving;
        let hb = reg.nodes[&me].heartbeat;
        assert_eq!(renew(&mut reg, me, g), Standing::Member);
        assert_eq!(reg.nodes[&me].heartbeat, hb);
        assert!(!obs.observe(5_000, me, g, &reg).live.contains(&me));
    }

    #[test]
    fn the_same_rules_hold_for_the_storage_node_registry() {
        let rec = NodeRecord {
            name: "s".into(),
            zone: Zone("a".into()),
            data_addr: "127.0.0.1:1".parse().unwrap(),
            control_addr: "127.0.0.1:2".parse().unwrap(),
            generation: Generation(0),
            state: MemberState::Evicted,
            heartbeat: 9,
        };
        let mut reg = NodeRegistry::default();
        let (s1, s2) = (id(1), id(2));
        assert_eq!(join(&mut reg, s1, rec.clone()), Generation(1));
        assert_eq!(join(&mut reg, s2, rec.clone()), Generation(1));
        assert_eq!(
            (reg.nodes[&s1].state, reg.nodes[&s1].heartbeat),
            (MemberState::Active, 0)
        );
        // A compute node is in no storage registry: it only judges the others.
        let mut obs = LeaseObserver::new(100);
        assert_eq!(obs.observe_others(0, &reg).live, [s1, s2].into());
        assert_eq!(renew(&mut reg, s1, Generation(1)), Standing::Member);
        let l = obs.observe_others(100, &reg);
        assert_eq!(l.live, [s1].into());
        assert_eq!(l.lapsed.len(), 1);
        assert!(evict(&mut reg, &l.lapsed[0]));
        assert_eq!(reg.nodes[&s2].generation, Generation(2));
        assert_eq!(renew(&mut reg, s2, Generation(1)), Standing::Evicted);
        assert_eq!(join(&mut reg, s2, rec), Generation(3));
        assert_eq!(renew(&mut reg, s2, Generation(3)), Standing::Member);
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_the_member_that_left() {
        let all: Vec<NodeId> = (1..=4).map(id).collect();
        let three: Vec<NodeId> = all[..3].to_vec();
        let mut moved = 0;
        let mut counts = BTreeMap::new();
        for k in 0..400u32 {
            let key = format!("q{k}");
            let before = owner_of(&all, &key).unwrap();
            let after = owner_of(&three, &key).unwrap();
            *counts.entry(before).or_insert(0) += 1;
            if before != after {
                assert_eq!(before, all[3]);
                moved += 1;
            }
        }
        assert!(moved > 0);
        assert!(counts.values().all(|c| *c > 50), "skewed: {counts:?}");
        assert_eq!(owner_of(&[], "q"), None);
        // The same golden value as compute's `cluster::ownership::score`: every node, of
        // every release, must pick the same owner.
        let n = NodeId(uuid::Uuid::from_u128(0x1234_5678_9abc_def1));
        assert_eq!(score("/\u{0}orders", &n), 0xfc31_09d3_b0c9_1bfc);
        let live: BTreeSet<NodeId> = all.iter().copied().collect();
        let winner = owner_of(&live, "q").unwrap();
        let other = *all.iter().find(|n| **n != winner).unwrap();
        assert_eq!(sticky_owner(&live, "q", Some(other)), Some(other));
        assert_eq!(sticky_owner(&live, "q", Some(id(99))), Some(winner));
    }

    #[test]
    fn takeover_raises_fences_recovers_and_opens() {
        let seg = SegmentMeta {
            id: SegmentId(7),
            epoch: Epoch(1),
            ensemble: vec![id(1), id(2), id(3)],
            ack_quorum: 2,
            end: None,
            under_replicated: false,
        };
        let mut meta = LogMeta {
            epoch: Epoch(1),
            segments: vec![seg.clone()],
            ..LogMeta::default()
        };
        let (mut t, a) = Takeover::start();
        assert_eq!(a, vec![TakeoverAction::RaiseEpoch]);
        let epoch = raise_epoch(&mut meta, id(9)).unwrap();
        let a = t.on_raised(Ok(meta.clone()));
        assert_eq!(a.len(), 3);
        assert_eq!(t.epoch(), Some(Epoch(2)));
        let tail = |last| FenceAnswer::Fenced {
            last_entry: last,
            lac: None,
            end: None,
        };
        assert!(t.on_fence(0, tail(None)).is_empty());
        assert_eq!(t.fenced_tail(), None);
        let a = t.on_fence(1, tail(None));
        assert_eq!(t.fenced_tail(), Some(None));
        let seal = Seal {
            segment: SegmentId(7),
            end: 0,
            under_replicated: true,
        };
        assert_eq!(
            a,
            vec![TakeoverAction::SealAndOpen {
                epoch,
                seal: Some(seal)
            }]
        );
        let new = SegmentMeta {
            id: SegmentId(8),
            epoch,
            ..seg
        };
        // A third owner raised the epoch meanwhile: the conditional CAS fails.
        let mut raced = meta.clone();
        raise_epoch(&mut raced, id(5)).unwrap();
        assert_eq!(
            seal_and_open(&mut raced, epoch, Some(seal), new.clone()),
            Err(TakeoverFailure::Superseded(Epoch(3)))
        );
        seal_and_open(&mut meta, epoch, Some(seal), new).unwrap();
        assert_eq!(meta.segments.len(), 1, "the empty segment is dropped");
        let newer = claim(None, id(5), Epoch(3));
        assert_eq!(
            claim(Some(newer), id(9), epoch),
            newer,
            "a late claim changes nothing"
        );
        assert_eq!(claim(Some(newer), id(9), Epoch(4)).owner, id(9));
        t.on_opened(Ok(()));
        assert_eq!(t.outcome(), Some(Ok(epoch)));
    }

    #[test]
    fn a_takeover_overtaken_while_recovering_gives_up() {
        let seg = SegmentMeta {
            id: SegmentId(7),
            epoch: Epoch(1),
            ensemble: vec![id(1), id(2), id(3)],
            ack_quorum: 2,
            end: None,
            under_replicated: false,
        };
        let mut meta = LogMeta {
            epoch: Epoch(1),
            segments: vec![seg],
            ..LogMeta::default()
        };
        let (mut t, _) = Takeover::start();
        raise_epoch(&mut meta, id(9)).unwrap();
        t.on_raised(Ok(meta));
        let fenced = FenceAnswer::Fenced {
            last_entry: Some(4),
            lac: Some(3),
            end: None,
        };
        t.on_fence(0, fenced);
        assert!(!t.on_fence(1, fenced).is_empty(), "reads entry 4");
        assert_eq!(t.fenced_tail(), Some(Some(4)));
        // A third owner's fence reaches a member first: this recovery stops.
        t.on_read(2, 4, EntryAnswer::Superseded(3));
        assert_eq!(
            t.outcome(),
            Some(Err(TakeoverFailure::Superseded(Epoch(3))))
        );
        assert!(t.on_opened(Ok(())).is_empty());
        assert_eq!(
            t.outcome(),
            Some(Err(TakeoverFailure::Superseded(Epoch(3))))
        );
    }
}

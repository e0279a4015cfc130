//! Deterministic simulation of queue ownership (RFC 0004) on top of fencing and recovery
//! (RFC 0001).
//!
//! Compute processes run the rules of `protocol::ownership` on their own simulated clocks:
//! they join with a fresh generation, renew a lease, read the registry, evict members whose
//! heartbeat stood still for a lease on the reader's clock, pick owners by sticky rendezvous
//! among the members they believe live, and take queues over (raise the epoch by CAS, fence
//! and recover the open segment with [`Takeover`], seal it and open a new segment), then
//! append through [`AppendQuorum`]. Storage nodes apply [`SegmentRules`] with group commit.
//! The registers are a linearizable store reached through the same lossy network (a lost
//! reply means the change may have landed), available while a majority of storage nodes is.
//! On even seeds storage nodes also refuse writes from compute generations their last read
//! of the registry (every 500 ms) shows evicted or superseded; odd seeds rely on fencing
//! alone.
//!
//! A seeded schedule delivers messages in any order, loses some, pauses processes (SIGSTOP:
//! no steps, clock frozen or jumping on resume, messages in flight both ways), crashes and
//! restarts them with a fresh generation, partitions one zone, and crashes storage nodes
//! (losing what was not fsync'd). Scenarios add dueling owners, owners paused past their
//! lease, and third owners that take over while a second one is still recovering.
//!
//! After every step the invariants are checked: at most one epoch appends (an entry
//! acknowledged to an older epoch's writer is never above what a newer epoch's completed
//! fence found, nor above the end its segment was sealed at), acknowledged entries stay in
//! the log on `Qa` disks, epochs and fences only grow, each epoch is granted once, and an
//! owner claim never replaces a newer one. Then every fault heals and none is injected:
//! ownership must settle, each log with exactly one writer that gets appends acknowledged.
//! Last, every process stops and one more takeover recovers each log, which must hold every
//! acknowledged entry exactly once, in each writer's acknowledgement order.
//!
//! Replay one seed: `OWNERSHIP_SIM_SEED=17 cargo test -p warren-storage --test
//! ownership_sim <test name> -- --nocapture`.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap, VecDeque};
use warren_common::{Epoch, Generation, NodeId, SegmentId, Zone};
use warren_storage::meta::{ComputeRecord, ComputeRegistry, LogMeta, MemberState, SegmentMeta};
use warren_storage::protocol::ownership::{
    self, Lapsed, LeaseObserver, OwnerClaim, Seal, Standing, Takeover, TakeoverAction,
    TakeoverFailure,
};
use warren_storage::protocol::placement::{Candidate, choose_ensemble};
use warren_storage::protocol::quorum::{AppendQuorum, SendEntry};
use warren_storage::protocol::recovery::{EntryAnswer, FenceAnswer, RecoveryAction};
use warren_storage::protocol::segment::{SegmentRules, Tail};

const QW: usize = 3;
const QA: usize = 2;
const RENEW_MS: u64 = 100;
const LEASE_MS: u64 = 300;
const LOGS: usize = 2;
const ZONES: usize = 3;
const STEPS: usize = 2000;
const CALM_STEPS: usize = 500;
const TRACE: usize = 80;
const LOSS_PERCENT: u32 = 3;
const MAX_IN_FLIGHT: usize = 8;
const MAX_PROCS: usize = 6;
/// How often a storage node re-reads the compute registry.
const STORE_REFRESH_MS: u64 = 500;
/// Seeds per scenario for the protocol as designed.
const SEEDS: u64 = 300;
/// Seeds per scenario for each deliberately broken protocol.
const BROKEN_SEEDS: u64 = 30;

/// Which faults the schedule favours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Every fault at a moderate rate.
    Mixed,
    /// Processes often believe they own a queue someone else owns (a view glitch).
    DuelingOwners,
    /// Owners are paused, and resumed only after their lease lapsed.
    PausedOwner,
    /// Whenever a takeover starts recovering, another process often takes over too.
    FenceDuringRecovery,
}

/// The protocol the compute processes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// RFC 0001 and RFC 0004.
    Correct,
    /// Broken on purpose: a new owner trusts the lease and recovers the tail without
    /// fencing it (it only asks the members for their tail).
    SkipFence,
    /// Broken on purpose: the epoch is written blindly as the cached epoch plus one
    /// instead of raised by compare-and-swap.
    BlindEpoch,
    /// Broken on purpose: a completed takeover records its node as the owner even when a
    /// newer epoch is recorded already (keeping the newer epoch).
    ClaimOverwrites,
}

#[derive(Clone, Debug)]
enum Req {
    Append {
        segment: u64,
        epoch: u64,
        entry: u64,
        lac: Option<u64>,
        payload: Bytes,
    },
    Fence {
        segment: u64,
        epoch: u64,
        // Only report the tail, fence nothing (the broken SkipFence owner).
        probe: bool,
    },
    Read {
        segment: u64,
        entry: u64,
    },
}

#[derive(Clone, Debug)]
enum Resp {
    Ok,
    // The sender's generation was evicted or superseded (compute's `Hello` check).
    Evicted,
    Fenced(u64),
    FenceOk(Tail),
    Entry(Option<Bytes>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Append,
    Fence,
    Read,
    Write,
}

#[derive(Clone, Debug)]
enum RegOp {
    Join,
    Renew(Generation),
    Read,
    Evict(Lapsed),
    Raise,
    BlindRaise(Epoch),
    Claim(Epoch),
    SealOpen {
        epoch: Epoch,
        seal: Option<Seal>,
        new: SegmentMeta,
    },
}

#[derive(Clone, Debug)]
enum RegResult {
    Joined(Generation),
    Renewed(Standing),
    Read(ComputeRegistry, Vec<LogMeta>, Vec<Option<OwnerClaim>>),
    Done,
    Raised(Result<LogMeta, TakeoverFailure>),
    Opened(Result<(), TakeoverFailure>),
}

#[derive(Clone, Debug)]
enum Body {
    StoreReq {
        node: usize,
        member: usize,
        purpose: Purpose,
        entry: u64,
        req: Req,
    },
    StoreResp {
        member: usize,
        purpose: Purpose,
        entry: u64,
        segment: u64,
        resp: Option<Resp>,
    },
    RegReq(RegOp),
    RegResp(RegOp, Option<RegResult>),
}

/// A message between a compute process incarnation and storage (or the registers); the
/// route tags let late answers find, or miss, the takeover or writer that asked.
#[derive(Clone, Debug)]
struct Msg {
    p: usize,
    inc: u32,
    // The sender's generation when it sent (0: none), as its connection's `Hello` said.
    generation: u64,
    log: usize,
    w: usize,
    body: Body,
}

fn store_resp(m: &Msg, resp: Option<Resp>) -> Msg {
    let Body::StoreReq {
        member,
        purpose,
        entry,
        req,
        ..
    } = &m.body
    else {
        unreachable!("only requests are answered");
    };
    let segment = match req {
        Req::Append { segment, .. } | Req::Fence { segment, .. } | Req::Read { segment, .. } => {
            *segment
        }
    };
    Msg {
        body: Body::StoreResp {
            member: *member,
            purpose: *purpose,
            entry: *entry,
            segment,
            resp,
        },
        ..m.clone()
    }
}

struct Store {
    id: NodeId,
    zone: usize,
    up: bool,
    durable: Vec<Req>,
    pending: Vec<(Req, Msg)>,
    rules: HashMap<u64, SegmentRules>,
    entries: HashMap<(u64, u64), Bytes>,
    // The highest fence answered per segment: it must survive every crash.
    answered_fence: HashMap<u64, u64>,
    // Compute generations as of this node's last read of the registry.
    known: HashMap<NodeId, u64>,
    next_refresh: u64,
}

impl Store {
    fn rebuild(&mut self) {
        self.rules.clear();
        self.entries.clear();
        for r in &self.durable {
            match r {
                Req::Append {
                    segment,
                    entry,
                    lac,
                    payload,
                    ..
                } => {
                    self.rules
                        .entry(*segment)
                        .or_default()
                        .replay_append(*entry, *lac);
                    self.entries.insert((*segment, *entry), payload.clone());
                }
                Req::Fence { segment, epoch, .. } => {
                    self.rules.entry(*segment).or_default().replay_fence(*epoch)
                }
                Req::Read { .. } => {}
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Running,
    Paused { since: u64, freeze: bool },
    Crashed,
}

enum Hold {
    Idle,
    Taking {
        w: usize,
        t: Takeover,
        recovering: Option<u64>,
        new: Option<SegmentMeta>,
    },
    Writing {
        w: usize,
        segment: SegmentMeta,
        quorum: AppendQuorum,
        pending: Vec<Bytes>,
    },
}

impl Hold {
    fn writer(&self) -> Option<usize> {
        match self {
            Hold::Idle => None,
            Hold::Taking { w, .. } | Hold::Writing { w, .. } => Some(*w),
        }
    }
}

struct Proc {
    id: NodeId,
    zone: usize,
    status: Status,
    inc: u32,
    generation: Option<Generation>,
    joining: bool,
    clock: u64,
    rate: u64,
    next_timer: u64,
    observer: LeaseObserver,
    view: BTreeSet<NodeId>,
    descs: Vec<LogMeta>,
    claims: Vec<Option<OwnerClaim>>,
    holds: Vec<Hold>,
    forced_until: Vec<u64>,
    // Paused while writing; its next "fenced" answer proves a stale owner was stopped.
    paused_writer: bool,
}

impl Proc {
    fn new(id: NodeId, zone: usize, rate: u64, inc: u32, clock: u64) -> Proc {
        Proc {
            id,
            zone,
            status: Status::Running,
            inc,
            generation: None,
            joining: false,
            clock,
            rate,
            next_timer: clock,
            observer: LeaseObserver::new(LEASE_MS),
            view: BTreeSet::new(),
            descs: vec![LogMeta::default(); LOGS],
            claims: vec![None; LOGS],
            holds: (0..LOGS).map(|_| Hold::Idle).collect(),
            forced_until: vec![0; LOGS],
            paused_writer: false,
        }
    }

    fn writing(&self) -> bool {
        self.holds.iter().any(|h| matches!(h, Hold::Writing { .. }))
    }
}

#[allow(dead_code)] // `log` and `p` are for reading a failure in a debugger.
struct WriterRec {
    log: usize,
    p: usize,
    epoch: Option<Epoch>,
    fence_recorded: bool,
}

struct Ack {
    w: usize,
    log: usize,
    segment: u64,
    entry: u64,
    payload: Bytes,
}

/// What the schedules exercised, so a test can insist its scenario really happened.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    acked: u64,
    takeovers: u64,
    owned: u64,
    recovery_overtaken: u64,
    stale_refused: u64,
    evictions: u64,
    self_evicted: u64,
    superseded: u64,
    refused_evicted: u64,
    paused_owner_evicted: u64,
    resumed_owner_fenced: u64,
    duel_steps: u64,
    dual_writer_steps: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.acked += o.acked;
        self.takeovers += o.takeovers;
        self.owned += o.owned;
        self.recovery_overtaken += o.recovery_overtaken;
        self.stale_refused += o.stale_refused;
        self.evictions += o.evictions;
        self.self_evicted += o.self_evicted;
        self.superseded += o.superseded;
        self.refused_evicted += o.refused_evicted;
        self.paused_owner_evicted += o.paused_owner_evicted;
        self.resumed_owner_fenced += o.resumed_owner_fenced;
        self.duel_steps += o.duel_steps;
        self.dual_writer_steps += o.dual_writer_steps;
    }
}

/// The trace: notable events only (deliveries and fsyncs would drown them).
#[derive(Clone, Debug)]
#[allow(dead_code)] // Fields are read through Debug when a failure prints the trace.
enum Ev {
    Joined {
        p: usize,
        generation: u64,
    },
    View {
        p: usize,
        live: usize,
        lapsed: usize,
    },
    SelfEvicted {
        p: usize,
    },
    Superseded {
        p: usize,
    },
    Replaced {
        old: usize,
        new: usize,
    },
    Evicted {
        by: usize,
        target: NodeId,
    },
    TakeoverStart {
        p: usize,
        log: usize,
        w: usize,
    },
    Granted {
        log: usize,
        epoch: u64,
        w: usize,
    },
    FenceDone {
        w: usize,
        segment: u64,
        bound: Option<u64>,
    },
    Owned {
        w: usize,
        epoch: u64,
        segment: u64,
    },
    TakeoverFailed {
        w: usize,
        why: TakeoverFailure,
    },
    Released {
        p: usize,
        log: usize,
        w: usize,
    },
    WriterRefused {
        w: usize,
    },
    WriterFenced {
        w: usize,
        by: u64,
    },
    Appended {
        w: usize,
        entry: u64,
    },
    Acked {
        w: usize,
        segment: u64,
        entry: u64,
    },
    Pause {
        p: usize,
        freeze: bool,
    },
    Resume {
        p: usize,
        paused_ms: u64,
    },
    Crash {
        p: usize,
    },
    Restart {
        p: usize,
    },
    Partition {
        zone: usize,
    },
    Heal,
    StoreCrash {
        node: usize,
    },
    StoreUp {
        node: usize,
    },
    Force {
        p: usize,
        log: usize,
    },
}

struct Sim {
    seed: u64,
    scenario: Scenario,
    protocol: Protocol,
    // Storage refuses writes from evicted or superseded compute generations, behind fencing.
    generations: bool,
    // Every fault healed, none injected, nothing lost: ownership must settle.
    calm: bool,
    rng: StdRng,
    step: usize,
    now: u64,
    stores: Vec<Store>,
    procs: Vec<Proc>,
    net: Vec<Msg>,
    registry: ComputeRegistry,
    logs: Vec<LogMeta>,
    // Compute's queue descriptors: who completed the newest takeover of each log.
    claims: Vec<Option<OwnerClaim>>,
    partition: Option<usize>,
    writers: Vec<WriterRec>,
    grants: HashMap<(usize, u64), usize>,
    acked: Vec<Ack>,
    checked_acked: usize,
    // Completed fences by segment: (fencing epoch, highest entry the fenced members held).
    fences: HashMap<u64, Vec<(u64, Option<u64>)>>,
    prev_epochs: Vec<Epoch>,
    prev_ends: HashMap<u64, u64>,
    violation: Option<String>,
    // Something the invariants read changed since the last check (descriptors, fences,
    // acknowledgements, a storage node's state after a crash).
    dirty: bool,
    trace: VecDeque<(usize, u64, Ev)>,
    trace_len: usize,
    stats: Stats,
    next_payload: u64,
}

fn log_key(log: usize) -> String {
    format!("/\u{0}q{log}")
}

fn zone_name(z: usize) -> Zone {
    Zone(format!("zone-{}", (b'a' + z as u8) as char))
}

fn compute_record(zone: usize) -> ComputeRecord {
    ComputeRecord {
        name: "compute".into(),
        zone: zone_name(zone),
        amqp_addr: "127.0.0.1:5672".parse().unwrap(),
        peer_addr: "127.0.0.1:5673".parse().unwrap(),
        generation: Generation(0),
        state: MemberState::Active,
        heartbeat: 0,
    }
}

impl Sim {
    fn new(seed: u64, scenario: Scenario, protocol: Protocol) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let n_stores = rng.random_range(3..=6);
        let n_procs = rng.random_range(2..=4);
        let stores = (0..n_stores)
            .map(|i| Store {
                id: NodeId(uuid::Uuid::from_u128(i as u128 + 1)),
                zone: i % ZONES,
                up: true,
                durable: Vec::new(),
                pending: Vec::new(),
                rules: HashMap::new(),
                entries: HashMap::new(),
                answered_fence: HashMap::new(),
                known: HashMap::new(),
                next_refresh: 0,
            })
            .collect();
        let procs = (0..n_procs)
            .map(|i| {
                let rate = rng.random_range(900..=1100);
                let clock = rng.random_range(0..1_000_000);
                Proc::new(
                    NodeId(uuid::Uuid::from_u128(0x100 + i as u128)),
                    i % ZONES,
                    rate,
                    0,
                    clock,
                )
            })
            .collect();
        Sim {
            seed,
            scenario,
            protocol,
            // Half the seeds without it, so that fencing alone is shown to be enough; the
            // broken owner that skips fencing always has it, to show it is not.
            calm: false,
            generations: protocol == Protocol::SkipFence || seed.is_multiple_of(2),
            rng,
            step: 0,
            now: 0,
            stores,
            procs,
            net: Vec::new(),
            registry: ComputeRegistry::default(),
            logs: vec![LogMeta::default(); LOGS],
            claims: vec![None; LOGS],
            partition: None,
            writers: Vec::new(),
            grants: HashMap::new(),
            acked: Vec::new(),
            checked_acked: 0,
            fences: HashMap::new(),
            prev_epochs: vec![Epoch(0); LOGS],
            prev_ends: HashMap::new(),
            violation: None,
            dirty: true,
            trace: VecDeque::new(),
            // A replayed seed keeps its whole history.
            trace_len: if replaying() { usize::MAX } else { TRACE },
            stats: Stats::default(),
            next_payload: 0,
        }
    }

    fn ev(&mut self, e: Ev) {
        if self.trace.len() == self.trace_len {
            self.trace.pop_front();
        }
        self.trace.push_back((self.step, self.now, e));
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.random_range(0..100) < percent
    }

    fn lost(&mut self) -> bool {
        !self.calm && self.chance(LOSS_PERCENT)
    }

    fn store_index(&self, id: &NodeId) -> usize {
        self.stores.iter().position(|s| s.id == *id).unwrap()
    }

    fn send(&mut self, p: usize, log: usize, w: usize, body: Body) {
        let inc = self.procs[p].inc;
        let generation = self.procs[p].generation.map_or(0, |g| g.0);
        self.net.push(Msg {
            p,
            inc,
            generation,
            log,
            w,
            body,
        });
    }

    fn reg(&mut self, p: usize, log: usize, w: usize, op: RegOp) {
        self.send(p, log, w, Body::RegReq(op));
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        match self.partition {
            Some(z) => (a == z) == (b == z),
            None => true,
        }
    }

    /// The registers answer a process while it reaches a majority of storage nodes.
    fn registers_available(&self, p: usize) -> bool {
        let z = self.procs[p].zone;
        let n = self
            .stores
            .iter()
            .filter(|s| s.up && self.reachable(z, s.zone))
            .count();
        n > self.stores.len() / 2
    }

    // ---- the network ----

    fn deliverable(&self, m: &Msg) -> bool {
        match m.body {
            Body::StoreReq { .. } | Body::RegReq(_) => true,
            // Answers wait while their process is stopped.
            _ => !matches!(self.procs[m.p].status, Status::Paused { .. }),
        }
    }

    fn deliver_random(&mut self) -> bool {
        if self.calm {
            // Once calm, a round delivers everything in flight: every message arrives
            // within a bounded delay, however many are queued.
            if self.net.is_empty() {
                return false;
            }
            for m in std::mem::take(&mut self.net) {
                self.deliver(m);
            }
            return true;
        }
        for _ in 0..8 {
            if self.net.is_empty() {
                return false;
            }
            let i = self.rng.random_range(0..self.net.len());
            if self.deliverable(&self.net[i]) {
                let m = self.net.swap_remove(i);
                self.deliver(m);
                return true;
            }
        }
        false
    }

    fn deliver(&mut self, m: Msg) {
        let route = Msg {
            body: Body::RegReq(RegOp::Read),
            ..m
        };
        match m.body {
            Body::StoreReq { node, ref req, .. } => {
                let pz = self.procs[m.p].zone;
                let ok = self.stores[node].up && self.reachable(pz, self.stores[node].zone);
                let write = matches!(req, Req::Append { .. } | Req::Fence { probe: false, .. });
                if !ok || self.lost() {
                    // The sender times out.
                    self.net.push(store_resp(&m, None));
                } else if self.generations
                    && write
                    && self.stores[node]
                        .known
                        .get(&self.procs[m.p].id)
                        .is_some_and(|g| *g > m.generation)
                {
                    self.net.push(store_resp(&m, Some(Resp::Evicted)));
                } else {
                    let req = req.clone();
                    self.store_receive(node, req, m);
                }
            }
            Body::RegReq(op) => {
                let result = if !self.registers_available(m.p) || self.lost() {
                    None
                } else {
                    let result = self.apply(&route, &op);
                    // A lost answer: the change landed, the proposer does not know.
                    (!self.lost()).then_some(result)
                };
                self.net.push(Msg {
                    body: Body::RegResp(op, result),
                    ..route
                });
            }
            Body::StoreResp {
                member,
                purpose,
                entry,
                segment,
                resp,
            } => {
                if self.procs[m.p].status == Status::Crashed || self.procs[m.p].inc != m.inc {
                    return;
                }
                let resp = if resp.is_some() && self.lost() {
                    None
                } else {
                    resp
                };
                self.on_store_resp(&route, member, purpose, entry, segment, resp);
            }
            Body::RegResp(op, result) => {
                if self.procs[m.p].status == Status::Crashed || self.procs[m.p].inc != m.inc {
                    return;
                }
                self.on_reg(&route, op, result);
            }
        }
    }

    // ---- storage nodes ----

    fn store_receive(&mut self, node: usize, req: Req, m: Msg) {
        let s = &mut self.stores[node];
        match &req {
            Req::Append {
                segment,
                epoch,
                entry,
                lac,
                ..
            } => match s
                .rules
                .entry(*segment)
                .or_default()
                .append(*epoch, *entry, *lac)
            {
                Err(f) => self.net.push(store_resp(&m, Some(Resp::Fenced(f)))),
                Ok(()) => s.pending.push((req, store_resp(&m, Some(Resp::Ok)))),
            },
            Req::Fence {
                segment,
                probe: true,
                ..
            } => {
                let r = s.rules.get(segment).copied().unwrap_or_default();
                let tail = Tail {
                    last_entry: r.last,
                    lac: r.lac,
                    end: r.end,
                };
                self.net.push(store_resp(&m, Some(Resp::FenceOk(tail))));
            }
            Req::Fence { segment, epoch, .. } => {
                match s.rules.entry(*segment).or_default().fence(*epoch) {
                    Err(f) => self.net.push(store_resp(&m, Some(Resp::Fenced(f)))),
                    Ok(tail) => s
                        .pending
                        .push((req, store_resp(&m, Some(Resp::FenceOk(tail))))),
                }
            }
            Req::Read { segment, entry } => {
                let e = s.entries.get(&(*segment, *entry)).cloned();
                self.net.push(store_resp(&m, Some(Resp::Entry(e))));
            }
        }
    }

    fn fsync(&mut self, node: usize) {
        let s = &mut self.stores[node];
        for (req, answer) in std::mem::take(&mut s.pending) {
            match &req {
                Req::Append {
                    segment,
                    entry,
                    payload,
                    ..
                } => {
                    s.entries.insert((*segment, *entry), payload.clone());
                }
                Req::Fence { segment, epoch, .. } => {
                    let f = s.answered_fence.entry(*segment).or_default();
                    *f = (*f).max(*epoch);
                }
                Req::Read { .. } => {}
            }
            s.durable.push(req);
            self.net.push(answer);
        }
    }

    fn crash_store(&mut self) {
        let node = self.rng.random_range(0..self.stores.len());
        let up = self.stores.iter().filter(|s| s.up).count();
        if !self.stores[node].up || up - 1 <= self.stores.len() / 2 {
            return;
        }
        self.ev(Ev::StoreCrash { node });
        self.dirty = true;
        let s = &mut self.stores[node];
        s.up = false;
        // Requests lost with the crash time out at their senders.
        for (_, mut answer) in s.pending.drain(..) {
            if let Body::StoreResp { resp, .. } = &mut answer.body {
                *resp = None;
            }
            self.net.push(answer);
        }
        self.stores[node].rebuild();
    }

    fn restart_store(&mut self) {
        let down: Vec<usize> = (0..self.stores.len())
            .filter(|n| !self.stores[*n].up)
            .collect();
        if down.is_empty() {
            return;
        }
        let node = down[self.rng.random_range(0..down.len())];
        self.stores[node].up = true;
        self.ev(Ev::StoreUp { node });
    }

    // ---- the registers ----

    fn grant(&mut self, log: usize, epoch: Epoch, w: usize) {
        if let Some(prev) = self.grants.insert((log, epoch.0), w)
            && prev != w
        {
            self.violation.get_or_insert(format!(
                "epoch {} of log {log} granted to two takeovers (writers {prev} and {w})",
                epoch.0
            ));
        }
        self.writers[w].epoch = Some(epoch);
        self.ev(Ev::Granted {
            log,
            epoch: epoch.0,
            w,
        });
    }

    fn apply(&mut self, m: &Msg, op: &RegOp) -> RegResult {
        let id = self.procs[m.p].id;
        if matches!(
            op,
            RegOp::Raise | RegOp::BlindRaise(_) | RegOp::SealOpen { .. }
        ) {
            self.dirty = true;
        }
        match op {
            RegOp::Join => {
                let g =
                    ownership::join(&mut self.registry, id, compute_record(self.procs[m.p].zone));
                RegResult::Joined(g)
            }
            RegOp::Renew(g) => RegResult::Renewed(ownership::renew(&mut self.registry, id, *g)),
            RegOp::Read => RegResult::Read(
                self.registry.clone(),
                self.logs.clone(),
                self.claims.clone(),
            ),
            RegOp::Claim(epoch) => {
                let prev = self.claims[m.log];
                let next = match self.protocol {
                    Protocol::ClaimOverwrites => OwnerClaim {
                        owner: id,
                        epoch: prev.map_or(*epoch, |c| c.epoch.max(*epoch)),
                    },
                    _ => ownership::claim(prev, id, *epoch),
                };
                if let Some(c) = prev
                    && c.epoch > *epoch
                    && next != c
                {
                    self.violation.get_or_insert(format!(
                        "the recorded owner is the newest: a late claim by writer {} (epoch {}) \
                         replaced the owner of epoch {}",
                        m.w, epoch.0, c.epoch.0
                    ));
                }
                self.claims[m.log] = Some(next);
                RegResult::Done
            }
            RegOp::Evict(l) => {
                if ownership::evict(&mut self.registry, l) {
                    self.stats.evictions += 1;
                    self.ev(Ev::Evicted {
                        by: m.p,
                        target: l.id,
                    });
                    if let Some(target) = self.procs.iter().find(|p| p.id == l.id)
                        && matches!(target.status, Status::Paused { .. })
                        && target.writing()
                    {
                        self.stats.paused_owner_evicted += 1;
                    }
                }
                RegResult::Done
            }
            RegOp::Raise => {
                let r = ownership::raise_epoch(&mut self.logs[m.log], id);
                if let Ok(e) = r {
                    self.grant(m.log, e, m.w);
                }
                RegResult::Raised(r.map(|_| self.logs[m.log].clone()))
            }
            RegOp::BlindRaise(seen) => {
                let e = Epoch(seen.0 + 1);
                self.logs[m.log].epoch = e;
                self.logs[m.log].owner = Some(id);
                self.grant(m.log, e, m.w);
                RegResult::Raised(Ok(self.logs[m.log].clone()))
            }
            RegOp::SealOpen { epoch, seal, new } => RegResult::Opened(ownership::seal_and_open(
                &mut self.logs[m.log],
                *epoch,
                *seal,
                new.clone(),
            )),
        }
    }

    // ---- compute processes ----

    fn tick(&mut self) {
        let d = self.rng.random_range(5..=25);
        self.now += d;
        if self.generations {
            for n in 0..self.stores.len() {
                let s = &self.stores[n];
                if s.up && self.now >= s.next_refresh {
                    let known = self
                        .registry
                        .nodes
                        .iter()
                        .map(|(id, r)| (*id, r.generation.0))
                        .collect();
                    let s = &mut self.stores[n];
                    s.known = known;
                    s.next_refresh = self.now + STORE_REFRESH_MS;
                }
            }
        }
        for p in 0..self.procs.len() {
            if self.procs[p].status != Status::Running {
                continue;
            }
            let pr = &mut self.procs[p];
            pr.clock += d * pr.rate / 1000;
            if pr.clock >= pr.next_timer {
                pr.next_timer = pr.clock + RENEW_MS;
                self.timer(p);
            }
        }
    }

    fn timer(&mut self, p: usize) {
        match self.procs[p].generation {
            None => {
                if !self.procs[p].joining {
                    self.procs[p].joining = true;
                    self.reg(p, 0, usize::MAX, RegOp::Join);
                }
            }
            Some(g) => {
                self.reg(p, 0, usize::MAX, RegOp::Renew(g));
                self.reg(p, 0, usize::MAX, RegOp::Read);
            }
        }
        for log in 0..LOGS {
            self.reconnect(p, log);
        }
    }

    fn stop_all(&mut self, p: usize) {
        for log in 0..LOGS {
            self.release(p, log);
        }
    }

    fn release(&mut self, p: usize, log: usize) {
        let hold = std::mem::replace(&mut self.procs[p].holds[log], Hold::Idle);
        if let Some(w) = hold.writer() {
            self.ev(Ev::Released { p, log, w });
        }
    }

    fn judge_self(&mut self, p: usize, standing: Standing) {
        match standing {
            Standing::Member => {}
            Standing::Evicted => self.self_evicted(p),
            Standing::Superseded(_) => {
                // A replacement runs under this identity: this process exits.
                self.stats.superseded += 1;
                self.ev(Ev::Superseded { p });
                self.stop_all(p);
                self.procs[p].status = Status::Crashed;
            }
        }
    }

    fn self_evicted(&mut self, p: usize) {
        self.stats.self_evicted += 1;
        self.ev(Ev::SelfEvicted { p });
        self.stop_all(p);
        self.procs[p].generation = None;
        self.procs[p].view.clear();
    }

    fn on_reg(&mut self, m: &Msg, op: RegOp, result: Option<RegResult>) {
        let p = m.p;
        match op {
            RegOp::Join => {
                self.procs[p].joining = false;
                if let Some(RegResult::Joined(g)) = result
                    && self.procs[p].generation.is_none()
                {
                    let pr = &mut self.procs[p];
                    pr.generation = Some(g);
                    pr.observer = LeaseObserver::new(LEASE_MS);
                    self.ev(Ev::Joined { p, generation: g.0 });
                }
            }
            RegOp::Renew(g) => {
                if let Some(RegResult::Renewed(standing)) = result
                    && self.procs[p].generation == Some(g)
                {
                    self.judge_self(p, standing);
                }
            }
            RegOp::Read => {
                if let Some(RegResult::Read(reg, logs, claims)) = result {
                    self.on_read(p, reg, logs, claims);
                }
            }
            RegOp::Evict(_) | RegOp::Claim(_) => {}
            RegOp::Raise | RegOp::BlindRaise(_) => {
                let raised = match result {
                    Some(RegResult::Raised(r)) => r,
                    _ => Err(TakeoverFailure::Unavailable),
                };
                if let Hold::Taking { w, t, .. } = &mut self.procs[p].holds[m.log]
                    && *w == m.w
                {
                    let actions = t.on_raised(raised);
                    self.takeover_actions(p, m.log, actions);
                }
            }
            RegOp::SealOpen { .. } => {
                let opened = match result {
                    Some(RegResult::Opened(r)) => r,
                    _ => Err(TakeoverFailure::Unavailable),
                };
                if let Hold::Taking { w, t, .. } = &mut self.procs[p].holds[m.log]
                    && *w == m.w
                {
                    let actions = t.on_opened(opened);
                    self.takeover_actions(p, m.log, actions);
                }
            }
        }
    }

    fn on_read(
        &mut self,
        p: usize,
        reg: ComputeRegistry,
        logs: Vec<LogMeta>,
        claims: Vec<Option<OwnerClaim>>,
    ) {
        let Some(g) = self.procs[p].generation else {
            return;
        };
        let pr = &mut self.procs[p];
        let obs = pr.observer.observe(pr.clock, pr.id, g, &reg);
        if obs.standing != Standing::Member {
            self.judge_self(p, obs.standing);
            return;
        }
        let changed = pr.view != obs.live || !obs.lapsed.is_empty();
        pr.view = obs.live;
        pr.descs = logs;
        pr.claims = claims;
        if changed {
            let (live, lapsed) = (pr.view.len(), obs.lapsed.len());
            self.ev(Ev::View { p, live, lapsed });
        }
        for l in obs.lapsed {
            self.reg(p, 0, usize::MAX, RegOp::Evict(l));
        }
        for log in 0..LOGS {
            self.decide(p, log);
        }
    }

    /// The ownership decision, on this process's beliefs only.
    fn decide(&mut self, p: usize, log: usize) {
        let pr = &self.procs[p];
        // Sticky on the owner of the newest completed takeover, as compute records it.
        let recorded = pr.claims[log].map(|c| c.owner);
        let target = ownership::sticky_owner(&pr.view, &log_key(log), recorded);
        let mine = target == Some(pr.id) || pr.forced_until[log] > pr.clock;
        let idle = matches!(pr.holds[log], Hold::Idle);
        if mine && idle {
            self.start_takeover(p, log);
        } else if !mine && !idle {
            self.release(p, log);
        }
    }

    fn start_takeover(&mut self, p: usize, log: usize) {
        let w = self.writers.len();
        self.writers.push(WriterRec {
            log,
            p,
            epoch: None,
            fence_recorded: false,
        });
        self.stats.takeovers += 1;
        self.ev(Ev::TakeoverStart { p, log, w });
        let (t, actions) = Takeover::start();
        self.procs[p].holds[log] = Hold::Taking {
            w,
            t,
            recovering: None,
            new: None,
        };
        self.takeover_actions(p, log, actions);
    }

    fn choose_new_segment(&mut self, epoch: Epoch) -> SegmentMeta {
        let id: u64 = self.rng.random();
        let candidates: Vec<Candidate> = self
            .stores
            .iter()
            .map(|s| Candidate {
                id: s.id,
                zone: zone_name(s.zone),
                live: s.up,
            })
            .collect();
        SegmentMeta {
            id: SegmentId(id),
            epoch,
            ensemble: choose_ensemble(&candidates, QW, 1, id, &[]),
            ack_quorum: QA,
            end: None,
            under_replicated: false,
        }
    }

    fn recovery_req(&self, epoch: Epoch, seg: &SegmentMeta, a: RecoveryAction) -> Body {
        let (member, purpose, entry, req) = match a {
            RecoveryAction::Fence { member } => (
                member,
                Purpose::Fence,
                0,
                Req::Fence {
                    segment: seg.id.0,
                    epoch: epoch.0,
                    probe: self.protocol == Protocol::SkipFence,
                },
            ),
            RecoveryAction::Read { member, entry } => (
                member,
                Purpose::Read,
                entry,
                Req::Read {
                    segment: seg.id.0,
                    entry,
                },
            ),
            RecoveryAction::Write {
                member,
                entry,
                payload,
            } => (
                member,
                Purpose::Write,
                entry,
                Req::Append {
                    segment: seg.id.0,
                    epoch: epoch.0,
                    entry,
                    lac: None,
                    payload,
                },
            ),
        };
        Body::StoreReq {
            node: self.store_index(&seg.ensemble[member]),
            member,
            purpose,
            entry,
            req,
        }
    }

    fn takeover_actions(&mut self, p: usize, log: usize, actions: Vec<TakeoverAction>) {
        for a in actions {
            let Hold::Taking { w, t, .. } = &self.procs[p].holds[log] else {
                return;
            };
            let (w, open, epoch) = (*w, t.open_segment().cloned(), t.epoch());
            match a {
                TakeoverAction::RaiseEpoch => {
                    let op = match self.protocol {
                        Protocol::BlindEpoch => RegOp::BlindRaise(self.procs[p].descs[log].epoch),
                        _ => RegOp::Raise,
                    };
                    self.reg(p, log, w, op);
                }
                TakeoverAction::Recover(ra) => {
                    let seg = open.unwrap();
                    let body = self.recovery_req(epoch.unwrap(), &seg, ra);
                    self.send(p, log, w, body);
                    if let Hold::Taking { recovering, .. } = &mut self.procs[p].holds[log]
                        && recovering.is_none()
                    {
                        *recovering = Some(seg.id.0);
                        self.third_owner(p, log);
                    }
                }
                TakeoverAction::SealAndOpen { epoch, seal } => {
                    let seg = self.choose_new_segment(epoch);
                    if let Hold::Taking { new, .. } = &mut self.procs[p].holds[log] {
                        *new = Some(seg.clone());
                    }
                    self.reg(
                        p,
                        log,
                        w,
                        RegOp::SealOpen {
                            epoch,
                            seal,
                            new: seg,
                        },
                    );
                }
            }
        }
        self.takeover_progress(p, log);
    }

    fn takeover_progress(&mut self, p: usize, log: usize) {
        let Hold::Taking {
            w,
            t,
            recovering,
            new,
        } = &self.procs[p].holds[log]
        else {
            return;
        };
        let (w, recovering, new) = (*w, *recovering, new.clone());
        let (tail, epoch, outcome) = (t.fenced_tail(), t.epoch(), t.outcome());
        if let (Some(seg), Some(bound), Some(epoch)) = (recovering, tail, epoch)
            && !self.writers[w].fence_recorded
        {
            self.writers[w].fence_recorded = true;
            self.fences.entry(seg).or_default().push((epoch.0, bound));
            self.dirty = true;
            self.ev(Ev::FenceDone {
                w,
                segment: seg,
                bound,
            });
        }
        match outcome {
            None => {}
            Some(Ok(epoch)) => {
                let segment = new.unwrap();
                self.stats.owned += 1;
                self.ev(Ev::Owned {
                    w,
                    epoch: epoch.0,
                    segment: segment.id.0,
                });
                self.procs[p].holds[log] = Hold::Writing {
                    w,
                    quorum: AppendQuorum::new(segment.ensemble.len(), QA, 0),
                    segment,
                    pending: Vec::new(),
                };
                self.reg(p, log, w, RegOp::Claim(epoch));
            }
            Some(Err(why)) => {
                if matches!(why, TakeoverFailure::Superseded(_)) && recovering.is_some() {
                    self.stats.recovery_overtaken += 1;
                }
                self.ev(Ev::TakeoverFailed { w, why });
                self.procs[p].holds[log] = Hold::Idle;
            }
        }
    }

    /// Scenario hook: while one process recovers a log, another one takes it over too.
    fn third_owner(&mut self, p: usize, log: usize) {
        let percent = match self.scenario {
            _ if self.calm => 0,
            Scenario::FenceDuringRecovery => 50,
            Scenario::Mixed => 5,
            _ => 0,
        };
        if !self.chance(percent) {
            return;
        }
        let others: Vec<usize> = (0..self.procs.len())
            .filter(|q| {
                *q != p
                    && self.procs[*q].status == Status::Running
                    && self.procs[*q].generation.is_some()
            })
            .collect();
        if let Some(&q) = others.get(self.rng.random_range(0..others.len().max(1))) {
            self.force_on(q, log);
        }
    }

    fn force_on(&mut self, p: usize, log: usize) {
        self.ev(Ev::Force { p, log });
        let pr = &mut self.procs[p];
        pr.forced_until[log] = pr.clock + 2 * LEASE_MS;
        if matches!(pr.holds[log], Hold::Idle) {
            self.start_takeover(p, log);
        }
    }

    /// A process believes, for a while, that it owns a queue whatever its view says.
    fn force(&mut self) {
        let ps: Vec<usize> = (0..self.procs.len())
            .filter(|q| {
                self.procs[*q].status == Status::Running && self.procs[*q].generation.is_some()
            })
            .collect();
        if ps.is_empty() {
            return;
        }
        let p = ps[self.rng.random_range(0..ps.len())];
        let log = self.rng.random_range(0..LOGS);
        self.force_on(p, log);
    }

    fn on_store_resp(
        &mut self,
        m: &Msg,
        member: usize,
        purpose: Purpose,
        entry: u64,
        segment: u64,
        resp: Option<Resp>,
    ) {
        let (p, log) = (m.p, m.log);
        match &mut self.procs[p].holds[log] {
            Hold::Taking { w, t, .. } if *w == m.w => {
                let actions = match purpose {
                    Purpose::Fence => t.on_fence(
                        member,
                        match resp {
                            Some(Resp::FenceOk(tail)) => FenceAnswer::Fenced {
                                last_entry: tail.last_entry,
                                lac: tail.lac,
                                end: tail.end,
                            },
                            Some(Resp::Fenced(e)) => FenceAnswer::Superseded(e),
                            _ => FenceAnswer::Failed,
                        },
                    ),
                    Purpose::Read => t.on_read(
                        member,
                        entry,
                        match resp {
                            Some(Resp::Entry(Some(b))) => EntryAnswer::Ok(Some(b)),
                            Some(Resp::Entry(None)) => EntryAnswer::Absent,
                            Some(Resp::Fenced(e)) => EntryAnswer::Superseded(e),
                            _ => EntryAnswer::Failed,
                        },
                    ),
                    Purpose::Write => t.on_write(
                        member,
                        entry,
                        match resp {
                            Some(Resp::Ok) => EntryAnswer::Ok(None),
                            Some(Resp::Fenced(e)) => EntryAnswer::Superseded(e),
                            _ => EntryAnswer::Failed,
                        },
                    ),
                    Purpose::Append => Vec::new(),
                };
                self.takeover_actions(p, log, actions);
            }
            Hold::Writing {
                w,
                segment: seg,
                quorum,
                pending,
            } if *w == m.w && purpose == Purpose::Append && seg.id.0 == segment => {
                let w = *w;
                match resp {
                    Some(Resp::Ok) => {
                        let base = quorum.resolved();
                        let range = quorum.on_ack(member, entry);
                        let n = (range.end - range.start) as usize;
                        let mut acks = Vec::new();
                        for e in range {
                            acks.push(Ack {
                                w,
                                log,
                                segment,
                                entry: e,
                                payload: pending[(e - base) as usize].clone(),
                            });
                        }
                        pending.drain(..n);
                        for a in acks {
                            self.stats.acked += 1;
                            self.ev(Ev::Acked {
                                w,
                                segment,
                                entry: a.entry,
                            });
                            self.acked.push(a);
                        }
                    }
                    Some(Resp::Evicted) => {
                        self.stats.refused_evicted += 1;
                        self.ev(Ev::WriterRefused { w });
                        self.procs[p].holds[log] = Hold::Idle;
                    }
                    Some(Resp::Fenced(by)) => {
                        // A fenced writer stops serving the queue at once.
                        self.stats.stale_refused += 1;
                        if self.procs[p].paused_writer {
                            self.stats.resumed_owner_fenced += 1;
                            self.procs[p].paused_writer = false;
                        }
                        self.ev(Ev::WriterFenced { w, by });
                        self.procs[p].holds[log] = Hold::Idle;
                    }
                    _ => quorum.on_member_down(member),
                }
            }
            _ => {}
        }
    }

    fn send_entries(
        &mut self,
        p: usize,
        log: usize,
        w: usize,
        seg: &SegmentMeta,
        sends: Vec<SendEntry>,
    ) {
        let epoch = self.writers[w].epoch.unwrap();
        for s in sends {
            let body = Body::StoreReq {
                node: self.store_index(&seg.ensemble[s.member]),
                member: s.member,
                purpose: Purpose::Append,
                entry: s.entry,
                req: Req::Append {
                    segment: seg.id.0,
                    epoch: epoch.0,
                    entry: s.entry,
                    lac: s.lac,
                    payload: s.payload,
                },
            };
            self.send(p, log, w, body);
        }
    }

    fn append(&mut self) {
        let candidates: Vec<(usize, usize)> = (0..self.procs.len())
            .filter(|p| self.procs[*p].status == Status::Running)
            .flat_map(|p| (0..LOGS).map(move |l| (p, l)))
            .filter(|(p, l)| {
                // Bounded in flight, like the real writer's credit.
                matches!(&self.procs[*p].holds[*l], Hold::Writing { quorum, .. } if quorum.in_flight() < MAX_IN_FLIGHT)
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let (p, log) = candidates[self.rng.random_range(0..candidates.len())];
        let payload = Bytes::from(format!("m{}", self.next_payload));
        self.next_payload += 1;
        let Hold::Writing {
            w,
            segment,
            quorum,
            pending,
        } = &mut self.procs[p].holds[log]
        else {
            return;
        };
        let (entry, sends) = quorum.push(payload.clone());
        pending.push(payload);
        let (w, segment) = (*w, segment.clone());
        if self.trace_len == usize::MAX {
            // Too many for the short trace a failure prints; the whole history has them.
            self.ev(Ev::Appended { w, entry });
        }
        self.send_entries(p, log, w, &segment, sends);
    }

    /// A writer reconnects to members it marked down whose node answers again.
    fn reconnect(&mut self, p: usize, log: usize) {
        let Hold::Writing {
            w, segment, quorum, ..
        } = &mut self.procs[p].holds[log]
        else {
            return;
        };
        let mut sends = Vec::new();
        for m in 0..segment.ensemble.len() {
            let node = self
                .stores
                .iter()
                .position(|s| s.id == segment.ensemble[m])
                .unwrap();
            if quorum.is_down(m) && self.stores[node].up {
                sends.extend(quorum.on_member_up(m));
            }
        }
        let (w, segment) = (*w, segment.clone());
        self.send_entries(p, log, w, &segment, sends);
    }

    // ---- process faults ----

    fn pause(&mut self, owners_only: bool) {
        let ps: Vec<usize> = (0..self.procs.len())
            .filter(|p| self.procs[*p].status == Status::Running)
            .filter(|p| !owners_only || self.procs[*p].writing())
            .collect();
        if ps.is_empty() {
            return;
        }
        let p = ps[self.rng.random_range(0..ps.len())];
        let freeze = self.rng.random();
        self.procs[p].status = Status::Paused {
            since: self.now,
            freeze,
        };
        self.procs[p].paused_writer = self.procs[p].writing();
        self.ev(Ev::Pause { p, freeze });
    }

    fn resume(&mut self) {
        let min_pause = match self.scenario {
            Scenario::PausedOwner => 2 * LEASE_MS,
            _ => 0,
        };
        let ps: Vec<usize> = (0..self.procs.len())
            .filter(|p| {
                matches!(self.procs[*p].status, Status::Paused { since, .. } if self.now - since >= min_pause)
            })
            .collect();
        if ps.is_empty() {
            return;
        }
        let p = ps[self.rng.random_range(0..ps.len())];
        let Status::Paused { since, freeze } = self.procs[p].status else {
            return;
        };
        let pr = &mut self.procs[p];
        if !freeze {
            // A monotonic clock that kept running: the process sees time jump.
            pr.clock += (self.now - since) * pr.rate / 1000;
        }
        pr.status = Status::Running;
        self.ev(Ev::Resume {
            p,
            paused_ms: self.now - since,
        });
    }

    fn crash_proc(&mut self) {
        let ps: Vec<usize> = (0..self.procs.len())
            .filter(|p| self.procs[*p].status != Status::Crashed)
            .collect();
        if ps.is_empty() {
            return;
        }
        let p = ps[self.rng.random_range(0..ps.len())];
        self.procs[p].status = Status::Crashed;
        self.procs[p].holds = (0..LOGS).map(|_| Hold::Idle).collect();
        self.ev(Ev::Crash { p });
    }

    fn restart_proc(&mut self) {
        let ps: Vec<usize> = (0..self.procs.len())
            .filter(|p| self.procs[*p].status == Status::Crashed)
            .collect();
        if ps.is_empty() {
            return;
        }
        let p = ps[self.rng.random_range(0..ps.len())];
        let old = &self.procs[p];
        let clock = self.rng.random_range(0..1_000_000);
        self.procs[p] = Proc::new(old.id, old.zone, old.rate, old.inc + 1, clock);
        self.ev(Ev::Restart { p });
    }

    /// A supervisor gives up on a stopped process and starts another under the same node
    /// id; the stopped one may wake up later, a zombie with the old generation.
    fn replace_paused(&mut self) {
        let ps: Vec<usize> = (0..self.procs.len())
            .filter(|p| matches!(self.procs[*p].status, Status::Paused { .. }))
            .collect();
        if ps.is_empty() || self.procs.len() >= MAX_PROCS {
            return;
        }
        let p = ps[self.rng.random_range(0..ps.len())];
        let old = &self.procs[p];
        let clock = self.rng.random_range(0..1_000_000);
        let new = Proc::new(old.id, old.zone, old.rate, 0, clock);
        self.procs.push(new);
        self.ev(Ev::Replaced {
            old: p,
            new: self.procs.len() - 1,
        });
    }

    fn fault(&mut self, r: u32) {
        let s = self.scenario;
        match r {
            0..=5 => self.pause(s == Scenario::PausedOwner),
            6..=24 => self.resume(),
            25..=28 => self.crash_proc(),
            29..=40 => self.restart_proc(),
            41..=43 => {
                if self.partition.is_none() {
                    let zone = self.rng.random_range(0..ZONES);
                    self.partition = Some(zone);
                    self.ev(Ev::Partition { zone });
                }
            }
            44..=55 => {
                if self.partition.take().is_some() {
                    self.ev(Ev::Heal);
                }
            }
            56..=61 => self.crash_store(),
            62..=80 => self.restart_store(),
            81..=85 => self.force(),
            86..=87 => self.replace_paused(),
            _ => match s {
                Scenario::DuelingOwners if r < 115 => self.force(),
                Scenario::PausedOwner if r < 100 => self.pause(true),
                Scenario::PausedOwner if r < 125 => self.resume(),
                _ => {}
            },
        }
    }

    fn step(&mut self) {
        self.step += 1;
        if !self.calm && self.rng.random_range(0..1000) < 25 {
            let r = self.rng.random_range(0..140);
            self.fault(r);
            return;
        }
        match self.rng.random_range(0..1000u32) {
            0..=749 => {
                if !self.deliver_random() {
                    self.tick();
                }
            }
            750..=839 => {
                let busy: Vec<usize> = (0..self.stores.len())
                    .filter(|n| !self.stores[*n].pending.is_empty())
                    .collect();
                if self.calm {
                    for n in busy {
                        self.fsync(n);
                    }
                } else if !busy.is_empty() {
                    let n = busy[self.rng.random_range(0..busy.len())];
                    self.fsync(n);
                }
            }
            840..=919 => self.tick(),
            920..=979 => self.append(),
            _ => {
                for p in 0..self.procs.len() {
                    if self.procs[p].status == Status::Running {
                        for log in 0..LOGS {
                            self.reconnect(p, log);
                        }
                    }
                }
            }
        }
        for log in 0..LOGS {
            let mut holders = 0;
            let mut writers = 0;
            for p in &self.procs {
                if p.status == Status::Crashed {
                    continue;
                }
                match p.holds[log] {
                    Hold::Idle => {}
                    Hold::Taking { .. } => holders += 1,
                    Hold::Writing { .. } => {
                        holders += 1;
                        writers += 1;
                    }
                }
            }
            if holders >= 2 {
                self.stats.duel_steps += 1;
            }
            if writers >= 2 {
                self.stats.dual_writer_steps += 1;
            }
        }
    }

    // ---- invariants ----

    fn durable_copies(&self, seg: &SegmentMeta, entry: u64) -> Vec<Bytes> {
        seg.ensemble
            .iter()
            .filter_map(|id| {
                self.stores[self.store_index(id)]
                    .entries
                    .get(&(seg.id.0, entry))
                    .cloned()
            })
            .collect()
    }

    fn check(&mut self) -> Result<(), String> {
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        // Only new acknowledgements need a look unless something else changed.
        let from = if std::mem::take(&mut self.dirty) {
            0
        } else if self.checked_acked == self.acked.len() {
            return Ok(());
        } else {
            self.checked_acked
        };
        // Epochs only increase per log; a fence once answered is never forgotten.
        for log in 0..LOGS {
            let e = self.logs[log].epoch;
            if e < self.prev_epochs[log] {
                return Err(format!(
                    "epochs only increase: log {log} went from {} to {}",
                    self.prev_epochs[log].0, e.0
                ));
            }
            self.prev_epochs[log] = e;
        }
        for (n, s) in self.stores.iter().enumerate() {
            for (seg, e) in &s.answered_fence {
                let now = s.rules.get(seg).map_or(0, |r| r.fenced);
                if now < *e {
                    return Err(format!(
                        "node {n} forgot the fence at {e} of segment {seg} (now {now})"
                    ));
                }
            }
        }
        // Descriptors: only the last segment is open, sealed ends never change, and a
        // newly sealed prefix is on Qa disks with one content per entry.
        let mut segs: HashMap<u64, (usize, &SegmentMeta)> = HashMap::new();
        let mut newly_sealed = Vec::new();
        for (log, m) in self.logs.iter().enumerate() {
            for (i, s) in m.segments.iter().enumerate() {
                if i + 1 < m.segments.len() && s.end.is_none() {
                    return Err(format!(
                        "log {log}: segment {} is open but not last",
                        s.id.0
                    ));
                }
                if let Some(end) = s.end {
                    match self.prev_ends.get(&s.id.0) {
                        Some(prev) if *prev != end => {
                            return Err(format!(
                                "log {log}: sealed end of {} changed from {prev} to {end}",
                                s.id.0
                            ));
                        }
                        Some(_) => {}
                        None => newly_sealed.push(s),
                    }
                }
                segs.insert(s.id.0, (log, s));
            }
        }
        for s in &newly_sealed {
            let end = s.end.unwrap();
            for e in 0..end {
                let copies = self.durable_copies(s, e);
                if copies.len() < QA || copies.windows(2).any(|c| c[0] != c[1]) {
                    return Err(format!(
                        "segment {} sealed at {end} but entry {e} has {} copies: {copies:?}",
                        s.id.0,
                        copies.len()
                    ));
                }
            }
        }
        // Acknowledged entries: in the log, on Qa disks, and never above what a newer
        // epoch's completed fence found (at most one epoch appends) or the sealed end.
        for (i, a) in self.acked.iter().enumerate().skip(from) {
            let Some((log, seg)) = segs.get(&a.segment) else {
                return Err(format!(
                    "acknowledged entry {} of segment {} (writer {}) lost: segment left log {}",
                    a.entry, a.segment, a.w, a.log
                ));
            };
            if *log != a.log {
                return Err(format!("segment {} moved between logs", a.segment));
            }
            let epoch = seg.epoch.0;
            if let Some(end) = seg.end
                && a.entry >= end
            {
                return Err(format!(
                    "at most one epoch appends: writer {} (epoch {epoch}) got entry {} of \
                     segment {} acknowledged, but the segment was sealed at {end}",
                    a.w, a.entry, a.segment
                ));
            }
            for (fence_epoch, bound) in self.fences.get(&a.segment).into_iter().flatten() {
                if *fence_epoch > epoch && bound.is_none_or(|b| a.entry > b) {
                    return Err(format!(
                        "at most one epoch appends: writer {} (epoch {epoch}) got entry {} of \
                         segment {} acknowledged, above what epoch {fence_epoch}'s completed \
                         fence found ({bound:?})",
                        a.w, a.entry, a.segment
                    ));
                }
            }
            if i >= self.checked_acked {
                let copies = self.durable_copies(seg, a.entry);
                if copies.len() < QA || copies.iter().any(|c| *c != a.payload) {
                    return Err(format!(
                        "acknowledged entry {} of segment {} has copies {copies:?}, want {} \
                         of {:?}",
                        a.entry, a.segment, QA, a.payload
                    ));
                }
            }
        }
        let sealed: Vec<(u64, u64)> = newly_sealed
            .iter()
            .map(|s| (s.id.0, s.end.unwrap()))
            .collect();
        self.prev_ends.extend(sealed);
        self.checked_acked = self.acked.len();
        Ok(())
    }

    /// Heal every fault and inject none: ownership must settle, each log with one writer
    /// that every process agrees on and that gets appends acknowledged.
    fn settle(&mut self) -> Result<(), String> {
        self.calm = true;
        self.partition = None;
        for s in &mut self.stores {
            s.up = true;
        }
        for p in 0..self.procs.len() {
            self.procs[p].forced_until = vec![0; LOGS];
            if let Status::Paused { .. } = self.procs[p].status {
                self.procs[p].status = Status::Running;
            }
            let id = self.procs[p].id;
            let taken = self
                .procs
                .iter()
                .any(|q| q.id == id && q.status != Status::Crashed);
            if self.procs[p].status == Status::Crashed && !taken {
                let old = &self.procs[p];
                let clock = self.rng.random_range(0..1_000_000);
                self.procs[p] = Proc::new(old.id, old.zone, old.rate, old.inc + 1, clock);
            }
        }
        let before = self.acked.len();
        for _ in 0..CALM_STEPS {
            self.step();
            self.check()?;
        }
        for log in 0..LOGS {
            let writers: Vec<usize> = (0..self.procs.len())
                .filter(|p| {
                    self.procs[*p].status == Status::Running
                        && matches!(self.procs[*p].holds[log], Hold::Writing { .. })
                })
                .collect();
            let [p] = writers[..] else {
                return Err(format!(
                    "ownership did not settle: log {log} has writers {writers:?} after \
                     {CALM_STEPS} calm steps"
                ));
            };
            let Hold::Writing { w, .. } = self.procs[p].holds[log] else {
                unreachable!("a writer holds its log");
            };
            if !self.acked[before..].iter().any(|a| a.w == w) {
                return Err(format!(
                    "ownership did not settle: log {log}'s writer {w} got nothing \
                     acknowledged in {CALM_STEPS} calm steps"
                ));
            }
        }
        Ok(())
    }

    /// Heal everything, stop every process (their messages to storage still land), take
    /// each log over once more without faults, and check that it holds every acknowledged
    /// entry exactly once, in each writer's acknowledgement order.
    fn audit(&mut self) -> Result<(), String> {
        self.partition = None;
        for s in &mut self.stores {
            s.up = true;
        }
        for p in &mut self.procs {
            p.status = Status::Crashed;
        }
        let in_flight: Vec<Msg> = self.net.drain(..).collect();
        for m in in_flight {
            if let Body::StoreReq { node, req, .. } = m.body.clone() {
                self.store_receive(node, req, m);
            }
        }
        for n in 0..self.stores.len() {
            self.fsync(n);
        }
        self.net.clear();
        self.dirty = true;
        self.check()?;
        let auditor = NodeId(uuid::Uuid::from_u128(0xa0d1));
        for log in 0..LOGS {
            let w = self.writers.len();
            self.writers.push(WriterRec {
                log,
                p: usize::MAX,
                epoch: None,
                fence_recorded: false,
            });
            let (mut t, actions) = Takeover::start();
            let mut queue: VecDeque<TakeoverAction> = actions.into();
            let mut recovering = None;
            while let Some(a) = queue.pop_front() {
                let more = match a {
                    TakeoverAction::RaiseEpoch => {
                        let r = ownership::raise_epoch(&mut self.logs[log], auditor);
                        if let Ok(e) = r {
                            self.grant(log, e, w);
                        }
                        t.on_raised(r.map(|_| self.logs[log].clone()))
                    }
                    TakeoverAction::Recover(ra) => {
                        // Requests queued before recovery ended need no answer.
                        let Some(seg) = t.open_segment().cloned() else {
                            continue;
                        };
                        recovering = Some(seg.id.0);
                        let epoch = t.epoch().unwrap().0;
                        self.audit_recover(&mut t, &seg, epoch, ra)
                    }
                    TakeoverAction::SealAndOpen { epoch, seal } => {
                        let new = self.choose_new_segment(epoch);
                        let r = ownership::seal_and_open(&mut self.logs[log], epoch, seal, new);
                        t.on_opened(r)
                    }
                };
                if let (Some(seg), Some(bound), Some(epoch)) =
                    (recovering, t.fenced_tail(), t.epoch())
                    && !self.writers[w].fence_recorded
                {
                    self.writers[w].fence_recorded = true;
                    self.fences.entry(seg).or_default().push((epoch.0, bound));
                }
                queue.extend(more);
            }
            if !matches!(t.outcome(), Some(Ok(_))) {
                return Err(format!(
                    "the final takeover of log {log} on a healed cluster ended {:?}",
                    t.outcome()
                ));
            }
            self.dirty = true;
            self.check()?;
        }
        let mut index: HashMap<Bytes, (usize, usize)> = HashMap::new();
        for (log, m) in self.logs.iter().enumerate() {
            let mut pos = 0;
            for s in &m.segments {
                for e in 0..s.end.unwrap_or(0) {
                    let copies = self.durable_copies(s, e);
                    let Some(c) = copies.first() else {
                        return Err(format!("log {log}: sealed entry {e} of {} missing", s.id.0));
                    };
                    if index.insert(c.clone(), (log, pos)).is_some() {
                        return Err(format!("log {log}: {c:?} twice in the log"));
                    }
                    pos += 1;
                }
            }
        }
        let mut last: HashMap<usize, usize> = HashMap::new();
        for a in &self.acked {
            let Some((log, pos)) = index.get(&a.payload) else {
                return Err(format!(
                    "acknowledged {:?} (writer {}, segment {} entry {}) missing from the \
                     recovered log",
                    a.payload, a.w, a.segment, a.entry
                ));
            };
            if *log != a.log {
                return Err(format!("{:?} recovered into the wrong log", a.payload));
            }
            if let Some(l) = last.insert(a.w, *pos)
                && *pos <= l
            {
                return Err(format!("writer {}: acknowledgement order broken", a.w));
            }
        }
        Ok(())
    }

    /// One recovery request of the final takeover, answered at once and durably.
    fn audit_recover(
        &mut self,
        t: &mut Takeover,
        seg: &SegmentMeta,
        epoch: u64,
        a: RecoveryAction,
    ) -> Vec<TakeoverAction> {
        match a {
            RecoveryAction::Fence { member } => {
                let n = self.store_index(&seg.ensemble[member]);
                let s = &mut self.stores[n];
                let answer = match s.rules.entry(seg.id.0).or_default().fence(epoch) {
                    Ok(tail) => {
                        s.durable.push(Req::Fence {
                            segment: seg.id.0,
                            epoch,
                            probe: false,
                        });
                        let f = s.answered_fence.entry(seg.id.0).or_default();
                        *f = (*f).max(epoch);
                        FenceAnswer::Fenced {
                            last_entry: tail.last_entry,
                            lac: tail.lac,
                            end: tail.end,
                        }
                    }
                    Err(e) => FenceAnswer::Superseded(e),
                };
                t.on_fence(member, answer)
            }
            RecoveryAction::Read { member, entry } => {
                let n = self.store_index(&seg.ensemble[member]);
                let s = &self.stores[n];
                let answer = match s.entries.get(&(seg.id.0, entry)) {
                    Some(b) => EntryAnswer::Ok(Some(b.clone())),
                    None => EntryAnswer::Absent,
                };
                t.on_read(member, entry, answer)
            }
            RecoveryAction::Write {
                member,
                entry,
                payload,
            } => {
                let n = self.store_index(&seg.ensemble[member]);
                let s = &mut self.stores[n];
                let answer = match s
                    .rules
                    .entry(seg.id.0)
                    .or_default()
                    .append(epoch, entry, None)
                {
                    Ok(()) => {
                        s.entries.insert((seg.id.0, entry), payload.clone());
                        s.durable.push(Req::Append {
                            segment: seg.id.0,
                            epoch,
                            entry,
                            lac: None,
                            payload,
                        });
                        EntryAnswer::Ok(None)
                    }
                    Err(e) => EntryAnswer::Superseded(e),
                };
                t.on_write(member, entry, answer)
            }
        }
    }

    fn failure(&self, what: &str) -> String {
        let mut out = format!(
            "seed {} ({:?}, {:?}, {} storage nodes, {} compute processes) failed at step {} \
             (t={} ms): {what}\nlast events (step, time ms, event):\n",
            self.seed,
            self.scenario,
            self.protocol,
            self.stores.len(),
            self.procs.len(),
            self.step,
            self.now
        );
        for (step, now, e) in &self.trace {
            out.push_str(&format!("  {step:5} {now:6} {e:?}\n"));
        }
        out.push_str(&format!(
            "{} messages in flight; processes:\n",
            self.net.len()
        ));
        if self.trace_len == usize::MAX {
            for m in &self.net {
                out.push_str(&format!("  {m:?}\n"));
            }
        }
        for (i, p) in self.procs.iter().enumerate() {
            let holds: Vec<String> = p
                .holds
                .iter()
                .map(|h| match h {
                    Hold::Idle => "idle".to_string(),
                    Hold::Taking { w, t, .. } => format!("taking w{w} {t:?}"),
                    Hold::Writing { w, quorum, .. } => {
                        format!("writing w{w} resolved {}", quorum.resolved())
                    }
                })
                .collect();
            out.push_str(&format!(
                "  p{i} {:?} {:?} view {} {holds:?}\n",
                p.status,
                p.generation,
                p.view.len()
            ));
        }
        out
    }
}

/// Run one seed; `Err` holds the violation and a trace.
fn run(seed: u64, scenario: Scenario, protocol: Protocol) -> Result<Stats, String> {
    let mut sim = Sim::new(seed, scenario, protocol);
    for _ in 0..STEPS {
        sim.step();
        if let Err(v) = sim.check() {
            return Err(sim.failure(&v));
        }
    }
    if let Err(v) = sim.settle() {
        return Err(sim.failure(&v));
    }
    if let Err(v) = sim.audit() {
        return Err(sim.failure(&v));
    }
    if replaying() {
        eprintln!("{}", sim.failure("nothing (the seed passed)"));
    }
    Ok(sim.stats)
}

fn replaying() -> bool {
    std::env::var("OWNERSHIP_SIM_SEED").is_ok()
}

/// The seeds to run: `OWNERSHIP_SIM_SEED` replays one.
fn seeds(n: u64) -> Vec<u64> {
    match std::env::var("OWNERSHIP_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("OWNERSHIP_SIM_SEED is a number")],
        Err(_) => (0..n).collect(),
    }
}

fn run_seeds(test: &str, scenario: Scenario, n: u64) -> Stats {
    let mut total = Stats::default();
    let seeds = seeds(n);
    for seed in &seeds {
        match run(*seed, scenario, Protocol::Correct) {
            Ok(s) => total += s,
            Err(e) => panic!(
                "{e}\nreplay: OWNERSHIP_SIM_SEED={seed} cargo test -p warren-storage --test \
                 ownership_sim {test} -- --nocapture"
            ),
        }
    }
    eprintln!("{scenario:?}, {} seeds: {total:?}", seeds.len());
    total
}

/// Run a broken protocol over `n` seeds of every scenario: how many seeds of each caught
/// it, and the first failure (printed).
fn caught(protocol: Protocol, n: u64) -> Vec<(Scenario, u64)> {
    let mut out = Vec::new();
    let mut first = None;
    for scenario in SCENARIOS {
        let mut count = 0;
        for seed in 0..n {
            if let Err(e) = run(seed, scenario, protocol) {
                count += 1;
                first.get_or_insert(e);
            }
        }
        out.push((scenario, count));
    }
    eprintln!(
        "{protocol:?} caught in {out:?} of {n} seeds each; first failure:\n{}",
        first.unwrap_or_default()
    );
    out
}

const SCENARIOS: [Scenario; 4] = [
    Scenario::Mixed,
    Scenario::DuelingOwners,
    Scenario::PausedOwner,
    Scenario::FenceDuringRecovery,
];

#[test]
fn ownership_holds_under_mixed_faults() {
    let s = run_seeds("ownership_holds_under_mixed_faults", Scenario::Mixed, SEEDS);
    if !replaying() {
        assert!(s.acked > 10_000, "too few acknowledgements: {s:?}");
        assert!(s.owned > 500, "too few completed takeovers: {s:?}");
        assert!(s.evictions > 100, "too few evictions: {s:?}");
        assert!(
            s.self_evicted > 10,
            "evicted processes rarely learned it: {s:?}"
        );
        assert!(
            s.superseded > 10,
            "replaced processes rarely woke up: {s:?}"
        );
    }
}

#[test]
fn dueling_owners_never_both_append() {
    let s = run_seeds(
        "dueling_owners_never_both_append",
        Scenario::DuelingOwners,
        SEEDS,
    );
    if !replaying() {
        assert!(
            s.dual_writer_steps > 1_000,
            "two writers rarely coexisted: {s:?}"
        );
        assert!(s.stale_refused > 200, "stale owners rarely fenced: {s:?}");
    }
}

#[test]
fn lease_expiry_while_paused_fences_the_resumed_owner() {
    let s = run_seeds(
        "lease_expiry_while_paused_fences_the_resumed_owner",
        Scenario::PausedOwner,
        SEEDS,
    );
    if !replaying() {
        assert!(
            s.paused_owner_evicted > 100,
            "paused owners rarely evicted: {s:?}"
        );
        assert!(
            s.resumed_owner_fenced > 50,
            "resumed owners rarely fenced: {s:?}"
        );
        assert!(
            s.refused_evicted > 20,
            "storage rarely refused an evicted generation: {s:?}"
        );
    }
}

#[test]
fn a_third_owner_fences_an_owner_still_recovering() {
    let s = run_seeds(
        "a_third_owner_fences_an_owner_still_recovering",
        Scenario::FenceDuringRecovery,
        SEEDS,
    );
    if !replaying() {
        assert!(
            s.recovery_overtaken > 200,
            "recoveries rarely overtaken: {s:?}"
        );
    }
}

#[test]
fn an_owner_that_skips_fencing_is_caught() {
    for (scenario, n) in caught(Protocol::SkipFence, BROKEN_SEEDS) {
        assert!(
            n > 0,
            "{scenario:?}: {BROKEN_SEEDS} seeds never caught an unfenced takeover"
        );
    }
}

#[test]
fn a_late_owner_claim_that_overwrites_a_newer_one_is_caught() {
    // Rarer than the others: it needs a takeover's claim to land after a newer one's.
    let caught = caught(Protocol::ClaimOverwrites, 2 * BROKEN_SEEDS);
    assert!(
        caught.iter().any(|(_, n)| *n > 0),
        "no seed caught a late claim: {caught:?}"
    );
}

#[test]
fn an_epoch_written_without_compare_and_swap_is_caught() {
    for (scenario, n) in caught(Protocol::BlindEpoch, BROKEN_SEEDS) {
        assert!(
            n > 0,
            "{scenario:?}: {BROKEN_SEEDS} seeds never caught a blind epoch write"
        );
    }
}

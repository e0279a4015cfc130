//! Deterministic simulation of the fencing and recovery protocol (RFC 0001).
//!
//! It drives the same I/O-free state machines the real client and node use
//! ([`AppendQuorum`], [`Recovery`], [`SegmentRules`], [`choose_ensemble`]) through seeded
//! schedules of message loss, reordering and duplication-free redelivery, storage node
//! crashes (losing everything not fsync'd) and restarts, timeouts, dueling writers that
//! take the log over from each other (stale ones keep appending), and writers that switch
//! to a new segment (ensemble change or roll) mid-stream. After every step it checks the invariants of the RFC:
//! no acknowledged entry is lost or changed, sealed prefixes are fully replicated, and a
//! fenced epoch never gets an entry acknowledged past the sealed end of its segment.
//! At the end it heals the cluster, runs a last takeover, and checks that the log holds
//! every acknowledged entry, in each writer's acknowledgement order, with nothing
//! duplicated. The schedule mix was checked against deliberately broken protocols (no
//! fence check on append, a fence quorum one too small, absence counted from unfenced
//! members, recovery skipping the entry after the LAC): each one fails within the seeds run.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use warren_common::{NodeId, Zone};
use warren_storage::protocol::placement::{Candidate, choose_ensemble};
use warren_storage::protocol::quorum::{AppendQuorum, SendEntry};
use warren_storage::protocol::recovery::{
    EntryAnswer, FenceAnswer, Recovery, RecoveryAction, RecoveryFailure,
};
use warren_storage::protocol::segment::{SegmentRules, Tail};

const NODES: usize = 4;
const QW: usize = 3;
const QA: usize = 2;

#[derive(Clone, Debug)]
struct Segment {
    id: u64,
    epoch: u64,
    ensemble: Vec<usize>,
    end: Option<u64>,
}

#[derive(Clone, Debug, Default)]
struct Meta {
    epoch: u64,
    segments: Vec<Segment>,
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
    },
    Read {
        segment: u64,
        entry: u64,
    },
}

#[derive(Clone, Debug)]
enum Resp {
    Ok,
    Fenced(u64),
    FenceOk(Tail),
    Entry(Option<Bytes>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Append,
    RecFence,
    RecRead,
    RecWrite,
}

#[derive(Clone, Debug)]
struct Msg {
    writer: usize,
    // The segment the request is about, so that late answers for a segment the writer
    // has left are recognised (the real driver tags them with a generation).
    segment: u64,
    member: usize,
    entry: u64,
    purpose: Purpose,
    to_node: Option<(usize, Req)>,
    reply: Option<Resp>,
}

#[derive(Default)]
struct Node {
    up: bool,
    durable: Vec<Req>,
    pending: Vec<(Req, Msg)>,
    rules: HashMap<u64, SegmentRules>,
    entries: HashMap<(u64, u64), Bytes>,
}

impl Node {
    fn rebuild(&mut self) {
        self.rules.clear();
        self.entries.clear();
        for r in self.durable.clone() {
            match r {
                Req::Append {
                    segment,
                    entry,
                    lac,
                    payload,
                    ..
                } => {
                    self.rules
                        .entry(segment)
                        .or_default()
                        .replay_append(entry, lac);
                    self.entries.insert((segment, entry), payload);
                }
                Req::Fence { segment, epoch } => {
                    self.rules.entry(segment).or_default().replay_fence(epoch)
                }
                Req::Read { .. } => {}
            }
        }
    }
}

enum Phase {
    Recovering {
        segment: Segment,
        rec: Recovery,
    },
    Writing {
        segment: Segment,
        quorum: AppendQuorum,
        pending: Vec<Bytes>,
    },
    Dead,
}

struct Writer {
    epoch: u64,
    phase: Phase,
}

struct Sim {
    rng: StdRng,
    meta: Meta,
    nodes: Vec<Node>,
    net: Vec<Msg>,
    writers: Vec<Writer>,
    // Every acknowledged entry: (writer, segment id, entry id, payload), in ack order.
    acked: Vec<(usize, u64, u64, Bytes)>,
    next_payload: u64,
    node_ids: Vec<NodeId>,
    checked_acked: usize,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let nodes = (0..NODES)
            .map(|_| Node {
                up: true,
                ..Node::default()
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed),
            meta: Meta::default(),
            nodes,
            net: Vec::new(),
            writers: Vec::new(),
            acked: Vec::new(),
            next_payload: 0,
            node_ids: (0..NODES)
                .map(|i| NodeId(uuid::Uuid::from_u128(i as u128 + 1)))
                .collect(),
            checked_acked: 0,
        }
    }

    fn send(
        &mut self,
        writer: usize,
        node: usize,
        member: usize,
        entry: u64,
        purpose: Purpose,
        req: Req,
    ) {
        let segment = match &req {
            Req::Append { segment, .. }
            | Req::Fence { segment, .. }
            | Req::Read { segment, .. } => *segment,
        };
        self.net.push(Msg {
            writer,
            segment,
            member,
            entry,
            purpose,
            to_node: Some((node, req)),
            reply: None,
        });
    }

    /// Start a takeover: raise the epoch (a CAS on the register), then recover or open.
    fn start_writer(&mut self) {
        self.meta.epoch += 1;
        let epoch = self.meta.epoch;
        let w = self.writers.len();
        self.writers.push(Writer {
            epoch,
            phase: Phase::Dead,
        });
        match self.meta.segments.last().cloned() {
            Some(seg) if seg.end.is_none() => {
                let (rec, actions) = Recovery::start(seg.ensemble.len(), QA);
                self.writers[w].phase = Phase::Recovering {
                    segment: seg.clone(),
                    rec,
                };
                self.issue_recovery(w, &seg, actions);
                self.check_recovery_done(w);
            }
            _ => self.open_segment(w, None),
        }
    }

    fn issue_recovery(&mut self, w: usize, seg: &Segment, actions: Vec<RecoveryAction>) {
        let epoch = self.writers[w].epoch;
        for a in actions {
            match a {
                RecoveryAction::Fence { member } => self.send(
                    w,
                    seg.ensemble[member],
                    member,
                    0,
                    Purpose::RecFence,
                    Req::Fence {
                        segment: seg.id,
                        epoch,
                    },
                ),
                RecoveryAction::Read { member, entry } => self.send(
                    w,
                    seg.ensemble[member],
                    member,
                    entry,
                    Purpose::RecRead,
                    Req::Read {
                        segment: seg.id,
                        entry,
                    },
                ),
                RecoveryAction::Write {
                    member,
                    entry,
                    payload,
                } => self.send(
                    w,
                    seg.ensemble[member],
                    member,
                    entry,
                    Purpose::RecWrite,
                    Req::Append {
                        segment: seg.id,
                        epoch,
                        entry,
                        lac: None,
                        payload,
                    },
                ),
            }
        }
    }

    fn check_recovery_done(&mut self, w: usize) {
        let outcome = match &self.writers[w].phase {
            Phase::Recovering { rec, .. } => rec.outcome(),
            _ => return,
        };
        match outcome {
            None => {}
            Some(Ok(end)) => self.open_segment(w, Some(end)),
            Some(Err(RecoveryFailure::Superseded(_))) | Some(Err(RecoveryFailure::Unavailable)) => {
                self.writers[w].phase = Phase::Dead
            }
        }
    }

    /// The second CAS of a takeover: conditional on the epoch, seal the recovered segment
    /// and append a new one.
    fn open_segment(&mut self, w: usize, end: Option<u64>) {
        let epoch = self.writers[w].epoch;
        if self.meta.epoch != epoch {
            self.writers[w].phase = Phase::Dead;
            return;
        }
        if let Some(end) = end {
            let last = self.meta.segments.last_mut().unwrap();
            assert!(last.end.is_none_or(|e| e == end));
            if end == 0 {
                self.meta.segments.pop();
            } else {
                last.end = Some(end);
            }
        }
        let id: u64 = self.rng.random();
        let candidates: Vec<Candidate> = self
            .node_ids
            .iter()
            .enumerate()
            .map(|(i, id)| Candidate {
                id: *id,
                zone: Zone(format!("z{i}")),
                live: self.nodes[i].up,
            })
            .collect();
        let ensemble: Vec<usize> = choose_ensemble(&candidates, QW, 1, id, &[])
            .into_iter()
            .map(|n| self.node_ids.iter().position(|x| *x == n).unwrap())
            .collect();
        let segment = Segment {
            id,
            epoch,
            ensemble,
            end: None,
        };
        self.meta.segments.push(segment.clone());
        self.writers[w].phase = Phase::Writing {
            quorum: AppendQuorum::new(ensemble_len(&segment), QA, 0),
            segment,
            pending: Vec::new(),
        };
    }

    fn append(&mut self, w: usize) {
        let payload = Bytes::from(format!("p{}", self.next_payload));
        self.next_payload += 1;
        let epoch = self.writers[w].epoch;
        let Phase::Writing {
            segment,
            quorum,
            pending,
        } = &mut self.writers[w].phase
        else {
            return;
        };
        let (_, sends) = quorum.push(payload.clone());
        pending.push(payload);
        let segment = segment.clone();
        self.send_entries(w, &segment, epoch, sends);
    }

    fn send_entries(&mut self, w: usize, segment: &Segment, epoch: u64, sends: Vec<SendEntry>) {
        for s in sends {
            self.send(
                w,
                segment.ensemble[s.member],
                s.member,
                s.entry,
                Purpose::Append,
                Req::Append {
                    segment: segment.id,
                    epoch,
                    entry: s.entry,
                    lac: s.lac,
                    payload: s.payload,
                },
            );
        }
    }

    /// A node handles a request: refusals and reads answer at once, changes answer after
    /// the fsync that covers them.
    fn node_receive(&mut self, node: usize, req: Req, msg: Msg) {
        let n = &mut self.nodes[node];
        if !n.up {
            return;
        }
        let reply = |m: &Msg, r: Resp| Msg {
            to_node: None,
            reply: Some(r),
            ..m.clone()
        };
        match &req {
            Req::Append {
                segment,
                epoch,
                entry,
                lac,
                ..
            } => match n
                .rules
                .entry(*segment)
                .or_default()
                .append(*epoch, *entry, *lac)
            {
                Err(f) => self.net.push(reply(&msg, Resp::Fenced(f))),
                Ok(()) => n.pending.push((req, reply(&msg, Resp::Ok))),
            },
            Req::Fence { segment, epoch } => {
                match n.rules.entry(*segment).or_default().fence(*epoch) {
                    Err(f) => self.net.push(reply(&msg, Resp::Fenced(f))),
                    Ok(tail) => n.pending.push((req, reply(&msg, Resp::FenceOk(tail)))),
                }
            }
            Req::Read { segment, entry } => {
                let e = n.entries.get(&(*segment, *entry)).cloned();
                self.net.push(reply(&msg, Resp::Entry(e)));
            }
        }
    }

    fn fsync(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        for (req, answer) in std::mem::take(&mut n.pending) {
            if let Req::Append {
                segment,
                entry,
                payload,
                ..
            } = &req
            {
                n.entries.insert((*segment, *entry), payload.clone());
            }
            n.durable.push(req);
            self.net.push(answer);
        }
    }

    fn crash(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.up = false;
        // Requests lost with the crash time out at their senders.
        for (_, answer) in n.pending.drain(..) {
            self.net.push(Msg {
                reply: None,
                ..answer
            });
        }
        n.rebuild();
    }

    fn writer_receive(&mut self, msg: Msg, answer: Option<Resp>) {
        let w = msg.writer;
        let epoch = self.writers[w].epoch;
        match &mut self.writers[w].phase {
            Phase::Dead => {}
            Phase::Recovering { segment, rec } => {
                let segment = segment.clone();
                let actions = match msg.purpose {
                    Purpose::RecFence => rec.on_fence(
                        msg.member,
                        match answer {
                            Some(Resp::FenceOk(t)) => FenceAnswer::Fenced {
                                last_entry: t.last_entry,
                                lac: t.lac,
                                end: t.end,
                            },
                            Some(Resp::Fenced(e)) => FenceAnswer::Superseded(e),
                            _ => FenceAnswer::Failed,
                        },
                    ),
                    Purpose::RecRead => rec.on_read(
                        msg.member,
                        msg.entry,
                        match answer {
                            Some(Resp::Entry(Some(p))) => EntryAnswer::Ok(Some(p)),
                            Some(Resp::Entry(None)) => EntryAnswer::Absent,
                            Some(Resp::Fenced(e)) => EntryAnswer::Superseded(e),
                            _ => EntryAnswer::Failed,
                        },
                    ),
                    Purpose::RecWrite => rec.on_write(
                        msg.member,
                        msg.entry,
                        match answer {
                            Some(Resp::Ok) => EntryAnswer::Ok(None),
                            Some(Resp::Fenced(e)) => EntryAnswer::Superseded(e),
                            _ => EntryAnswer::Failed,
                        },
                    ),
                    Purpose::Append => Vec::new(),
                };
                self.issue_recovery(w, &segment, actions);
                self.check_recovery_done(w);
            }
            Phase::Writing {
                segment,
                quorum,
                pending,
            } => {
                if msg.purpose != Purpose::Append || msg.segment != segment.id {
                    return;
                }
                match answer {
                    Some(Resp::Ok) => {
                        let base = quorum.resolved();
                        let range = quorum.on_ack(msg.member, msg.entry);
                        for e in range {
                            let p = pending[(e - base) as usize].clone();
                            self.acked.push((w, segment.id, e, p));
                        }
                        let n = (quorum.resolved() - base) as usize;
                        pending.drain(..n);
                    }
                    Some(Resp::Fenced(_)) => {
                        self.writers[w].phase = Phase::Dead;
                    }
                    _ => {
                        quorum.on_member_down(msg.member);
                    }
                }
            }
        }
        let _ = epoch;
    }

    fn writer_members(&self, w: usize) -> usize {
        match &self.writers[w].phase {
            Phase::Writing { segment, .. } => segment.ensemble.len(),
            _ => 0,
        }
    }

    /// A writer whose member is marked down tries it again (the driver's reconnect).
    fn member_up(&mut self, w: usize, member: usize) {
        let epoch = self.writers[w].epoch;
        if let Phase::Writing {
            segment, quorum, ..
        } = &mut self.writers[w].phase
            && quorum.is_down(member)
        {
            let sends = quorum.on_member_up(member);
            let segment = segment.clone();
            self.send_entries(w, &segment, epoch, sends);
        }
    }

    /// The writer seals its segment at its last resolved entry and continues in a new
    /// segment (ensemble change or roll), moving its unresolved entries there in order. The
    /// descriptor change is a CAS conditional on the writer's epoch.
    fn switch(&mut self, w: usize) {
        let epoch = self.writers[w].epoch;
        let Phase::Writing {
            segment,
            quorum,
            pending,
        } = &mut self.writers[w].phase
        else {
            return;
        };
        if self.meta.epoch != epoch {
            self.writers[w].phase = Phase::Dead;
            return;
        }
        let end = quorum.resolved();
        let moved = quorum.take_unresolved();
        assert_eq!(&moved, pending);
        pending.clear();
        let down: Vec<NodeId> = (0..segment.ensemble.len())
            .filter(|m| quorum.is_down(*m))
            .map(|m| self.node_ids[segment.ensemble[m]])
            .collect();
        let old_id = segment.id;
        let last = self.meta.segments.last_mut().unwrap();
        assert_eq!(
            last.id, old_id,
            "a writer switched a segment that is not last"
        );
        if end == 0 {
            self.meta.segments.pop();
        } else {
            last.end = Some(end);
        }
        let id: u64 = self.rng.random();
        let candidates: Vec<Candidate> = self
            .node_ids
            .iter()
            .enumerate()
            .map(|(i, id)| Candidate {
                id: *id,
                zone: Zone(format!("z{i}")),
                live: self.nodes[i].up,
            })
            .collect();
        let mut chosen = choose_ensemble(&candidates, QW, 1, id, &down);
        if chosen.len() < QA {
            chosen = choose_ensemble(&candidates, QW, 1, id, &[]);
        }
        let ensemble: Vec<usize> = chosen
            .into_iter()
            .map(|n| self.node_ids.iter().position(|x| *x == n).unwrap())
            .collect();
        let new = Segment {
            id,
            epoch,
            ensemble,
            end: None,
        };
        self.meta.segments.push(new.clone());
        let mut quorum = AppendQuorum::new(ensemble_len(&new), QA, 0);
        let mut sends = Vec::new();
        for p in &moved {
            sends.extend(quorum.push(p.clone()).1);
        }
        self.writers[w].phase = Phase::Writing {
            segment: new.clone(),
            quorum,
            pending: moved,
        };
        self.send_entries(w, &new, epoch, sends);
    }

    fn step(&mut self, faults: bool) {
        let roll = self.rng.random_range(0..1000);
        let live_writers: Vec<usize> = (0..self.writers.len())
            .filter(|w| !matches!(self.writers[*w].phase, Phase::Dead))
            .collect();
        match roll {
            0..=599 if !self.net.is_empty() => {
                // Deliver a random message: the network reorders freely.
                let i = self.rng.random_range(0..self.net.len());
                let msg = self.net.swap_remove(i);
                if faults && self.rng.random_range(0..100) < 3 {
                    // Lost; the sender times out.
                    let failed = Msg {
                        to_node: None,
                        reply: None,
                        ..msg
                    };
                    self.writer_receive(failed, None);
                    return;
                }
                match msg.to_node.clone() {
                    Some((node, req)) => {
                        if self.nodes[node].up {
                            self.node_receive(node, req, msg);
                        } else {
                            self.writer_receive(msg, None);
                        }
                    }
                    None => {
                        let answer = msg.reply.clone();
                        self.writer_receive(msg, answer);
                    }
                }
            }
            0..=719 => {
                // Group commit on a node with something queued.
                let busy: Vec<usize> = (0..NODES)
                    .filter(|n| !self.nodes[*n].pending.is_empty())
                    .collect();
                if !busy.is_empty() {
                    let n = busy[self.rng.random_range(0..busy.len())];
                    self.fsync(n);
                }
            }
            720..=769 => {
                if let Some(&w) = live_writers.last() {
                    self.append(w);
                } else {
                    self.start_writer();
                }
            }
            770..=799 => {
                // Any live writer may append, including a stale one.
                if !live_writers.is_empty() {
                    let w = live_writers[self.rng.random_range(0..live_writers.len())];
                    self.append(w);
                }
            }
            800..=809 => self.start_writer(),
            990..=999 => {
                if let Some(&w) = live_writers.last() {
                    self.switch(w);
                }
            }
            810..=824 if faults => {
                let n = self.rng.random_range(0..NODES);
                let up = self.nodes.iter().filter(|n| n.up).count();
                if self.nodes[n].up && up > QA {
                    self.crash(n);
                }
            }
            825..=864 => {
                let n = self.rng.random_range(0..NODES);
                self.nodes[n].up = true;
            }
            _ => {
                // Writers reconnect to members whose node is reachable again.
                for w in live_writers {
                    for m in 0..QW.min(self.writer_members(w)) {
                        let node = match &self.writers[w].phase {
                            Phase::Writing { segment, .. } => segment.ensemble[m],
                            _ => continue,
                        };
                        if self.nodes[node].up {
                            self.member_up(w, m);
                        }
                    }
                }
            }
        }
    }

    fn durable_copies(&self, segment: &Segment, entry: u64) -> Vec<Bytes> {
        segment
            .ensemble
            .iter()
            .filter_map(|n| self.nodes[*n].entries.get(&(segment.id, entry)).cloned())
            .collect()
    }

    /// Check the invariants. Durable data is never lost (crashes drop only what was not
    /// fsync'd), so content is checked once, when an entry is acknowledged or sealed.
    fn check(&mut self, prev_meta: &Meta) {
        // I3: the epoch never goes back; sealed ends never change.
        assert!(self.meta.epoch >= prev_meta.epoch);
        let prev_ends: HashMap<u64, Option<u64>> =
            prev_meta.segments.iter().map(|s| (s.id, s.end)).collect();
        for (i, s) in self.meta.segments.iter().enumerate() {
            if i + 1 < self.meta.segments.len() {
                assert!(s.end.is_some(), "only the last segment may be open");
            }
            match prev_ends.get(&s.id) {
                Some(Some(end)) => assert_eq!(s.end, Some(*end), "a sealed end changed"),
                _ => {
                    // Newly sealed: the whole prefix is on Qa disks, one content per entry.
                    if let Some(end) = s.end {
                        for e in 0..end {
                            let copies = self.durable_copies(s, e);
                            assert!(
                                copies.len() >= QA,
                                "sealed entry {e} has {} copies",
                                copies.len()
                            );
                            assert!(copies.windows(2).all(|c| c[0] == c[1]));
                        }
                    }
                }
            }
        }
        let segs: HashMap<u64, &Segment> = self.meta.segments.iter().map(|s| (s.id, s)).collect();
        // I1 and I2: every acknowledged entry is in the log, below its segment's sealed end.
        for (n, (w, seg_id, entry, payload)) in self.acked.iter().enumerate() {
            let seg = segs
                .get(seg_id)
                .unwrap_or_else(|| panic!("segment of an acknowledged entry vanished"));
            assert_eq!(seg.epoch, self.writers[*w].epoch);
            if let Some(end) = seg.end {
                assert!(
                    *entry < end,
                    "acknowledged entry {entry} beyond sealed end {end}"
                );
            }
            if n >= self.checked_acked {
                let copies = self.durable_copies(seg, *entry);
                assert!(
                    copies.len() >= QA,
                    "acknowledged entry has {} copies",
                    copies.len()
                );
                assert!(
                    copies.iter().all(|c| c == payload),
                    "an entry's content changed"
                );
            }
        }
        self.checked_acked = self.acked.len();
    }

    /// Heal everything and take the log over once more without faults; return its content.
    fn final_log(&mut self) -> Vec<Bytes> {
        for n in 0..NODES {
            self.nodes[n].up = true;
        }
        self.start_writer();
        let w = self.writers.len() - 1;
        for _ in 0..100_000 {
            if matches!(self.writers[w].phase, Phase::Writing { .. } | Phase::Dead) {
                break;
            }
            if self.net.is_empty() {
                for n in 0..NODES {
                    self.fsync(n);
                }
            }
            if let Some(msg) = self.net.pop() {
                match msg.to_node.clone() {
                    Some((node, req)) => self.node_receive(node, req, msg),
                    None => {
                        let answer = msg.reply.clone();
                        self.writer_receive(msg, answer);
                    }
                }
            }
        }
        assert!(
            matches!(self.writers[w].phase, Phase::Writing { .. }),
            "the final takeover did not complete on a healed cluster"
        );
        let mut out = Vec::new();
        for s in &self.meta.segments {
            for e in 0..s.end.unwrap_or(0) {
                out.push(self.durable_copies(s, e)[0].clone());
            }
        }
        out
    }
}

fn ensemble_len(s: &Segment) -> usize {
    s.ensemble.len()
}

fn run(seed: u64, steps: usize) -> (usize, usize) {
    let mut sim = Sim::new(seed);
    sim.start_writer();
    for i in 0..steps {
        let before = sim.meta.clone();
        sim.step(i < steps * 9 / 10);
        sim.check(&before);
    }
    let log = sim.final_log();
    // The log holds every acknowledged entry in acknowledgement order, nothing twice.
    let mut index = BTreeMap::new();
    for (i, p) in log.iter().enumerate() {
        assert!(
            index.insert(p.clone(), i).is_none(),
            "entry {p:?} twice in the log"
        );
    }
    // Each writer's acknowledgements come in log order.
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (w, _, _, p) in &sim.acked {
        let at = *index
            .get(p)
            .unwrap_or_else(|| panic!("seed {seed}: acknowledged {p:?} lost"));
        if let Some(l) = last.insert(*w, at) {
            assert!(at > l, "seed {seed}: acknowledgement order broken");
        }
    }
    (sim.acked.len(), sim.writers.len())
}

#[test]
fn fencing_and_recovery_hold_under_seeded_faults() {
    let mut acked = 0;
    let mut writers = 0;
    for seed in 0..400 {
        let (a, w) = run(seed, 1500);
        acked += a;
        writers += w;
    }
    eprintln!("{acked} acknowledgements, {writers} takeovers");
    // The schedules must actually exercise the protocol, not just fail everything.
    assert!(acked > 4_000, "only {acked} acknowledgements in all runs");
    assert!(writers > 3_000, "only {writers} takeovers in all runs");
}

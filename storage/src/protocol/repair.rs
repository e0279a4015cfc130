//! Re-replication of sealed segments (RFC 0003), without I/O: which segments need work,
//! where each missing copy comes from, and whether another node's repair claim lapsed.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use warren_common::{LogId, NodeId};

use crate::meta::{RepairClaim, SegmentMeta};

/// What a sealed segment needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentNeeds {
    /// Indexes in the ensemble of members that are gone for good (evicted, or no longer
    /// registered): their copies must be rebuilt on other nodes.
    pub replace: Vec<usize>,
    /// Some members may lack entries below the seal (the segment is flagged
    /// `under_replicated`): every member must be checked and refilled.
    pub refill: bool,
}

/// What `segment` needs, or `None` if nothing (or if it is still open: its writer's
/// ensemble change, or the next takeover, deals with an open segment).
pub fn segment_needs(
    segment: &SegmentMeta,
    gone: impl Fn(&NodeId) -> bool,
) -> Option<SegmentNeeds> {
    segment.end?;
    let replace: Vec<usize> = (0..segment.ensemble.len())
        .filter(|i| gone(&segment.ensemble[*i]))
        .collect();
    (!replace.is_empty() || segment.under_replicated).then_some(SegmentNeeds {
        replace,
        refill: segment.under_replicated,
    })
}

/// For each entry `0..end` that `present[target]` lacks, the member to copy it from.
/// `present[m]` is `None` for a member that could not be read (gone or unreachable).
/// `Err(entry)` names the first missing entry that no readable member has.
pub fn copy_plan(
    end: u64,
    present: &[Option<BTreeSet<u64>>],
    target: usize,
) -> Result<Vec<(u64, usize)>, u64> {
    let has = |m: usize, e: u64| present[m].as_ref().is_some_and(|p| p.contains(&e));
    let mut plan = Vec::new();
    // The previous entry's source first, so copies are read in runs from one member.
    let mut last_source = None;
    for entry in 0..end {
        if has(target, entry) {
            continue;
        }
        let source = last_source
            .filter(|s| has(*s, entry))
            .or_else(|| (0..present.len()).find(|m| *m != target && has(*m, entry)))
            .ok_or(entry)?;
        last_source = Some(source);
        plan.push((entry, source));
    }
    Ok(plan)
}

/// Whether this node may take a log's repair claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimVerdict {
    /// Nobody holds it.
    Free,
    /// Another repair holds it and has renewed it recently enough.
    Held,
    /// Its holder stopped renewing it (or it was left by an earlier process of this node).
    Lapsed,
}

/// Judges other nodes' repair claims without comparing clocks across nodes: a claim whose
/// token this node has seen unchanged for `lease` on its own monotonic clock has lapsed.
#[derive(Debug)]
pub struct ClaimWatch {
    lease: Duration,
    seen: HashMap<LogId, (u64, Instant)>,
}

impl ClaimWatch {
    /// A watch that lets claims lapse after `lease` without renewal.
    pub fn new(lease: Duration) -> Self {
        ClaimWatch {
            lease,
            seen: HashMap::new(),
        }
    }

    /// Judge `claim` on `log` as seen at `now`. `me` is this node; `held_here` says whether
    /// a repair in this process holds the log's claim.
    pub fn judge(
        &mut self,
        log: LogId,
        claim: Option<&RepairClaim>,
        me: NodeId,
        held_here: bool,
        now: Instant,
    ) -> ClaimVerdict {
        let Some(claim) = claim else {
            self.seen.remove(&log);
            return ClaimVerdict::Free;
        };
        if held_here {
            return ClaimVerdict::Held;
        }
        if claim.by == me {
            // Nothing in this process holds it: an earlier run of this node left it.
            self.seen.remove(&log);
            return ClaimVerdict::Lapsed;
        }
        match self.seen.get(&log) {
            Some((token, since)) if *token == claim.token => {
                if now.saturating_duration_since(*since) >= self.lease {
                    self.seen.remove(&log);
                    ClaimVerdict::Lapsed
                } else {
                    ClaimVerdict::Held
                }
            }
            _ => {
                self.seen.insert(log, (claim.token, now));
                ClaimVerdict::Held
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use warren_common::{Epoch, SegmentId};

    fn segment(n: usize, end: Option<u64>, under: bool) -> SegmentMeta {
        SegmentMeta {
            id: SegmentId(1),
            epoch: Epoch(1),
            ensemble: (0..n).map(|_| NodeId::random()).collect(),
            ack_quorum: 2,
            end,
            under_replicated: under,
        }
    }

    #[test]
    fn only_sealed_segments_with_a_gone_member_or_a_flag_need_repair() {
        let s = segment(3, Some(10), false);
        assert_eq!(segment_needs(&s, |_| false), None);
        let lost = s.ensemble[1];
        assert_eq!(
            segment_needs(&s, |n| *n == lost),
            Some(SegmentNeeds {
                replace: vec![1],
                refill: false
            })
        );
        let open = segment(3, None, true);
        assert_eq!(segment_needs(&open, |_| true), None);
        let flagged = segment(3, Some(4), true);
        assert_eq!(
            segment_needs(&flagged, |_| false),
            Some(SegmentNeeds {
                replace: vec![],
                refill: true
            })
        );
    }

    #[test]
    fn every_missing_entry_has_a_source_or_the_plan_names_it() {
        let set = |v: &[u64]| Some(v.iter().copied().collect::<BTreeSet<u64>>());
        // Member 0 is gone, 1 has 0..3, 2 has 2..5; the target 3 is new.
        let present = vec![None, set(&[0, 1, 2]), set(&[2, 3, 4]), set(&[])];
        assert_eq!(
            copy_plan(5, &present, 3),
            Ok(vec![(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)])
        );
        // Refilling member 2 only copies what it lacks.
        assert_eq!(copy_plan(5, &present, 2), Ok(vec![(0, 1), (1, 1)]));
        // Entry 5 is on no readable member.
        assert_eq!(copy_plan(6, &present, 3), Err(5));
        assert_eq!(copy_plan(0, &present, 3), Ok(vec![]));
    }

    #[test]
    fn a_claim_lapses_only_after_its_token_stayed_the_same_for_a_lease() {
        let lease = Duration::from_secs(60);
        let mut w = ClaimWatch::new(lease);
        let (log, me, other) = (LogId::random(), NodeId::random(), NodeId::random());
        let t0 = Instant::now();
        assert_eq!(w.judge(log, None, me, false, t0), ClaimVerdict::Free);
        let c1 = RepairClaim {
            by: other,
            token: 1,
        };
        assert_eq!(w.judge(log, Some(&c1), me, false, t0), ClaimVerdict::Held);
        assert_eq!(
            w.judge(log, Some(&c1), me, false, t0 + lease / 2),
            ClaimVerdict::Held
        );
        // Renewed: the wait starts over.
        let c2 = RepairClaim {
            by: other,
            token: 2,
        };
        assert_eq!(
            w.judge(log, Some(&c2), me, false, t0 + lease),
            ClaimVerdict::Held
        );
        assert_eq!(
            w.judge(log, Some(&c2), me, false, t0 + lease + lease / 2),
            ClaimVerdict::Held
        );
        assert_eq!(
            w.judge(log, Some(&c2), me, false, t0 + lease * 2),
            ClaimVerdict::Lapsed
        );
        // Our own claim: held by a task here, or left by an earlier run.
        let mine = RepairClaim { by: me, token: 3 };
        assert_eq!(w.judge(log, Some(&mine), me, true, t0), ClaimVerdict::Held);
        assert_eq!(
            w.judge(log, Some(&mine), me, false, t0),
            ClaimVerdict::Lapsed
        );
    }
}

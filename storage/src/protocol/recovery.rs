//! Recovery of an open segment by a new writer (RFC 0001, takeover steps 2–4): fence the
//! ensemble, find the last entry that may have been acknowledged, re-replicate the tail
//! above the last-add-confirmed at the new epoch, and report where to seal.

use bytes::Bytes;

/// Something the driver must send to one ensemble member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryAction {
    /// Fence the segment at the recovery epoch.
    Fence {
        /// Member index.
        member: usize,
    },
    /// Read one entry.
    Read {
        /// Member index.
        member: usize,
        /// Entry id.
        entry: u64,
    },
    /// Write one recovered entry at the recovery epoch.
    Write {
        /// Member index.
        member: usize,
        /// Entry id.
        entry: u64,
        /// The entry's bytes.
        payload: Bytes,
    },
}

/// A storage node's answer to a fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceAnswer {
    /// Fenced; the node's tail state.
    Fenced {
        /// Highest entry stored.
        last_entry: Option<u64>,
        /// Highest last-add-confirmed seen.
        lac: Option<u64>,
        /// Sealed end, if the node has the seal.
        end: Option<u64>,
    },
    /// The node is fenced at a higher epoch: a newer writer exists.
    Superseded(u64),
    /// No answer (unreachable, timed out, error).
    Failed,
}

/// A storage node's answer to a read or a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryAnswer {
    /// Read: the node has the entry. Write: it is durable.
    Ok(Option<Bytes>),
    /// Read: the node does not have the entry.
    Absent,
    /// The node is fenced at a higher epoch: a newer writer exists.
    Superseded(u64),
    /// No answer.
    Failed,
}

/// Why recovery failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryFailure {
    /// A newer epoch fenced the segment: give up, another writer owns the log.
    Superseded(u64),
    /// Too few members answered; the takeover can be retried.
    Unavailable,
}

#[derive(Debug)]
enum Phase {
    Fencing,
    Reading {
        entry: u64,
        answered: u64,
        absent_fenced: usize,
    },
    Writing {
        entry: u64,
        answered: u64,
        acks: usize,
    },
    Done(Result<u64, RecoveryFailure>),
}

/// A fenced member's (last entry, last-add-confirmed, sealed end).
type TailState = (Option<u64>, Option<u64>, Option<u64>);

/// The recovery of one segment.
#[derive(Debug)]
pub struct Recovery {
    members: usize,
    ack_quorum: usize,
    // Fence answers by member; `Some` means that member is fenced at our epoch.
    fenced: Vec<Option<TailState>>,
    failed: Vec<bool>,
    // Highest entry any fenced member holds; nothing above it can have been acknowledged.
    last: Option<u64>,
    phase: Phase,
}

impl Recovery {
    /// Start recovering a segment with `members` ensemble members and ack quorum
    /// `ack_quorum`; returns the fences to send.
    pub fn start(members: usize, ack_quorum: usize) -> (Self, Vec<RecoveryAction>) {
        assert!(members <= 64 && ack_quorum >= 1 && ack_quorum <= members);
        let r = Recovery {
            members,
            ack_quorum,
            fenced: vec![None; members],
            failed: vec![false; members],
            last: None,
            phase: Phase::Fencing,
        };
        let actions = (0..members)
            .map(|member| RecoveryAction::Fence { member })
            .collect();
        (r, actions)
    }

    /// `Some(Ok(end))` once the segment is recovered and should be sealed with entries
    /// `0..end`; `Some(Err(_))` if recovery failed.
    pub fn outcome(&self) -> Option<Result<u64, RecoveryFailure>> {
        match self.phase {
            Phase::Done(r) => Some(r),
            _ => None,
        }
    }

    /// Whether every member answered the fence and holds entries up to `end` (else the
    /// sealed segment should be repaired). Gaps below a member's last entry are not seen
    /// here; a writer that had a member down marks its segment itself.
    pub fn all_members_reached(&self, end: u64) -> bool {
        self.failed.iter().all(|f| !f)
            && self.fenced.iter().all(|t| {
                t.is_some_and(|(last, _, sealed)| {
                    sealed.is_some() || end == 0 || last.is_some_and(|l| l + 1 >= end)
                })
            })
    }

    // Members fenced at our epoch needed to rule out any old-epoch acknowledgement.
    fn fence_quorum(&self) -> usize {
        self.members - self.ack_quorum + 1
    }

    fn fail(&mut self, f: RecoveryFailure) -> Vec<RecoveryAction> {
        self.phase = Phase::Done(Err(f));
        Vec::new()
    }

    /// Feed a fence answer from `member`.
    pub fn on_fence(&mut self, member: usize, answer: FenceAnswer) -> Vec<RecoveryAction> {
        if member >= self.members || self.outcome().is_some() {
            return Vec::new();
        }
        match answer {
            FenceAnswer::Superseded(e) => return self.fail(RecoveryFailure::Superseded(e)),
            FenceAnswer::Failed => self.failed[member] = true,
            FenceAnswer::Fenced {
                last_entry,
                lac,
                end,
            } => {
                self.fenced[member] = Some((last_entry, lac, end));
                self.last = self.last.max(last_entry);
            }
        }
        if !matches!(self.phase, Phase::Fencing) {
            // A late fence answer only adds evidence; the phase in progress goes on.
            return Vec::new();
        }
        let fenced: Vec<_> = self.fenced.iter().flatten().copied().collect();
        let failed = self.failed.iter().filter(|f| **f).count();
        if fenced.len() < self.fence_quorum() {
            if self.members - failed < self.fence_quorum() {
                return self.fail(RecoveryFailure::Unavailable);
            }
            return Vec::new();
        }
        if let Some(end) = fenced.iter().find_map(|(_, _, end)| *end) {
            // A node only learns a seal after it was recorded in metadata: it is final.
            self.phase = Phase::Done(Ok(end));
            return Vec::new();
        }
        let lac = fenced.iter().filter_map(|(_, lac, _)| *lac).max();
        let start = lac.map_or(0, |l| l + 1);
        self.read(start)
    }

    fn read(&mut self, entry: u64) -> Vec<RecoveryAction> {
        if self.last.is_none_or(|last| entry > last) {
            // Every fenced member lacks this entry, so it never reached the ack quorum.
            self.phase = Phase::Done(Ok(entry));
            return Vec::new();
        }
        self.phase = Phase::Reading {
            entry,
            answered: 0,
            absent_fenced: 0,
        };
        let mut actions = Vec::new();
        for member in 0..self.members {
            if self.failed[member] {
                self.note_answered(member);
            } else {
                actions.push(RecoveryAction::Read { member, entry });
            }
        }
        actions.extend(self.check_read_exhausted());
        actions
    }

    fn note_answered(&mut self, member: usize) {
        if let Phase::Reading { answered, .. } | Phase::Writing { answered, .. } = &mut self.phase {
            *answered |= 1 << member;
        }
    }

    fn check_read_exhausted(&mut self) -> Vec<RecoveryAction> {
        if let Phase::Reading { answered, .. } = self.phase
            && answered.count_ones() as usize == self.members
        {
            return self.fail(RecoveryFailure::Unavailable);
        }
        Vec::new()
    }

    /// Feed a read answer from `member` for `entry`.
    pub fn on_read(
        &mut self,
        member: usize,
        entry: u64,
        answer: EntryAnswer,
    ) -> Vec<RecoveryAction> {
        let Phase::Reading {
            entry: want,
            answered,
            ..
        } = self.phase
        else {
            return Vec::new();
        };
        if member >= self.members || entry != want || answered & (1 << member) != 0 {
            return Vec::new();
        }
        self.note_answered(member);
        match answer {
            EntryAnswer::Ok(Some(payload)) => {
                self.phase = Phase::Writing {
                    entry,
                    answered: 0,
                    acks: 0,
                };
                let mut actions = Vec::new();
                for m in 0..self.members {
                    if self.failed[m] {
                        self.note_answered(m);
                    } else {
                        actions.push(RecoveryAction::Write {
                            member: m,
                            entry,
                            payload: payload.clone(),
                        });
                    }
                }
                actions.extend(self.check_write_exhausted());
                return actions;
            }
            EntryAnswer::Ok(None) | EntryAnswer::Absent => {
                // Only a fenced member's absence is evidence: an unfenced one could still
                // receive the entry from the old writer.
                if self.fenced[member].is_some()
                    && let Phase::Reading { absent_fenced, .. } = &mut self.phase
                {
                    *absent_fenced += 1;
                    if *absent_fenced >= self.fence_quorum() {
                        self.phase = Phase::Done(Ok(entry));
                        return Vec::new();
                    }
                }
            }
            EntryAnswer::Superseded(e) => return self.fail(RecoveryFailure::Superseded(e)),
            EntryAnswer::Failed => self.failed[member] = true,
        }
        self.check_read_exhausted()
    }

    fn check_write_exhausted(&mut self) -> Vec<RecoveryAction> {
        if let Phase::Writing { answered, acks, .. } = self.phase {
            let outstanding = self.members - answered.count_ones() as usize;
            if acks + outstanding < self.ack_quorum {
                return self.fail(RecoveryFailure::Unavailable);
            }
        }
        Vec::new()
    }

    /// Feed a write answer from `member` for `entry`.
    pub fn on_write(
        &mut self,
        member: usize,
        entry: u64,
        answer: EntryAnswer,
    ) -> Vec<RecoveryAction> {
        let Phase::Writing {
            entry: want,
            answered,
            ..
        } = self.phase
        else {
            return Vec::new();
        };
        if member >= self.members || entry != want || answered & (1 << member) != 0 {
            return Vec::new();
        }
        self.note_answered(member);
        match answer {
            EntryAnswer::Ok(_) => {
                if let Phase::Writing { acks, .. } = &mut self.phase {
                    *acks += 1;
                    if *acks >= self.ack_quorum {
                        return self.read(entry + 1);
                    }
                }
                Vec::new()
            }
            EntryAnswer::Superseded(e) => self.fail(RecoveryFailure::Superseded(e)),
            EntryAnswer::Absent | EntryAnswer::Failed => {
                self.failed[member] = true;
                self.check_write_exhausted()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fenced(last: Option<u64>, lac: Option<u64>) -> FenceAnswer {
        FenceAnswer::Fenced {
            last_entry: last,
            lac,
            end: None,
        }
    }

    #[test]
    fn an_empty_segment_recovers_to_zero() {
        let (mut r, a) = Recovery::start(3, 2);
        assert_eq!(a.len(), 3);
        assert!(r.on_fence(0, fenced(None, None)).is_empty());
        assert_eq!(r.outcome(), None, "needs Qw - Qa + 1 = 2 fences");
        r.on_fence(1, fenced(None, None));
        assert_eq!(r.outcome(), Some(Ok(0)));
    }

    #[test]
    fn entries_above_lac_are_read_and_rewritten_then_absence_ends_recovery() {
        let (mut r, _) = Recovery::start(3, 2);
        r.on_fence(0, fenced(Some(5), Some(3)));
        let a = r.on_fence(1, fenced(Some(4), Some(2)));
        assert_eq!(a.len(), 3);
        assert!(a.contains(&RecoveryAction::Read {
            member: 2,
            entry: 4
        }));
        let p = Bytes::from_static(b"x");
        let w = r.on_read(2, 4, EntryAnswer::Ok(Some(p.clone())));
        assert_eq!(w.len(), 3);
        r.on_write(0, 4, EntryAnswer::Ok(None));
        let next = r.on_write(1, 4, EntryAnswer::Ok(None));
        assert!(next.contains(&RecoveryAction::Read {
            member: 0,
            entry: 5
        }));
        // Entry 5: absent on both fenced members, so it was never acknowledged.
        r.on_read(2, 5, EntryAnswer::Absent);
        assert_eq!(r.outcome(), None, "member 2 is not fenced: no evidence");
        r.on_read(0, 5, EntryAnswer::Absent);
        r.on_read(1, 5, EntryAnswer::Absent);
        assert_eq!(r.outcome(), Some(Ok(5)));
    }

    #[test]
    fn a_higher_fence_or_too_many_failures_end_recovery() {
        let (mut r, _) = Recovery::start(3, 2);
        r.on_fence(0, FenceAnswer::Superseded(9));
        assert_eq!(r.outcome(), Some(Err(RecoveryFailure::Superseded(9))));
        let (mut r, _) = Recovery::start(3, 2);
        r.on_fence(0, FenceAnswer::Failed);
        r.on_fence(1, FenceAnswer::Failed);
        assert_eq!(r.outcome(), Some(Err(RecoveryFailure::Unavailable)));
    }
}

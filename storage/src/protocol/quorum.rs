//! Quorum tracking for one writer on one segment: entries are sent to every ensemble member
//! and resolve, strictly in entry order, once `ack_quorum` members acknowledged them.

use bytes::Bytes;
use std::collections::VecDeque;

/// Send one entry to one ensemble member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendEntry {
    /// Index of the member in the ensemble.
    pub member: usize,
    /// Entry id.
    pub entry: u64,
    /// The entry's bytes.
    pub payload: Bytes,
    /// The last entry known at the ack quorum when this was sent.
    pub lac: Option<u64>,
}

#[derive(Debug)]
struct Pending {
    payload: Bytes,
    // Bit i set: member i acknowledged. Ensembles are far smaller than 64.
    acks: u64,
}

/// Tracks in-flight entries of one segment writer.
#[derive(Debug)]
pub struct AppendQuorum {
    members: usize,
    ack_quorum: usize,
    down: Vec<bool>,
    /// Entries below this id are resolved; `pending[0]` has this id.
    resolved: u64,
    pending: VecDeque<Pending>,
    first: u64,
    // Acknowledgements received from each member, late ones included.
    acks: Vec<u64>,
}

impl AppendQuorum {
    /// A tracker for a segment with `members` ensemble members, whose next entry is `first`.
    pub fn new(members: usize, ack_quorum: usize, first: u64) -> Self {
        assert!(members <= 64, "ensembles hold at most 64 members");
        AppendQuorum {
            members,
            ack_quorum,
            down: vec![false; members],
            resolved: first,
            pending: VecDeque::new(),
            first,
            acks: vec![0; members],
        }
    }

    /// The id the next pushed entry gets.
    pub fn next_entry(&self) -> u64 {
        self.resolved + self.pending.len() as u64
    }

    /// Entries `..resolved()` are at the ack quorum.
    pub fn resolved(&self) -> u64 {
        self.resolved
    }

    /// The last entry at the ack quorum, if any.
    pub fn lac(&self) -> Option<u64> {
        self.resolved.checked_sub(1)
    }

    /// How many entries wait for their quorum.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Whether enough members are up for entries to resolve.
    pub fn writable(&self) -> bool {
        self.down.iter().filter(|d| !**d).count() >= self.ack_quorum
    }

    /// Whether a member is marked down.
    pub fn is_down(&self, member: usize) -> bool {
        self.down.get(member).copied().unwrap_or(true)
    }

    /// Add an entry; returns its id and the sends to make (to every member not down).
    pub fn push(&mut self, payload: Bytes) -> (u64, Vec<SendEntry>) {
        let entry = self.next_entry();
        let lac = self.lac();
        let sends = (0..self.members)
            .filter(|m| !self.down[*m])
            .map(|member| SendEntry {
                member,
                entry,
                payload: payload.clone(),
                lac,
            })
            .collect();
        self.pending.push_back(Pending { payload, acks: 0 });
        (entry, sends)
    }

    /// Record that `member` has `entry` on disk; returns the range of entries that became
    /// resolved (possibly empty). Duplicate and stale acks are ignored.
    pub fn on_ack(&mut self, member: usize, entry: u64) -> std::ops::Range<u64> {
        let before = self.resolved;
        if member >= self.members || entry < self.first {
            return before..before;
        }
        if entry < self.resolved {
            // A late acknowledgement: the entry resolved without it, but the member has it.
            self.acks[member] += 1;
            return before..before;
        }
        let Some(p) = self.pending.get_mut((entry - self.resolved) as usize) else {
            return before..before;
        };
        if p.acks & (1 << member) == 0 {
            self.acks[member] += 1;
        }
        p.acks |= 1 << member;
        while let Some(front) = self.pending.front() {
            if (front.acks.count_ones() as usize) < self.ack_quorum {
                break;
            }
            self.pending.pop_front();
            self.resolved += 1;
        }
        before..self.resolved
    }

    /// Whether every member acknowledged every resolved entry (as far as acknowledgements
    /// have arrived): if not, a segment sealed now may need repair.
    pub fn members_complete(&self) -> bool {
        let resolved = self.resolved - self.first;
        self.acks.iter().all(|a| *a >= resolved)
    }

    /// Mark a member down (unreachable); its later acks still count if they come.
    pub fn on_member_down(&mut self, member: usize) {
        if let Some(d) = self.down.get_mut(member) {
            *d = true;
        }
    }

    /// Mark a member up again; returns every pending entry it has not acknowledged.
    pub fn on_member_up(&mut self, member: usize) -> Vec<SendEntry> {
        if member >= self.members {
            return Vec::new();
        }
        self.down[member] = false;
        let lac = self.lac();
        self.pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.acks & (1 << member) == 0)
            .map(|(i, p)| SendEntry {
                member,
                entry: self.resolved + i as u64,
                payload: p.payload.clone(),
                lac,
            })
            .collect()
    }

    /// Remove and return every unresolved entry's payload, in order (for moving them to a
    /// new segment).
    pub fn take_unresolved(&mut self) -> Vec<Bytes> {
        self.pending.drain(..).map(|p| p.payload).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_resolve_in_order_at_the_ack_quorum() {
        let mut q = AppendQuorum::new(3, 2, 0);
        let (e0, s0) = q.push(Bytes::from_static(b"a"));
        let (e1, _) = q.push(Bytes::from_static(b"b"));
        assert_eq!((e0, e1, s0.len()), (0, 1, 3));
        assert_eq!(q.on_ack(0, 1), 0..0);
        assert_eq!(q.on_ack(1, 1), 0..0, "entry 1 waits for entry 0");
        assert_eq!(q.on_ack(0, 0), 0..0);
        assert_eq!(q.on_ack(0, 0), 0..0, "duplicate acks do not count twice");
        assert_eq!(q.on_ack(2, 0), 0..2);
        assert_eq!(q.lac(), Some(1));
        assert!(!q.members_complete());
        assert_eq!(q.on_ack(2, 1), 2..2, "late acks resolve nothing");
        assert!(!q.members_complete(), "member 1 still lacks entry 0");
        assert_eq!(q.on_ack(1, 0), 2..2);
        assert!(
            q.members_complete(),
            "but they show the member has the entry"
        );
    }

    #[test]
    fn a_member_coming_back_gets_what_it_missed() {
        let mut q = AppendQuorum::new(3, 2, 5);
        q.on_member_down(2);
        let (_, sends) = q.push(Bytes::from_static(b"a"));
        assert_eq!(sends.len(), 2);
        q.on_member_down(1);
        assert!(!q.writable());
        let resend = q.on_member_up(2);
        assert_eq!(resend.len(), 1);
        assert_eq!(resend[0].entry, 5);
        assert_eq!(q.on_ack(0, 5), 5..5);
        assert_eq!(q.on_ack(2, 5), 5..6);
    }
}

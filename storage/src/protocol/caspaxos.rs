//! CASPaxos (Rystsov, 2018): single-key linearizable registers without a leader.
//! The acceptor is a pure state change the node makes durable before answering; the
//! proposer's vote counting is a tally the client driver feeds with answers.

use bytes::Bytes;

/// A proposal number: ordered by counter, then proposer id, so ballots never tie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    /// Increases with every attempt of a proposer, and past every ballot it saw.
    pub counter: u64,
    /// The proposer's unique id.
    pub proposer: [u8; 16],
}

/// What one acceptor holds for one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcceptorState {
    /// The highest ballot promised.
    pub promised: Option<Ballot>,
    /// The ballot of the accepted value.
    pub accepted: Option<Ballot>,
    /// The accepted value (`None`: empty or deleted).
    pub value: Option<Bytes>,
}

impl AcceptorState {
    fn highest(&self) -> Option<Ballot> {
        self.promised.max(self.accepted)
    }

    /// Phase 1. On success the caller must make the new state durable before answering
    /// with the accepted ballot and value; on refusal returns the ballot to outbid.
    pub fn prepare(&mut self, ballot: Ballot) -> Result<(Option<Ballot>, Option<Bytes>), Ballot> {
        match self.highest() {
            Some(h) if ballot < h => Err(h),
            _ => {
                self.promised = Some(ballot);
                Ok((self.accepted, self.value.clone()))
            }
        }
    }

    /// Phase 2. On success the caller must make the new state durable before answering.
    pub fn accept(&mut self, ballot: Ballot, value: Option<Bytes>) -> Result<(), Ballot> {
        match self.highest() {
            Some(h) if ballot < h => Err(h),
            _ => {
                self.promised = Some(ballot);
                self.accepted = Some(ballot);
                self.value = value;
                Ok(())
            }
        }
    }
}

/// Where a phase stands after an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tally {
    /// Keep waiting for answers.
    Pending,
    /// A majority agreed.
    Quorum,
    /// A majority can no longer agree: retry with a ballot above `outbid` (if any).
    Lost {
        /// The highest conflicting ballot seen.
        outbid: Option<Ballot>,
    },
}

/// Vote counting for one phase among `n` acceptors, remembering the value with the highest
/// accepted ballot among phase-1 promises.
#[derive(Debug)]
pub struct PhaseTally {
    n: usize,
    yes: usize,
    no: usize,
    outbid: Option<Ballot>,
    best: Option<(Ballot, Option<Bytes>)>,
    decided: bool,
    // The accepted ballot of the first promise, and whether every promise agreed with it.
    first_accepted: Option<Option<Ballot>>,
    unanimous: bool,
}

impl PhaseTally {
    /// A tally among `n` acceptors.
    pub fn new(n: usize) -> Self {
        PhaseTally {
            n,
            yes: 0,
            no: 0,
            outbid: None,
            best: None,
            decided: false,
            first_accepted: None,
            unanimous: true,
        }
    }

    fn majority(&self) -> usize {
        self.n / 2 + 1
    }

    fn status(&mut self) -> Tally {
        if self.decided {
            return Tally::Pending;
        }
        if self.yes >= self.majority() {
            self.decided = true;
            Tally::Quorum
        } else if self.n - self.no < self.majority() {
            self.decided = true;
            Tally::Lost {
                outbid: self.outbid,
            }
        } else {
            Tally::Pending
        }
    }

    /// A phase-1 promise carrying the acceptor's accepted ballot and value.
    pub fn promise(&mut self, accepted: Option<Ballot>, value: Option<Bytes>) -> Tally {
        self.yes += 1;
        match self.first_accepted {
            None => self.first_accepted = Some(accepted),
            Some(first) if first != accepted => self.unanimous = false,
            Some(_) => {}
        }
        if let Some(b) = accepted
            && self.best.as_ref().is_none_or(|(best, _)| b > *best)
        {
            self.best = Some((b, value));
        }
        self.status()
    }

    /// A phase-2 acceptance.
    pub fn accepted(&mut self) -> Tally {
        self.yes += 1;
        self.status()
    }

    /// A refusal naming the ballot to outbid.
    pub fn refused(&mut self, conflict: Option<Ballot>) -> Tally {
        self.no += 1;
        self.outbid = self.outbid.max(conflict);
        self.status()
    }

    /// No answer.
    pub fn failed(&mut self) -> Tally {
        self.no += 1;
        self.status()
    }

    /// Whether every promise counted reported the same accepted ballot. Then, once a
    /// majority promised, that value is chosen (a majority accepted it) and nothing newer
    /// can have been chosen before this round's promises, so a round that leaves the value
    /// unchanged may skip phase 2 and still be linearizable.
    pub fn unanimous(&self) -> bool {
        self.unanimous
    }

    /// The current register value according to the promises counted.
    pub fn current_value(&self) -> Option<Bytes> {
        self.best.as_ref().and_then(|(_, v)| v.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(counter: u64, p: u8) -> Ballot {
        Ballot {
            counter,
            proposer: [p; 16],
        }
    }

    #[test]
    fn acceptor_refuses_lower_ballots_after_promising() {
        let mut a = AcceptorState::default();
        assert_eq!(a.prepare(b(2, 1)), Ok((None, None)));
        assert_eq!(a.prepare(b(1, 9)), Err(b(2, 1)));
        assert_eq!(a.accept(b(1, 9), None), Err(b(2, 1)));
        assert_eq!(a.accept(b(2, 1), Some(Bytes::from_static(b"v"))), Ok(()));
        assert_eq!(
            a.prepare(b(3, 0)),
            Ok((Some(b(2, 1)), Some(Bytes::from_static(b"v"))))
        );
    }

    #[test]
    fn unanimity_is_only_claimed_when_every_promise_agrees() {
        let mut t = PhaseTally::new(3);
        t.promise(Some(b(2, 1)), Some(Bytes::from_static(b"v")));
        t.promise(Some(b(2, 1)), Some(Bytes::from_static(b"v")));
        assert!(t.unanimous());
        t.promise(None, None);
        assert!(!t.unanimous());
    }

    #[test]
    fn tally_picks_the_highest_accepted_value_and_detects_loss() {
        let mut t = PhaseTally::new(3);
        assert_eq!(
            t.promise(Some(b(1, 1)), Some(Bytes::from_static(b"old"))),
            Tally::Pending
        );
        assert_eq!(
            t.promise(Some(b(4, 2)), Some(Bytes::from_static(b"new"))),
            Tally::Quorum
        );
        assert_eq!(t.current_value(), Some(Bytes::from_static(b"new")));
        let mut t = PhaseTally::new(3);
        t.refused(Some(b(7, 3)));
        assert_eq!(
            t.failed(),
            Tally::Lost {
                outbid: Some(b(7, 3))
            }
        );
    }
}

//! A storage node's rules for one segment (RFC 0001, "Storage node rules"), without the
//! journal: the node applies them in arrival order and makes the result durable before it
//! answers.

/// A segment's fencing and tail state on one storage node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentRules {
    /// Appends below this epoch are refused.
    pub fenced: u64,
    /// Sealed with entries `0..end`.
    pub end: Option<u64>,
    /// Highest last-add-confirmed seen in an append.
    pub lac: Option<u64>,
    /// Highest entry accepted.
    pub last: Option<u64>,
}

/// What a fence reports: the node's tail state at the moment of the fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tail {
    /// Highest entry accepted before the fence.
    pub last_entry: Option<u64>,
    /// Highest last-add-confirmed seen.
    pub lac: Option<u64>,
    /// Sealed end, if sealed.
    pub end: Option<u64>,
}

impl SegmentRules {
    /// Accept an append, or refuse it with the epoch the segment is fenced at.
    pub fn append(&mut self, epoch: u64, entry: u64, lac: Option<u64>) -> Result<(), u64> {
        if epoch < self.fenced || self.end.is_some_and(|end| entry >= end) {
            return Err(self.fenced);
        }
        self.last = self.last.max(Some(entry));
        self.lac = self.lac.max(lac);
        Ok(())
    }

    /// Fence at `epoch` and report the tail, or refuse if a higher epoch fenced already.
    pub fn fence(&mut self, epoch: u64) -> Result<Tail, u64> {
        if epoch < self.fenced {
            return Err(self.fenced);
        }
        self.fenced = epoch;
        Ok(Tail {
            last_entry: self.last,
            lac: self.lac,
            end: self.end,
        })
    }

    /// Seal with `end` entries; a seal is final, so the first one wins. Returns the end.
    pub fn seal(&mut self, end: u64) -> u64 {
        *self.end.get_or_insert(end)
    }

    /// Apply an append read back from the journal (it was accepted when written).
    pub fn replay_append(&mut self, entry: u64, lac: Option<u64>) {
        self.last = self.last.max(Some(entry));
        self.lac = self.lac.max(lac);
    }

    /// Apply a fence read back from the journal.
    pub fn replay_fence(&mut self, epoch: u64) {
        self.fenced = self.fenced.max(epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_blocks_lower_epochs_and_seal_blocks_entries_past_the_end() {
        let mut s = SegmentRules::default();
        assert_eq!(s.append(1, 0, None), Ok(()));
        assert_eq!(
            s.fence(2),
            Ok(Tail {
                last_entry: Some(0),
                lac: None,
                end: None
            })
        );
        assert_eq!(s.append(1, 1, Some(0)), Err(2));
        assert_eq!(s.fence(1), Err(2));
        assert_eq!(s.append(2, 1, None), Ok(()));
        assert_eq!(s.seal(2), 2);
        assert_eq!(s.seal(5), 2);
        assert_eq!(s.append(3, 2, None), Err(2));
        assert_eq!(s.append(3, 1, None), Ok(()));
    }
}

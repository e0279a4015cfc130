//! Per-channel state: open/closing, content assembly, delivery tags and unacked
//! deliveries, consumers, prefetch, and the publisher-confirm tracker.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use warren_proto::amqp::ContentAssembler;

use crate::queue::{ChannelKey, ChannelLimiter, ConsumerId, QueueHandle, Seq};

/// Where a channel is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelState {
    /// channel.open-ok sent.
    Open,
    /// Warren sent channel.close and waits for close-ok; everything else is dropped.
    Closing,
}

/// A delivery waiting for the client's ack.
#[derive(Clone, Debug)]
pub struct Unacked {
    /// The queue it came from.
    pub queue: QueueHandle,
    /// Its position there.
    pub seq: Seq,
    /// Counted against the channel's prefetch (consumer deliveries, not basic.get).
    pub counted: bool,
}

/// A consumer on this channel.
#[derive(Clone, Debug)]
pub struct ConsumerEntry {
    /// Node-unique id.
    pub id: ConsumerId,
    /// The queue consumed from.
    pub queue: QueueHandle,
    /// Deliveries need no ack.
    pub no_ack: bool,
}

/// One open channel.
pub struct Channel {
    /// The channel number.
    pub id: u16,
    /// Unique identity for queue owners.
    pub key: ChannelKey,
    /// Open or closing.
    pub state: ChannelState,
    /// Assembles publish + header + body frames.
    pub assembler: ContentAssembler,
    /// Last delivery tag handed out.
    pub last_tag: u64,
    /// Deliveries waiting for an ack, by delivery tag.
    pub unacked: BTreeMap<u64, Unacked>,
    /// Consumers by tag.
    pub consumers: HashMap<String, ConsumerEntry>,
    /// basic.qos global=false: prefetch for consumers created from now on.
    pub prefetch: u16,
    /// basic.qos global=true: shared by every consumer of the channel.
    pub limiter: Arc<ChannelLimiter>,
    /// Set by confirm.select.
    pub confirms: Option<ConfirmTracker>,
    /// Queues that may hold deliveries or consumers of this channel.
    pub touched: HashMap<u64, QueueHandle>,
    /// The queue last declared here: an empty queue name in later methods means it.
    pub last_queue: Option<String>,
    /// Set by tx.select: publishes and settlements wait for tx.commit.
    pub tx: Option<TxBuffer>,
    /// The direct reply-to consumer, if any.
    pub reply_to: Option<crate::handlers::reply_to::ReplyTo>,
}

/// What a transactional channel has done since its last commit or rollback.
#[derive(Default)]
pub struct TxBuffer {
    /// Complete publishes, in order.
    pub publishes: Vec<Box<warren_proto::amqp::Content>>,
    /// Settlements, in order: delivery tag, the delivery, and how it is settled.
    pub settles: Vec<(u64, Unacked, TxSettle)>,
}

/// How a buffered settlement will be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxSettle {
    /// basic.ack.
    Ack,
    /// Reject or nack with requeue.
    Requeue,
    /// Reject or nack without requeue.
    Drop,
}

impl Channel {
    /// A newly opened channel.
    pub fn new(id: u16, key: ChannelKey, max_message_size: u64) -> Self {
        Channel {
            id,
            key,
            state: ChannelState::Open,
            assembler: ContentAssembler::new(max_message_size),
            last_tag: 0,
            unacked: BTreeMap::new(),
            consumers: HashMap::new(),
            prefetch: 0,
            limiter: Arc::new(ChannelLimiter::default()),
            confirms: None,
            touched: HashMap::new(),
            last_queue: None,
            tx: None,
            reply_to: None,
        }
    }

    /// Remember that `q` may hold state for this channel.
    pub fn touch(&mut self, q: &QueueHandle) {
        self.touched
            .entry(q.shared().id)
            .or_insert_with(|| q.clone());
    }

    /// Take the unacked deliveries an ack/nack/reject refers to; `None` if the tag is
    /// unknown (RabbitMQ: 406 PRECONDITION_FAILED "unknown delivery tag").
    pub fn take_acked(&mut self, tag: u64, multiple: bool) -> Option<Vec<Unacked>> {
        if multiple {
            if tag == 0 {
                return Some(std::mem::take(&mut self.unacked).into_values().collect());
            }
            if !self.unacked.contains_key(&tag) {
                return None;
            }
            let rest = self.unacked.split_off(&(tag + 1));
            let taken = std::mem::replace(&mut self.unacked, rest);
            Some(taken.into_values().collect())
        } else {
            self.unacked.remove(&tag).map(|u| vec![u])
        }
    }
}

/// Group deliveries by queue, keeping order: one ack command per queue.
pub fn group_by_queue(items: Vec<Unacked>) -> Vec<(QueueHandle, Vec<Seq>, u32)> {
    let mut out: Vec<(QueueHandle, Vec<Seq>, u32)> = Vec::new();
    for u in items {
        let counted = u32::from(u.counted);
        match out
            .iter_mut()
            .find(|(q, _, _)| q.shared().id == u.queue.shared().id)
        {
            Some((_, seqs, n)) => {
                seqs.push(u.seq);
                *n += counted;
            }
            None => out.push((u.queue, vec![u.seq], counted)),
        }
    }
    out
}

/// Tracks publishes in confirm mode and produces basic.ack/nack replies, coalescing with
/// `multiple` whenever every earlier publish has been answered.
#[derive(Debug, Default)]
pub struct ConfirmTracker {
    last: u64,
    /// Publishes waiting on queues: remaining queues, and whether all so far succeeded.
    pending: BTreeMap<u64, (u32, bool)>,
    /// Settled, not yet answered.
    done: BTreeMap<u64, bool>,
}

/// One confirm reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfirmReply {
    /// Delivery tag (publish sequence number).
    pub tag: u64,
    /// Covers every earlier unanswered publish too.
    pub multiple: bool,
    /// basic.ack (true) or basic.nack (false).
    pub ack: bool,
}

impl ConfirmTracker {
    /// Number a new publish routed to `targets` queues; one with no targets is settled now.
    pub fn publish(&mut self, targets: u32) -> u64 {
        self.last += 1;
        if targets == 0 {
            self.done.insert(self.last, true);
        } else {
            self.pending.insert(self.last, (targets, true));
        }
        self.last
    }

    /// Publishes waiting on queues.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// One queue settled these publishes.
    pub fn settle(&mut self, seqs: &[u64], ok: bool) {
        for s in seqs {
            if let Some((left, all_ok)) = self.pending.get_mut(s) {
                *left = left.saturating_sub(1);
                *all_ok &= ok;
                if *left == 0 {
                    let ok = *all_ok;
                    self.pending.remove(s);
                    self.done.insert(*s, ok);
                }
            }
        }
    }

    /// The replies that can be sent now.
    pub fn take_replies(&mut self) -> Vec<ConfirmReply> {
        let mut out = Vec::new();
        if self.done.is_empty() {
            return out;
        }
        let floor = self.pending.keys().next().copied().unwrap_or(self.last + 1);
        let above = self.done.split_off(&floor);
        let below = std::mem::replace(&mut self.done, above);
        // Everything below the oldest pending publish is answered here, so runs of equal
        // outcome can each be one reply with multiple=true.
        let mut run: Option<(u64, bool, usize)> = None;
        for (tag, ok) in below {
            match &mut run {
                Some((last, rok, n)) if *rok == ok => {
                    *last = tag;
                    *n += 1;
                }
                _ => {
                    if let Some((last, rok, n)) = run {
                        out.push(ConfirmReply {
                            tag: last,
                            multiple: n > 1,
                            ack: rok,
                        });
                    }
                    run = Some((tag, ok, 1));
                }
            }
        }
        if let Some((last, rok, n)) = run {
            out.push(ConfirmReply {
                tag: last,
                multiple: n > 1,
                ack: rok,
            });
        }
        for (tag, ok) in std::mem::take(&mut self.done) {
            out.push(ConfirmReply {
                tag,
                multiple: false,
                ack: ok,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(tag: u64, multiple: bool, ack: bool) -> ConfirmReply {
        ConfirmReply { tag, multiple, ack }
    }

    #[test]
    fn confirm_table() {
        // (targets per publish, settlements (seqs, ok), expected replies)
        type Case = (Vec<u32>, Vec<(Vec<u64>, bool)>, Vec<ConfirmReply>);
        let cases: Vec<Case> = vec![
            (
                vec![1, 1, 1],
                vec![(vec![1, 2, 3], true)],
                vec![r(3, true, true)],
            ),
            (vec![1], vec![(vec![1], true)], vec![r(1, false, true)]),
            (
                vec![1, 1, 1],
                vec![(vec![2, 3], true)],
                vec![r(2, false, true), r(3, false, true)],
            ),
            (
                vec![2, 1],
                vec![(vec![1, 2], true)],
                vec![r(2, false, true)],
            ),
            (
                vec![2, 1],
                vec![(vec![1, 2], true), (vec![1], true)],
                vec![r(2, true, true)],
            ),
            (vec![0, 0, 1], vec![], vec![r(2, true, true)]),
            (
                vec![1, 1, 1, 1],
                vec![(vec![1, 2], true), (vec![3], false), (vec![4], true)],
                vec![r(2, true, true), r(3, false, false), r(4, false, true)],
            ),
            (
                vec![2],
                vec![(vec![1], true), (vec![1], false)],
                vec![r(1, false, false)],
            ),
        ];
        for (i, (targets, settles, expect)) in cases.into_iter().enumerate() {
            let mut t = ConfirmTracker::default();
            for n in targets {
                t.publish(n);
            }
            for (seqs, ok) in settles {
                t.settle(&seqs, ok);
            }
            assert_eq!(t.take_replies(), expect, "case {i}");
        }
    }

    #[test]
    fn replies_are_not_repeated() {
        let mut t = ConfirmTracker::default();
        t.publish(1);
        t.publish(1);
        t.settle(&[2], true);
        assert_eq!(t.take_replies(), vec![r(2, false, true)]);
        t.settle(&[1], true);
        assert_eq!(t.take_replies(), vec![r(1, false, true)]);
        assert!(t.take_replies().is_empty());
        assert_eq!(t.in_flight(), 0);
    }
}

//! The queue engine: an I/O-free state machine holding a queue's ready list, its unacked
//! deliveries, and its consumers with their prefetch credit. The owner task feeds it
//! commands and performs the deliveries and log writes it asks for.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::message::Message;

/// A message's position in its queue: assigned at enqueue, increasing.
pub type Seq = u64;

/// One open channel, cluster-unique: a reopened channel number gets a new serial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    /// Connection id on this node.
    pub conn: u64,
    /// The AMQP channel number.
    pub channel: u16,
    /// Unique per channel.open on this node.
    pub serial: u64,
}

/// A consumer, unique on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

/// A channel's shared prefetch limit (basic.qos global=true), counted across all queues.
#[derive(Debug, Default)]
pub struct ChannelLimiter {
    limit: AtomicU32,
    unacked: AtomicU32,
    blocked: AtomicBool,
}

impl ChannelLimiter {
    /// Set the limit (0 = none).
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Release);
    }

    /// Take one unit of credit if available; remembers a refusal so releases can wake queues.
    ///
    /// A refusal and a [`ChannelLimiter::release`] may race (a queue's task and its
    /// connection's). The refusal marks the limiter blocked *before* it reads the count
    /// once more, and the release lowers the count before it clears the mark, all in one
    /// total order (`SeqCst`): so either the refusal sees the lowered count and takes it, or
    /// the release sees the mark and wakes the queue. Never neither.
    pub fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        if limit == 0 {
            self.unacked.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        let mut cur = self.unacked.load(Ordering::SeqCst);
        loop {
            if cur >= limit {
                self.blocked.store(true, Ordering::SeqCst);
                cur = self.unacked.load(Ordering::SeqCst);
                if cur < limit {
                    // Released meanwhile: try again (the mark may cause one spare wake-up).
                    continue;
                }
                return false;
            }
            match self.unacked.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Count one delivery made without asking: a queue on another node enforces its own
    /// copy of the limit, and this channel's other queues must see what it handed out.
    pub fn count(&self) {
        self.unacked.fetch_add(1, Ordering::AcqRel);
    }

    /// Return `n` units; true if some queue was refused credit and should be woken.
    pub fn release(&self, n: u32) -> bool {
        if n == 0 {
            return false;
        }
        let _ = self
            .unacked
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                Some(c.saturating_sub(n))
            });
        self.blocked.swap(false, Ordering::SeqCst)
    }

    /// The limit (0 = none).
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Acquire)
    }

    /// Deliveries currently counted.
    pub fn unacked(&self) -> u32 {
        self.unacked.load(Ordering::Acquire)
    }
}

/// What a consumer asked for in basic.consume (plus the channel's qos at that time).
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    /// Its id.
    pub id: ConsumerId,
    /// Its channel.
    pub channel: ChannelKey,
    /// The consumer tag.
    pub tag: Arc<str>,
    /// Deliveries are settled when sent.
    pub no_ack: bool,
    /// Only consumer of the queue.
    pub exclusive: bool,
    /// Per-consumer prefetch (0 = unlimited).
    pub prefetch: u16,
    /// `x-priority`: higher is served first.
    pub priority: i32,
    /// The channel-wide prefetch limit, if the channel set one.
    pub limiter: Option<Arc<ChannelLimiter>>,
}

/// A message in the queue.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its position.
    pub seq: Seq,
    /// The message.
    pub msg: Arc<Message>,
    /// Delivered before (requeued, or recovered after a takeover).
    pub redelivered: bool,
    /// Written to the durable log (so its settlement must be logged too).
    pub durable: bool,
    /// When it expires (milliseconds on the owner's clock), from queue or message TTL.
    pub expires_at: Option<u64>,
    /// Position among priorities: 0 is served first.
    pub rank: u8,
}

/// Why a message left a queue other than by ack: RabbitMQ's dead-letter reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadReason {
    /// basic.reject or basic.nack with requeue=false.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// Dropped from the head by x-max-length / x-max-length-bytes.
    MaxLen,
}

impl DeadReason {
    /// The `reason` value of an `x-death` entry.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Rejected => "rejected",
            DeadReason::Expired => "expired",
            DeadReason::MaxLen => "maxlen",
        }
    }
}

/// The queue arguments the engine enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueuePolicy {
    /// `x-max-length`: ready messages kept; the oldest are dropped beyond it.
    pub max_length: Option<usize>,
    /// `x-max-length-bytes`: ready body bytes kept.
    pub max_length_bytes: Option<u64>,
    /// `x-message-ttl` in milliseconds.
    pub message_ttl: Option<u64>,
    /// `x-max-priority`.
    pub max_priority: Option<u8>,
    /// `x-dead-letter-exchange` is set: removed messages must be reported.
    pub dead_letter: bool,
    /// `x-overflow = reject-publish` (or `reject-publish-dlx`): a full queue refuses new
    /// messages instead of dropping its oldest.
    pub reject_publish: bool,
    /// `x-single-active-consumer`: one consumer at a time gets messages; the next one
    /// (in registration order) takes over when it goes.
    pub single_active: bool,
}

impl QueuePolicy {
    /// Read the arguments of queue.declare.
    pub fn from_args(args: &amq_protocol::types::FieldTable) -> Self {
        use amq_protocol::types::AMQPValue;
        let int = |k: &str| -> Option<i64> {
            Some(match args.inner().get(k)? {
                AMQPValue::ShortShortInt(n) => i64::from(*n),
                AMQPValue::ShortShortUInt(n) => i64::from(*n),
                AMQPValue::ShortInt(n) => i64::from(*n),
                AMQPValue::ShortUInt(n) => i64::from(*n),
                AMQPValue::LongInt(n) => i64::from(*n),
                AMQPValue::LongUInt(n) => i64::from(*n),
                AMQPValue::LongLongInt(n) => *n,
                _ => return None,
            })
        };
        QueuePolicy {
            max_length: int("x-max-length").and_then(|n| usize::try_from(n).ok()),
            max_length_bytes: int("x-max-length-bytes").and_then(|n| u64::try_from(n).ok()),
            message_ttl: int("x-message-ttl").and_then(|n| u64::try_from(n).ok()),
            max_priority: int("x-max-priority")
                .and_then(|n| u8::try_from(n.clamp(0, 255)).ok())
                .filter(|p| *p > 0),
            dead_letter: args.inner().contains_key("x-dead-letter-exchange"),
            reject_publish: matches!(
                args.inner().get("x-overflow"),
                Some(AMQPValue::LongString(s))
                    if s.as_bytes() == b"reject-publish" || s.as_bytes() == b"reject-publish-dlx"
            ),
            single_active: matches!(
                args.inner().get("x-single-active-consumer"),
                Some(AMQPValue::Boolean(true))
            ),
        }
    }
}

/// A delivery the owner must send to a consumer.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The consumer.
    pub consumer: ConsumerId,
    /// Its channel.
    pub channel: ChannelKey,
    /// Its tag.
    pub tag: Arc<str>,
    /// The message's position (the channel's ack refers to it).
    pub seq: Seq,
    /// The message.
    pub msg: Arc<Message>,
    /// The redelivered flag.
    pub redelivered: bool,
    /// Settled on send: the channel must not expect an ack.
    pub no_ack: bool,
}

/// Why the engine refused a consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumeError {
    /// The queue has an exclusive consumer, or an exclusive consumer asked for a queue in use.
    ExclusiveInUse,
}

struct Consumer {
    spec: ConsumerSpec,
    unacked: u32,
}

impl Consumer {
    fn take_credit(&mut self) -> bool {
        if self.spec.no_ack {
            return true;
        }
        if self.spec.prefetch != 0 && self.unacked >= u32::from(self.spec.prefetch) {
            return false;
        }
        if let Some(l) = &self.spec.limiter
            && !l.try_acquire()
        {
            return false;
        }
        self.unacked += 1;
        true
    }
}

struct Unacked {
    entry: Entry,
    channel: ChannelKey,
    consumer: Option<ConsumerId>,
}

/// The state of one queue.
#[derive(Default)]
pub struct QueueEngine {
    ready: VecDeque<Entry>,
    unacked: HashMap<Seq, Unacked>,
    consumers: HashMap<ConsumerId, Consumer>,
    rings: BTreeMap<Reverse<i32>, VecDeque<ConsumerId>>,
    next_seq: Seq,
    exclusive_consumer: bool,
    had_consumer: bool,
    settled: Vec<Seq>,
    policy: QueuePolicy,
    ready_bytes: u64,
    dead: Vec<(Entry, DeadReason)>,
}

impl QueueEngine {
    /// An empty queue without limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue enforcing `policy`.
    pub fn with_policy(policy: QueuePolicy) -> Self {
        QueueEngine {
            policy,
            ..Self::default()
        }
    }

    /// The enforced arguments.
    pub fn policy(&self) -> &QueuePolicy {
        &self.policy
    }

    /// Messages removed by reject, TTL or length limit since the last call, for
    /// dead-lettering (only collected when the queue has a dead-letter exchange).
    pub fn take_dead(&mut self) -> Vec<(Entry, DeadReason)> {
        std::mem::take(&mut self.dead)
    }

    fn rank_of(&self, msg: &Message) -> u8 {
        match self.policy.max_priority {
            None => 0,
            Some(max) => max - msg.priority.unwrap_or(0).min(max),
        }
    }

    fn pop_ready(&mut self) -> Option<Entry> {
        let e = self.ready.pop_front()?;
        self.ready_bytes = self.ready_bytes.saturating_sub(e.msg.body.len() as u64);
        Some(e)
    }

    fn remove_dead(&mut self, entry: Entry, reason: DeadReason) {
        if entry.durable {
            self.settled.push(entry.seq);
        }
        if self.policy.dead_letter {
            self.dead.push((entry, reason));
        }
    }

    /// Drop expired messages from the head (RabbitMQ expires at the head only).
    pub fn expire(&mut self, now: u64) {
        while self
            .ready
            .front()
            .is_some_and(|e| e.expires_at.is_some_and(|t| now >= t))
        {
            if let Some(e) = self.pop_ready() {
                self.remove_dead(e, DeadReason::Expired);
            }
        }
    }

    /// When the head message expires, if it does.
    pub fn next_expiry(&self) -> Option<u64> {
        self.ready.front().and_then(|e| e.expires_at)
    }

    fn enforce_length(&mut self) {
        if self.policy.reject_publish {
            return;
        }
        loop {
            let over_count = self.policy.max_length.is_some_and(|m| self.ready.len() > m);
            let over_bytes = self
                .policy
                .max_length_bytes
                .is_some_and(|m| self.ready_bytes > m);
            if !(over_count || over_bytes) {
                break;
            }
            match self.pop_ready() {
                Some(e) => self.remove_dead(e, DeadReason::MaxLen),
                None => break,
            }
        }
    }

    /// Ready messages (what queue.declare-ok and basic.get-ok report).
    pub fn ready_count(&self) -> u32 {
        u32::try_from(self.ready.len()).unwrap_or(u32::MAX)
    }

    /// Delivered, not yet settled messages.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// Consumers attached.
    pub fn consumer_count(&self) -> u32 {
        u32::try_from(self.consumers.len()).unwrap_or(u32::MAX)
    }

    /// Had a consumer once and has none now (auto-delete rule).
    pub fn is_unused(&self) -> bool {
        self.had_consumer && self.consumers.is_empty()
    }

    /// Durable messages settled since the last call: the owner logs them.
    pub fn take_settled(&mut self) -> Vec<Seq> {
        std::mem::take(&mut self.settled)
    }

    /// Whether a new message would exceed `x-max-length` / `x-max-length-bytes` with
    /// `x-overflow = reject-publish`: the publish is refused (nacked).
    pub fn would_reject(&self, msg: &Message) -> bool {
        self.policy.reject_publish
            && (self
                .policy
                .max_length
                .is_some_and(|m| self.ready.len() >= m)
                || self
                    .policy
                    .max_length_bytes
                    .is_some_and(|m| self.ready_bytes + msg.body.len() as u64 > m))
    }

    /// The single active consumer: the oldest one still attached.
    fn active_consumer(&self) -> Option<ConsumerId> {
        self.consumers.keys().min().copied()
    }

    /// Add a message at the tail (of its priority); returns its position. `now` is the
    /// owner's clock in milliseconds, for TTLs.
    pub fn enqueue(&mut self, msg: Arc<Message>, durable: bool, now: u64) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ttl = match (self.policy.message_ttl, msg.expiration_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let rank = self.rank_of(&msg);
        let redelivered = msg.resent;
        self.insert_ready(Entry {
            seq,
            msg,
            redelivered,
            durable,
            expires_at: ttl.map(|t| now.saturating_add(t)),
            rank,
        });
        self.enforce_length();
        seq
    }

    /// Put back a message recovered from the log (replay), keeping its position.
    pub fn restore(&mut self, mut entry: Entry) {
        self.next_seq = self.next_seq.max(entry.seq + 1);
        entry.rank = self.rank_of(&entry.msg);
        self.insert_ready(entry);
    }

    /// Drop a restored message that the log says was settled.
    pub fn forget(&mut self, seq: Seq) -> bool {
        match self.ready.iter().position(|e| e.seq == seq) {
            Some(i) => {
                if let Some(e) = self.ready.remove(i) {
                    self.ready_bytes = self.ready_bytes.saturating_sub(e.msg.body.len() as u64);
                }
                true
            }
            None => false,
        }
    }

    /// Whether some ready message lives only in memory (it would not survive a hand-off).
    pub fn has_transient(&self) -> bool {
        self.ready.iter().any(|e| !e.durable)
    }

    /// Ready messages flagged redelivered (for a hand-off mark).
    pub fn ready_redelivered(&self) -> Vec<Seq> {
        self.ready
            .iter()
            .filter(|e| e.redelivered)
            .map(|e| e.seq)
            .collect()
    }

    /// The next position to assign (replay continues numbering after it).
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Make sure positions continue after `seq`.
    pub fn bump_seq(&mut self, seq: Seq) {
        self.next_seq = self.next_seq.max(seq);
    }

    fn insert_ready(&mut self, entry: Entry) {
        self.ready_bytes += entry.msg.body.len() as u64;
        // Ordered by priority, then position: requeued messages go back to their original
        // place, as in RabbitMQ.
        let key = (entry.rank, entry.seq);
        match self.ready.back() {
            None => self.ready.push_back(entry),
            Some(b) if (b.rank, b.seq) < key => self.ready.push_back(entry),
            _ => {
                let i = self.ready.partition_point(|e| (e.rank, e.seq) < key);
                self.ready.insert(i, entry);
            }
        }
    }

    /// Attach a consumer.
    pub fn add_consumer(&mut self, spec: ConsumerSpec) -> Result<(), ConsumeError> {
        if self.exclusive_consumer || (spec.exclusive && !self.consumers.is_empty()) {
            return Err(ConsumeError::ExclusiveInUse);
        }
        self.exclusive_consumer = spec.exclusive;
        self.had_consumer = true;
        self.rings
            .entry(Reverse(spec.priority))
            .or_default()
            .push_back(spec.id);
        self.consumers
            .insert(spec.id, Consumer { spec, unacked: 0 });
        Ok(())
    }

    /// Detach a consumer; its unacked deliveries stay with its channel. False if unknown.
    pub fn cancel(&mut self, id: ConsumerId) -> bool {
        let Some(c) = self.consumers.remove(&id) else {
            return false;
        };
        if c.spec.exclusive {
            self.exclusive_consumer = false;
        }
        let key = Reverse(c.spec.priority);
        if let Some(ring) = self.rings.get_mut(&key) {
            ring.retain(|x| *x != id);
            if ring.is_empty() {
                self.rings.remove(&key);
            }
        }
        true
    }

    /// Consumers of one channel (for basic.cancel on queue deletion).
    pub fn consumers_of(&self) -> Vec<(ConsumerId, ChannelKey, Arc<str>)> {
        self.consumers
            .values()
            .map(|c| (c.spec.id, c.spec.channel, c.spec.tag.clone()))
            .collect()
    }

    /// Hand ready messages to consumers with credit, round-robin within the highest priority.
    pub fn dispatch(&mut self, out: &mut Vec<Delivery>) {
        while !self.ready.is_empty() {
            let Some(cid) = self.pick_consumer() else {
                break;
            };
            let Some(entry) = self.pop_ready() else {
                break;
            };
            let Some(c) = self.consumers.get(&cid) else {
                break;
            };
            let spec = &c.spec;
            out.push(Delivery {
                consumer: cid,
                channel: spec.channel,
                tag: spec.tag.clone(),
                seq: entry.seq,
                msg: entry.msg.clone(),
                redelivered: entry.redelivered,
                no_ack: spec.no_ack,
            });
            if spec.no_ack {
                if entry.durable {
                    self.settled.push(entry.seq);
                }
            } else {
                let channel = spec.channel;
                self.unacked.insert(
                    entry.seq,
                    Unacked {
                        entry,
                        channel,
                        consumer: Some(cid),
                    },
                );
            }
        }
    }

    fn pick_consumer(&mut self) -> Option<ConsumerId> {
        if self.policy.single_active {
            let active = self.active_consumer()?;
            let c = self.consumers.get_mut(&active)?;
            return c.take_credit().then_some(active);
        }
        let consumers = &mut self.consumers;
        for ring in self.rings.values_mut() {
            for _ in 0..ring.len() {
                let cid = ring.pop_front()?;
                ring.push_back(cid);
                if let Some(c) = consumers.get_mut(&cid)
                    && c.take_credit()
                {
                    return Some(cid);
                }
            }
        }
        None
    }

    /// basic.get: the head message, and how many remain ready after it.
    pub fn get(&mut self, channel: ChannelKey, no_ack: bool, now: u64) -> Option<(Entry, u32)> {
        self.expire(now);
        let entry = self.pop_ready()?;
        if no_ack {
            if entry.durable {
                self.settled.push(entry.seq);
            }
        } else {
            self.unacked.insert(
                entry.seq,
                Unacked {
                    entry: entry.clone(),
                    channel,
                    consumer: None,
                },
            );
        }
        Some((entry, self.ready_count()))
    }

    fn take_unacked(&mut self, channel: ChannelKey, seq: Seq) -> Option<Unacked> {
        match self.unacked.get(&seq) {
            Some(u) if u.channel == channel => {}
            _ => return None,
        }
        let u = self.unacked.remove(&seq)?;
        if let Some(cid) = u.consumer
            && let Some(c) = self.consumers.get_mut(&cid)
        {
            c.unacked = c.unacked.saturating_sub(1);
        }
        Some(u)
    }

    /// Settle deliveries (basic.ack, or reject/nack without requeue).
    pub fn ack(&mut self, channel: ChannelKey, seqs: &[Seq]) {
        for &seq in seqs {
            if let Some(u) = self.take_unacked(channel, seq)
                && u.entry.durable
            {
                self.settled.push(seq);
            }
        }
    }

    /// Drop deliveries (reject/nack without requeue), dead-lettering them if configured.
    pub fn reject(&mut self, channel: ChannelKey, seqs: &[Seq]) {
        for &seq in seqs {
            if let Some(u) = self.take_unacked(channel, seq) {
                self.remove_dead(u.entry, DeadReason::Rejected);
            }
        }
    }

    /// Return deliveries to the ready list, marked redelivered.
    pub fn requeue(&mut self, channel: ChannelKey, seqs: &[Seq]) {
        for &seq in seqs {
            if let Some(u) = self.take_unacked(channel, seq) {
                let mut entry = u.entry;
                entry.redelivered = true;
                self.insert_ready(entry);
            }
        }
    }

    /// A channel closed: drop its consumers and requeue everything it held.
    pub fn channel_closed(&mut self, channel: ChannelKey) {
        let ids: Vec<ConsumerId> = self
            .consumers
            .values()
            .filter(|c| c.spec.channel == channel)
            .map(|c| c.spec.id)
            .collect();
        for id in ids {
            self.cancel(id);
        }
        let mut seqs: Vec<Seq> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.channel == channel)
            .map(|(s, _)| *s)
            .collect();
        seqs.sort_unstable();
        self.requeue(channel, &seqs);
    }

    /// queue.purge: drop every ready message; returns how many.
    pub fn purge(&mut self) -> u32 {
        let n = self.ready_count();
        self.ready_bytes = 0;
        for e in self.ready.drain(..) {
            if e.durable {
                self.settled.push(e.seq);
            }
        }
        n
    }

    /// Lowest position still live (ready or unacked), for trimming the log.
    pub fn lowest_live(&self) -> Option<Seq> {
        let r = match (self.ready.front(), self.ready.back()) {
            (Some(f), Some(b)) if f.rank == b.rank => Some(f.seq),
            // Several priorities: each in position order, the whole list not.
            _ => self.ready.iter().map(|e| e.seq).min(),
        };
        let u = self.unacked.keys().min().copied();
        match (r, u) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A queue refused credit either sees a release that races with it, or is woken by it:
    /// never neither (a lost wake-up left a consumer idle with its channel's credit free).
    #[test]
    fn a_release_racing_a_refusal_never_loses_the_wake_up() {
        use std::sync::atomic::AtomicUsize;
        const ROUNDS: usize = 200_000;
        let limiter = Arc::new(ChannelLimiter::default());
        limiter.set_limit(1);
        // Round r starts when `round` is 2r+1 (the queue side goes) and the release side
        // follows at once; each side spins, so the two calls overlap as closely as they can.
        let round = Arc::new(AtomicUsize::new(0));
        let queue = {
            let (l, round) = (limiter.clone(), round.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::with_capacity(ROUNDS);
                for r in 0..ROUNDS {
                    while round.load(Ordering::Acquire) != 2 * r + 1 {
                        std::hint::spin_loop();
                    }
                    outcomes.push(l.try_acquire());
                    round.store(2 * r + 2, Ordering::Release);
                }
                outcomes
            })
        };
        let mut woken = Vec::with_capacity(ROUNDS);
        for r in 0..ROUNDS {
            // One unit taken, nobody blocked: the state in which a refusal and a release race.
            limiter.unacked.store(1, Ordering::SeqCst);
            limiter.blocked.store(false, Ordering::SeqCst);
            round.store(2 * r + 1, Ordering::Release);
            woken.push(limiter.release(1));
            while round.load(Ordering::Acquire) != 2 * r + 2 {
                std::hint::spin_loop();
            }
        }
        let acquired = queue.join().unwrap();
        let lost = (0..ROUNDS).filter(|&r| !acquired[r] && !woken[r]).count();
        assert_eq!(
            lost, 0,
            "refused, and the release woke nobody, in {lost} of {ROUNDS} rounds"
        );
    }
    use amq_protocol::protocol::BasicProperties;
    use bytes::Bytes;

    fn msg(body: &str) -> Arc<Message> {
        msg_with(body, BasicProperties::default())
    }

    fn msg_with(body: &str, props: BasicProperties) -> Arc<Message> {
        Arc::new(Message::new(
            String::new(),
            "q".into(),
            crate::message::encode_properties(&props),
            &props,
            Bytes::copy_from_slice(body.as_bytes()),
        ))
    }

    fn ch(n: u16) -> ChannelKey {
        ChannelKey {
            conn: 1,
            channel: n,
            serial: u64::from(n),
        }
    }

    fn consumer(id: u64, channel: ChannelKey, prefetch: u16) -> ConsumerSpec {
        ConsumerSpec {
            id: ConsumerId(id),
            channel,
            tag: format!("ctag{id}").into(),
            no_ack: false,
            exclusive: false,
            prefetch,
            priority: 0,
            limiter: None,
        }
    }

    fn bodies(d: &[Delivery]) -> Vec<String> {
        d.iter()
            .map(|d| String::from_utf8(d.msg.body.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn round_robin_between_consumers() {
        let mut q = QueueEngine::new();
        q.add_consumer(consumer(1, ch(1), 0)).unwrap();
        q.add_consumer(consumer(2, ch(1), 0)).unwrap();
        for i in 0..4 {
            q.enqueue(msg(&i.to_string()), false, 0);
        }
        let mut out = Vec::new();
        q.dispatch(&mut out);
        let who: Vec<u64> = out.iter().map(|d| d.consumer.0).collect();
        assert_eq!(who, vec![1, 2, 1, 2]);
        assert_eq!(bodies(&out), vec!["0", "1", "2", "3"]);
    }

    #[test]
    fn prefetch_table() {
        // (per-consumer prefetch, channel-wide limit, messages, acks after first dispatch,
        //  delivered first, delivered after acks)
        let cases: &[(u16, u32, usize, usize, usize, usize)] = &[
            (0, 0, 10, 0, 10, 0),
            (1, 0, 10, 1, 1, 1),
            (3, 0, 10, 2, 3, 2),
            (0, 2, 10, 2, 2, 2),
            (5, 2, 10, 1, 2, 1),
            (2, 5, 10, 2, 2, 2),
        ];
        for (i, &(prefetch, global, n, acks, first, second)) in cases.iter().enumerate() {
            let mut q = QueueEngine::new();
            let limiter = Arc::new(ChannelLimiter::default());
            limiter.set_limit(global);
            let mut spec = consumer(1, ch(1), prefetch);
            spec.limiter = Some(limiter.clone());
            q.add_consumer(spec).unwrap();
            for j in 0..n {
                q.enqueue(msg(&j.to_string()), false, 0);
            }
            let mut out = Vec::new();
            q.dispatch(&mut out);
            assert_eq!(out.len(), first, "case {i} first");
            let seqs: Vec<Seq> = out.iter().take(acks).map(|d| d.seq).collect();
            q.ack(ch(1), &seqs);
            limiter.release(u32::try_from(seqs.len()).unwrap());
            let mut out2 = Vec::new();
            q.dispatch(&mut out2);
            assert_eq!(out2.len(), second, "case {i} second");
        }
    }

    #[test]
    fn channel_limit_is_shared_between_queues() {
        let limiter = Arc::new(ChannelLimiter::default());
        limiter.set_limit(3);
        let mut a = QueueEngine::new();
        let mut b = QueueEngine::new();
        for (q, id) in [(&mut a, 1), (&mut b, 2)] {
            let mut spec = consumer(id, ch(1), 0);
            spec.limiter = Some(limiter.clone());
            q.add_consumer(spec).unwrap();
            for j in 0..5 {
                q.enqueue(msg(&j.to_string()), false, 0);
            }
        }
        let mut out = Vec::new();
        a.dispatch(&mut out);
        b.dispatch(&mut out);
        assert_eq!(out.len(), 3);
        assert!(limiter.release(1), "a refused queue must be woken");
    }

    #[test]
    fn a_resent_publish_is_delivered_flagged_redelivered() {
        // Its first attempt may be in the log the next owner replays: a second copy must
        // not look new.
        let mut q = QueueEngine::new();
        q.enqueue(msg("first"), false, 0);
        q.enqueue(msg("again").as_resent(), false, 0);
        let (a, _) = q.get(ch(1), true, 0).unwrap();
        let (b, _) = q.get(ch(1), true, 0).unwrap();
        assert!(!a.redelivered);
        assert!(b.redelivered);
    }

    #[test]
    fn requeue_marks_redelivered_and_keeps_order() {
        let mut q = QueueEngine::new();
        for j in 0..3 {
            q.enqueue(msg(&j.to_string()), false, 0);
        }
        let (e0, _) = q.get(ch(1), false, 0).unwrap();
        let (e1, left) = q.get(ch(1), false, 0).unwrap();
        assert_eq!(left, 1);
        q.requeue(ch(1), &[e1.seq]);
        q.requeue(ch(1), &[e0.seq]);
        let got: Vec<(String, bool)> = (0..3)
            .map(|_| {
                let (e, _) = q.get(ch(1), true, 0).unwrap();
                (
                    String::from_utf8(e.msg.body.to_vec()).unwrap(),
                    e.redelivered,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![("0".into(), true), ("1".into(), true), ("2".into(), false)]
        );
        assert!(q.get(ch(1), true, 0).is_none());
    }

    #[test]
    fn acks_from_another_channel_are_ignored() {
        let mut q = QueueEngine::new();
        q.enqueue(msg("a"), true, 0);
        let (e, _) = q.get(ch(1), false, 0).unwrap();
        q.ack(ch(2), &[e.seq]);
        assert_eq!(q.unacked_count(), 1);
        q.ack(ch(1), &[e.seq]);
        assert_eq!(q.unacked_count(), 0);
        assert_eq!(q.take_settled(), vec![e.seq]);
    }

    #[test]
    fn channel_close_requeues_and_drops_consumers() {
        let mut q = QueueEngine::new();
        q.add_consumer(consumer(1, ch(1), 0)).unwrap();
        q.enqueue(msg("a"), false, 0);
        let mut out = Vec::new();
        q.dispatch(&mut out);
        assert_eq!(out.len(), 1);
        q.channel_closed(ch(1));
        assert_eq!(q.consumer_count(), 0);
        assert!(q.is_unused());
        assert_eq!(q.ready_count(), 1);
        q.add_consumer(consumer(2, ch(2), 0)).unwrap();
        let mut out = Vec::new();
        q.dispatch(&mut out);
        assert!(out[0].redelivered);
    }

    #[test]
    fn exclusive_consumer_rules() {
        let mut q = QueueEngine::new();
        let mut ex = consumer(1, ch(1), 0);
        ex.exclusive = true;
        q.add_consumer(ex).unwrap();
        assert_eq!(
            q.add_consumer(consumer(2, ch(1), 0)),
            Err(ConsumeError::ExclusiveInUse)
        );
        q.cancel(ConsumerId(1));
        q.add_consumer(consumer(2, ch(1), 0)).unwrap();
        let mut ex = consumer(3, ch(1), 0);
        ex.exclusive = true;
        assert_eq!(q.add_consumer(ex), Err(ConsumeError::ExclusiveInUse));
    }

    #[test]
    fn higher_priority_consumers_are_served_first() {
        let mut q = QueueEngine::new();
        q.add_consumer(consumer(1, ch(1), 1)).unwrap();
        let mut hi = consumer(2, ch(1), 1);
        hi.priority = 10;
        q.add_consumer(hi).unwrap();
        for j in 0..3 {
            q.enqueue(msg(&j.to_string()), false, 0);
        }
        let mut out = Vec::new();
        q.dispatch(&mut out);
        let who: Vec<u64> = out.iter().map(|d| d.consumer.0).collect();
        assert_eq!(who, vec![2, 1]);
    }

    #[test]
    fn purge_counts_ready_only_and_settles_durable() {
        let mut q = QueueEngine::new();
        q.enqueue(msg("a"), true, 0);
        q.enqueue(msg("b"), false, 0);
        q.enqueue(msg("c"), true, 0);
        let (e, _) = q.get(ch(1), false, 0).unwrap();
        assert_eq!(q.purge(), 2);
        assert_eq!(q.take_settled(), vec![2]);
        assert_eq!(q.lowest_live(), Some(e.seq));
    }

    #[test]
    fn no_ack_consumers_settle_on_delivery() {
        let mut q = QueueEngine::new();
        let mut c = consumer(1, ch(1), 1);
        c.no_ack = true;
        q.add_consumer(c).unwrap();
        for j in 0..5 {
            q.enqueue(msg(&j.to_string()), true, 0);
        }
        let mut out = Vec::new();
        q.dispatch(&mut out);
        assert_eq!(out.len(), 5, "prefetch does not apply to no-ack consumers");
        assert_eq!(q.take_settled().len(), 5);
        assert_eq!(q.unacked_count(), 0);
    }

    fn drain(q: &mut QueueEngine, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((e, _)) = q.get(ch(9), true, now) {
            out.push(String::from_utf8(e.msg.body.to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn the_lowest_live_position_counts_every_priority() {
        let mut q = QueueEngine::with_policy(QueuePolicy {
            max_priority: Some(10),
            ..Default::default()
        });
        let low = q.enqueue(msg("low"), true, 0);
        q.enqueue(
            msg_with("high", BasicProperties::default().with_priority(9)),
            true,
            0,
        );
        // "high" is served first, but "low" holds the oldest record.
        assert_eq!(q.lowest_live(), Some(low));
    }

    #[test]
    fn priorities_order_ready_messages() {
        let mut q = QueueEngine::with_policy(QueuePolicy {
            max_priority: Some(10),
            ..Default::default()
        });
        for (body, p) in [
            ("low", Some(1)),
            ("none", None),
            ("high", Some(9)),
            ("mid", Some(5)),
            ("high2", Some(9)),
            ("over", Some(200)),
        ] {
            let mut props = BasicProperties::default();
            if let Some(p) = p {
                props = props.with_priority(p);
            }
            q.enqueue(msg_with(body, props), false, 0);
        }
        assert_eq!(
            drain(&mut q, 0),
            vec!["over", "high", "high2", "mid", "low", "none"]
        );
    }

    #[test]
    fn max_length_drops_from_the_head_and_dead_letters() {
        let mut q = QueueEngine::with_policy(QueuePolicy {
            max_length: Some(2),
            dead_letter: true,
            ..Default::default()
        });
        for i in 0..5 {
            q.enqueue(msg(&i.to_string()), false, 0);
        }
        let dead: Vec<DeadReason> = q.take_dead().into_iter().map(|(_, r)| r).collect();
        assert_eq!(dead, vec![DeadReason::MaxLen; 3]);
        assert_eq!(drain(&mut q, 0), vec!["3", "4"]);
    }

    #[test]
    fn ttl_table() {
        // (queue ttl, message expiration, now at get, still there)
        let cases: &[(Option<u64>, Option<&str>, u64, bool)] = &[
            (None, None, 1_000_000, true),
            (Some(0), None, 0, false),
            (None, Some("0"), 0, false),
            (Some(100), None, 99, true),
            (Some(100), None, 100, false),
            (None, Some("50"), 49, true),
            (Some(100), Some("10"), 20, false),
            (Some(10), Some("100"), 20, false),
            (None, Some("garbage"), 1_000, true),
        ];
        for (i, &(ttl, exp, now, kept)) in cases.iter().enumerate() {
            let mut q = QueueEngine::with_policy(QueuePolicy {
                message_ttl: ttl,
                dead_letter: true,
                ..Default::default()
            });
            let mut props = BasicProperties::default();
            if let Some(e) = exp {
                props = props.with_expiration(e.into());
            }
            q.enqueue(msg_with("m", props), false, 0);
            assert_eq!(q.get(ch(1), true, now).is_some(), kept, "case {i}");
            let expired = q.take_dead().len();
            assert_eq!(expired, usize::from(!kept), "case {i}");
        }
    }

    #[test]
    fn zero_ttl_messages_reach_a_waiting_consumer() {
        let mut q = QueueEngine::with_policy(QueuePolicy {
            message_ttl: Some(0),
            ..Default::default()
        });
        q.add_consumer(consumer(1, ch(1), 0)).unwrap();
        q.enqueue(msg("now"), false, 5);
        let mut out = Vec::new();
        q.dispatch(&mut out);
        q.expire(5);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn rejected_messages_are_dead_lettered_only_with_a_dlx() {
        for dlx in [false, true] {
            let mut q = QueueEngine::with_policy(QueuePolicy {
                dead_letter: dlx,
                ..Default::default()
            });
            q.enqueue(msg("x"), true, 0);
            let (e, _) = q.get(ch(1), false, 0).unwrap();
            q.reject(ch(1), &[e.seq]);
            assert_eq!(q.take_dead().len(), usize::from(dlx));
            assert_eq!(q.take_settled(), vec![e.seq]);
        }
    }

    #[test]
    fn reject_publish_refuses_instead_of_dropping() {
        let policy = QueuePolicy {
            max_length: Some(2),
            reject_publish: true,
            ..Default::default()
        };
        let mut q = QueueEngine::with_policy(policy);
        let mut accepted = 0;
        for i in 0..5 {
            let m = msg(&i.to_string());
            if !q.would_reject(&m) {
                q.enqueue(m, false, 0);
                accepted += 1;
            }
        }
        assert_eq!(accepted, 2);
        assert_eq!(drain(&mut q, 0), vec!["0", "1"]);
    }

    #[test]
    fn single_active_consumer_gets_everything_until_it_goes() {
        let mut q = QueueEngine::with_policy(QueuePolicy {
            single_active: true,
            ..Default::default()
        });
        q.add_consumer(consumer(1, ch(1), 0)).unwrap();
        q.add_consumer(consumer(2, ch(1), 0)).unwrap();
        for i in 0..3 {
            q.enqueue(msg(&i.to_string()), false, 0);
        }
        let mut out = Vec::new();
        q.dispatch(&mut out);
        assert!(out.iter().all(|d| d.consumer == ConsumerId(1)));
        q.cancel(ConsumerId(1));
        q.enqueue(msg("after"), false, 0);
        let mut out = Vec::new();
        q.dispatch(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].consumer, ConsumerId(2));
    }
}

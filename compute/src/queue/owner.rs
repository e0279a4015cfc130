//! The queue owner: one task per queue holding its engine, fed by a bounded command
//! channel, writing enqueue and settlement records to the queue's log, and pushing
//! deliveries and confirms to connections.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use warren_storage::StorageError;

use super::engine::{
    ChannelKey, ConsumeError, ConsumerId, ConsumerSpec, DeadReason, Delivery, Entry, QueueEngine,
    QueuePolicy, Seq,
};
use super::log::{AppendFuture, QueueLog};
use super::record::{self, Record};
use crate::message::Message;
use warren_storage::client::LogPosition;

/// Commands a queue owner accepts, at most this many queued per queue.
pub const QUEUE_CHANNEL_CAPACITY: usize = 4096;
/// Commands handled before the owner flushes a batch to its log and consumers.
const MAX_BATCH: usize = 512;

/// Events a queue owner sends to a connection.
#[derive(Debug)]
pub enum ConnEvent {
    /// Messages for consumers on this connection.
    Deliver {
        /// The queue they come from (acks go back to it).
        queue: QueueHandle,
        /// The deliveries, in order.
        deliveries: Vec<Delivery>,
    },
    /// Publishes on a channel settled by a queue: `ok` false means nack.
    Confirm {
        /// The publishing channel.
        channel: ChannelKey,
        /// Publish sequence numbers.
        seqs: Vec<u64>,
        /// Durably stored (or stored in memory for the transient path).
        ok: bool,
    },
    /// A reply for a direct reply-to consumer (no queue, no ack).
    DirectReply {
        /// The consumer's channel.
        channel: ChannelKey,
        /// Its consumer tag.
        tag: Arc<str>,
        /// The reply.
        msg: Arc<Message>,
    },
    /// A publish this owner accepted but could not store (its log was taken over or
    /// failed): the publisher's connection hands it to the queue's current owner.
    Reroute {
        /// The queue.
        queue: String,
        /// The message.
        msg: Arc<Message>,
        /// Its confirm.
        confirm: ConfirmTo,
    },
    /// The queue went away under a consumer (deleted, or its owner lost the log).
    Cancelled {
        /// The consumer's channel.
        channel: ChannelKey,
        /// The consumer tag.
        tag: Arc<str>,
    },
}

/// Where a connection receives events; unbounded because prefetch bounds deliveries and
/// the owner must never wait on a connection (connections wait on owners).
pub type ConnSink = mpsc::UnboundedSender<ConnEvent>;

/// Whom to confirm a publish to.
#[derive(Clone, Debug)]
pub struct ConfirmTo {
    /// The publisher's connection.
    pub sink: ConnSink,
    /// The publisher's channel.
    pub channel: ChannelKey,
    /// The publish sequence number.
    pub seq: u64,
}

/// Current counts of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueStats {
    /// Ready messages.
    pub messages: u32,
    /// Consumers.
    pub consumers: u32,
}

/// A command for a queue owner.
#[derive(Debug)]
pub enum QueueCmd {
    /// Enqueue a message.
    Publish {
        /// The message.
        msg: Arc<Message>,
        /// Confirm to this channel once stored.
        confirm: Option<ConfirmTo>,
    },
    /// Attach a consumer.
    Consume {
        /// The consumer.
        spec: ConsumerSpec,
        /// Its connection.
        sink: ConnSink,
        /// The answer.
        reply: oneshot::Sender<Result<QueueStats, ConsumeError>>,
    },
    /// Detach a consumer.
    Cancel {
        /// The consumer.
        id: ConsumerId,
        /// Answered once detached.
        reply: Option<oneshot::Sender<()>>,
    },
    /// Settle deliveries.
    Ack {
        /// The channel that received them.
        channel: ChannelKey,
        /// Their positions.
        seqs: Vec<Seq>,
    },
    /// Reject deliveries (requeue or drop).
    Reject {
        /// The channel that received them.
        channel: ChannelKey,
        /// Their positions.
        seqs: Vec<Seq>,
        /// Put them back instead of dropping them.
        requeue: bool,
    },
    /// A channel closed: requeue its deliveries and drop its consumers.
    ChannelClosed {
        /// The channel.
        channel: ChannelKey,
    },
    /// basic.get.
    Get {
        /// The channel asking.
        channel: ChannelKey,
        /// Settle on send.
        no_ack: bool,
        /// The head message and the ready count after it.
        reply: oneshot::Sender<Option<(Entry, u32)>>,
    },
    /// queue.purge.
    Purge {
        /// How many ready messages were dropped.
        reply: oneshot::Sender<u32>,
    },
    /// Counts for queue.declare-ok.
    Stats {
        /// The counts.
        reply: oneshot::Sender<QueueStats>,
    },
    /// queue.delete: checks the conditions and stops the owner.
    Delete {
        /// Refuse if it has consumers.
        if_unused: bool,
        /// Refuse if it has ready messages.
        if_empty: bool,
        /// Ready count at deletion, or which condition failed.
        reply: oneshot::Sender<Result<u32, DeleteRefused>>,
    },
    /// Credit came back on a channel-wide limit: try to deliver.
    Wake,
    /// Another compute node took the queue over: stop serving it here.
    Superseded,
    /// Stop serving here so another node can take the queue over, if nothing is unacked
    /// and nothing consumes (no redelivery): answered true once the hand-off mark is
    /// durable, false if the queue is busy (it then goes on serving).
    HandOff {
        /// The answer.
        reply: oneshot::Sender<bool>,
    },
    /// Several publishes, acks, rejects and wakes from one connection, in order: one
    /// channel operation instead of one per message.
    Batch(Vec<QueueCmd>),
}

/// Why queue.delete was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteRefused {
    /// `if_unused` and the queue has consumers.
    InUse,
    /// `if_empty` and the queue has messages.
    NotEmpty,
}

/// What identifies a queue to connections.
#[derive(Debug)]
pub struct QueueShared {
    /// Node-unique id of this owner incarnation.
    pub id: u64,
    /// The vhost.
    pub vhost: String,
    /// The queue name.
    pub name: String,
    /// Durable queue.
    pub durable: bool,
    /// The replicated log this owner writes, if it writes one.
    pub log_id: Option<warren_common::LogId>,
    /// A proxy forwarding to the owner on another compute node, not an owner.
    pub remote: bool,
    /// The owner's command channel.
    pub tx: mpsc::Sender<QueueCmd>,
}

/// A cheap handle to a running queue owner.
#[derive(Clone, Debug)]
pub struct QueueHandle(pub Arc<QueueShared>);

impl QueueHandle {
    /// Send a command; `false` if the owner has stopped.
    pub async fn send(&self, cmd: QueueCmd) -> bool {
        self.0.tx.send(cmd).await.is_ok()
    }

    /// The shared part.
    pub fn shared(&self) -> &QueueShared {
        &self.0
    }

    /// The replicated log this owner writes, if it writes one.
    pub fn log_id(&self) -> Option<warren_common::LogId> {
        self.0.log_id
    }

    /// Whether the owner has stopped.
    pub fn is_closed(&self) -> bool {
        self.0.tx.is_closed()
    }
}

/// Called once when an auto-delete queue loses its last consumer, or the owner stops.
pub type OwnerExit = Box<dyn FnOnce(ExitReason) + Send>;

/// Receives messages a queue removed by reject, TTL or length limit, to dead-letter them.
pub type DeadLetterFn = Arc<dyn Fn(Vec<(Entry, DeadReason)>) + Send + Sync>;

/// How to run one queue owner.
pub struct OwnerConfig {
    /// Node-unique id of this owner incarnation.
    pub id: u64,
    /// The vhost.
    pub vhost: String,
    /// The queue name.
    pub name: String,
    /// Durable queue.
    pub durable: bool,
    /// Delete the queue when its last consumer goes.
    pub auto_delete: bool,
    /// Called when the owner stops.
    pub on_exit: OwnerExit,
    /// Where dead-lettered messages go (if the queue has a dead-letter exchange).
    pub dead_letter: Option<DeadLetterFn>,
    /// `x-expires` in milliseconds.
    pub expires: Option<u64>,
    /// The replicated log, for a durable owner.
    pub log_id: Option<warren_common::LogId>,
}

/// Why an owner stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// queue.delete.
    Deleted,
    /// An auto-delete queue lost its last consumer.
    AutoDeleted,
    /// The log failed (fenced by a newer owner, or storage lost).
    LogFailed,
    /// Handed off to another node while idle.
    HandedOff,
}

impl ExitReason {
    /// The queue is gone for good (not moving to another owner).
    pub fn deleted(self) -> bool {
        matches!(self, ExitReason::Deleted | ExitReason::AutoDeleted)
    }
}

/// Replay a log into a fresh engine: enqueue records restore messages (marked redelivered,
/// since a previous owner may have delivered them), settle records remove them.
pub fn replay(
    records: Vec<bytes::Bytes>,
    policy: QueuePolicy,
) -> Result<QueueEngine, record::CorruptRecord> {
    replay_handoff(records, policy).map(|(engine, _)| engine)
}

/// Like [`replay`]; when the log ends with a hand-off mark (its previous owner stopped
/// gracefully with nothing unacked), only the messages the mark lists are flagged
/// redelivered, and the second value is true: the new owner must then append a record
/// before it delivers anything, so that a later replay no longer trusts the mark.
pub fn replay_handoff(
    records: Vec<bytes::Bytes>,
    policy: QueuePolicy,
) -> Result<(QueueEngine, bool), record::CorruptRecord> {
    let mut engine = QueueEngine::with_policy(policy);
    let mut max_seq = 0;
    let mut live: std::collections::BTreeMap<Seq, Message> = std::collections::BTreeMap::new();
    let mut handoff: Option<std::collections::HashSet<Seq>> = None;
    for rec in records {
        match record::decode(rec)? {
            Record::Enqueue(items) => {
                handoff = None;
                for (seq, msg) in items {
                    max_seq = max_seq.max(seq + 1);
                    live.insert(seq, msg);
                }
            }
            Record::Settle(seqs) => {
                handoff = None;
                for s in seqs {
                    live.remove(&s);
                }
            }
            Record::HandOff(seqs) => handoff = Some(seqs.into_iter().collect()),
        }
    }
    for (seq, msg) in live {
        // TTLs restart at takeover: the log keeps no enqueue times.
        engine.restore(Entry {
            seq,
            msg: Arc::new(msg),
            redelivered: handoff.as_ref().is_none_or(|r| r.contains(&seq)),
            durable: true,
            expires_at: None,
            rank: 0,
        });
    }
    engine.bump_seq(max_seq);
    Ok((engine, handoff.is_some()))
}

struct PendingAppend {
    fut: AppendFuture,
    confirms: Vec<(Arc<Message>, ConfirmTo)>,
    /// The first position (seq) of an enqueue batch, reported back with its log position
    /// so the owner knows where it may trim.
    first_seq: Option<Seq>,
}

/// How long an append may stay unacknowledged before the owner gives its log up.
const APPEND_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// Settlements between two attempts to trim the log.
const TRIM_EVERY: usize = 8192;

/// The owner's state besides the engine.
pub struct Owner<L: QueueLog> {
    engine: QueueEngine,
    log: L,
    handle: QueueHandle,
    auto_delete: bool,
    sinks: HashMap<u64, ConnSink>,
    on_exit: Option<OwnerExit>,
    dead_letter: Option<DeadLetterFn>,
    clock: tokio::time::Instant,
    /// `x-expires` in milliseconds: delete after this long without consumers or use.
    expires: Option<u64>,
    last_used: u64,
    appends: mpsc::UnboundedSender<PendingAppend>,
    failures: mpsc::UnboundedReceiver<StorageError>,
    positions: mpsc::UnboundedReceiver<(Seq, LogPosition)>,
    /// Durable enqueue batches: first seq and log position, oldest first.
    batches: std::collections::VecDeque<(Seq, LogPosition)>,
    settled_since_trim: usize,
    batch_durable: Vec<(Seq, Arc<Message>)>,
    batch_confirms_durable: Vec<(Arc<Message>, ConfirmTo)>,
    batch_confirms_now: Vec<ConfirmTo>,
    deliveries: Vec<Delivery>,
    /// A hand-off accepted: answered once its mark is durable.
    handoff: Option<oneshot::Sender<bool>>,
}

/// Start an owner task for a queue whose engine was rebuilt from `log`.
pub fn spawn<L: QueueLog>(engine: QueueEngine, log: L, config: OwnerConfig) -> QueueHandle {
    let (tx, rx) = mpsc::channel(QUEUE_CHANNEL_CAPACITY);
    let OwnerConfig {
        id,
        vhost,
        name,
        durable,
        auto_delete,
        on_exit,
        dead_letter,
        expires,
        log_id,
    } = config;
    let handle = QueueHandle(Arc::new(QueueShared {
        id,
        vhost,
        name,
        durable,
        log_id,
        remote: false,
        tx,
    }));
    let (appends, appends_rx) = mpsc::unbounded_channel();
    let (fail_tx, failures) = mpsc::unbounded_channel();
    let (pos_tx, positions) = mpsc::unbounded_channel();
    tokio::spawn(confirmer(
        appends_rx,
        fail_tx,
        pos_tx,
        handle.0.name.clone(),
    ));
    let owner = Owner {
        engine,
        log,
        handle: handle.clone(),
        auto_delete,
        sinks: HashMap::new(),
        on_exit: Some(on_exit),
        dead_letter,
        clock: tokio::time::Instant::now(),
        expires,
        last_used: 0,
        appends,
        failures,
        positions,
        batches: std::collections::VecDeque::new(),
        settled_since_trim: 0,
        batch_durable: Vec::new(),
        batch_confirms_durable: Vec::new(),
        batch_confirms_now: Vec::new(),
        deliveries: Vec::new(),
        handoff: None,
    };
    tokio::spawn(owner.run(rx));
    handle
}

async fn confirmer(
    mut rx: mpsc::UnboundedReceiver<PendingAppend>,
    failures: mpsc::UnboundedSender<StorageError>,
    positions: mpsc::UnboundedSender<(Seq, LogPosition)>,
    queue: String,
) {
    let mut failed = false;
    while let Some(p) = rx.recv().await {
        let ok = if failed {
            false
        } else {
            let result = match tokio::time::timeout(APPEND_STALL, p.fut).await {
                Ok(r) => r,
                // A writer whose appends stop resolving is as good as failed: the next owner
                // takes the log over (fencing this writer) and recovers what reached a quorum.
                Err(_) => Err(StorageError::Unavailable(format!(
                    "append not acknowledged within {APPEND_STALL:?}"
                ))),
            };
            match result {
                Ok(pos) => {
                    if let (Some(seq), Some(pos)) = (p.first_seq, pos) {
                        let _ = positions.send((seq, pos));
                    }
                    true
                }
                Err(e) => {
                    failed = true;
                    let _ = failures.send(e);
                    false
                }
            }
        };
        if ok {
            send_confirms(p.confirms.into_iter().map(|(_, c)| c).collect(), true);
        } else {
            for (msg, confirm) in p.confirms {
                reroute(&queue, msg, confirm);
            }
        }
    }
}

/// Give a publish back to its publisher's connection for the queue's next owner.
fn reroute(queue: &str, msg: Arc<Message>, confirm: ConfirmTo) {
    let sink = confirm.sink.clone();
    let _ = sink.send(ConnEvent::Reroute {
        queue: queue.to_string(),
        msg,
        confirm,
    });
}

/// Answer the confirms of publishes a stopped owner will never handle: confirmed if the
/// queue was deleted (as RabbitMQ does), else rerouted to the queue's next owner.
fn confirm_dropped(cmd: QueueCmd, deleted: bool, queue: &str) {
    match cmd {
        QueueCmd::Publish {
            msg,
            confirm: Some(c),
        } => {
            if deleted {
                send_confirms(vec![c], true);
            } else {
                reroute(queue, msg, c);
            }
        }
        QueueCmd::Batch(cmds) => {
            for c in cmds {
                confirm_dropped(c, deleted, queue);
            }
        }
        _ => {}
    }
}

fn send_confirms(confirms: Vec<ConfirmTo>, ok: bool) {
    if confirms.is_empty() {
        return;
    }
    let mut grouped: Vec<(ChannelKey, ConnSink, Vec<u64>)> = Vec::new();
    for c in confirms {
        match grouped.iter_mut().find(|(k, _, _)| *k == c.channel) {
            Some((_, _, seqs)) => seqs.push(c.seq),
            None => grouped.push((c.channel, c.sink, vec![c.seq])),
        }
    }
    for (channel, sink, seqs) in grouped {
        let _ = sink.send(ConnEvent::Confirm { channel, seqs, ok });
    }
}

impl<L: QueueLog> Owner<L> {
    async fn run(mut self, mut rx: mpsc::Receiver<QueueCmd>) {
        let reason = loop {
            let unused_deadline = match self.expires {
                Some(ttl) if self.engine.consumer_count() == 0 => {
                    Some(self.last_used.saturating_add(ttl))
                }
                _ => None,
            };
            let expiry = match (self.engine.next_expiry(), unused_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wake_at = self.clock + std::time::Duration::from_millis(expiry.unwrap_or(0));
            let cmd = tokio::select! {
                biased;
                err = self.failures.recv() => {
                    if let Some(e) = err {
                        warn!(queue = %self.handle.0.name, error = %e, "queue log failed; queue stops serving on this node");
                    }
                    break ExitReason::LogFailed;
                }
                cmd = rx.recv() => cmd,
                _ = tokio::time::sleep_until(wake_at), if expiry.is_some() => {
                    self.flush();
                    if unused_deadline.is_some_and(|d| self.now() >= d)
                        && self.engine.consumer_count() == 0
                    {
                        // x-expires: unused for the whole period.
                        break ExitReason::AutoDeleted;
                    }
                    continue;
                }
            };
            // The owner holds a sender itself, so the channel never closes under it.
            let Some(cmd) = cmd else {
                break ExitReason::Deleted;
            };
            let mut stop = self.handle_cmd(cmd);
            let mut n = 1;
            while stop.is_none() && n < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => stop = self.handle_cmd(cmd),
                    Err(_) => break,
                }
                n += 1;
            }
            self.flush();
            if let Some(reason) = stop {
                break reason;
            }
            if self.settled_since_trim >= TRIM_EVERY {
                self.trim().await;
            }
            if self.auto_delete && self.engine.is_unused() {
                break ExitReason::AutoDeleted;
            }
        };
        self.flush();
        // Cancel consumers so clients learn the queue is gone.
        for (_, channel, tag) in self.engine.consumers_of() {
            if let Some(sink) = self.sinks.get(&channel.conn) {
                let _ = sink.send(ConnEvent::Cancelled { channel, tag });
            }
        }
        if let Some(reply) = self.handoff.take() {
            // After every record of the publishes this owner took: the mark is last.
            let mark = record::encode_handoff(&self.engine.ready_redelivered());
            let fut = self.log.append(mark);
            let ok = matches!(tokio::time::timeout(APPEND_STALL, fut).await, Ok(Ok(_)));
            let _ = reply.send(ok);
        }
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            confirm_dropped(cmd, reason.deleted(), &self.handle.0.name);
        }
        debug!(queue = %self.handle.0.name, ?reason, "queue owner stopped");
        if let Some(f) = self.on_exit.take() {
            f(reason);
        }
    }

    /// Let storage free log segments that hold only settled messages. Everything before
    /// the enqueue batch holding the oldest live message is dead: enqueues there are all
    /// settled, and settlements there only concern them.
    async fn trim(&mut self) {
        self.settled_since_trim = 0;
        while let Ok(b) = self.positions.try_recv() {
            self.batches.push_back(b);
        }
        let lowest = self.engine.lowest_live().unwrap_or(self.engine.next_seq());
        while self.batches.len() >= 2 && self.batches[1].0 <= lowest {
            self.batches.pop_front();
        }
        // A live message older than every batch this owner wrote (one it replayed after a
        // takeover) has its record in a segment before all of them: nothing can go yet.
        let Some(&(first, before)) = self.batches.front() else {
            return;
        };
        if first > lowest {
            return;
        }
        if let Err(e) = self.log.trim(before).await {
            debug!(queue = %self.handle.0.name, error = %e, "log trim failed; will retry later");
        }
    }

    /// Milliseconds on the owner's clock (tokio's, so tests can pause time).
    fn now(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn handle_cmd(&mut self, cmd: QueueCmd) -> Option<ExitReason> {
        match cmd {
            QueueCmd::Publish { msg, confirm } => {
                if self.engine.would_reject(&msg) {
                    // x-overflow = reject-publish: RabbitMQ nacks (or silently drops).
                    if let Some(c) = confirm {
                        send_confirms(vec![c], false);
                    }
                    return None;
                }
                let durable = self.log.is_durable() && msg.persistent;
                let now = self.now();
                let seq = self.engine.enqueue(msg.clone(), durable, now);
                if durable {
                    if let Some(c) = confirm {
                        self.batch_confirms_durable.push((msg.clone(), c));
                    }
                    self.batch_durable.push((seq, msg));
                } else if let Some(c) = confirm {
                    self.batch_confirms_now.push(c);
                }
            }
            QueueCmd::Consume { spec, sink, reply } => {
                self.last_used = self.now();
                self.sinks.entry(spec.channel.conn).or_insert(sink);
                let r = self.engine.add_consumer(spec).map(|()| self.stats());
                let _ = reply.send(r);
            }
            QueueCmd::Cancel { id, reply } => {
                self.last_used = self.now();
                self.engine.cancel(id);
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            QueueCmd::Ack { channel, seqs } => self.engine.ack(channel, &seqs),
            QueueCmd::Reject {
                channel,
                seqs,
                requeue,
            } => {
                if requeue {
                    self.engine.requeue(channel, &seqs);
                } else {
                    self.engine.reject(channel, &seqs);
                }
            }
            QueueCmd::ChannelClosed { channel } => self.engine.channel_closed(channel),
            QueueCmd::Get {
                channel,
                no_ack,
                reply,
            } => {
                let now = self.now();
                self.last_used = now;
                let r = self.engine.get(channel, no_ack, now);
                let _ = reply.send(r);
            }
            QueueCmd::Purge { reply } => {
                let _ = reply.send(self.engine.purge());
            }
            QueueCmd::Stats { reply } => {
                self.last_used = self.now();
                let _ = reply.send(self.stats());
            }
            QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            } => {
                if if_unused && self.engine.consumer_count() > 0 {
                    let _ = reply.send(Err(DeleteRefused::InUse));
                } else if if_empty && self.engine.ready_count() > 0 {
                    let _ = reply.send(Err(DeleteRefused::NotEmpty));
                } else {
                    let _ = reply.send(Ok(self.engine.ready_count()));
                    return Some(ExitReason::Deleted);
                }
            }
            QueueCmd::Wake => {}
            QueueCmd::Superseded => {
                warn!(queue = %self.handle.0.name, "queue taken over by another compute node; it stops serving here");
                return Some(ExitReason::LogFailed);
            }
            QueueCmd::HandOff { reply } => {
                if self.log.is_durable()
                    && self.handoff.is_none()
                    && self.engine.unacked_count() == 0
                    && self.engine.consumer_count() == 0
                    && !self.engine.has_transient()
                {
                    self.handoff = Some(reply);
                    return Some(ExitReason::HandedOff);
                }
                let _ = reply.send(false);
            }
            QueueCmd::Batch(cmds) => {
                let mut stop = None;
                for cmd in cmds {
                    if stop.is_none() {
                        stop = self.handle_cmd(cmd);
                    } else {
                        confirm_dropped(
                            cmd,
                            stop.is_some_and(ExitReason::deleted),
                            &self.handle.0.name,
                        );
                    }
                }
                return stop;
            }
        }
        None
    }

    fn stats(&self) -> QueueStats {
        QueueStats {
            messages: self.engine.ready_count(),
            consumers: self.engine.consumer_count(),
        }
    }

    /// Write the batch's records, release confirms, and deliver.
    fn flush(&mut self) {
        self.engine.dispatch(&mut self.deliveries);
        // After dispatch, so a zero TTL still reaches a consumer that is waiting.
        let now = self.now();
        self.engine.expire(now);
        let dead = self.engine.take_dead();
        if !dead.is_empty()
            && let Some(f) = &self.dead_letter
        {
            f(dead);
        }
        if !self.batch_durable.is_empty() {
            let first_seq = self.batch_durable.first().map(|(s, _)| *s);
            let rec = record::encode_enqueue(self.batch_durable.iter().map(|(s, m)| (*s, &**m)));
            self.batch_durable.clear();
            let fut = self.log.append(rec);
            let confirms = std::mem::take(&mut self.batch_confirms_durable);
            let _ = self.appends.send(PendingAppend {
                fut,
                confirms,
                first_seq,
            });
        }
        let settled = self.engine.take_settled();
        if !settled.is_empty() && self.log.is_durable() {
            self.settled_since_trim += settled.len();
            let fut = self.log.append(record::encode_settle(&settled));
            let _ = self.appends.send(PendingAppend {
                fut,
                confirms: Vec::new(),
                first_seq: None,
            });
        }
        if !self.batch_confirms_now.is_empty() {
            send_confirms(std::mem::take(&mut self.batch_confirms_now), true);
        }
        if self.deliveries.is_empty() {
            return;
        }
        let mut all = std::mem::take(&mut self.deliveries);
        // Deliveries for one connection go in one event, in order.
        if all.iter().all(|d| d.channel.conn == all[0].channel.conn) {
            let conn = all[0].channel.conn;
            self.send_deliveries(conn, all);
        } else {
            let mut by_conn: Vec<(u64, Vec<Delivery>)> = Vec::new();
            for d in all.drain(..) {
                match by_conn.iter_mut().find(|(c, _)| *c == d.channel.conn) {
                    Some((_, v)) => v.push(d),
                    None => by_conn.push((d.channel.conn, vec![d])),
                }
            }
            for (conn, ds) in by_conn {
                self.send_deliveries(conn, ds);
            }
        }
    }

    fn send_deliveries(&mut self, conn: u64, deliveries: Vec<Delivery>) {
        let Some(sink) = self.sinks.get(&conn) else {
            return;
        };
        let ev = ConnEvent::Deliver {
            queue: self.handle.clone(),
            deliveries,
        };
        if let Err(mpsc::error::SendError(ConnEvent::Deliver { deliveries, .. })) = sink.send(ev) {
            // The connection is gone; its channel-closed commands will requeue these.
            self.sinks.remove(&conn);
            for d in deliveries {
                if !d.no_ack {
                    self.engine.requeue(d.channel, &[d.seq]);
                }
            }
        }
    }
}

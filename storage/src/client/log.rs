//! Queue logs: takeover ([`acquire`]), the single writer ([`LogWriter`]), and deletion.
//! The decisions are made by [`crate::protocol`]'s state machines; this is their driver.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use warren_common::{Epoch, LogId, NodeId, SegmentId};
use warren_proto::internal::data::{Request, Response};

use super::repair;
use super::transport::{Conn, ReplyTo};
use super::{ClientInner, LogEntry, LogPosition};
use crate::StorageError;
use crate::meta::{self, LogMeta, SegmentMeta};
use crate::protocol::ownership::{self, Seal, Takeover, TakeoverAction, TakeoverFailure};
use crate::protocol::placement::{choose_ensemble, choose_replacement};
use crate::protocol::quorum::{AppendQuorum, SendEntry};
use crate::protocol::recovery::{EntryAnswer, FenceAnswer, RecoveryAction};

/// Takeover attempts before `acquire_log` gives up with a retryable error.
const ACQUIRE_ATTEMPTS: usize = 8;
/// Most bytes a read asks one node for.
const READ_MAX_BYTES: u32 = 8 * 1024 * 1024;

fn decode_meta(bytes: Option<&Bytes>) -> Result<Option<LogMeta>, StorageError> {
    bytes.map(meta::decode).transpose()
}

/// Take over `log` (RFC 0001, "Takeover"), retrying transient failures.
pub(crate) async fn acquire(
    client: Arc<ClientInner>,
    log: LogId,
) -> Result<LogWriter, StorageError> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_acquire(&client, log).await {
            Err(e) if e.is_retryable() && attempt < ACQUIRE_ATTEMPTS => {
                tracing::debug!(%log, error = %e, attempt, "takeover failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// One takeover, driving [`Takeover`] (the state machine the ownership simulation checks):
/// this does its I/O, the descriptor CASes and the fence, read and write requests to the
/// open segment's members, and feeds the answers back.
async fn try_acquire(client: &Arc<ClientInner>, log: LogId) -> Result<LogWriter, StorageError> {
    client.refresh_registry().await?;
    let repl = client.config.replication;
    // Every segment lives on a full write quorum (RFC 0001). Fewer registered nodes only
    // happens while the cluster is still starting; a segment opened then on `Qa` nodes
    // would stop taking appends, and could not be recovered, after losing any one of them,
    // even once a spare node exists. Checked before raising the epoch, so that waiting for
    // the nodes to register does not churn the descriptor; retrying re-reads the registry.
    let registered = client.candidates().len();
    if registered < repl.write_quorum {
        return Err(StorageError::Unavailable(format!(
            "only {registered} storage nodes registered, write quorum is {}",
            repl.write_quorum
        )));
    }
    let key = meta::log_key(log);
    let me = client.config.node_id;
    let (mut takeover, mut actions) = Takeover::start();
    // Answers of the open segment's members, for the recovery steps.
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The segment that was open when the epoch was raised (the one recovered).
    let mut open: Option<SegmentMeta> = None;
    // The descriptor as the seal-and-open CAS wrote it, and the segment it sealed.
    let mut opened: Option<(LogMeta, Option<(SegmentMeta, Seal)>)> = None;
    loop {
        for action in std::mem::take(&mut actions) {
            actions.extend(match action {
                // Step 1: raise the epoch. From here on no descriptor change by an older
                // writer lands.
                TakeoverAction::RaiseEpoch => {
                    let written = client
                        .registers
                        .update(&key, |cur| {
                            let mut m = decode_meta(cur)?.unwrap_or_default();
                            ownership::raise_epoch(&mut m, me).map_err(|_| {
                                StorageError::NotFound(format!("log {log} was deleted"))
                            })?;
                            Ok::<_, StorageError>(Some(meta::encode(&m)))
                        })
                        .await??;
                    let m = decode_meta(written.as_ref())?
                        .ok_or_else(|| StorageError::Corrupt("log descriptor vanished".into()))?;
                    let next = takeover.on_raised(Ok(m));
                    open = takeover.open_segment().cloned();
                    next
                }
                // Steps 2-4: fence and recover the open segment.
                TakeoverAction::Recover(action) => {
                    let (Some(segment), Some(epoch)) = (takeover.open_segment(), takeover.epoch())
                    else {
                        continue;
                    };
                    send_recovery(client, segment, epoch, action, &tx);
                    Vec::new()
                }
                // Step 5: seal it and open ours, in one CAS conditional on our epoch.
                TakeoverAction::SealAndOpen { epoch, seal } => {
                    if let Some(seal) = seal {
                        tracing::info!(%log, %epoch, segment = %seal.segment, end = seal.end,
                            degraded = seal.under_replicated, "recovered open segment");
                    }
                    let sealed = open.take().zip(seal);
                    let m = seal_and_open(client, log, epoch, seal).await?;
                    opened = Some((m, sealed));
                    takeover.on_opened(Ok(()))
                }
            });
        }
        match takeover.outcome() {
            Some(Ok(_)) => break,
            Some(Err(TakeoverFailure::Superseded(e))) => {
                return Err(StorageError::Fenced(format!(
                    "log {log}: an open segment was fenced at epoch {e} by a newer writer"
                )));
            }
            Some(Err(TakeoverFailure::Unavailable)) => {
                return Err(StorageError::Unavailable(format!(
                    "log {log}: too few members of the open segment answered recovery"
                )));
            }
            Some(Err(TakeoverFailure::Deleted)) => {
                return Err(StorageError::NotFound(format!("log {log} was deleted")));
            }
            None => {}
        }
        if actions.is_empty() {
            let Some((action, result)) = rx.recv().await else {
                return Err(StorageError::Unavailable(
                    "recovery lost its replies".into(),
                ));
            };
            actions = feed_recovery(&mut takeover, action, result);
        }
    }
    let Some((m, sealed)) = opened else {
        return Err(StorageError::Corrupt(
            "takeover ended without a segment".into(),
        ));
    };
    if let Some((s, seal)) = sealed {
        // Metadata is the truth; telling the nodes only lets them refuse stragglers early.
        let client = client.clone();
        tokio::spawn(async move {
            let req = if seal.end == 0 {
                Request::Delete { segment: s.id.0 }
            } else {
                Request::Seal {
                    segment: s.id.0,
                    end: seal.end,
                }
            };
            for node in s.ensemble {
                let _ = client.node_request(node, req.clone()).await;
            }
        });
    }
    LogWriter::open(client.clone(), log, m).await
}

/// Takeover step 5: choose a fresh ensemble, and in one CAS conditional on `epoch` seal the
/// recovered segment (or drop it when empty) and open the new one. Returns the descriptor
/// as written.
async fn seal_and_open(
    client: &Arc<ClientInner>,
    log: LogId,
    epoch: Epoch,
    seal: Option<Seal>,
) -> Result<LogMeta, StorageError> {
    let repl = client.config.replication;
    let id = SegmentId(rand::random());
    let ensemble = choose_ensemble(
        &client.candidates(),
        repl.write_quorum,
        repl.per_zone,
        id.0,
        &[],
    );
    if ensemble.len() < repl.write_quorum {
        return Err(StorageError::Unavailable(format!(
            "only {} storage nodes registered, write quorum is {}",
            ensemble.len(),
            repl.write_quorum
        )));
    }
    let segment = SegmentMeta {
        id,
        epoch,
        ensemble,
        ack_quorum: repl.ack_quorum,
        end: None,
        under_replicated: false,
    };
    let written = client
        .registers
        .update(&meta::log_key(log), |cur| {
            let mut m = decode_meta(cur)?
                .ok_or_else(|| StorageError::Fenced(format!("log {log} was deleted")))?;
            ownership::seal_and_open(&mut m, epoch, seal, segment.clone()).map_err(|f| {
                StorageError::Fenced(match f {
                    TakeoverFailure::Superseded(now) => {
                        format!("log {log} taken over at {now} during our takeover at {epoch}")
                    }
                    _ => format!("log {log} was deleted"),
                })
            })?;
            Ok::<_, StorageError>(Some(meta::encode(&m)))
        })
        .await??;
    decode_meta(written.as_ref())?
        .ok_or_else(|| StorageError::Corrupt("log descriptor vanished".into()))
}

/// Send one recovery step to its member of `segment`; the answer comes back on `tx`.
fn send_recovery(
    client: &Arc<ClientInner>,
    segment: &SegmentMeta,
    epoch: Epoch,
    action: RecoveryAction,
    tx: &mpsc::UnboundedSender<(RecoveryAction, Result<Response, StorageError>)>,
) {
    let (member, req) = match &action {
        RecoveryAction::Fence { member } => (
            *member,
            Request::Fence {
                segment: segment.id.0,
                epoch: epoch.0,
            },
        ),
        RecoveryAction::Read { member, entry } => (
            *member,
            Request::Read {
                segment: segment.id.0,
                from: *entry,
                max_entries: 1,
                max_bytes: READ_MAX_BYTES,
            },
        ),
        RecoveryAction::Write {
            member,
            entry,
            payload,
        } => (
            *member,
            Request::Append {
                segment: segment.id.0,
                epoch: epoch.0,
                entry: *entry,
                lac: None,
                payload: payload.clone(),
            },
        ),
    };
    let Some(&node) = segment.ensemble.get(member) else {
        // Never happens (recovery numbers the segment's own members); answered as a failed
        // member rather than left unanswered, which would stall the takeover.
        let _ = tx.send((
            action,
            Err(StorageError::Corrupt(format!(
                "segment {} has no member {member}",
                segment.id
            ))),
        ));
        return;
    };
    let client = client.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let r = client.node_request(node, req).await;
        let _ = tx.send((action, r));
    });
}

/// Feed a member's answer to a recovery step to the takeover.
fn feed_recovery(
    takeover: &mut Takeover,
    action: RecoveryAction,
    result: Result<Response, StorageError>,
) -> Vec<TakeoverAction> {
    match action {
        RecoveryAction::Fence { member } => {
            let answer = match result {
                Ok(Response::FenceOk {
                    last_entry,
                    lac,
                    end,
                }) => FenceAnswer::Fenced {
                    last_entry,
                    lac,
                    end,
                },
                Ok(Response::Fenced { epoch }) => FenceAnswer::Superseded(epoch),
                _ => FenceAnswer::Failed,
            };
            takeover.on_fence(member, answer)
        }
        RecoveryAction::Read { member, entry } => {
            let answer = match result {
                Ok(Response::Entries { entries, .. }) => entries
                    .into_iter()
                    .find(|e| e.entry == entry)
                    .map_or(EntryAnswer::Absent, |e| EntryAnswer::Ok(Some(e.payload))),
                Ok(Response::Fenced { epoch }) => EntryAnswer::Superseded(epoch),
                _ => EntryAnswer::Failed,
            };
            takeover.on_read(member, entry, answer)
        }
        RecoveryAction::Write { member, entry, .. } => {
            let answer = match result {
                Ok(Response::Ok) => EntryAnswer::Ok(None),
                Ok(Response::Fenced { epoch }) => EntryAnswer::Superseded(epoch),
                _ => EntryAnswer::Failed,
            };
            takeover.on_write(member, entry, answer)
        }
    }
}

/// Delete `log`: mark it deleted (raising its epoch, so its writer's descriptor changes
/// fail) and drop its segments on the storage nodes, which then refuse its appends.
pub(crate) async fn delete(client: &Arc<ClientInner>, log: LogId) -> Result<(), StorageError> {
    client.refresh_registry().await?;
    let key = meta::log_key(log);
    let written = client
        .registers
        .update(&key, |cur| {
            let Some(mut m) = decode_meta(cur)? else {
                return Ok(None);
            };
            m.deleted = true;
            m.epoch = m.epoch.next();
            m.owner = None;
            Ok::<_, StorageError>(Some(meta::encode(&m)))
        })
        .await??;
    let Some(m) = decode_meta(written.as_ref())? else {
        return Ok(());
    };
    delete_segments(client, &m.segments).await;
    Ok(())
}

async fn delete_segments(client: &Arc<ClientInner>, segments: &[SegmentMeta]) {
    let mut calls = JoinSet::new();
    for s in segments {
        for node in &s.ensemble {
            let client = client.clone();
            let (node, segment) = (*node, s.id);
            calls.spawn(async move {
                if let Err(e) = client
                    .node_request(node, Request::Delete { segment: segment.0 })
                    .await
                {
                    // Its entries stay on that node until an orphan scrub removes them.
                    tracing::warn!(%node, %segment, error = %e, "could not delete segment");
                }
            });
        }
    }
    while calls.join_next().await.is_some() {}
}

/// The single writer of one queue log, at one epoch.
pub struct LogWriter {
    core: Arc<Core>,
}

struct Core {
    client: Arc<ClientInner>,
    log: LogId,
    epoch: Epoch,
    replies: mpsc::UnboundedSender<(u64, Result<Response, StorageError>)>,
    st: Mutex<WriterState>,
}

type Waiter = oneshot::Sender<Result<LogPosition, StorageError>>;

/// A move to a new segment: on a full segment (roll) or a failed member (ensemble change).
struct Switch {
    // Appends waiting for the new segment, in order (after a failure, the old segment's
    // unresolved entries come first).
    parked: VecDeque<(Bytes, Waiter)>,
    // A roll lets the entries in flight resolve in the old segment before sealing it.
    draining: bool,
    // The seal-and-open CAS is running.
    started: bool,
}

struct WriterState {
    meta: LogMeta,
    seg_index: u32,
    segment: SegmentMeta,
    // Bumped at every switch to a new segment; replies and reconnects for an older
    // segment are recognised by it and ignored.
    generation: u16,
    conns: Vec<Option<Arc<Conn>>>,
    reconnecting: Vec<bool>,
    quorum: AppendQuorum,
    // One per unresolved entry, in entry order.
    waiters: VecDeque<Waiter>,
    // A switch to a new segment in progress, if any.
    switch: Option<Switch>,
    // After a switch failed (metadata unreachable), none is tried again before this.
    no_switch_before: Option<std::time::Instant>,
    // Payload bytes sent to the current segment.
    segment_bytes: u64,
    // A member of the current segment was down at some point: some entries may be on
    // fewer than all members.
    degraded: bool,
    fenced: Option<String>,
}

// Reply tag: segment generation (16 bits), member (8 bits), entry id (40 bits).
fn tag(generation: u16, member: usize, entry: u64) -> u64 {
    (u64::from(generation) << 48) | ((member as u64 & 0xff) << 40) | (entry & ((1 << 40) - 1))
}

fn untag(tag: u64) -> (u16, usize, u64) {
    (
        (tag >> 48) as u16,
        ((tag >> 40) & 0xff) as usize,
        tag & ((1 << 40) - 1),
    )
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, WriterState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the members and repair marks of sealed segments from a newer descriptor
    /// (a repair may have moved copies); the open segment is this writer's own.
    fn merge_sealed(&self, m: &LogMeta) {
        let mut st = self.lock();
        for s in st.meta.segments.iter_mut().filter(|s| s.end.is_some()) {
            if let Some(n) = m.segments.iter().find(|n| n.id == s.id) {
                s.ensemble.clone_from(&n.ensemble);
                s.under_replicated = n.under_replicated;
            }
        }
    }

    fn send(&self, st: &WriterState, s: SendEntry) {
        if let Some(conn) = &st.conns[s.member] {
            conn.submit(
                Request::Append {
                    segment: st.segment.id.0,
                    epoch: self.epoch.0,
                    entry: s.entry,
                    lac: s.lac,
                    payload: s.payload,
                },
                ReplyTo::Queue(self.replies.clone(), tag(st.generation, s.member, s.entry)),
            );
        }
    }

    fn push(&self, st: &mut WriterState, payload: Bytes, waiter: Waiter) {
        st.segment_bytes += payload.len() as u64;
        let (_, sends) = st.quorum.push(payload);
        st.waiters.push_back(waiter);
        for s in sends {
            self.send(st, s);
        }
    }

    fn fence(&self, st: &mut WriterState, reason: String) {
        if st.fenced.is_none() {
            tracing::warn!(log = %self.log, epoch = %self.epoch, %reason, "log writer fenced");
        }
        st.quorum.take_unresolved();
        for w in st.waiters.drain(..) {
            let _ = w.send(Err(StorageError::Fenced(reason.clone())));
        }
        for (_, w) in st.switch.take().map(|s| s.parked).unwrap_or_default() {
            let _ = w.send(Err(StorageError::Fenced(reason.clone())));
        }
        st.fenced = Some(reason);
    }

    fn on_reply(self: &Arc<Self>, tag: u64, result: Result<Response, StorageError>) {
        let (generation, member, entry) = untag(tag);
        let mut st = self.lock();
        if st.fenced.is_some() || generation != st.generation {
            return;
        }
        match result {
            Ok(Response::Ok) => {
                let resolved = st.quorum.on_ack(member, entry);
                let segment = st.seg_index;
                for e in resolved {
                    if let Some(w) = st.waiters.pop_front() {
                        let _ = w.send(Ok(LogPosition { segment, entry: e }));
                    }
                }
                self.maybe_switch(&mut st);
            }
            Ok(Response::Fenced { epoch }) => {
                let reason = format!(
                    "log {} segment {} fenced at epoch {epoch} (ours is {})",
                    self.log, st.segment.id, self.epoch
                );
                self.fence(&mut st, reason);
            }
            // A storage node refused this compute generation (it was evicted).
            Err(StorageError::Fenced(reason)) => self.fence(&mut st, reason),
            other => {
                st.quorum.on_member_down(member);
                st.degraded = true;
                st.conns[member] = None;
                if st.reconnecting[member] {
                    return;
                }
                let node = st.segment.ensemble[member];
                tracing::debug!(log = %self.log, %node, answer = ?other, "ensemble member failed");
                self.client.mark_failed(node);
                st.reconnecting[member] = true;
                tokio::spawn(reconnect(Arc::downgrade(self), st.generation, member));
                // A healthy spare node means the segment can get back to full replication
                // at once instead of waiting for this member.
                let spare = self
                    .client
                    .candidates()
                    .iter()
                    .any(|c| c.live && !st.segment.ensemble.contains(&c.id));
                if spare && switch_allowed(&st) {
                    self.start_ensemble_change(&mut st);
                }
            }
        }
    }

    /// Start rolling to a new segment: later appends wait, those in flight resolve here.
    fn start_roll(self: &Arc<Self>, st: &mut WriterState) {
        if st.switch.is_none() && switch_allowed(st) {
            st.switch = Some(Switch {
                parked: VecDeque::new(),
                draining: true,
                started: false,
            });
            self.maybe_switch(st);
        }
    }

    /// Move to a new ensemble now: the unresolved entries go to the new segment, ahead of
    /// any parked appends.
    fn start_ensemble_change(self: &Arc<Self>, st: &mut WriterState) {
        let sw = st.switch.get_or_insert_with(|| Switch {
            parked: VecDeque::new(),
            draining: false,
            started: false,
        });
        if sw.started {
            // The CAS is under way; nothing is in flight in the old segment any more.
            return;
        }
        sw.draining = false;
        let moved: Vec<_> = st
            .quorum
            .take_unresolved()
            .into_iter()
            .zip(st.waiters.drain(..))
            .collect();
        for m in moved.into_iter().rev() {
            sw.parked.push_front(m);
        }
        self.maybe_switch(st);
    }

    fn maybe_switch(self: &Arc<Self>, st: &mut WriterState) {
        let idle = st.quorum.in_flight() == 0;
        if let Some(sw) = st.switch.as_mut()
            && !sw.started
            && (!sw.draining || idle)
        {
            sw.started = true;
            tokio::spawn(change_ensemble(Arc::downgrade(self)));
        }
    }
}

fn switch_allowed(st: &WriterState) -> bool {
    st.no_switch_before
        .is_none_or(|t| std::time::Instant::now() >= t)
}

/// Attempts at a segment switch before the writer gives up on it for a while.
const SWITCH_ATTEMPTS: usize = 3;
/// How long the writer keeps to its segment after a failed switch.
const SWITCH_BACKOFF: Duration = Duration::from_secs(10);

/// Seal the frozen segment at its last resolved entry and continue in a new segment on
/// healthy nodes (RFC 0001, "Ensemble change"): one CAS conditional on our epoch. If the
/// metadata cannot be reached, give up and go on writing to the current segment: the parked
/// entries go back to it with the same entry ids (nothing was resolved meanwhile), which
/// storage nodes accept again idempotently.
async fn change_ensemble(core: Weak<Core>) {
    let mut delay = Duration::from_millis(50);
    let mut maybe_sealed = false;
    for attempt in 1.. {
        let Some(core) = core.upgrade() else { return };
        let (old, end, down, degraded) = {
            let st = core.lock();
            if st.fenced.is_some() {
                return;
            }
            let down: Vec<_> = (0..st.segment.ensemble.len())
                .filter(|m| st.quorum.is_down(*m))
                .map(|m| st.segment.ensemble[m])
                .collect();
            let degraded = st.degraded || !down.is_empty() || !st.quorum.members_complete();
            (st.segment.clone(), st.quorum.resolved(), down, degraded)
        };
        match switch_segment(&core, &old, end, &down, degraded).await {
            Ok(()) => return,
            Err(SwitchError::Fenced(reason)) => {
                let mut st = core.lock();
                core.fence(&mut st, reason);
                return;
            }
            Err(SwitchError::Failed {
                maybe_sealed: true,
                error,
            }) => {
                maybe_sealed = true;
                tracing::debug!(log = %core.log, %error, "segment switch unconfirmed; retrying");
            }
            Err(SwitchError::Failed { error: e, .. })
                if attempt >= SWITCH_ATTEMPTS && !maybe_sealed =>
            {
                tracing::warn!(log = %core.log, error = %e, "segment switch impossible for now; writing on");
                let mut st = core.lock();
                if let Some(sw) = st.switch.take() {
                    for (payload, waiter) in sw.parked {
                        core.push(&mut st, payload, waiter);
                    }
                }
                st.no_switch_before = Some(std::time::Instant::now() + SWITCH_BACKOFF);
                return;
            }
            Err(SwitchError::Failed { error, .. }) => {
                tracing::debug!(log = %core.log, %error, "segment switch failed; retrying");
            }
        }
        drop(core);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Why a switch did not happen.
enum SwitchError {
    /// A newer writer exists.
    Fenced(String),
    /// It can be retried; `maybe_sealed` if the old segment may be sealed already, in which
    /// case going back to it could write past its end, so the switch must be completed.
    Failed {
        error: StorageError,
        maybe_sealed: bool,
    },
}

impl From<StorageError> for SwitchError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::Fenced(r) => SwitchError::Fenced(r),
            error => SwitchError::Failed {
                error,
                maybe_sealed: false,
            },
        }
    }
}

async fn switch_segment(
    core: &Arc<Core>,
    old: &SegmentMeta,
    end: u64,
    down: &[NodeId],
    degraded: bool,
) -> Result<(), SwitchError> {
    let client = &core.client;
    let repl = client.config.replication;
    let id = SegmentId(rand::random());
    let candidates = client.candidates();
    let mut ensemble = if down.is_empty() || old.ensemble.len() != repl.write_quorum {
        // A roll (or a change of profile): a fresh ensemble spreads segments over all nodes.
        choose_ensemble(&candidates, repl.write_quorum, repl.per_zone, id.0, down)
    } else {
        // An ensemble change keeps the members that answer and replaces each failed one,
        // in its own zone first; one with no live spare stays, to be refilled by repair.
        let mut e = old.ensemble.clone();
        for lost in down {
            if let Some(i) = e.iter().position(|n| n == lost)
                && let Some(r) = choose_replacement(&candidates, &e, *lost, repl.per_zone, id.0)
            {
                e[i] = r;
            }
        }
        e
    };
    if ensemble.len() < repl.write_quorum {
        // Too few healthy nodes: keep the full write quorum with the down ones included,
        // so that they get their copies by repair once they are back.
        let all = choose_ensemble(&candidates, repl.write_quorum, repl.per_zone, id.0, &[]);
        if all.len() > ensemble.len() {
            ensemble = all;
        }
    }
    if ensemble.len() < repl.write_quorum {
        return Err(
            StorageError::Unavailable("too few storage nodes for a new ensemble".into()).into(),
        );
    }
    let segment = SegmentMeta {
        id,
        epoch: core.epoch,
        ensemble,
        ack_quorum: repl.ack_quorum,
        end: None,
        under_replicated: false,
    };
    let (log, epoch) = (core.log, core.epoch);
    let written = client
        .registers
        .update_with_attempts(
            &meta::log_key(log),
            |cur| {
                let mut m = decode_meta(cur)?
                    .ok_or_else(|| StorageError::Fenced(format!("log {log} was deleted")))?;
                if m.epoch != epoch || m.deleted {
                    return Err(StorageError::Fenced(format!(
                        "log {log} taken over at {}",
                        m.epoch
                    )));
                }
                match m.segments.last_mut() {
                    Some(last) if last.id == old.id => {
                        if end == 0 {
                            m.segments.pop();
                        } else {
                            last.end = Some(end);
                            last.under_replicated |= degraded;
                        }
                    }
                    // An earlier attempt of ours landed after it timed out: its new segment is
                    // open and unused (its entries were never sent); replace it.
                    Some(last) if last.epoch == epoch && last.end.is_none() => {
                        m.segments.pop();
                    }
                    _ => {}
                }
                if m.segments.last().is_some_and(|s| s.end.is_none()) {
                    return Err(StorageError::Corrupt(format!(
                        "log {log}: unexpected open segment during ensemble change"
                    )));
                }
                m.segments.push(segment.clone());
                Ok(Some(meta::encode(&m)))
            },
            2,
        )
        .await;
    let written = match written {
        Ok(Ok(w)) => w,
        Ok(Err(StorageError::Fenced(reason))) => return Err(SwitchError::Fenced(reason)),
        Ok(Err(error)) => {
            return Err(SwitchError::Failed {
                error,
                maybe_sealed: false,
            });
        }
        Err(f) => {
            return Err(SwitchError::Failed {
                error: f.error,
                maybe_sealed: f.maybe_written,
            });
        }
    };
    // The seal landed: from here on the switch can only be completed.
    let m = decode_meta(written.as_ref())
        .ok()
        .flatten()
        .ok_or_else(|| SwitchError::Failed {
            error: StorageError::Corrupt("log descriptor unreadable after switch".into()),
            maybe_sealed: true,
        })?;
    let n = segment.ensemble.len();
    let mut conns = vec![None; n];
    let mut calls = JoinSet::new();
    for (i, node) in segment.ensemble.iter().enumerate() {
        let (client, node) = (client.clone(), *node);
        calls.spawn(async move { (i, client.node_conn(node).await) });
    }
    while let Some(Ok((i, c))) = calls.join_next().await {
        conns[i] = c.ok();
    }
    {
        let mut st = core.lock();
        if st.fenced.is_some() {
            return Ok(());
        }
        st.seg_index = m.next_index() - 1;
        st.meta = m;
        st.segment = segment;
        st.generation = st.generation.wrapping_add(1);
        st.conns = conns;
        st.reconnecting = vec![false; n];
        st.quorum = AppendQuorum::new(n, st.segment.ack_quorum.min(n), 0);
        st.segment_bytes = 0;
        st.degraded = false;
        let roll_at = client.segment_roll_bytes.load(Ordering::Relaxed);
        let mut parked = st.switch.take().map(|s| s.parked).unwrap_or_default();
        while st.segment_bytes < roll_at
            && let Some((payload, waiter)) = parked.pop_front()
        {
            core.push(&mut st, payload, waiter);
        }
        if !parked.is_empty() || st.segment_bytes >= roll_at {
            st.switch = Some(Switch {
                parked,
                draining: true,
                started: false,
            });
            core.maybe_switch(&mut st);
        }
        for m in 0..n {
            if st.conns[m].is_none() {
                st.quorum.on_member_down(m);
                st.degraded = true;
                st.reconnecting[m] = true;
                tokio::spawn(reconnect(Arc::downgrade(core), st.generation, m));
            }
        }
        tracing::info!(log = %log, segment = st.seg_index, sealed_at = end, "ensemble changed");
    }
    let req = if end == 0 {
        Request::Delete { segment: old.id.0 }
    } else {
        Request::Seal {
            segment: old.id.0,
            end,
        }
    };
    for node in &old.ensemble {
        if !down.contains(node) {
            let _ = client.node_request(*node, req.clone()).await;
        }
    }
    Ok(())
}

/// How often the owner of a log looks for under-replicated sealed segments.
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);

/// Keep the log's sealed segments fully replicated for as long as this writer holds the
/// log: refill members that missed entries, and move copies off members evicted for good
/// (RFC 0003). The owner is one more repairer: the work is claimed on the descriptor like
/// any other node's repair.
async fn repair_loop(core: Weak<Core>) {
    loop {
        tokio::time::sleep(REPAIR_INTERVAL).await;
        let Some(core) = core.upgrade() else { return };
        let cached = {
            let st = core.lock();
            if st.fenced.is_some() {
                return;
            }
            st.meta.clone()
        };
        // At most one registry read a second for all the logs of this client.
        let Ok(registry) = core.client.registry_if_stale().await else {
            continue;
        };
        if !repair::needs_repair(&cached, &registry) {
            continue;
        }
        let merge = |m: &LogMeta| core.merge_sealed(m);
        match repair::repair_log(&core.client, core.log, &registry, &merge).await {
            Ok((report, Some(m))) => {
                core.merge_sealed(&m);
                tracing::debug!(log = %core.log, ?report, "owner repair pass");
            }
            Ok((_, None)) => {}
            Err(e) => {
                tracing::debug!(log = %core.log, error = %e, "segment repair postponed");
            }
        }
    }
}

/// Bring a failed ensemble member back: reconnect (re-reading the registry, since a
/// restarted node may listen elsewhere) and resend what it missed.
async fn reconnect(core: Weak<Core>, generation: u16, member: usize) {
    let mut delay = Duration::from_millis(100);
    loop {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
        let Some(core) = core.upgrade() else { return };
        let node = {
            let st = core.lock();
            if st.fenced.is_some() || st.generation != generation {
                return;
            }
            st.segment.ensemble[member]
        };
        let Ok(conn) = core.client.node_conn(node).await else {
            // A reachable node outside the ensemble (one that joined since the failure)
            // gets the segment back to full replication at once. Only a node that answers
            // counts, so a down zone does not make the writer churn through its nodes.
            // The loop goes on: if the switch cannot happen, the member may still return.
            let spare = {
                let st = core.lock();
                if st.fenced.is_some() || st.generation != generation {
                    return;
                }
                if switch_allowed(&st) {
                    core.client
                        .candidates()
                        .into_iter()
                        .find(|c| c.live && !st.segment.ensemble.contains(&c.id))
                        .map(|c| c.id)
                } else {
                    None
                }
            };
            if let Some(spare) = spare
                && core.client.node_conn(spare).await.is_ok()
            {
                let mut st = core.lock();
                if st.fenced.is_none() && st.generation == generation {
                    core.start_ensemble_change(&mut st);
                }
            }
            continue;
        };
        let mut st = core.lock();
        if st.generation != generation {
            return;
        }
        st.conns[member] = Some(conn);
        st.reconnecting[member] = false;
        let resend = st.quorum.on_member_up(member);
        tracing::debug!(log = %core.log, %node, resend = resend.len(), "ensemble member back");
        for s in resend {
            core.send(&st, s);
        }
        return;
    }
}

impl LogWriter {
    async fn open(
        client: Arc<ClientInner>,
        log: LogId,
        meta: LogMeta,
    ) -> Result<LogWriter, StorageError> {
        let segment = meta
            .segments
            .last()
            .cloned()
            .ok_or_else(|| StorageError::Corrupt("log has no segment after takeover".into()))?;
        let seg_index = meta.next_index() - 1;
        let n = segment.ensemble.len();
        let mut conns = vec![None; n];
        let mut calls = JoinSet::new();
        for (i, node) in segment.ensemble.iter().enumerate() {
            let (client, node) = (client.clone(), *node);
            calls.spawn(async move { (i, client.node_conn(node).await) });
        }
        while let Some(Ok((i, c))) = calls.join_next().await {
            conns[i] = c.ok();
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let quorum = AppendQuorum::new(n, segment.ack_quorum.min(n), 0);
        let epoch = meta.epoch;
        let core = Arc::new(Core {
            client,
            log,
            epoch,
            replies: tx,
            st: Mutex::new(WriterState {
                meta,
                seg_index,
                segment,
                generation: 0,
                conns,
                reconnecting: vec![false; n],
                quorum,
                waiters: VecDeque::new(),
                switch: None,
                no_switch_before: None,
                segment_bytes: 0,
                degraded: false,
                fenced: None,
            }),
        });
        {
            let mut st = core.lock();
            for m in 0..n {
                if st.conns[m].is_none() {
                    st.quorum.on_member_down(m);
                    st.degraded = true;
                    st.reconnecting[m] = true;
                    tokio::spawn(reconnect(Arc::downgrade(&core), 0, m));
                }
            }
        }
        tokio::spawn(repair_loop(Arc::downgrade(&core)));
        let weak = Arc::downgrade(&core);
        tokio::spawn(async move {
            while let Some((tag, result)) = rx.recv().await {
                let Some(core) = weak.upgrade() else { return };
                core.on_reply(tag, result);
            }
        });
        tracing::info!(%log, %epoch, segment = seg_index, members = n, "log writer ready");
        Ok(LogWriter { core })
    }

    /// The epoch this writer holds.
    pub fn epoch(&self) -> Epoch {
        self.core.epoch
    }

    /// The log this writer writes.
    pub fn log_id(&self) -> LogId {
        self.core.log
    }

    /// Append one entry. Appends made in order get increasing positions and resolve in
    /// that order, once `ack_quorum` storage nodes have the entry on disk; many may be in
    /// flight at once. The position is the one the future resolves with: an ensemble change
    /// (a failed storage node replaced) moves unacknowledged entries to the next segment,
    /// keeping their order. `Err(Fenced)` means a newer owner exists: stop serving.
    pub fn append(
        &self,
        payload: Bytes,
    ) -> impl Future<Output = Result<LogPosition, StorageError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let early = {
            let core = &self.core;
            let mut st = core.lock();
            if let Some(reason) = &st.fenced {
                Some(StorageError::Fenced(reason.clone()))
            } else if let Some(sw) = st.switch.as_mut() {
                sw.parked.push_back((payload, tx));
                None
            } else {
                core.push(&mut st, payload, tx);
                if st.segment_bytes >= core.client.segment_roll_bytes.load(Ordering::Relaxed) {
                    core.start_roll(&mut st);
                }
                None
            }
        };
        async move {
            if let Some(e) = early {
                return Err(e);
            }
            rx.await
                .unwrap_or_else(|_| Err(StorageError::Unavailable("log writer closed".into())))
        }
    }

    /// Read up to `max_entries` live entries at or after `from` (use [`LogWriter::start`]
    /// for the first live position), in order. An empty result means the end of the log.
    pub async fn read(
        &self,
        from: LogPosition,
        max_entries: usize,
    ) -> Result<Vec<LogEntry>, StorageError> {
        let (meta, current, resolved) = {
            let st = self.core.lock();
            (st.meta.clone(), st.seg_index, st.quorum.resolved())
        };
        let mut pos = from.max(LogPosition {
            segment: meta.first,
            entry: 0,
        });
        let mut out = Vec::new();
        while out.len() < max_entries {
            let Some(seg) = meta.segment(pos.segment) else {
                break;
            };
            // Only acknowledged entries are part of the log.
            let bound = if pos.segment == current {
                resolved
            } else {
                seg.end.unwrap_or(0)
            };
            if pos.entry >= bound {
                if pos.segment < current {
                    pos = LogPosition {
                        segment: pos.segment + 1,
                        entry: 0,
                    };
                    continue;
                }
                break;
            }
            let want = ((bound - pos.entry) as usize).min(max_entries - out.len());
            let got = match self.read_segment(seg, pos.entry, want).await {
                Ok(got) => got,
                Err(e) if seg.end.is_some() => {
                    // A repair may have moved the copies: ask where the descriptor says.
                    match self.fresh_segment(seg.id).await {
                        Some(fresh) if fresh.ensemble != seg.ensemble => {
                            self.read_segment(&fresh, pos.entry, want).await?
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            for (entry, payload) in got {
                out.push(LogEntry {
                    position: LogPosition {
                        segment: pos.segment,
                        entry,
                    },
                    payload,
                });
                pos.entry = entry + 1;
            }
        }
        Ok(out)
    }

    /// The sealed segment `id` as the descriptor has it now (cached for later reads).
    async fn fresh_segment(&self, id: SegmentId) -> Option<SegmentMeta> {
        let bytes = self
            .core
            .client
            .registers
            .get(&meta::log_key(self.core.log))
            .await
            .ok()?;
        let m = decode_meta(bytes.as_ref()).ok()??;
        self.core.merge_sealed(&m);
        m.segments
            .into_iter()
            .find(|s| s.id == id && s.end.is_some())
    }

    /// A contiguous run of entries `from..` (at most `want`) from any member that has it.
    async fn read_segment(
        &self,
        seg: &SegmentMeta,
        from: u64,
        want: usize,
    ) -> Result<Vec<(u64, Bytes)>, StorageError> {
        let mut last_err = None;
        for node in self.core.client.by_health(&seg.ensemble) {
            let req = Request::Read {
                segment: seg.id.0,
                from,
                max_entries: want.min(u32::MAX as usize) as u32,
                max_bytes: READ_MAX_BYTES,
            };
            match self.core.client.node_request(node, req).await {
                Ok(Response::Entries { entries, .. }) => {
                    let run: Vec<_> = entries
                        .into_iter()
                        .zip(from..)
                        .take_while(|(e, want)| e.entry == *want)
                        .take(want)
                        .map(|(e, _)| (e.entry, e.payload))
                        .collect();
                    if !run.is_empty() {
                        return Ok(run);
                    }
                }
                Ok(other) => last_err = Some(format!("{other:?}")),
                Err(e) => last_err = Some(e.to_string()),
            }
        }
        Err(StorageError::Unavailable(format!(
            "no member of segment {} has entry {from} ({})",
            seg.id,
            last_err.unwrap_or_default()
        )))
    }

    /// The first live position of the log (everything before it was trimmed).
    pub fn start(&self) -> LogPosition {
        LogPosition {
            segment: self.core.lock().meta.first,
            entry: 0,
        }
    }

    /// Declare everything before `before` no longer needed; storage may drop whole segments
    /// below it. Replay after a takeover starts at the trim point.
    pub async fn trim(&self, before: LogPosition) -> Result<(), StorageError> {
        let core = &self.core;
        let (epoch, log, current, first) = {
            let st = core.lock();
            (core.epoch, core.log, st.seg_index, st.meta.first)
        };
        // Never the segment being written.
        let new_first = before.segment.min(current);
        if new_first <= first {
            // Nothing whole to free: no metadata round trip.
            return Ok(());
        }
        let key = meta::log_key(log);
        let mut removed = Vec::new();
        let written = core
            .client
            .registers
            .update(&key, |cur| {
                let mut m = decode_meta(cur)?
                    .ok_or_else(|| StorageError::Fenced(format!("log {log} was deleted")))?;
                if m.epoch != epoch || m.deleted {
                    return Err(StorageError::Fenced(format!(
                        "log {log} taken over at {}",
                        m.epoch
                    )));
                }
                removed.clear();
                while m.first < new_first && !m.segments.is_empty() {
                    removed.push(m.segments.remove(0));
                    m.first += 1;
                }
                Ok(Some(meta::encode(&m)))
            })
            .await?;
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                if matches!(e, StorageError::Fenced(_)) {
                    let mut st = core.lock();
                    core.fence(&mut st, e.to_string());
                }
                return Err(e);
            }
        };
        if let Some(m) = decode_meta(written.as_ref())? {
            let mut st = core.lock();
            st.meta.first = m.first;
            st.meta.segments = m.segments;
        }
        delete_segments(&core.client, &removed).await;
        Ok(())
    }
}

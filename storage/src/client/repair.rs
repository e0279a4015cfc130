//! Background re-replication of sealed segments (RFC 0003). Any client may run it for any
//! log: a claim taken by compare-and-swap on the log descriptor keeps two repairs of one log
//! apart, and each step keeps at least as many copies as before it (copy and fsync first,
//! then swap the member in metadata).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use warren_common::{Epoch, LogId, NodeId, SegmentId};
use warren_proto::internal::data::{Request, Response};

use super::ClientInner;
use crate::StorageError;
use crate::meta::{self, LogMeta, MemberState, NodeRegistry, RepairClaim, SegmentMeta};
use crate::protocol::placement::choose_replacement;
use crate::protocol::repair::{ClaimVerdict, ClaimWatch, SegmentNeeds, copy_plan, segment_needs};

/// How long another node's repair claim must stay unrenewed before it may be taken over.
/// A holder renews it after every segment, so this bounds the time one segment may take.
pub(crate) const CLAIM_LEASE: Duration = Duration::from_secs(120);
/// Most bytes one repair read asks a node for.
const READ_MAX_BYTES: u32 = 8 * 1024 * 1024;
/// Most entries one repair read asks a node for (and copies in flight to one target).
const READ_MAX_ENTRIES: usize = 1024;
/// Replacement nodes tried for one lost member in one pass.
const TARGET_ATTEMPTS: usize = 3;

/// What a repair pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Segments brought back to a full copy on every member.
    pub repaired: usize,
    /// Members that were gone for good and now have a replacement.
    pub replaced: usize,
    /// Entry copies written.
    pub copied: usize,
    /// Segments that still need work: claimed by another node, no node to copy to, or a
    /// node or the metadata could not be reached. A later pass retries them.
    pub pending: usize,
}

impl RepairReport {
    fn add(&mut self, other: RepairReport) {
        self.repaired += other.repaired;
        self.replaced += other.replaced;
        self.copied += other.copied;
        self.pending += other.pending;
    }
}

/// Claims held by repairs running in this process, and the claims of others being watched.
pub(crate) struct RepairClaims {
    watch: ClaimWatch,
    held: HashSet<LogId>,
}

impl RepairClaims {
    pub(crate) fn new() -> Self {
        RepairClaims {
            watch: ClaimWatch::new(CLAIM_LEASE),
            held: HashSet::new(),
        }
    }
}

/// Releases the in-process mark of a held claim however the repair ends.
struct Held<'a> {
    client: &'a ClientInner,
    log: LogId,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.client.repair_claims().held.remove(&self.log);
    }
}

/// Whether `node` is gone for good: evicted. A node missing from the registry is not
/// judged gone (an empty or unreadable registry must not start a mass re-replication).
pub(crate) fn is_gone(registry: &NodeRegistry, node: &NodeId) -> bool {
    registry
        .nodes
        .get(node)
        .is_some_and(|r| r.state == MemberState::Evicted)
}

/// Whether some sealed segment of `m` needs repair by the registry `registry`.
pub(crate) fn needs_repair(m: &LogMeta, registry: &NodeRegistry) -> bool {
    m.segments
        .iter()
        .any(|s| segment_needs(s, |n| is_gone(registry, n)).is_some())
}

fn decode_meta(bytes: Option<&bytes::Bytes>) -> Result<Option<LogMeta>, StorageError> {
    bytes.map(meta::decode).transpose()
}

/// Repair every log in `logs`, one after the other; failures count as pending.
pub(crate) async fn repair_logs(client: &Arc<ClientInner>, logs: &[LogId]) -> RepairReport {
    let mut report = RepairReport::default();
    let registry = match client.refresh_registry().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "repair postponed: node registry unreachable");
            report.pending = logs.len();
            return report;
        }
    };
    for log in logs {
        match repair_log(client, *log, &registry, &|_| {}).await {
            Ok((r, _)) => report.add(r),
            Err(e) => {
                tracing::debug!(%log, error = %e, "log repair postponed");
                report.pending += 1;
            }
        }
    }
    report
}

/// Repair the sealed segments of `log` that need it, judged by `registry`. `swapped` sees
/// the descriptor after every recorded swap, before the claim is released. Returns what
/// was done and the descriptor as last seen (`None` if the log does not exist).
pub(crate) async fn repair_log(
    client: &Arc<ClientInner>,
    log: LogId,
    registry: &NodeRegistry,
    swapped: &(dyn Fn(&LogMeta) + Send + Sync),
) -> Result<(RepairReport, Option<LogMeta>), StorageError> {
    let key = meta::log_key(log);
    let mut report = RepairReport::default();
    let Some(m) = decode_meta(client.registers.get(&key).await?.as_ref())? else {
        return Ok((report, None));
    };
    let gone = |n: &NodeId| is_gone(registry, n);
    let todo: Vec<SegmentId> = m
        .segments
        .iter()
        .filter(|s| segment_needs(s, gone).is_some())
        .map(|s| s.id)
        .collect();
    if m.deleted || todo.is_empty() {
        return Ok((report, Some(m)));
    }
    // Do not claim the log only to find that nothing can be done yet: a refill cannot
    // finish while a member is down (until it is evicted, when its copies move instead),
    // and a lost member cannot be replaced while no live node is outside the ensemble.
    let candidates = client.candidates();
    let mut workable = 0;
    for s in m.segments.iter().filter(|s| todo.contains(&s.id)) {
        let Some(needs) = segment_needs(s, gone) else {
            continue;
        };
        let possible = if needs.replace.is_empty() {
            let mut reachable = true;
            for node in &s.ensemble {
                if client.node_conn(*node).await.is_err() {
                    reachable = false;
                    break;
                }
            }
            reachable
        } else {
            candidates
                .iter()
                .any(|c| c.live && !s.ensemble.contains(&c.id))
        };
        if possible {
            workable += 1;
        }
    }
    if workable == 0 {
        report.pending = todo.len();
        return Ok((report, Some(m)));
    }
    let me = client.config.node_id;
    let verdict = {
        let mut claims = client.repair_claims();
        let held_here = claims.held.contains(&log);
        claims
            .watch
            .judge(log, m.repair.as_ref(), me, held_here, Instant::now())
    };
    if verdict == ClaimVerdict::Held {
        report.pending = todo.len();
        return Ok((report, Some(m)));
    }
    if !client.repair_claims().held.insert(log) {
        report.pending = todo.len();
        return Ok((report, Some(m)));
    }
    let _held = Held { client, log };

    // Take the claim, if it is still the one judged above.
    let observed = m.repair;
    let mut tokens = vec![rand::random::<u64>()];
    let first = tokens[0];
    let claimed = client
        .registers
        .update(&key, |cur| {
            let mut d = decode_meta(cur)?
                .ok_or_else(|| StorageError::NotFound(format!("log {log} vanished")))?;
            if d.deleted {
                return Err(StorageError::NotFound(format!("log {log} was deleted")));
            }
            // A retried round may find its own earlier accept.
            if d.repair != observed && d.repair.map(|c| c.token) != Some(first) {
                return Err(StorageError::Unavailable(format!(
                    "log {log} repair claimed by another node"
                )));
            }
            d.repair = Some(RepairClaim {
                by: me,
                token: first,
            });
            Ok(Some(meta::encode(&d)))
        })
        .await?;
    let mut m = match claimed {
        Ok(w) => decode_meta(w.as_ref())?
            .ok_or_else(|| StorageError::Corrupt("log descriptor vanished".into()))?,
        Err(StorageError::NotFound(_)) => return Ok((report, None)),
        Err(e) => {
            tracing::debug!(%log, error = %e, "repair not claimed");
            report.pending = todo.len();
            return Ok((report, Some(m)));
        }
    };
    tracing::info!(%log, segments = todo.len(), "repair claimed");

    for (done, id) in todo.iter().enumerate() {
        let Some(seg) = m.segments.iter().find(|s| s.id == *id).cloned() else {
            // Trimmed meanwhile: nothing to keep.
            continue;
        };
        let Some(needs) = segment_needs(&seg, gone) else {
            continue;
        };
        let outcome = match repair_segment(client, &seg, m.epoch, &needs).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(%log, segment = %seg.id, error = %e, "segment repair postponed");
                report.pending += 1;
                continue;
            }
        };
        report.copied += outcome.copied;
        if outcome.swaps.is_empty() && !outcome.complete {
            report.pending += 1;
            continue;
        }
        // Swap the members and renew the claim, only if the claim is still ours.
        let next = rand::random::<u64>();
        tokens.push(next);
        let ours = tokens.clone();
        let written = client
            .registers
            .update(&key, |cur| {
                let mut d = decode_meta(cur)?
                    .ok_or_else(|| StorageError::NotFound(format!("log {log} vanished")))?;
                if !d
                    .repair
                    .is_some_and(|c| c.by == me && ours.contains(&c.token))
                {
                    return Err(StorageError::Unavailable(format!(
                        "log {log} repair claim lost"
                    )));
                }
                if d.deleted {
                    return Err(StorageError::NotFound(format!("log {log} was deleted")));
                }
                if let Some(s) = d.segments.iter_mut().find(|s| s.id == seg.id) {
                    for (i, old, new) in &outcome.swaps {
                        if s.ensemble.get(*i) == Some(old) && !s.ensemble.contains(new) {
                            s.ensemble[*i] = *new;
                        }
                    }
                    if outcome.complete && s.end == seg.end {
                        s.under_replicated = false;
                    }
                }
                d.repair = Some(RepairClaim {
                    by: me,
                    token: next,
                });
                Ok(Some(meta::encode(&d)))
            })
            .await;
        let kept = matches!(&written, Ok(Ok(w)) if decode_meta(w.as_ref())
            .ok()
            .flatten()
            .is_some_and(|d| d.segments.iter().any(|s| s.id == seg.id)));
        if !kept && matches!(&written, Ok(Ok(_)) | Ok(Err(StorageError::NotFound(_)))) {
            // Trimmed or deleted meanwhile: the new copies are nobody's.
            for (_, _, node) in &outcome.swaps {
                let _ = client
                    .node_request(*node, Request::Delete { segment: seg.id.0 })
                    .await;
            }
        }
        match written {
            Ok(Ok(w)) => {
                if let Some(d) = decode_meta(w.as_ref())? {
                    swapped(&d);
                    m = d;
                }
                report.replaced += outcome.swaps.len();
                if outcome.complete {
                    report.repaired += 1;
                } else {
                    report.pending += 1;
                }
                tracing::info!(
                    %log,
                    segment = %seg.id,
                    replaced = outcome.swaps.len(),
                    copied = outcome.copied,
                    complete = outcome.complete,
                    "segment re-replicated"
                );
            }
            Ok(Err(e)) | Err(e) => {
                // The next pass copies again (to the same node, most likely: appends of an
                // entry it holds are harmless).
                tracing::debug!(%log, segment = %seg.id, error = %e, "repair could not record its swap");
                report.pending += todo.len() - done;
                break;
            }
        }
    }

    // Release the claim.
    let released = client
        .registers
        .update(&key, |cur| {
            let Some(mut d) = decode_meta(cur)? else {
                return Err(StorageError::NotFound(format!("log {log} vanished")));
            };
            if !d
                .repair
                .is_some_and(|c| c.by == me && tokens.contains(&c.token))
            {
                return Err(StorageError::Unavailable("repair claim not ours".into()));
            }
            d.repair = None;
            Ok(Some(meta::encode(&d)))
        })
        .await;
    match released {
        Ok(Ok(w)) => {
            if let Some(d) = decode_meta(w.as_ref())? {
                m = d;
            }
        }
        // Left in place, it lapses after a claim lease (at once for this node's next run).
        Ok(Err(e)) | Err(e) => tracing::debug!(%log, error = %e, "repair claim not released"),
    }
    Ok((report, Some(m)))
}

/// What one segment's repair achieved.
struct SegmentOutcome {
    /// `(member index, lost node, replacement)`: the replacement holds every entry.
    swaps: Vec<(usize, NodeId, NodeId)>,
    copied: usize,
    /// Every member (after the swaps) holds every entry below the seal.
    complete: bool,
}

async fn repair_segment(
    client: &Arc<ClientInner>,
    seg: &SegmentMeta,
    epoch: Epoch,
    needs: &SegmentNeeds,
) -> Result<SegmentOutcome, StorageError> {
    let end = seg.end.unwrap_or(0);
    let n = seg.ensemble.len();
    if needs.replace.is_empty() {
        // Only a refill, which cannot finish while a member is down: check before reading
        // every member's entries, since a down member may stay down until it is evicted.
        for node in &seg.ensemble {
            if let Err(e) = client.node_conn(*node).await {
                tracing::debug!(segment = %seg.id, %node, error = %e, "refill waits for a member");
                return Ok(SegmentOutcome {
                    swaps: Vec::new(),
                    copied: 0,
                    complete: false,
                });
            }
        }
    }
    // What each member still reachable holds.
    let mut present: Vec<Option<BTreeSet<u64>>> = vec![None; n];
    let mut calls = JoinSet::new();
    for (i, node) in seg.ensemble.iter().enumerate() {
        if needs.replace.contains(&i) {
            continue;
        }
        let (client, node, segment) = (client.clone(), *node, seg.id);
        calls.spawn(async move { (i, entries_held(&client, node, segment, end).await) });
    }
    while let Some(joined) = calls.join_next().await {
        match joined {
            Ok((i, Ok(set))) => present[i] = Some(set),
            Ok((i, Err(e))) => {
                tracing::debug!(segment = %seg.id, node = %seg.ensemble[i], error = %e, "repair cannot read a member");
            }
            Err(_) => {}
        }
    }
    let full = |p: &Option<BTreeSet<u64>>| p.as_ref().is_some_and(|p| p.len() as u64 >= end);

    let mut out = SegmentOutcome {
        swaps: Vec::new(),
        copied: 0,
        complete: false,
    };
    let mut ensemble = seg.ensemble.clone();
    let per_zone = client.config.replication.per_zone;
    for &i in &needs.replace {
        let lost = seg.ensemble[i];
        let mut plan_present = present.clone();
        plan_present[i] = Some(BTreeSet::new());
        let plan = match copy_plan(end, &plan_present, i) {
            Ok(p) => p,
            Err(entry) => {
                tracing::warn!(segment = %seg.id, entry, "no reachable member holds this entry; repair waits");
                continue;
            }
        };
        let mut tried: Vec<NodeId> = Vec::new();
        for _ in 0..TARGET_ATTEMPTS {
            let candidates: Vec<_> = client
                .candidates()
                .into_iter()
                .filter(|c| !tried.contains(&c.id))
                .collect();
            let salt = seg.id.0 ^ (i as u64);
            let Some(target) = choose_replacement(&candidates, &ensemble, lost, per_zone, salt)
            else {
                tracing::debug!(segment = %seg.id, %lost, "no live node to re-replicate to");
                break;
            };
            tried.push(target);
            match copy_entries(client, seg.id, epoch, end, &plan, &ensemble, target).await {
                Ok(copied) => {
                    out.copied += copied;
                    ensemble[i] = target;
                    present[i] = Some((0..end).collect());
                    out.swaps.push((i, lost, target));
                    break;
                }
                Err(e @ StorageError::Fenced(_)) => return Err(e),
                Err(e) => {
                    client.mark_failed(target);
                    tracing::debug!(segment = %seg.id, %target, error = %e, "re-replication target failed");
                }
            }
        }
    }
    if needs.refill {
        for i in 0..n {
            if present[i].is_none() || full(&present[i]) {
                continue;
            }
            let Ok(plan) = copy_plan(end, &present, i) else {
                continue;
            };
            match copy_entries(client, seg.id, epoch, end, &plan, &ensemble, ensemble[i]).await {
                Ok(copied) => {
                    out.copied += copied;
                    present[i] = Some((0..end).collect());
                }
                Err(e @ StorageError::Fenced(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(segment = %seg.id, node = %ensemble[i], error = %e, "refill failed");
                }
            }
        }
        out.complete = present.iter().all(full);
    } else {
        out.complete = out.swaps.len() == needs.replace.len();
    }
    Ok(out)
}

/// The entry ids below `end` that `node` holds for `segment`.
async fn entries_held(
    client: &ClientInner,
    node: NodeId,
    segment: SegmentId,
    end: u64,
) -> Result<BTreeSet<u64>, StorageError> {
    let mut have = BTreeSet::new();
    let mut from = 0;
    while from < end {
        let req = Request::Read {
            segment: segment.0,
            from,
            max_entries: READ_MAX_ENTRIES as u32,
            max_bytes: READ_MAX_BYTES,
        };
        match client.node_request(node, req).await? {
            Response::Entries { entries, .. } => {
                let Some(last) = entries.last().map(|e| e.entry) else {
                    break;
                };
                have.extend(entries.iter().map(|e| e.entry).filter(|e| *e < end));
                from = last + 1;
            }
            other => {
                return Err(StorageError::Unavailable(format!(
                    "repair read from {node}: {other:?}"
                )));
            }
        }
    }
    Ok(have)
}

/// Copy the entries of `plan` (entry, source member in `members`) to `target`, each
/// fsync'd there before it counts, then seal `target` at `end`. Returns the copies made.
async fn copy_entries(
    client: &Arc<ClientInner>,
    segment: SegmentId,
    epoch: Epoch,
    end: u64,
    plan: &[(u64, usize)],
    members: &[NodeId],
    target: NodeId,
) -> Result<usize, StorageError> {
    let mut copied = 0;
    let mut k = 0;
    while k < plan.len() {
        let (first, source) = plan[k];
        // A run of consecutive entries from one source is read in one request.
        let mut run = 1;
        while k + run < plan.len()
            && run < READ_MAX_ENTRIES
            && plan[k + run] == (first + run as u64, source)
        {
            run += 1;
        }
        let req = Request::Read {
            segment: segment.0,
            from: first,
            max_entries: run as u32,
            max_bytes: READ_MAX_BYTES,
        };
        let entries = match client.node_request(members[source], req).await? {
            Response::Entries { entries, .. } => entries,
            other => {
                return Err(StorageError::Unavailable(format!("repair read: {other:?}")));
            }
        };
        let got: Vec<_> = entries
            .into_iter()
            .zip(first..first + run as u64)
            .take_while(|(e, want)| e.entry == *want)
            .map(|(e, _)| e)
            .collect();
        if got.is_empty() {
            return Err(StorageError::Unavailable(format!(
                "repair source {} lost entry {first} of segment {segment}",
                members[source]
            )));
        }
        let mut appends = JoinSet::new();
        for e in &got {
            let client = client.clone();
            // The descriptor's epoch is at least every fence any member of this sealed
            // segment saw, and entries below the seal are accepted on a sealed segment.
            let req = Request::Append {
                segment: segment.0,
                epoch: epoch.0,
                entry: e.entry,
                lac: None,
                payload: e.payload.clone(),
            };
            appends.spawn(async move { client.node_request(target, req).await });
        }
        while let Some(joined) = appends.join_next().await {
            match joined {
                Ok(Ok(Response::Ok)) => copied += 1,
                Ok(Ok(Response::Fenced { epoch })) => {
                    return Err(StorageError::Fenced(format!(
                        "segment {segment} fenced at {epoch} during repair"
                    )));
                }
                Ok(Ok(other)) => {
                    return Err(StorageError::Unavailable(format!(
                        "repair write: {other:?}"
                    )));
                }
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(StorageError::Unavailable(format!("repair write: {e}"))),
            }
        }
        k += got.len();
    }
    // Sealed, the copy refuses anything at or past the end, as the other members do.
    match client
        .node_request(
            target,
            Request::Seal {
                segment: segment.0,
                end,
            },
        )
        .await?
    {
        Response::Ok => Ok(copied),
        other => Err(StorageError::Unavailable(format!("repair seal: {other:?}"))),
    }
}

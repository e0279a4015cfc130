//! The node's segment store: one journal file with group commit, and the in-memory index
//! of every segment's entries, fence epoch, seal and last-add-confirmed.
//!
//! All changes go through one writer thread, in arrival order. It checks each change against
//! the state left by the changes before it (so a fence refuses every append queued after
//! it), writes a batch with one `write` and one fsync, and only then makes the batch's
//! entries readable and answers. Reads never see an entry that is not on disk.

use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use warren_proto::internal::data::{ErrorCode, ReadEntry, Response};

use super::journal::{self, ENTRY_FIXED, HEADER, Record};
use crate::StorageError;
use crate::protocol::segment::SegmentRules;

/// Epoch reported for a deleted segment: above every real epoch, so its writer stops.
const DELETED_EPOCH: u64 = u64::MAX;
const QUEUE_DEPTH: usize = 16 * 1024;

#[derive(Clone, Copy, Debug)]
struct Loc {
    offset: u64,
    len: u32,
}

#[derive(Debug, Default)]
struct SegState {
    // Includes changes in the batch being written.
    rules: SegmentRules,
    // Durable entries only.
    entries: BTreeMap<u64, Loc>,
}

#[derive(Debug, Default)]
struct State {
    segments: HashMap<u64, SegState>,
    deleted: HashSet<u64>,
    poisoned: bool,
}

/// Journal counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// fsyncs done.
    pub fsyncs: AtomicU64,
    /// Records made durable.
    pub records: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
}

/// A change to make durable.
#[derive(Debug)]
pub enum Mutation {
    /// Store an entry.
    Append {
        /// Segment id.
        segment: u64,
        /// Writer epoch.
        epoch: u64,
        /// Entry id.
        entry: u64,
        /// Writer's last-add-confirmed.
        lac: Option<u64>,
        /// Bytes.
        payload: Bytes,
    },
    /// Fence at an epoch.
    Fence {
        /// Segment id.
        segment: u64,
        /// Epoch.
        epoch: u64,
    },
    /// Seal with an entry count.
    Seal {
        /// Segment id.
        segment: u64,
        /// Entries `0..end`.
        end: u64,
    },
    /// Delete.
    Delete {
        /// Segment id.
        segment: u64,
    },
}

/// Where the answer to a mutation goes; called exactly once, from the writer thread.
pub type Reply = Box<dyn FnOnce(Response) + Send>;

struct Op {
    mutation: Mutation,
    reply: Reply,
}

/// The segment store of one node.
pub struct Store {
    state: Arc<Mutex<State>>,
    stats: Arc<Stats>,
    tx: Mutex<Option<tokio::sync::mpsc::Sender<Op>>>,
    reader: File,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves plain data behind; the writer thread poisons
    // the store itself on I/O errors, so lock poisoning carries no extra meaning.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Open (or create) the journal in `dir`, rebuild the index from it, truncate a torn
    /// tail, and start the writer thread.
    pub fn open(dir: &Path, max_batch_bytes: usize) -> Result<Arc<Store>, StorageError> {
        let path = dir.join("journal");
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut state = State::default();
        let mut entries = 0u64;
        let valid = journal::replay(&mut BufReader::new(&file), |offset, rec| {
            apply_replayed(&mut state, offset, rec, &mut entries)
        })?;
        let len = file.metadata()?.len();
        if valid < len {
            tracing::warn!(
                path = %path.display(),
                valid,
                len,
                "journal has a torn or corrupt tail; truncating it"
            );
            file.set_len(valid)?;
            file.sync_all()?;
        }
        tracing::info!(
            segments = state.segments.len(),
            entries,
            bytes = valid,
            "journal replayed"
        );
        let reader = File::open(&path)?;
        let state = Arc::new(Mutex::new(state));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_DEPTH);
        let thread = {
            let state = state.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || writer_loop(file, valid, rx, state, stats, max_batch_bytes))?
        };
        Ok(Arc::new(Store {
            state,
            stats,
            tx: Mutex::new(Some(tx)),
            reader,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Queue a mutation; `reply` is called after it is durable (or refused).
    pub async fn submit(&self, mutation: Mutation, reply: Reply) {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .cloned();
        let op = Op { mutation, reply };
        let Some(tx) = tx else {
            (op.reply)(unavailable("storage node is shutting down"));
            return;
        };
        if let Err(e) = tx.send(op).await {
            (e.0.reply)(unavailable("storage node is shutting down"));
        }
    }

    /// Queue a mutation and wait for its answer.
    pub async fn apply(&self, mutation: Mutation) -> Response {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            mutation,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .await;
        rx.await
            .unwrap_or_else(|_| unavailable("journal writer stopped"))
    }

    /// Read durable entries `from..` of a segment (blocking file reads: call from a
    /// blocking context).
    pub fn read(&self, segment: u64, from: u64, max_entries: u32, max_bytes: u32) -> Response {
        let (locs, end) = {
            let st = lock(&self.state);
            if st.deleted.contains(&segment) {
                return Response::Error {
                    code: ErrorCode::Invalid,
                    message: format!("segment {segment:016x} was deleted"),
                };
            }
            let Some(seg) = st.segments.get(&segment) else {
                return Response::Entries {
                    entries: Vec::new(),
                    end: None,
                };
            };
            let mut bytes = 0u64;
            let mut locs = Vec::new();
            for (id, loc) in seg.entries.range(from..) {
                if seg.rules.end.is_some_and(|end| *id >= end)
                    || locs.len() >= max_entries as usize
                    || (!locs.is_empty() && bytes + u64::from(loc.len) > u64::from(max_bytes))
                {
                    break;
                }
                bytes += u64::from(loc.len);
                locs.push((*id, *loc));
            }
            (locs, seg.rules.end)
        };
        let mut entries = Vec::with_capacity(locs.len());
        for (entry, loc) in locs {
            let mut buf = vec![0u8; loc.len as usize];
            if let Err(e) = self.reader.read_exact_at(&mut buf, loc.offset) {
                tracing::error!(error = %e, "journal read failed");
                return Response::Error {
                    code: ErrorCode::Io,
                    message: e.to_string(),
                };
            }
            entries.push(ReadEntry {
                entry,
                payload: Bytes::from(buf),
            });
        }
        Response::Entries { entries, end }
    }

    /// Journal counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stop accepting mutations, let the writer finish what is queued, and wait for it.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

fn unavailable(msg: &str) -> Response {
    Response::Error {
        code: ErrorCode::Unavailable,
        message: msg.to_string(),
    }
}

fn apply_replayed(state: &mut State, offset: u64, rec: Record, entries: &mut u64) {
    match rec {
        Record::Entry {
            segment,
            entry,
            lac,
            payload,
            ..
        } => {
            if state.deleted.contains(&segment) {
                return;
            }
            let seg = state.segments.entry(segment).or_default();
            seg.entries.insert(
                entry,
                Loc {
                    offset: offset + (HEADER + ENTRY_FIXED) as u64,
                    len: payload.len() as u32,
                },
            );
            seg.rules.replay_append(entry, lac);
            *entries += 1;
        }
        Record::Fence { segment, epoch } => {
            if !state.deleted.contains(&segment) {
                let seg = state.segments.entry(segment).or_default();
                seg.rules.replay_fence(epoch);
            }
        }
        Record::Seal { segment, end } => {
            if !state.deleted.contains(&segment) {
                let seg = state.segments.entry(segment).or_default();
                seg.rules.seal(end);
            }
        }
        Record::Delete { segment } => {
            state.segments.remove(&segment);
            state.deleted.insert(segment);
        }
    }
}

enum Staged {
    // An entry to make readable once durable.
    Entry {
        segment: u64,
        entry: u64,
        at: usize,
        len: u32,
    },
    Other,
}

struct Batch {
    buf: BytesMut,
    staged: Vec<(Staged, Response, Reply)>,
}

/// Check `mutation` against the state left by everything queued before it. Returns the
/// immediate answer if it is refused; otherwise encodes its record into the batch.
fn stage(st: &mut State, mutation: Mutation, reply: Reply, batch: &mut Batch) {
    if st.poisoned {
        reply(Response::Error {
            code: ErrorCode::Io,
            message: "journal disk failed earlier".into(),
        });
        return;
    }
    let deleted = |seg: u64| st.deleted.contains(&seg);
    match mutation {
        Mutation::Append {
            segment,
            epoch,
            entry,
            lac,
            payload,
        } => {
            if deleted(segment) {
                return reply(Response::Fenced {
                    epoch: DELETED_EPOCH,
                });
            }
            let seg = st.segments.entry(segment).or_default();
            if let Err(fenced) = seg.rules.append(epoch, entry, lac) {
                return reply(Response::Fenced { epoch: fenced });
            }
            let len = payload.len() as u32;
            let rec = Record::Entry {
                segment,
                epoch,
                entry,
                lac,
                payload,
            };
            let at = journal::encode(&rec, &mut batch.buf);
            batch.staged.push((
                Staged::Entry {
                    segment,
                    entry,
                    at,
                    len,
                },
                Response::Ok,
                reply,
            ));
        }
        Mutation::Fence { segment, epoch } => {
            if deleted(segment) {
                return reply(Response::Fenced {
                    epoch: DELETED_EPOCH,
                });
            }
            let seg = st.segments.entry(segment).or_default();
            // The answer describes every append staged before this fence; they become
            // durable with (or before) it, so the answer is true by the time it is sent.
            let answer = match seg.rules.fence(epoch) {
                Err(fenced) => return reply(Response::Fenced { epoch: fenced }),
                Ok(tail) => Response::FenceOk {
                    last_entry: tail.last_entry,
                    lac: tail.lac,
                    end: tail.end,
                },
            };
            journal::encode(&Record::Fence { segment, epoch }, &mut batch.buf);
            batch.staged.push((Staged::Other, answer, reply));
        }
        Mutation::Seal { segment, end } => {
            if deleted(segment) {
                return reply(Response::Ok);
            }
            let seg = st.segments.entry(segment).or_default();
            // A seal is final: metadata recorded it before any node heard of it.
            let end = seg.rules.seal(end);
            journal::encode(&Record::Seal { segment, end }, &mut batch.buf);
            batch.staged.push((Staged::Other, Response::Ok, reply));
        }
        Mutation::Delete { segment } => {
            st.segments.remove(&segment);
            st.deleted.insert(segment);
            journal::encode(&Record::Delete { segment }, &mut batch.buf);
            batch.staged.push((Staged::Other, Response::Ok, reply));
        }
    }
}

fn writer_loop(
    mut file: File,
    mut pos: u64,
    mut rx: tokio::sync::mpsc::Receiver<Op>,
    state: Arc<Mutex<State>>,
    stats: Arc<Stats>,
    max_batch_bytes: usize,
) {
    let mut batch = Batch {
        buf: BytesMut::with_capacity(1024 * 1024),
        staged: Vec::new(),
    };
    let mut last_log = Instant::now();
    let mut logged_fsyncs = 0;
    while let Some(first) = rx.blocking_recv() {
        {
            let mut st = lock(&state);
            stage(&mut st, first.mutation, first.reply, &mut batch);
            // Group commit: everything already queued rides on this fsync.
            while batch.buf.len() < max_batch_bytes {
                let Ok(op) = rx.try_recv() else { break };
                stage(&mut st, op.mutation, op.reply, &mut batch);
            }
        }
        if batch.staged.is_empty() {
            continue;
        }
        let result = file.write_all(&batch.buf).and_then(|()| file.sync_data());
        let staged = std::mem::take(&mut batch.staged);
        match result {
            Ok(()) => {
                {
                    let mut st = lock(&state);
                    for (s, _, _) in &staged {
                        if let Staged::Entry {
                            segment,
                            entry,
                            at,
                            len,
                        } = s
                            && let Some(seg) = st.segments.get_mut(segment)
                        {
                            seg.entries.insert(
                                *entry,
                                Loc {
                                    offset: pos + *at as u64,
                                    len: *len,
                                },
                            );
                        }
                    }
                }
                pos += batch.buf.len() as u64;
                stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                stats
                    .records
                    .fetch_add(staged.len() as u64, Ordering::Relaxed);
                stats
                    .bytes
                    .fetch_add(batch.buf.len() as u64, Ordering::Relaxed);
                for (_, answer, reply) in staged {
                    reply(answer);
                }
            }
            Err(e) => {
                // After a failed write or fsync the file's state is unknown (fsyncgate):
                // refuse everything from now on; the node must be restarted and replay.
                tracing::error!(error = %e, "journal write failed; refusing all writes until restart");
                lock(&state).poisoned = true;
                for (_, _, reply) in staged {
                    reply(Response::Error {
                        code: ErrorCode::Io,
                        message: e.to_string(),
                    });
                }
            }
        }
        batch.buf.clear();
        if last_log.elapsed() >= Duration::from_secs(10) {
            let fsyncs = stats.fsyncs.load(Ordering::Relaxed);
            if fsyncs != logged_fsyncs {
                tracing::debug!(
                    fsyncs,
                    records = stats.records.load(Ordering::Relaxed),
                    bytes = stats.bytes.load(Ordering::Relaxed),
                    "journal group commit"
                );
                logged_fsyncs = fsyncs;
            }
            last_log = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn append(segment: u64, epoch: u64, entry: u64) -> Mutation {
        Mutation::Append {
            segment,
            epoch,
            entry,
            lac: entry.checked_sub(1),
            payload: Bytes::from(format!("{segment}:{entry}")),
        }
    }

    #[tokio::test]
    async fn fence_refuses_lower_epochs_and_everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.apply(append(7, 1, 0)).await, Response::Ok);
        assert_eq!(store.apply(append(7, 1, 1)).await, Response::Ok);
        assert_eq!(
            store
                .apply(Mutation::Fence {
                    segment: 7,
                    epoch: 2
                })
                .await,
            Response::FenceOk {
                last_entry: Some(1),
                lac: Some(0),
                end: None
            }
        );
        assert_eq!(
            store.apply(append(7, 1, 2)).await,
            Response::Fenced { epoch: 2 }
        );
        assert_eq!(store.apply(append(7, 2, 2)).await, Response::Ok);
        store.close();
        drop(store);

        // Reopen after a torn write at the tail.
        let path = dir.path().join("journal");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 50, 1, 2, 3]).unwrap();
        drop(f);
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            store.apply(append(7, 1, 3)).await,
            Response::Fenced { epoch: 2 },
            "the fence survives a restart"
        );
        match store.read(7, 0, 10, 1 << 20) {
            Response::Entries { entries, .. } => {
                let ids: Vec<_> = entries.iter().map(|e| e.entry).collect();
                assert_eq!(ids, vec![0, 1, 2]);
                assert_eq!(entries[2].payload, Bytes::from("7:2"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(store.stats().fsyncs.load(Ordering::Relaxed), 0);
        assert_eq!(store.apply(append(7, 2, 3)).await, Response::Ok);
        assert_eq!(store.stats().fsyncs.load(Ordering::Relaxed), 1);
        assert_eq!(store.stats().records.load(Ordering::Relaxed), 1);
    }
}

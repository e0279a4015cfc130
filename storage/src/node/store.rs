//! The node's segment store: one journal file with group commit, and the in-memory index
//! of every segment's entries, fence epoch, seal and last-add-confirmed.
//!
//! All changes go through one writer thread, in arrival order. It checks each change against
//! the state left by the changes before it (so a fence refuses every append queued after
//! it), writes a batch with one `write` and one fsync, and only then makes the batch's
//! entries readable and answers. Reads never see an entry that is not on disk.

use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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
    file: u32,
    offset: u64,
    len: u32,
}

#[derive(Debug, Default)]
struct SegState {
    // Includes changes in the batch being written.
    rules: SegmentRules,
    // Durable entries only.
    entries: BTreeMap<u64, Loc>,
    // Journal files holding any record of this segment.
    files: BTreeSet<u32>,
}

#[derive(Debug, Default)]
struct State {
    segments: HashMap<u64, SegState>,
    deleted: HashSet<u64>,
    poisoned: bool,
    // Journal files by number, with the live segments that have records in each. A file
    // other than the active one is removed once no live segment has a record in it.
    files: BTreeMap<u32, JournalFile>,
    active: u32,
}

#[derive(Debug)]
struct JournalFile {
    reader: Arc<File>,
    segments: HashSet<u64>,
}

impl State {
    fn note_record(&mut self, file: u32, segment: u64) {
        if let Some(seg) = self.segments.get_mut(&segment) {
            seg.files.insert(file);
        }
        if let Some(f) = self.files.get_mut(&file) {
            f.segments.insert(segment);
        }
    }

    /// Forget a segment; returns the files it leaves without live records.
    fn delete_segment(&mut self, segment: u64) -> Vec<u32> {
        self.deleted.insert(segment);
        let Some(seg) = self.segments.remove(&segment) else {
            return Vec::new();
        };
        let mut freed = Vec::new();
        for f in seg.files {
            if let Some(jf) = self.files.get_mut(&f) {
                jf.segments.remove(&segment);
                if jf.segments.is_empty() && f != self.active {
                    freed.push(f);
                }
            }
        }
        freed
    }
}

/// The journal rolls over to a new file at this size, so that space is reclaimed file by
/// file as segments are deleted.
pub const JOURNAL_FILE_BYTES: u64 = 256 * 1024 * 1024;

fn file_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("journal-{n:08}"))
}

/// Remove journal files that hold no live record (blocking).
/// Batches of freed journal files waiting for the janitor; past this the writer waits.
const JANITOR_DEPTH: usize = 64;

fn remove_files(dir: &Path, state: &Mutex<State>, files: &[u32]) {
    for f in files {
        let still_free = {
            let mut st = lock(state);
            let free = st
                .files
                .get(f)
                .is_some_and(|jf| jf.segments.is_empty() && *f != st.active);
            if free {
                st.files.remove(f);
            }
            free
        };
        if still_free {
            match std::fs::remove_file(file_path(dir, *f)) {
                Ok(()) => tracing::debug!(file = f, "journal file freed"),
                Err(e) => tracing::warn!(file = f, error = %e, "could not remove journal file"),
            }
        }
    }
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
        Self::open_with_file_size(dir, max_batch_bytes, JOURNAL_FILE_BYTES)
    }

    /// [`Store::open`] with a given journal file size.
    pub fn open_with_file_size(
        dir: &Path,
        max_batch_bytes: usize,
        file_bytes: u64,
    ) -> Result<Arc<Store>, StorageError> {
        let mut numbers: Vec<u32> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("journal-"))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        numbers.sort_unstable();
        if numbers.is_empty() {
            numbers.push(1);
        }
        let active = *numbers.last().expect("at least one journal file");
        let mut state = State {
            active,
            ..State::default()
        };
        let mut entries = 0u64;
        let mut writer = None;
        for n in &numbers {
            let path = file_path(dir, *n);
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&path)?;
            state.files.insert(
                *n,
                JournalFile {
                    reader: Arc::new(File::open(&path)?),
                    segments: HashSet::new(),
                },
            );
            let valid = journal::replay(&mut BufReader::new(&file), |offset, rec| {
                apply_replayed(&mut state, *n, offset, rec, &mut entries)
            })?;
            let len = file.metadata()?.len();
            if valid < len {
                if *n == active {
                    tracing::warn!(path = %path.display(), valid, len, "journal has a torn tail; truncating it");
                    file.set_len(valid)?;
                    file.sync_all()?;
                } else {
                    // A rotated file was complete when it was closed: this is corruption.
                    // The records after it are lost here; the other replicas have them.
                    tracing::error!(path = %path.display(), valid, len, "corrupt journal file; ignoring its tail");
                }
            }
            if *n == active {
                writer = Some((file, valid));
            }
        }
        if numbers.len() == 1 {
            File::open(dir)?.sync_all()?;
        }
        let (file, valid) = writer.expect("the active journal file was opened");
        let freed: Vec<u32> = state
            .files
            .iter()
            .filter(|(n, f)| f.segments.is_empty() && **n != active)
            .map(|(n, _)| *n)
            .collect();
        tracing::info!(
            segments = state.segments.len(),
            entries,
            files = state.files.len(),
            "journal replayed"
        );
        let state = Arc::new(Mutex::new(state));
        remove_files(dir, &state, &freed);
        let stats = Arc::new(Stats::default());
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_DEPTH);
        let (janitor, freed_files) = std::sync::mpsc::sync_channel::<Vec<u32>>(JANITOR_DEPTH);
        {
            let state = state.clone();
            let dir = dir.to_path_buf();
            // Ends when the writer (the only sender) is gone.
            std::thread::Builder::new()
                .name("journal-janitor".into())
                .spawn(move || {
                    for files in freed_files {
                        remove_files(&dir, &state, &files);
                    }
                })?;
        }
        let thread = {
            let state = state.clone();
            let stats = stats.clone();
            let w = JournalWriter {
                janitor,
                dir: dir.to_path_buf(),
                file,
                number: active,
                pos: valid,
                file_bytes,
            };
            std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || writer_loop(w, rx, state, stats, max_batch_bytes))?
        };
        Ok(Arc::new(Store {
            state,
            stats,
            tx: Mutex::new(Some(tx)),
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
            let mut locs: Vec<(u64, Loc, Option<Arc<File>>)> = Vec::new();
            for (id, loc) in seg.entries.range(from..) {
                if seg.rules.end.is_some_and(|end| *id >= end)
                    || locs.len() >= max_entries as usize
                    || (!locs.is_empty() && bytes + u64::from(loc.len) > u64::from(max_bytes))
                {
                    break;
                }
                bytes += u64::from(loc.len);
                let reader = st.files.get(&loc.file).map(|f| f.reader.clone());
                locs.push((*id, *loc, reader));
            }
            (locs, seg.rules.end)
        };
        let mut entries = Vec::with_capacity(locs.len());
        for (entry, loc, reader) in locs {
            let mut buf = vec![0u8; loc.len as usize];
            let read = match reader {
                Some(r) => r.read_exact_at(&mut buf, loc.offset),
                None => Err(std::io::Error::other("journal file missing")),
            };
            if let Err(e) = read {
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

fn apply_replayed(state: &mut State, file: u32, offset: u64, rec: Record, entries: &mut u64) {
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
                    file,
                    offset: offset + (HEADER + ENTRY_FIXED) as u64,
                    len: payload.len() as u32,
                },
            );
            seg.rules.replay_append(entry, lac);
            *entries += 1;
            state.note_record(file, segment);
        }
        Record::Fence { segment, epoch } => {
            if !state.deleted.contains(&segment) {
                let seg = state.segments.entry(segment).or_default();
                seg.rules.replay_fence(epoch);
                state.note_record(file, segment);
            }
        }
        Record::Seal { segment, end } => {
            if !state.deleted.contains(&segment) {
                let seg = state.segments.entry(segment).or_default();
                seg.rules.seal(end);
                state.note_record(file, segment);
            }
        }
        Record::Delete { segment } => {
            state.delete_segment(segment);
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
    // A delete that may free journal files once durable.
    Delete(Vec<u32>),
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
            let active = st.active;
            st.note_record(active, segment);
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
            let active = st.active;
            st.note_record(active, segment);
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
            let active = st.active;
            st.note_record(active, segment);
            journal::encode(&Record::Seal { segment, end }, &mut batch.buf);
            batch.staged.push((Staged::Other, Response::Ok, reply));
        }
        Mutation::Delete { segment } => {
            let freed = st.delete_segment(segment);
            journal::encode(&Record::Delete { segment }, &mut batch.buf);
            batch
                .staged
                .push((Staged::Delete(freed), Response::Ok, reply));
        }
    }
}

/// The journal writer's handle on the active file.
struct JournalWriter {
    dir: PathBuf,
    file: File,
    number: u32,
    pos: u64,
    file_bytes: u64,
    /// Unlinking a 256 MiB file takes long enough to stall a group commit, and every node
    /// frees its files at about the same moment: a janitor thread does it off the write path.
    janitor: std::sync::mpsc::SyncSender<Vec<u32>>,
}

impl JournalWriter {
    /// Hand journal files that no live segment uses to the janitor. `remove_files` checks
    /// again under the state lock, so a late removal is as safe as an immediate one, and a
    /// file left behind by a crash is removed at the next start.
    fn free(&self, files: Vec<u32>) {
        if self.janitor.send(files).is_err() {
            tracing::warn!("journal janitor stopped; freed files stay until the next start");
        }
    }

    /// Start the next file; the old one is complete (every batch in it was fsync'd).
    fn rotate(&mut self, state: &Mutex<State>) -> std::io::Result<()> {
        let next = self.number + 1;
        let path = file_path(&self.dir, next);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)?;
        File::open(&self.dir)?.sync_all()?;
        let reader = Arc::new(File::open(&path)?);
        let old = self.number;
        let old_free = {
            let mut st = lock(state);
            st.files.insert(
                next,
                JournalFile {
                    reader,
                    segments: HashSet::new(),
                },
            );
            st.active = next;
            st.files.get(&old).is_some_and(|f| f.segments.is_empty())
        };
        self.file = file;
        self.number = next;
        self.pos = 0;
        if old_free {
            self.free(vec![old]);
        }
        Ok(())
    }
}

fn writer_loop(
    mut w: JournalWriter,
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
        let result = w
            .file
            .write_all(&batch.buf)
            .and_then(|()| w.file.sync_data());
        let staged = std::mem::take(&mut batch.staged);
        match result {
            Ok(()) => {
                let mut freed = Vec::new();
                {
                    let mut st = lock(&state);
                    for (s, _, _) in &staged {
                        match s {
                            Staged::Entry {
                                segment,
                                entry,
                                at,
                                len,
                            } => {
                                if let Some(seg) = st.segments.get_mut(segment) {
                                    seg.entries.insert(
                                        *entry,
                                        Loc {
                                            file: w.number,
                                            offset: w.pos + *at as u64,
                                            len: *len,
                                        },
                                    );
                                }
                            }
                            Staged::Delete(files) => freed.extend_from_slice(files),
                            Staged::Other => {}
                        }
                    }
                }
                w.pos += batch.buf.len() as u64;
                stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                stats
                    .records
                    .fetch_add(staged.len() as u64, Ordering::Relaxed);
                stats
                    .bytes
                    .fetch_add(batch.buf.len() as u64, Ordering::Relaxed);
                // Deletes are durable now: files they emptied can go.
                if !freed.is_empty() {
                    w.free(std::mem::take(&mut freed));
                }
                for (_, answer, reply) in staged {
                    reply(answer);
                }
                if w.pos >= w.file_bytes
                    && let Err(e) = w.rotate(&state)
                {
                    // Keep writing to the current file; retry at the next batch.
                    tracing::warn!(error = %e, "journal rotation failed");
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
        let path = file_path(dir.path(), 1);
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

    fn journal_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("journal-"))
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn journal_files_rotate_and_are_removed_once_their_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_file_size(dir.path(), 1 << 20, 200).unwrap();
        // Segment 1 fills the first files, segment 2 the later ones.
        for e in 0..10 {
            assert_eq!(store.apply(append(1, 1, e)).await, Response::Ok);
        }
        for e in 0..10 {
            assert_eq!(store.apply(append(2, 1, e)).await, Response::Ok);
        }
        let before = journal_files(dir.path());
        assert!(before.len() >= 4, "{before:?}");
        assert_eq!(
            store.apply(Mutation::Delete { segment: 1 }).await,
            Response::Ok
        );
        // The janitor thread unlinks freed files shortly after the delete is durable.
        let mut after = journal_files(dir.path());
        for _ in 0..500 {
            if !after.contains(&"journal-00000001".to_string()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            after = journal_files(dir.path());
        }
        assert!(
            !after.contains(&"journal-00000001".to_string()),
            "{before:?} -> {after:?}"
        );
        assert!(after.contains(before.last().unwrap()));
        assert_eq!(
            store.apply(append(1, 9, 10)).await,
            Response::Fenced { epoch: u64::MAX },
            "a deleted segment refuses appends"
        );
        store.close();
        drop(store);
        let store = Store::open_with_file_size(dir.path(), 1 << 20, 200).unwrap();
        match store.read(2, 0, 100, 1 << 20) {
            Response::Entries { entries, .. } => assert_eq!(entries.len(), 10),
            other => panic!("{other:?}"),
        }
        match store.read(1, 0, 100, 1 << 20) {
            Response::Error { code, .. } => assert_eq!(code, ErrorCode::Invalid),
            other => panic!("{other:?}"),
        }
    }
}

//! The node's CASPaxos acceptor state: one record per change in an append-only file,
//! fsync'd before the acceptor answers, compacted at every start.

use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::journal::crc32;
use crate::StorageError;
use crate::protocol::caspaxos::{AcceptorState, Ballot};

/// Durable acceptor state for every key this node has seen.
///
/// An acceptor whose state is new (an empty data directory: a new cluster, or a lost disk)
/// is not *ready*: it refuses prepares and accepts until it has caught up from the other
/// acceptors (see [`merge_dumps`]), because an acceptor that forgot its promises and
/// acceptances could let two different values be chosen.
pub struct AcceptorStore {
    inner: Mutex<Inner>,
    ready: std::sync::atomic::AtomicBool,
}

struct Inner {
    dir: PathBuf,
    file: File,
    keys: HashMap<String, AcceptorState>,
    poisoned: bool,
    // Bytes in the file now, and bytes a compacted file would hold.
    file_bytes: u64,
    live_bytes: u64,
}

/// The file is rewritten once it is this much larger than its live content, so that the
/// many versions of frequently updated registers do not pile up.
const COMPACT_SLACK: u64 = 4 * 1024 * 1024;

/// Write every key's state to a new file and atomically replace `dir/registers` with it;
/// returns the new file opened for appending and its size. `Err(_, true)` means the
/// replacement may be half done: the caller must stop using the register file.
fn rewrite(
    dir: &Path,
    keys: &HashMap<String, AcceptorState>,
) -> Result<(File, u64), (std::io::Error, bool)> {
    let path = dir.join("registers");
    let tmp = dir.join("registers.tmp");
    let mut buf = BytesMut::new();
    for (k, s) in keys {
        encode_record(k, s, &mut buf);
    }
    let file = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        // Opened before the rename, so the handle is the new file whatever happens next.
        OpenOptions::new().append(true).open(&tmp)
    })()
    .map_err(|e| (e, false))?;
    std::fs::rename(&tmp, &path).map_err(|e| (e, false))?;
    sync_dir(dir).map_err(|e| (e, true))?;
    Ok((file, buf.len() as u64))
}

fn record_len(key: &str, state: &AcceptorState) -> u64 {
    let mut buf = BytesMut::new();
    encode_record(key, state, &mut buf);
    buf.len() as u64
}

/// An acceptor's answer to a prepare.
pub type PrepareResult = Result<(Option<Ballot>, Option<bytes::Bytes>), Ballot>;

// Record body: u16 key length, key, promised ballot, accepted ballot, value; a ballot is a
// presence byte then u64 counter and 16-byte proposer; a value is a presence byte then u32
// length and bytes.
fn encode_record(key: &str, state: &AcceptorState, buf: &mut BytesMut) {
    let mut body = BytesMut::with_capacity(64 + key.len());
    body.put_u16(key.len() as u16);
    body.put_slice(key.as_bytes());
    for b in [state.promised, state.accepted] {
        match b {
            Some(b) => {
                body.put_u8(1);
                body.put_u64(b.counter);
                body.put_slice(&b.proposer);
            }
            None => body.put_u8(0),
        }
    }
    match &state.value {
        Some(v) => {
            body.put_u8(1);
            body.put_u32(v.len() as u32);
            body.put_slice(v);
        }
        None => body.put_u8(0),
    }
    buf.put_u32(body.len() as u32);
    buf.put_u32(crc32(&body));
    buf.put_slice(&body);
}

fn decode_record(body: &[u8]) -> Option<(String, AcceptorState)> {
    let mut b = body;
    let take = |b: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h.to_vec())
    };
    let klen = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?) as usize;
    let key = String::from_utf8(take(&mut b, klen)?).ok()?;
    let mut ballots = [None, None];
    for slot in &mut ballots {
        if take(&mut b, 1)?[0] == 1 {
            let counter = u64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?);
            let proposer: [u8; 16] = take(&mut b, 16)?.try_into().ok()?;
            *slot = Some(Ballot { counter, proposer });
        }
    }
    let value = if take(&mut b, 1)?[0] == 1 {
        let len = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
        Some(bytes::Bytes::from(take(&mut b, len)?))
    } else {
        None
    };
    if !b.is_empty() {
        return None;
    }
    Some((
        key,
        AcceptorState {
            promised: ballots[0],
            accepted: ballots[1],
            value,
        },
    ))
}

fn load(path: &Path) -> Result<HashMap<String, AcceptorState>, StorageError> {
    let mut keys = HashMap::new();
    let Ok(file) = File::open(path) else {
        return Ok(keys);
    };
    let mut r = BufReader::new(file);
    loop {
        let mut header = [0u8; 8];
        if r.read_exact(&mut header).is_err() {
            break;
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > 64 * 1024 * 1024 {
            break;
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() || crc32(&body) != crc {
            // Torn tail: the acceptor never answered for it.
            break;
        }
        let (key, state) = decode_record(&body)
            .ok_or_else(|| StorageError::Corrupt("malformed register record".into()))?;
        keys.insert(key, state);
    }
    Ok(keys)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl AcceptorStore {
    /// Load `dir/registers`, rewrite it compacted, and open it for appending.
    pub fn open(dir: &Path) -> Result<AcceptorStore, StorageError> {
        let existed = dir.join("registers").exists();
        let keys = load(&dir.join("registers"))?;
        let (file, size) = if existed {
            rewrite(dir, &keys).map_err(|(e, _)| StorageError::Io(e))?
        } else {
            // No file until the state is caught up: a crash before then starts over.
            (File::open(dir)?, 0)
        };
        tracing::info!(
            keys = keys.len(),
            ready = existed,
            "register acceptor state loaded"
        );
        Ok(AcceptorStore {
            ready: std::sync::atomic::AtomicBool::new(existed),
            inner: Mutex::new(Inner {
                dir: dir.to_path_buf(),
                file,
                keys,
                poisoned: false,
                file_bytes: size,
                live_bytes: size,
            }),
        })
    }

    fn change<T>(
        &self,
        key: &str,
        f: impl FnOnce(&mut AcceptorState) -> Result<T, Ballot>,
    ) -> Result<Result<T, Ballot>, StorageError> {
        if !self.is_ready() {
            return Err(StorageError::Unavailable(
                "register acceptor is catching up".into(),
            ));
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.poisoned {
            return Err(StorageError::Unavailable(
                "register file failed earlier".into(),
            ));
        }
        let mut state = inner.keys.get(key).cloned().unwrap_or_default();
        let out = match f(&mut state) {
            Ok(v) => v,
            Err(b) => return Ok(Err(b)),
        };
        let mut buf = BytesMut::new();
        encode_record(key, &state, &mut buf);
        if let Err(e) = inner
            .file
            .write_all(&buf)
            .and_then(|()| inner.file.sync_data())
        {
            inner.poisoned = true;
            tracing::error!(error = %e, "register file write failed; refusing until restart");
            return Err(e.into());
        }
        let old_len = inner.keys.get(key).map_or(0, |s| record_len(key, s));
        inner.live_bytes = inner.live_bytes + buf.len() as u64 - old_len;
        inner.file_bytes += buf.len() as u64;
        inner.keys.insert(key.to_string(), state);
        if inner.file_bytes > 2 * inner.live_bytes + COMPACT_SLACK {
            let inner = &mut *inner;
            match rewrite(&inner.dir, &inner.keys) {
                Ok((file, size)) => {
                    inner.file = file;
                    inner.file_bytes = size;
                    inner.live_bytes = size;
                }
                Err((e, true)) => {
                    inner.poisoned = true;
                    tracing::error!(error = %e, "register file replacement failed; refusing until restart");
                }
                // The old file is still complete and open; try again after the next change.
                Err((e, false)) => tracing::warn!(error = %e, "register file compaction failed"),
            }
        }
        Ok(Ok(out))
    }

    /// Whether this acceptor answers prepares and accepts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Every key's state.
    pub fn dump(&self) -> Vec<(String, AcceptorState)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .keys
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Take `caught_up` as this acceptor's state, make it durable, and start serving
    /// (blocking: call from a blocking context).
    pub fn install(&self, caught_up: HashMap<String, AcceptorState>) -> Result<(), StorageError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (k, theirs) in caught_up {
            let mine = inner.keys.entry(k).or_default();
            *mine = merge_states([mine.clone(), theirs]);
        }
        let (file, size) =
            rewrite(&inner.dir, &inner.keys).map_err(|(e, _)| StorageError::Io(e))?;
        inner.file = file;
        inner.file_bytes = size;
        inner.live_bytes = size;
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(
            keys = inner.keys.len(),
            "register acceptor caught up and serving"
        );
        Ok(())
    }

    /// Phase 1, durable before it returns (blocking: call from a blocking context).
    pub fn prepare(&self, key: &str, ballot: Ballot) -> Result<PrepareResult, StorageError> {
        self.change(key, |s| s.prepare(ballot))
    }

    /// Phase 2, durable before it returns (blocking: call from a blocking context).
    pub fn accept(
        &self,
        key: &str,
        ballot: Ballot,
        value: Option<bytes::Bytes>,
    ) -> Result<Result<(), Ballot>, StorageError> {
        self.change(key, |s| s.accept(ballot, value))
    }
}

/// The most advanced of several states of one key: the highest promise seen anywhere, and
/// the acceptance with the highest ballot. Such a state is one a real acceptor could reach
/// (accept that proposal, then promise the higher ballot).
pub fn merge_states(states: impl IntoIterator<Item = AcceptorState>) -> AcceptorState {
    let mut out = AcceptorState::default();
    for s in states {
        out.promised = out.promised.max(s.promised).max(s.accepted);
        if s.accepted > out.accepted {
            out.accepted = s.accepted;
            out.value = s.value;
        }
    }
    out
}

/// How many *other* acceptors a catching-up acceptor must hear from among `seeds` in all:
/// enough to meet every majority it could have been part of in at least one other member,
/// so every promise and every chosen value it might have given is learnt.
pub fn others_needed(seeds: usize) -> usize {
    if seeds <= 1 { 0 } else { seeds - seeds / 2 }
}

/// Merge the dumps of other acceptors into the state a catching-up acceptor starts from.
pub fn merge_dumps(
    dumps: impl IntoIterator<Item = Vec<(String, AcceptorState)>>,
) -> HashMap<String, AcceptorState> {
    let mut out: HashMap<String, AcceptorState> = HashMap::new();
    for dump in dumps {
        for (k, s) in dump {
            let cur = out.remove(&k).unwrap_or_default();
            out.insert(k, merge_states([cur, s]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn promises_and_values_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let b = |c| Ballot {
            counter: c,
            proposer: [1; 16],
        };
        {
            let s = AcceptorStore::open(dir.path()).unwrap();
            assert!(
                s.prepare("k", b(1)).is_err(),
                "a new acceptor serves before catching up"
            );
            s.install(HashMap::new()).unwrap();
            s.prepare("k", b(1)).unwrap().unwrap();
            s.accept("k", b(1), Some(bytes::Bytes::from_static(b"v")))
                .unwrap()
                .unwrap();
            s.prepare("k", b(5)).unwrap().unwrap();
        }
        let s = AcceptorStore::open(dir.path()).unwrap();
        assert_eq!(s.prepare("k", b(3)).unwrap(), Err(b(5)));
        assert_eq!(
            s.prepare("k", b(6)).unwrap(),
            Ok((Some(b(1)), Some(bytes::Bytes::from_static(b"v"))))
        );
    }

    #[test]
    fn the_file_is_compacted_while_running_and_stays_correct() {
        let dir = tempfile::tempdir().unwrap();
        let b = |c| Ballot {
            counter: c,
            proposer: [2; 16],
        };
        let value = bytes::Bytes::from(vec![1u8; 25_000]);
        {
            let s = AcceptorStore::open(dir.path()).unwrap();
            s.install(HashMap::new()).unwrap();
            for c in 1..=400 {
                s.accept("k", b(c), Some(value.clone())).unwrap().unwrap();
            }
            s.accept("k", b(1001), Some(bytes::Bytes::from_static(b"last")))
                .unwrap()
                .unwrap();
        }
        let len = std::fs::metadata(dir.path().join("registers"))
            .unwrap()
            .len();
        assert!(
            len < 8 * 1024 * 1024,
            "register file not compacted: {len} bytes"
        );
        let s = AcceptorStore::open(dir.path()).unwrap();
        assert_eq!(
            s.prepare("k", b(2000)).unwrap(),
            Ok((Some(b(1001)), Some(bytes::Bytes::from_static(b"last"))))
        );
    }

    #[test]
    fn catching_up_takes_the_highest_promise_and_acceptance() {
        let b = |c, p| Ballot {
            counter: c,
            proposer: [p; 16],
        };
        let v = |x: &'static str| Some(bytes::Bytes::from_static(x.as_bytes()));
        let dumps = vec![
            vec![(
                "k".to_string(),
                AcceptorState {
                    promised: Some(b(9, 1)),
                    accepted: Some(b(3, 1)),
                    value: v("old"),
                },
            )],
            vec![(
                "k".to_string(),
                AcceptorState {
                    promised: Some(b(5, 2)),
                    accepted: Some(b(5, 2)),
                    value: v("new"),
                },
            )],
        ];
        let merged = merge_dumps(dumps);
        assert_eq!(
            merged["k"],
            AcceptorState {
                promised: Some(b(9, 1)),
                accepted: Some(b(5, 2)),
                value: v("new"),
            }
        );
        assert_eq!(others_needed(1), 0);
        assert_eq!(others_needed(3), 2);
        assert_eq!(others_needed(4), 2);
        assert_eq!(others_needed(5), 3);
    }
}

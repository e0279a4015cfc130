//! The storage client used by compute nodes.
//!
//! This is the whole contract between compute and storage:
//! - [`StorageClient::acquire_log`] makes the caller the single writer of a queue log
//!   (raise epoch, fence, recover the tail, open a new segment) and hands back a
//!   [`LogWriter`];
//! - [`LogWriter::append`] is a quorum append that resolves once `ack_quorum` storage nodes
//!   have the entry fsync'd; [`LogWriter::read`] pages through the live log for replay;
//!   [`LogWriter::trim`] lets storage free everything below a position;
//! - [`Registers`] are linearizable single-key registers (CASPaxos) for metadata.

use bytes::Bytes;
use std::future::Future;
use std::net::SocketAddr;
use warren_common::config::Replication;
use warren_common::{Epoch, LogId, NodeId, Zone};

use crate::StorageError;

/// Position of an entry in a queue log. Totally ordered; later appends get larger positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogPosition {
    /// Index of the segment in the log's segment list.
    pub segment: u32,
    /// Entry number within that segment, from 0.
    pub entry: u64,
}

/// One entry read back from a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Where the entry is.
    pub position: LogPosition,
    /// The bytes the writer appended.
    pub payload: Bytes,
}

/// How a compute node reaches the storage tier.
#[derive(Clone, Debug)]
pub struct StorageClientConfig {
    /// This compute node's identity (used in owner records and for fencing diagnostics).
    pub node_id: NodeId,
    /// This compute node's zone.
    pub zone: Zone,
    /// Control-plane (gRPC) addresses of the storage nodes that hold the metadata registers.
    pub seeds: Vec<SocketAddr>,
    /// Replication settings for new segments.
    pub replication: Replication,
    /// Cluster TLS material (CA, this node's cert and key).
    pub tls: warren_common::config::TlsPaths,
}

/// A connection to the storage tier. Cheap to clone; all clones share connections.
#[derive(Clone)]
pub struct StorageClient {
    _private: (),
}

impl StorageClient {
    /// Connect to the storage tier described by `config`.
    pub async fn connect(_config: StorageClientConfig) -> Result<Self, StorageError> {
        Err(StorageError::Unavailable(
            "storage client not built yet".into(),
        ))
    }

    /// The metadata registers.
    pub fn registers(&self) -> Registers {
        Registers { _private: () }
    }

    /// Become the only writer of `log` (creating it if it does not exist): raise its epoch,
    /// fence the previous writer's open segment, recover and seal its tail, and open a new
    /// segment at the new epoch. After this returns, no older writer can get an append
    /// acknowledged.
    pub async fn acquire_log(&self, _log: LogId) -> Result<LogWriter, StorageError> {
        Err(StorageError::Unavailable(
            "storage client not built yet".into(),
        ))
    }

    /// Delete a log and all its segments (queue.delete). Fences any writer first.
    pub async fn delete_log(&self, _log: LogId) -> Result<(), StorageError> {
        Err(StorageError::Unavailable(
            "storage client not built yet".into(),
        ))
    }
}

/// The single writer of one queue log, at one epoch.
pub struct LogWriter {
    epoch: Epoch,
}

impl LogWriter {
    /// The epoch this writer holds.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Append one entry. The position is assigned when this is called (so appends made in
    /// order get increasing positions); the returned future resolves once `ack_quorum`
    /// storage nodes have the entry on disk. Many appends may be in flight at once; they
    /// resolve in position order. `Err(Fenced)` means a newer owner exists: stop serving.
    pub fn append(
        &self,
        _payload: Bytes,
    ) -> impl Future<Output = Result<LogPosition, StorageError>> + Send + 'static {
        async {
            Err(StorageError::Unavailable(
                "storage client not built yet".into(),
            ))
        }
    }

    /// Read up to `max_entries` live entries at or after `from` (use [`LogWriter::start`]
    /// for the first live position), in order. An empty result means the end of the log.
    pub async fn read(
        &self,
        _from: LogPosition,
        _max_entries: usize,
    ) -> Result<Vec<LogEntry>, StorageError> {
        Err(StorageError::Unavailable(
            "storage client not built yet".into(),
        ))
    }

    /// The first live position of the log (everything before it was trimmed).
    pub fn start(&self) -> LogPosition {
        LogPosition {
            segment: 0,
            entry: 0,
        }
    }

    /// Declare everything before `before` no longer needed; storage may drop whole segments
    /// below it. Replay after a takeover starts at the trim point.
    pub async fn trim(&self, _before: LogPosition) -> Result<(), StorageError> {
        Err(StorageError::Unavailable(
            "storage client not built yet".into(),
        ))
    }
}

/// Linearizable single-key registers replicated with CASPaxos on the storage nodes.
#[derive(Clone)]
pub struct Registers {
    _private: (),
}

impl Registers {
    /// Read a register's current value (a linearizable read: a full CASPaxos round).
    pub async fn get(&self, _key: &str) -> Result<Option<Bytes>, StorageError> {
        Err(StorageError::Unavailable(
            "storage client not built yet".into(),
        ))
    }

    /// Atomically replace a register's value with `change(current)`. `change` may run more
    /// than once (on contention) and must be a pure function of its input. It returns the
    /// new value (`None` deletes), or `Err` to abort without writing; the abort comes back as
    /// `Ok(Err(e))`. On success returns the value written.
    pub async fn update<E, F>(
        &self,
        _key: &str,
        _change: F,
    ) -> Result<Result<Option<Bytes>, E>, StorageError>
    where
        F: FnMut(Option<&Bytes>) -> Result<Option<Bytes>, E> + Send,
        E: Send,
    {
        Err(StorageError::Unavailable(
            "storage client not built yet".into(),
        ))
    }
}

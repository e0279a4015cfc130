//! Where a queue owner writes its log: the replicated storage log for durable data, or
//! memory for the transient fast path.
//!
//! Which messages are written durably: a message goes to the storage log only when its
//! queue is durable *and* the message is persistent (delivery_mode 2). That is RabbitMQ's
//! contract for classic queues: transient messages, and everything in a non-durable
//! queue, are lost with the process that holds them, so writing them would buy nothing
//! and cost a quorum round trip each.

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use warren_storage::StorageError;
use warren_storage::client::{LogPosition, LogWriter};

/// A pending append: resolves once the record is durable (or immediately in memory).
pub type AppendFuture =
    Pin<Box<dyn Future<Output = Result<Option<LogPosition>, StorageError>> + Send + 'static>>;

/// The log a queue owner writes enqueue and settlement records to.
pub trait QueueLog: Send + 'static {
    /// Append a record; the position is fixed when this is called.
    fn append(&mut self, record: Bytes) -> AppendFuture;
    /// Every live record, in order, for replay on takeover.
    fn replay(&mut self) -> impl Future<Output = Result<Vec<Bytes>, StorageError>> + Send;
    /// Storage may free everything before `before`.
    fn trim(
        &mut self,
        before: LogPosition,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Whether appends are replicated (so confirms must wait for them).
    fn is_durable(&self) -> bool;
}

/// The in-memory log: nothing is written, nothing survives the owner.
#[derive(Debug, Default)]
pub struct MemoryLog;

impl QueueLog for MemoryLog {
    fn append(&mut self, _record: Bytes) -> AppendFuture {
        Box::pin(std::future::ready(Ok(None)))
    }

    async fn replay(&mut self) -> Result<Vec<Bytes>, StorageError> {
        Ok(Vec::new())
    }

    async fn trim(&mut self, _before: LogPosition) -> Result<(), StorageError> {
        Ok(())
    }

    fn is_durable(&self) -> bool {
        false
    }
}

/// The quorum-replicated storage log of a durable queue.
pub struct DurableLog {
    writer: LogWriter,
}

impl DurableLog {
    /// Wrap a writer obtained from `StorageClient::acquire_log`.
    pub fn new(writer: LogWriter) -> Self {
        DurableLog { writer }
    }
}

/// Records read per storage round trip during replay.
const REPLAY_PAGE: usize = 1024;

impl QueueLog for DurableLog {
    fn append(&mut self, record: Bytes) -> AppendFuture {
        let fut = self.writer.append(record);
        Box::pin(async move { fut.await.map(Some) })
    }

    async fn replay(&mut self) -> Result<Vec<Bytes>, StorageError> {
        let mut out = Vec::new();
        let mut from = self.writer.start();
        loop {
            let page = self.writer.read(from, REPLAY_PAGE).await?;
            let Some(last) = page.last() else {
                break;
            };
            from = LogPosition {
                segment: last.position.segment,
                entry: last.position.entry + 1,
            };
            out.extend(page.into_iter().map(|e| e.payload));
        }
        Ok(out)
    }

    async fn trim(&mut self, before: LogPosition) -> Result<(), StorageError> {
        self.writer.trim(before).await
    }

    fn is_durable(&self) -> bool {
        true
    }
}

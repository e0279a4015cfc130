//! Storage errors, each of which says whether a retry can help.

use warren_common::ErrorKind;

/// An error from the storage tier or its client.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Not enough storage nodes answered to reach the quorum; retry later.
    #[error("storage quorum unavailable: {0}")]
    Unavailable(String),
    /// A newer epoch fenced this writer; it must stop serving the log.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The log or key does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Local disk I/O failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Data read back or received from a peer is corrupt.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The request is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl StorageError {
    /// The public kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StorageError::Unavailable(_) => ErrorKind::Unavailable,
            StorageError::Fenced(_) => ErrorKind::Fenced,
            StorageError::NotFound(_) => ErrorKind::NotFound,
            StorageError::Io(_) => ErrorKind::Io,
            StorageError::Corrupt(_) => ErrorKind::Corrupt,
            StorageError::Invalid(_) => ErrorKind::Invalid,
        }
    }

    /// Whether retrying later can help.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

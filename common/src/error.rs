//! The small public error kind every crate maps its errors to; the AMQP edge maps it to
//! reply codes, operators read it in logs.

/// What kind of failure happened, and so what a caller can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Retrying later may succeed (a peer is down, a quorum is not reachable right now).
    Unavailable,
    /// This writer was fenced by a newer epoch or generation: stop, never retry.
    Fenced,
    /// The thing asked for does not exist.
    NotFound,
    /// The request conflicts with current state (CAS lost, exists with other settings).
    Conflict,
    /// The request itself is invalid; retrying the same request cannot help.
    Invalid,
    /// Data on disk or from a peer is corrupt or violates an invariant.
    Corrupt,
    /// A configured bound was hit (size, count, memory).
    LimitExceeded,
    /// A local I/O failure (disk).
    Io,
}

impl ErrorKind {
    /// Whether retrying the same operation later can help.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Conflict)
    }
}

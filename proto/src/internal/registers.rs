//! Control-plane messages for CASPaxos registers, carried over gRPC.
//!
//! These are hand-written prost messages rather than `protoc` output: there are five of
//! them, they change rarely, and building without `protoc` keeps every checkout buildable
//! with cargo alone. Field tags are the wire contract: never reuse or renumber one.

use bytes::Bytes;

/// The gRPC service name of the register acceptor.
pub const SERVICE: &str = "warren.internal.Registers";
/// Full gRPC path of [`PrepareRequest`].
pub const PREPARE_PATH: &str = "/warren.internal.Registers/Prepare";
/// Full gRPC path of [`AcceptRequest`].
pub const ACCEPT_PATH: &str = "/warren.internal.Registers/Accept";
/// Full gRPC path of [`DumpRequest`].
pub const DUMP_PATH: &str = "/warren.internal.Registers/Dump";

/// A CASPaxos ballot: ordered by counter, then by proposer id.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Ballot {
    /// Monotonic counter chosen by the proposer.
    #[prost(uint64, tag = "1")]
    pub counter: u64,
    /// The proposer's unique id (16 bytes), breaking ties between equal counters.
    #[prost(bytes = "bytes", tag = "2")]
    pub proposer: Bytes,
}

/// Phase 1: ask an acceptor to promise `ballot` for `key`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrepareRequest {
    /// The register key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The proposer's ballot.
    #[prost(message, optional, tag = "2")]
    pub ballot: Option<Ballot>,
}

/// Phase 1 answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrepareReply {
    /// Whether the acceptor promised the ballot.
    #[prost(bool, tag = "1")]
    pub promised: bool,
    /// When refused: the highest ballot the acceptor has seen, to outbid.
    #[prost(message, optional, tag = "2")]
    pub conflict: Option<Ballot>,
    /// The ballot of the value last accepted, if any.
    #[prost(message, optional, tag = "3")]
    pub accepted: Option<Ballot>,
    /// The value last accepted (absent: empty register or deleted).
    #[prost(bytes = "bytes", optional, tag = "4")]
    pub value: Option<Bytes>,
}

/// Phase 2: ask an acceptor to accept `value` at `ballot`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AcceptRequest {
    /// The register key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The proposer's ballot (must be the one promised).
    #[prost(message, optional, tag = "2")]
    pub ballot: Option<Ballot>,
    /// The new value (absent: delete).
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub value: Option<Bytes>,
}

/// Phase 2 answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AcceptReply {
    /// Whether the acceptor accepted (and made durable) the value.
    #[prost(bool, tag = "1")]
    pub accepted: bool,
    /// When refused: the highest ballot the acceptor has promised.
    #[prost(message, optional, tag = "2")]
    pub conflict: Option<Ballot>,
}

/// Ask an acceptor for its whole state (used by an acceptor that lost its disk to catch up).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DumpRequest {}

/// One key's acceptor state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AcceptorRecord {
    /// The register key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The highest ballot promised.
    #[prost(message, optional, tag = "2")]
    pub promised: Option<Ballot>,
    /// The ballot of the accepted value.
    #[prost(message, optional, tag = "3")]
    pub accepted: Option<Ballot>,
    /// The accepted value.
    #[prost(bytes = "bytes", optional, tag = "4")]
    pub value: Option<Bytes>,
}

/// An acceptor's whole state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DumpReply {
    /// Whether this acceptor serves (false: it is catching up itself).
    #[prost(bool, tag = "1")]
    pub ready: bool,
    /// Every key it holds state for.
    #[prost(message, repeated, tag = "2")]
    pub records: Vec<AcceptorRecord>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message;

    #[test]
    fn accept_request_round_trips_and_keeps_absent_value_distinct_from_empty() {
        for value in [None, Some(Bytes::new()), Some(Bytes::from_static(b"v"))] {
            let req = AcceptRequest {
                key: "nodes".into(),
                ballot: Some(Ballot {
                    counter: 7,
                    proposer: Bytes::from_static(&[1; 16]),
                }),
                value: value.clone(),
            };
            let bytes = req.encode_to_vec();
            let back = AcceptRequest::decode(bytes.as_slice()).unwrap();
            assert_eq!(back, req);
            assert_eq!(back.value, value);
        }
    }
}

//! Warren's internal protocols between compute and storage nodes: the QUIC data-plane frames
//! ([`data`]) and the gRPC control-plane messages for metadata registers ([`registers`]).

pub mod data;
pub mod registers;

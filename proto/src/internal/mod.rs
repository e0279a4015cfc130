//! Warren's internal protocols: the QUIC data-plane frames between compute and storage
//! ([`data`]) and between compute nodes ([`peer`]), and the gRPC control-plane messages for
//! metadata registers ([`registers`]).

pub mod data;
pub mod peer;
pub mod registers;

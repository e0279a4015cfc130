//! Warren's storage tier: the storage node server (journal, segments, fencing, metadata
//! registers) and the client library that compute nodes use to reach it.
//!
//! Compute depends only on [`client`]: [`client::StorageClient`] for queue logs and
//! [`client::Registers`] for linearizable metadata. The binary runs a node with
//! [`node::run`] and a [`config::StorageNodeConfig`]. The fencing and recovery protocol is
//! described in `docs/rfcs/0001-fencing-and-recovery.md` and implemented as I/O-free state
//! machines in [`protocol`].

pub mod client;
pub mod config;
pub mod error;
pub mod meta;
pub mod node;
pub mod protocol;
mod quic;
mod rpc;

pub use error::StorageError;

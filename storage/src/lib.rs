//! Warren's storage tier: the storage node server (journal, segments, fencing, metadata
//! registers) and the client library that compute nodes use to reach it.
//!
//! Compute depends only on [`client`]: [`client::StorageClient`] for queue logs and
//! [`client::Registers`] for linearizable metadata.

pub mod client;
pub mod error;

pub use error::StorageError;

//! The storage protocol as I/O-free state machines: they take replies and return the
//! messages to send, so the async drivers in [`crate::client`] stay thin and the
//! simulation in `tests/sim.rs` can drive them through any interleaving of faults.

pub mod caspaxos;
pub mod ownership;
pub mod placement;
pub mod quorum;
pub mod recovery;
pub mod repair;
pub mod segment;

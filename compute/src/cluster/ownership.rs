//! Queue ownership: rendezvous hashing over live compute nodes, leases and epochs.

//! Compute node membership: registration with a fresh generation, lease renewal, eviction.

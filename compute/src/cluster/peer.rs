//! The internal QUIC transport between compute nodes: operations forwarded to queue owners.

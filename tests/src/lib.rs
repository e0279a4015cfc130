//! Helpers for Warren's cluster-level tests: start real `warren` processes on free ports.

//! Every Warren wire format: the AMQP 0-9-1 codec and the internal protocols.
//! A pure codec: no I/O, no async runtime, no domain types.
pub mod amqp;
pub mod internal;

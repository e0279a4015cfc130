//! Warren's compute node: the AMQP 0-9-1 server, routing and the queue engine.
//!
//! Bytes become frames in [`connection::frame`], frames become methods handled per channel
//! ([`channel`], [`handlers`]), publishes are routed ([`routing`], [`topology`]) to queue
//! owners ([`queue`]) that keep each queue's state and write its log to storage.

pub mod channel;
pub mod config;
pub mod connection;
pub mod error;
pub mod handlers;
pub mod message;
pub mod meta;
pub mod node;
pub mod queue;
pub mod routing;
pub mod server;
pub mod topology;

pub use config::ComputeConfig;
pub use error::{AmqpError, ComputeError, ReplyCode};
pub use server::{ComputeNode, run};

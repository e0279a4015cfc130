//! Queues: the I/O-free engine, the log record format, the log implementations, and the
//! owner task that ties them together.

pub mod engine;
pub mod log;
pub mod owner;
pub mod record;

pub use engine::{
    ChannelKey, ChannelLimiter, ConsumerId, ConsumerSpec, Delivery, QueueEngine, Seq,
};
pub use owner::{ConnEvent, ConnSink, QueueCmd, QueueHandle, QueueStats};

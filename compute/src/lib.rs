//! Warren's compute node: the AMQP 0-9-1 server, routing and the queue engine.
//!
//! Bytes become frames (`warren_proto::amqp` decodes; [`connection::frame`] encodes the hot
//! outgoing frames), frames become methods handled per channel ([`channel`], [`handlers`]),
//! publishes are routed ([`routing`], [`topology`]) to queue owners ([`queue`]) that keep
//! each queue's state and write its log to storage.
//!
//! Decisions a reader needs:
//! - **One task per connection, one task per queue.** A connection gathers the publishes,
//!   acks and wakes of one socket read into one command per queue; owners never wait on
//!   connections (deliveries and confirms go back over unbounded channels, bounded in
//!   practice by prefetch and by `limits.max_inflight_confirms`, past which the connection
//!   stops reading its socket).
//! - **What is durable.** A message goes to the replicated log only if its queue is durable
//!   and it is persistent (delivery_mode 2), as RabbitMQ's classic queues keep only those
//!   across restarts. Everything else is the transient fast path: memory only, confirmed at
//!   once. Confirms of durable messages wait for the append to reach the ack quorum.
//! - **Ownership.** A durable queue has one owner in the cluster ([`cluster::ownership`]):
//!   the node its descriptor names while that node is a live member, else the rendezvous
//!   choice over the membership view. Opening a queue this node owns takes its log over
//!   (raise epoch, fence, recover) and records `(log, owner node, epoch)` in the descriptor;
//!   any other node gets a proxy that forwards to the owner over QUIC ([`cluster::peer`]),
//!   so a queue used through many nodes stays put. An owner whose appends are fenced, or
//!   whose descriptor names another node, stops; publishes it had accepted but not stored
//!   are handed back to their connections for the new owner, flagged as resends (their first
//!   attempt may be in the log, so they are delivered as redelivered). Idle queues move to their
//!   rendezvous owner after a join without redelivery (a hand-off mark in the log).
//! - **Recovery.** A new owner replays the log from its trim point: enqueue records minus
//!   settle records. Recovered messages are marked redelivered (a previous owner may have
//!   delivered them), as RabbitMQ does after a restart, unless the log ends with a graceful
//!   hand-off mark; TTLs restart at recovery.
//! - **Topology.** Durable exchanges, queues and bindings of a vhost are one JSON register
//!   (versioned); each node keeps an immutable snapshot, refreshed every second and after
//!   its own writes, and re-read at once when a name is missing while other compute nodes
//!   are live. Transient entities live only on the node that declared them.

pub mod channel;
pub mod cluster;
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

//! Metadata kept in registers: the node registry and queue-log descriptors. Values are JSON
//! so that fields can be added without a migration (unknown fields are ignored, missing ones
//! take their defaults).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use warren_common::{Epoch, Generation, LogId, NodeId, SegmentId, Zone};

use crate::StorageError;

/// Register key of the storage node registry.
pub const NODES_KEY: &str = "nodes";

/// Register key of the compute node registry.
pub const COMPUTE_NODES_KEY: &str = "compute-nodes";

/// Register key of a log's descriptor.
pub fn log_key(log: LogId) -> String {
    format!("log/{log}")
}

/// One storage node as published in the registry at its last start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Operator-facing node name.
    pub name: String,
    /// The node's zone.
    pub zone: Zone,
    /// QUIC data-plane address.
    pub data_addr: SocketAddr,
    /// gRPC control-plane address.
    pub control_addr: SocketAddr,
    /// Raised at every process start, and by eviction.
    pub generation: Generation,
    /// Whether the node is a member in good standing.
    #[serde(default)]
    pub state: MemberState,
    /// Raised by the node at every lease renewal; observers judge the lease by how long
    /// they have seen it unchanged on their own clock (no cross-node clock comparison).
    #[serde(default)]
    pub heartbeat: u64,
}

/// Where a node stands in the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Registered and renewing its lease.
    #[default]
    Active,
    /// Stopping gracefully: owns nothing new, hands its queues off.
    Leaving,
    /// Removed (lease lapsed, or by an operator). Its generation was raised past the one it
    /// ran with, so storage refuses that process; a node that finds itself evicted stops
    /// serving and joins again with a fresh generation.
    Evicted,
}

/// One compute node as published in the compute registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeRecord {
    /// Operator-facing node name.
    pub name: String,
    /// The node's zone.
    pub zone: Zone,
    /// Where AMQP clients connect to it.
    pub amqp_addr: SocketAddr,
    /// Its internal QUIC address (operations forwarded to queue owners).
    pub peer_addr: SocketAddr,
    /// Raised at every process start, and by eviction.
    pub generation: Generation,
    /// Where it stands.
    #[serde(default)]
    pub state: MemberState,
    /// Raised at every lease renewal (see [`NodeRecord::heartbeat`]).
    #[serde(default)]
    pub heartbeat: u64,
}

/// The compute node registry: every compute node identity ever started, by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeRegistry {
    /// Nodes by id.
    #[serde(default)]
    pub nodes: BTreeMap<NodeId, ComputeRecord>,
}

/// The storage node registry: every node identity ever started, by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistry {
    /// Nodes by id.
    #[serde(default)]
    pub nodes: BTreeMap<NodeId, NodeRecord>,
}

/// A registry record as membership sees it: the lease and eviction rules of
/// [`crate::protocol::ownership`] read and change only these fields, in either registry.
pub trait MemberRecord {
    /// Operator-facing node name.
    fn name(&self) -> &str;
    /// Raised at every process start, and by eviction.
    fn generation(&self) -> Generation;
    /// Raised at every lease renewal.
    fn heartbeat(&self) -> u64;
    /// Where the member stands.
    fn state(&self) -> MemberState;
    /// The generation, to change.
    fn generation_mut(&mut self) -> &mut Generation;
    /// The heartbeat, to change.
    fn heartbeat_mut(&mut self) -> &mut u64;
    /// The state, to change.
    fn state_mut(&mut self) -> &mut MemberState;
}

/// A membership registry: one register holding every member record by node id.
pub trait MemberRegistry {
    /// The record of one member.
    type Record: MemberRecord;
    /// The register key it is stored under.
    const KEY: &'static str;
    /// The records by node id.
    fn members(&self) -> &BTreeMap<NodeId, Self::Record>;
    /// The records by node id, to change.
    fn members_mut(&mut self) -> &mut BTreeMap<NodeId, Self::Record>;
}

macro_rules! member_registry {
    ($registry:ty, $record:ty, $key:expr) => {
        impl MemberRecord for $record {
            fn name(&self) -> &str {
                &self.name
            }
            fn generation(&self) -> Generation {
                self.generation
            }
            fn heartbeat(&self) -> u64 {
                self.heartbeat
            }
            fn state(&self) -> MemberState {
                self.state
            }
            fn generation_mut(&mut self) -> &mut Generation {
                &mut self.generation
            }
            fn heartbeat_mut(&mut self) -> &mut u64 {
                &mut self.heartbeat
            }
            fn state_mut(&mut self) -> &mut MemberState {
                &mut self.state
            }
        }

        impl MemberRegistry for $registry {
            type Record = $record;
            const KEY: &'static str = $key;
            fn members(&self) -> &BTreeMap<NodeId, $record> {
                &self.nodes
            }
            fn members_mut(&mut self) -> &mut BTreeMap<NodeId, $record> {
                &mut self.nodes
            }
        }
    };
}

member_registry!(NodeRegistry, NodeRecord, NODES_KEY);
member_registry!(ComputeRegistry, ComputeRecord, COMPUTE_NODES_KEY);

/// One segment of a log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// Cluster-wide unique id.
    pub id: SegmentId,
    /// Epoch of the writer that created it.
    pub epoch: Epoch,
    /// Storage nodes holding it, in distinct zones where possible.
    pub ensemble: Vec<NodeId>,
    /// Copies that must be on disk for an entry to count.
    pub ack_quorum: usize,
    /// `None` while open; `Some(n)` once sealed with entries `0..n`.
    #[serde(default)]
    pub end: Option<u64>,
    /// Some members may lack entries below `end` (one was down while it was written): the
    /// log's owner copies them over in the background, then clears this by a CAS.
    #[serde(default)]
    pub under_replicated: bool,
}

/// A queue log's descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMeta {
    /// Raised by every takeover.
    pub epoch: Epoch,
    /// The compute node that holds `epoch`.
    #[serde(default)]
    pub owner: Option<NodeId>,
    /// Log index of `segments[0]`; lower segments were trimmed.
    #[serde(default)]
    pub first: u32,
    /// Live segments in log order; only the last may be open.
    #[serde(default)]
    pub segments: Vec<SegmentMeta>,
    /// The log was deleted; it can never be written again.
    #[serde(default)]
    pub deleted: bool,
    /// Who is re-replicating this log's sealed segments, if anyone (RFC 0003).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairClaim>,
}

/// A claim on a log's background repair, taken and released by compare-and-swap on the
/// descriptor. Judged without comparing clocks: the holder replaces `token` after every
/// segment it repairs, and another node may take the claim over once it has seen the same
/// token for a whole claim lease on its own clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairClaim {
    /// The node running the repair.
    pub by: NodeId,
    /// Changed at every renewal; a claim whose token stays the same has lapsed.
    pub token: u64,
}

impl LogMeta {
    /// Log index of the segment after the last one.
    pub fn next_index(&self) -> u32 {
        self.first + self.segments.len() as u32
    }

    /// The segment with log index `index`, if live.
    pub fn segment(&self, index: u32) -> Option<&SegmentMeta> {
        index
            .checked_sub(self.first)
            .and_then(|i| self.segments.get(i as usize))
    }
}

/// Serialize a register value.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    // Serializing these plain structs to JSON cannot fail (no maps with non-string keys
    // other than NodeId, which serializes as a string).
    Bytes::from(serde_json::to_vec(value).expect("metadata serializes to JSON"))
}

/// Deserialize a register value.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt(format!("metadata: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn registry_round_trips() {
        let mut reg = NodeRegistry::default();
        reg.nodes.insert(
            NodeId::random(),
            NodeRecord {
                name: "s1".into(),
                zone: Zone("a".into()),
                data_addr: "127.0.0.1:1".parse().unwrap(),
                control_addr: "127.0.0.1:2".parse().unwrap(),
                generation: Generation(3),
                state: MemberState::Active,
                heartbeat: 7,
            },
        );
        let back: NodeRegistry = decode(&encode(&reg)).unwrap();
        assert_eq!(back, reg);
    }
}

//! This storage node's place in the cluster: its registration and lease (a heartbeat it
//! raises in the node registry; compute nodes evict a storage node whose heartbeat stops
//! moving), and the compute registry it checks writers against, so that a compute process
//! whose generation was evicted cannot write even if fencing somehow let it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use warren_common::config::TlsPaths;
use warren_common::{Generation, NodeId};

use crate::StorageError;
use crate::client::Registers;
use crate::meta::{
    self, COMPUTE_NODES_KEY, ComputeRegistry, MemberState, NODES_KEY, NodeRecord, NodeRegistry,
};
use crate::protocol::ownership::{self, Standing};

/// How often a storage node raises its heartbeat.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// How often a storage node re-reads the compute registry.
const GATE_REFRESH: Duration = Duration::from_millis(500);

/// The compute generations this node refuses writes from, as of its last read of the
/// compute registry.
#[derive(Default)]
pub struct ComputeGate {
    // (generation, state) by compute node.
    members: RwLock<BTreeMap<NodeId, (Generation, MemberState)>>,
}

impl ComputeGate {
    /// Whether writes from `node` at `generation` must be refused: the registry holds a
    /// newer generation for it (it was evicted, or restarted), or marks this one evicted.
    /// A node the cached registry does not know yet is let through: it has just joined.
    pub fn refuses(&self, node: NodeId, generation: u64) -> bool {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        match members.get(&node) {
            Some((g, state)) => {
                generation < g.0 || (*state == MemberState::Evicted && generation <= g.0)
            }
            None => false,
        }
    }

    /// Replace the cached registry.
    pub fn install(&self, registry: &ComputeRegistry) {
        let members = registry
            .nodes
            .iter()
            .map(|(id, r)| (*id, (r.generation, r.state)))
            .collect();
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = members;
    }
}

/// Keep `gate` up to date with the compute registry, until aborted.
pub async fn watch_compute_registry(gate: Arc<ComputeGate>, regs: Registers) {
    let mut tick = tokio::time::interval(GATE_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match regs.get_with_attempts(COMPUTE_NODES_KEY, 3).await {
            Ok(Some(b)) => match meta::decode::<ComputeRegistry>(&b) {
                Ok(reg) => gate.install(&reg),
                Err(e) => tracing::warn!(error = %e, "compute registry unreadable"),
            },
            Ok(None) => gate.install(&ComputeRegistry::default()),
            Err(e) => tracing::debug!(error = %e, "compute registry read failed; will retry"),
        }
    }
}

/// Register this node with a fresh generation, then renew its lease every
/// [`RENEW_INTERVAL`]; if it finds itself evicted, register again (its data is intact and
/// its identity unchanged, so only the generation moves). Runs until aborted.
pub async fn keep_lease(
    seeds: Vec<SocketAddr>,
    tls: TlsPaths,
    node_id: NodeId,
    record: NodeRecord,
) {
    let regs = loop {
        match Registers::connect(&seeds, &tls) {
            Ok(r) => break r,
            Err(e) => {
                tracing::error!(error = %e, "cannot reach the metadata registers; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    loop {
        let generation = register(&regs, node_id, &record).await;
        renew_until_evicted(&regs, node_id, generation).await;
        tracing::warn!(
            generation = generation.0,
            "this storage node was evicted from the cluster; registering again"
        );
    }
}

/// Publish this node in the registry with a fresh generation, retrying until a majority of
/// seeds answers (at cluster start the other seeds may not be up yet).
async fn register(regs: &Registers, node_id: NodeId, record: &NodeRecord) -> Generation {
    let mut delay = Duration::from_millis(50);
    loop {
        let mut chosen = Generation(1);
        let result = regs
            .update(NODES_KEY, |cur| {
                let mut reg: NodeRegistry = match cur {
                    Some(b) => meta::decode(b)?,
                    None => NodeRegistry::default(),
                };
                chosen = ownership::join(&mut reg, node_id, record.clone());
                Ok::<_, StorageError>(Some(meta::encode(&reg)))
            })
            .await;
        match result {
            Ok(Ok(_)) => {
                tracing::info!(generation = chosen.0, "registered in the node registry");
                return chosen;
            }
            Ok(Err(e)) | Err(e) => {
                tracing::debug!(error = %e, "node registration not possible yet; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Why a renewal did not write.
enum Lost {
    Evicted,
    Corrupt(StorageError),
}

/// Raise this node's heartbeat every [`RENEW_INTERVAL`]; returns once the registry shows
/// this generation evicted (or superseded).
async fn renew_until_evicted(regs: &Registers, node_id: NodeId, generation: Generation) {
    let mut tick = tokio::time::interval(RENEW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let result = regs
            .update(NODES_KEY, |cur| {
                let mut reg: NodeRegistry = match cur {
                    Some(b) => meta::decode(b).map_err(Lost::Corrupt)?,
                    None => NodeRegistry::default(),
                };
                match ownership::renew(&mut reg, node_id, generation) {
                    Standing::Member
                        if reg
                            .nodes
                            .get(&node_id)
                            .is_some_and(|r| r.state == MemberState::Active) => {}
                    // Leaving (nothing sets it for a storage node), evicted or superseded:
                    // this generation is over.
                    _ => return Err(Lost::Evicted),
                }
                Ok(Some(meta::encode(&reg)))
            })
            .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(Lost::Evicted)) => return,
            Ok(Err(Lost::Corrupt(e))) => {
                tracing::error!(error = %e, "node registry unreadable; lease not renewed")
            }
            Err(e) => tracing::debug!(error = %e, "lease renewal failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::meta::ComputeRecord;

    fn record(generation: u64, state: MemberState) -> ComputeRecord {
        ComputeRecord {
            name: "compute-0".into(),
            zone: warren_common::Zone("zone-a".into()),
            amqp_addr: "127.0.0.1:1".parse().unwrap(),
            peer_addr: "127.0.0.1:2".parse().unwrap(),
            generation: Generation(generation),
            state,
            heartbeat: 0,
        }
    }

    #[test]
    fn gate_refuses_older_and_evicted_generations_only() {
        let gate = ComputeGate::default();
        let (a, b, unknown) = (NodeId::random(), NodeId::random(), NodeId::random());
        let mut reg = ComputeRegistry::default();
        reg.nodes.insert(a, record(3, MemberState::Active));
        reg.nodes.insert(b, record(5, MemberState::Evicted));
        gate.install(&reg);
        assert!(gate.refuses(a, 2));
        assert!(!gate.refuses(a, 3));
        assert!(!gate.refuses(a, 4));
        assert!(gate.refuses(b, 4));
        assert!(gate.refuses(b, 5));
        assert!(
            !gate.refuses(b, 6),
            "a re-join after eviction gets a newer generation"
        );
        assert!(!gate.refuses(unknown, 1));
    }
}

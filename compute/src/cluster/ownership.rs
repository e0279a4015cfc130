//! Queue ownership: which live compute node serves each queue.
//!
//! The choice is rendezvous (highest random weight) hashing: every node scores
//! `hash(queue key, node id)` and the highest score wins. Every node that sees the same
//! members picks the same owner without talking to the others, and when a node joins or
//! leaves only the queues it wins or held move (about `1/n` of them), unlike `hash % n`.
//!
//! The hash is FNV-1a followed by a 64-bit finalizer: stable across processes, platforms and
//! releases (the std hasher is seeded per process), and well spread even for keys that
//! differ in one character. The rules themselves are `warren_storage::protocol::ownership`'s,
//! the I/O-free ownership rules the deterministic simulation checks; this module applies
//! them to the membership view.
//!
//! Ownership is *sticky*: a queue whose descriptor names a live member stays with it, even
//! when a newer member would win the hash. Without that, every join would move queues that
//! are in use (and redeliver their unacked messages); moving them is a separate, graceful
//! step (a hand-off when the queue is idle).

use warren_common::NodeId;
use warren_storage::protocol::ownership as rules;

use super::membership::ClusterView;

/// The weight of `node` for `key` (the rule lives with the other ownership rules in
/// `warren_storage::protocol::ownership`, which the ownership simulation checks).
pub use rules::score;

/// The key a queue is hashed by: its vhost and name (stable across redeclarations).
pub fn queue_key(vhost: &str, name: &str) -> String {
    format!("{vhost}\u{0}{name}")
}

/// The rendezvous choice for `key` among `nodes`: the highest score (ties, which need a
/// 64-bit collision, go to the larger node id). `None` if there are no nodes.
pub fn rendezvous<'a>(nodes: impl IntoIterator<Item = &'a NodeId>, key: &str) -> Option<NodeId> {
    rules::owner_of(nodes, key)
}

/// The owner a queue should have: the node its descriptor names while that node is a live
/// member (sticky), else the rendezvous choice among the members.
pub fn sticky_owner<'a>(
    nodes: impl IntoIterator<Item = &'a NodeId> + Clone,
    key: &str,
    recorded: Option<NodeId>,
) -> Option<NodeId> {
    rules::sticky_owner(nodes, key, recorded)
}

/// The rendezvous owner of `key` among the live members of `view`.
pub fn owner_of(view: &ClusterView, key: &str) -> Option<NodeId> {
    rendezvous(view.members.keys(), key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn nodes(n: u128) -> Vec<NodeId> {
        (1..=n)
            .map(|i| NodeId(uuid::Uuid::from_u128(i * 0x1234_5678_9abc_def1)))
            .collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| queue_key("/", &format!("q{i}"))).collect()
    }

    #[test]
    fn the_choice_is_stable_and_independent_of_member_order() {
        let ns = nodes(5);
        let mut rev = ns.clone();
        rev.reverse();
        for k in keys(200) {
            let a = rendezvous(&ns, &k);
            assert_eq!(a, rendezvous(&rev, &k));
            assert_eq!(a, rendezvous(&ns, &k));
        }
        // Golden value (checked against an independent implementation): the hash must
        // never change between releases, or queues would move on upgrade.
        assert_eq!(score("/\u{0}orders", &nodes(1)[0]), 0xfc31_09d3_b0c9_1bfc);
    }

    #[test]
    fn queues_spread_over_the_members() {
        let ns = nodes(4);
        let mut count: HashMap<NodeId, usize> = HashMap::new();
        for k in keys(4000) {
            *count.entry(rendezvous(&ns, &k).unwrap()).or_default() += 1;
        }
        assert_eq!(count.len(), 4);
        for (_, c) in count {
            assert!(
                (700..1300).contains(&c),
                "uneven spread: {c} of 4000 on one of 4"
            );
        }
    }

    #[test]
    fn a_join_moves_only_queues_to_the_new_node_and_a_leave_only_its_own() {
        let ns = nodes(4);
        let mut joined = ns.clone();
        let newcomer = NodeId(uuid::Uuid::from_u128(0xfeed));
        joined.push(newcomer);
        let mut moved = 0;
        for k in keys(4000) {
            let before = rendezvous(&ns, &k).unwrap();
            let after = rendezvous(&joined, &k).unwrap();
            if before != after {
                assert_eq!(after, newcomer, "a join moved a queue between old members");
                moved += 1;
            }
        }
        assert!(
            (500..1200).contains(&moved),
            "moved {moved} of 4000 to 1 of 5"
        );
        let gone = ns[0];
        let left: Vec<NodeId> = ns[1..].to_vec();
        for k in keys(4000) {
            let before = rendezvous(&ns, &k).unwrap();
            let after = rendezvous(&left, &k).unwrap();
            if before != gone {
                assert_eq!(before, after, "a leave moved a queue its owner kept");
            }
        }
    }

    #[test]
    fn a_live_recorded_owner_is_kept() {
        let ns = nodes(3);
        let k = queue_key("/", "orders");
        let natural = rendezvous(&ns, &k).unwrap();
        let other = *ns.iter().find(|n| **n != natural).unwrap();
        assert_eq!(sticky_owner(&ns, &k, Some(other)), Some(other));
        let dead = NodeId(uuid::Uuid::from_u128(1));
        assert_eq!(sticky_owner(&ns, &k, Some(dead)), Some(natural));
        assert_eq!(sticky_owner(&ns, &k, None), Some(natural));
        assert_eq!(sticky_owner(&[], &k, None), None);
    }
}

//! Choosing an ensemble: distinct zones first, live nodes first, and a per-segment
//! rendezvous order so segments spread over all nodes without coordination.

use warren_common::{NodeId, Zone};

/// A node that may hold a replica.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The node.
    pub id: NodeId,
    /// Its zone.
    pub zone: Zone,
    /// Whether it is believed reachable now.
    pub live: bool,
}

fn score(salt: u64, id: &NodeId) -> u64 {
    // FNV-1a over salt and id: stable across processes and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.to_be_bytes().iter().chain(id.0.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Pick up to `size` distinct nodes, at most `per_zone` per zone if enough zones exist,
/// preferring live nodes and excluding `avoid`. `salt` (e.g. the segment id) varies the
/// order between segments. Returns fewer than `size` only if there are too few nodes.
pub fn choose_ensemble(
    candidates: &[Candidate],
    size: usize,
    per_zone: usize,
    salt: u64,
    avoid: &[NodeId],
) -> Vec<NodeId> {
    let mut order: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !avoid.contains(&c.id))
        .collect();
    order.sort_by_key(|c| (!c.live, score(salt, &c.id)));
    order.dedup_by_key(|c| c.id);
    let mut chosen: Vec<&Candidate> = Vec::new();
    // Each pass allows one more replica per zone, so distinct zones are used first and
    // a cluster with fewer zones than replicas still gets a full ensemble.
    let mut limit = per_zone.max(1);
    while chosen.len() < size && chosen.len() < order.len() {
        for c in &order {
            if chosen.len() == size {
                break;
            }
            if chosen.iter().any(|x| x.id == c.id) {
                continue;
            }
            if chosen.iter().filter(|x| x.zone == c.zone).count() < limit {
                chosen.push(c);
            }
        }
        limit += 1;
    }
    chosen.into_iter().map(|c| c.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(zone: &str, live: bool) -> Candidate {
        Candidate {
            id: NodeId::random(),
            zone: Zone(zone.into()),
            live,
        }
    }

    #[test]
    fn replicas_go_to_distinct_zones_and_live_nodes_first() {
        let cs = vec![
            cand("a", true),
            cand("a", true),
            cand("b", false),
            cand("b", true),
            cand("c", true),
        ];
        for salt in 0..50 {
            let e = choose_ensemble(&cs, 3, 1, salt, &[]);
            assert_eq!(e.len(), 3);
            let zones: std::collections::BTreeSet<_> = e
                .iter()
                .map(|id| cs.iter().find(|c| c.id == *id).map(|c| c.zone.clone()))
                .collect();
            assert_eq!(zones.len(), 3);
            assert!(!e.contains(&cs[2].id), "dead node chosen over a live one");
        }
    }

    #[test]
    fn too_few_zones_still_fill_the_ensemble() {
        let cs = vec![cand("a", true), cand("a", true), cand("b", true)];
        assert_eq!(choose_ensemble(&cs, 3, 1, 7, &[]).len(), 3);
        assert_eq!(choose_ensemble(&cs, 3, 1, 7, &[cs[0].id]).len(), 2);
    }
}

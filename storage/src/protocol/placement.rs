//! Choosing an ensemble: distinct zones first, live nodes first, and a per-segment
//! rendezvous order so segments spread over all nodes without coordination. Callers leave
//! evicted nodes out of the candidates: an evicted identity is gone for good.

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

/// Pick a live node to take the place of `lost` in `ensemble` (the other members stay):
/// a node in the lost member's zone if that zone is not already at `per_zone` replicas,
/// then the zone with the fewest replicas of the ensemble (a zone not in it first), then
/// any. `salt` varies the choice between segments. `None` if no live node is outside the
/// ensemble.
pub fn choose_replacement(
    candidates: &[Candidate],
    ensemble: &[NodeId],
    lost: NodeId,
    per_zone: usize,
    salt: u64,
) -> Option<NodeId> {
    let zone_of = |id: &NodeId| candidates.iter().find(|c| c.id == *id).map(|c| &c.zone);
    let remaining: Vec<&Zone> = ensemble
        .iter()
        .filter(|id| **id != lost)
        .filter_map(zone_of)
        .collect();
    let load = |z: &Zone| remaining.iter().filter(|r| **r == z).count();
    let lost_zone = zone_of(&lost);
    candidates
        .iter()
        .filter(|c| c.live && !ensemble.contains(&c.id))
        .min_by_key(|c| {
            let own_zone = lost_zone == Some(&c.zone) && load(&c.zone) < per_zone.max(1);
            (!own_zone, load(&c.zone), score(salt, &c.id))
        })
        .map(|c| c.id)
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

    fn zone_of(cs: &[Candidate], id: NodeId) -> Zone {
        cs.iter().find(|c| c.id == id).unwrap().zone.clone()
    }

    #[test]
    fn a_replacement_comes_from_the_lost_zone_then_a_new_zone_then_any() {
        // Ensemble a0 b0 c0; spares a1, d0, b1.
        let cs = vec![
            cand("a", true),
            cand("b", true),
            cand("c", true),
            cand("a", true),
            cand("d", true),
            cand("b", true),
        ];
        let ensemble = [cs[0].id, cs[1].id, cs[2].id];
        for salt in 0..50 {
            let r = choose_replacement(&cs, &ensemble, cs[0].id, 1, salt).unwrap();
            assert_eq!(r, cs[3].id, "same zone first");
        }
        // The lost zone has no live spare: a zone the ensemble does not use yet.
        let mut no_a = cs.clone();
        no_a[3].live = false;
        for salt in 0..50 {
            let r = choose_replacement(&no_a, &ensemble, cs[0].id, 1, salt).unwrap();
            assert_eq!(r, cs[4].id, "a zone not in the ensemble next");
        }
        // Only a node in a zone the ensemble already uses is left.
        let mut only_b = no_a.clone();
        only_b[4].live = false;
        assert_eq!(
            choose_replacement(&only_b, &ensemble, cs[0].id, 1, 3),
            Some(cs[5].id)
        );
        only_b[5].live = false;
        assert_eq!(choose_replacement(&only_b, &ensemble, cs[0].id, 1, 3), None);
    }

    #[test]
    fn the_strict_profile_places_two_per_zone_and_replaces_within_the_zone() {
        // Three zones of three nodes; strict: six copies, two per zone.
        let cs: Vec<Candidate> = ["a", "b", "c"]
            .iter()
            .flat_map(|z| (0..3).map(move |_| cand(z, true)))
            .collect();
        for salt in 0..50 {
            let e = choose_ensemble(&cs, 6, 2, salt, &[]);
            assert_eq!(e.len(), 6);
            for z in ["a", "b", "c"] {
                let n = e.iter().filter(|id| zone_of(&cs, **id).0 == z).count();
                assert_eq!(n, 2, "zone {z} in {e:?}");
            }
            let lost = e[0];
            let r = choose_replacement(&cs, &e, lost, 2, salt).unwrap();
            assert_eq!(zone_of(&cs, r), zone_of(&cs, lost));
            assert!(!e.contains(&r));
        }
    }

    #[test]
    fn a_lost_zone_leaves_a_full_ensemble_on_the_other_zones() {
        // Zone a is down (its nodes failed); new ensembles avoid it while others can serve.
        let mut cs: Vec<Candidate> = ["a", "b", "c"]
            .iter()
            .flat_map(|z| (0..3).map(move |_| cand(z, true)))
            .collect();
        for c in cs.iter_mut().filter(|c| c.zone.0 == "a") {
            c.live = false;
        }
        let down: Vec<NodeId> = cs.iter().filter(|c| !c.live).map(|c| c.id).collect();
        for salt in 0..50 {
            let e = choose_ensemble(&cs, 3, 1, salt, &down);
            assert_eq!(e.len(), 3);
            assert!(e.iter().all(|id| zone_of(&cs, *id).0 != "a"));
            let e = choose_ensemble(&cs, 6, 2, salt, &down);
            assert_eq!(e.len(), 6, "strict: six copies on two zones");
        }
    }

    #[test]
    fn too_few_zones_still_fill_the_ensemble() {
        let cs = vec![cand("a", true), cand("a", true), cand("b", true)];
        assert_eq!(choose_ensemble(&cs, 3, 1, 7, &[]).len(), 3);
        assert_eq!(choose_ensemble(&cs, 3, 1, 7, &[cs[0].id]).len(), 2);
    }
}

//! Edge-owned broker node ids: the ids clients see are the edge's, so that
//! a switch to a cluster whose brokers have other ids leaves no client with
//! an id that no longer exists.
//!
//! Two pure types. [`GivenIds`] belongs to a virtual cluster and remembers
//! what clients were given, across upstreams. [`NodeIds`] belongs to one
//! upstream (one [`super::Discovery`]) and maps its ids to edge ids:
//! - the first upstream is the identity, forever (nothing to rewrite);
//! - a later one is pending until its broker list is first seen; then the
//!   k-th smallest of its ids takes the k-th smallest edge id clients were
//!   given, and every id beyond those gets a fresh one. A failback to the
//!   first upstream therefore maps back to the identity, and a mapping that
//!   is the identity is marked as such, so it costs nothing either.

use std::collections::{BTreeSet, HashMap};

/// The edge ids clients of one virtual cluster were given, whichever
/// upstream they came from.
#[derive(Debug, Default)]
pub struct GivenIds {
    /// Ids handed out with an address (brokers a client can connect to):
    /// what a later upstream's brokers take over.
    advertised: BTreeSet<i32>,
    /// The highest id ever handed out, with or without an address: fresh
    /// ids go above it, so they collide with nothing a client may hold.
    highest: Option<i32>,
}

impl GivenIds {
    /// `edge_id` was handed out with a broker address.
    pub fn advertised(&mut self, edge_id: i32) {
        if edge_id >= 0 {
            self.advertised.insert(edge_id);
            self.handed_out(edge_id);
        }
    }

    /// `edge_id` was handed out (as a leader, a replica, a coordinator...).
    pub fn handed_out(&mut self, edge_id: i32) {
        if edge_id >= 0 {
            self.highest = Some(self.highest.map_or(edge_id, |h| h.max(edge_id)));
        }
    }
}

/// How one upstream's ids become edge ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIds {
    /// The edge ids are the upstream's.
    Identity,
    /// A later upstream whose broker list the edge has not seen yet: no id
    /// of it can be translated.
    Pending,
    /// Translated both ways; grows as brokers appear.
    Mapped(Table),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    to_edge: HashMap<i32, i32>,
    to_upstream: HashMap<i32, i32>,
}

impl Table {
    fn insert(&mut self, upstream: i32, edge: i32) {
        self.to_edge.insert(upstream, edge);
        self.to_upstream.insert(edge, upstream);
    }

    fn is_identity(&self) -> bool {
        self.to_edge.iter().all(|(upstream, edge)| upstream == edge)
    }

    fn highest_edge(&self) -> Option<i32> {
        self.to_upstream.keys().copied().max()
    }
}

impl NodeIds {
    /// Whether ids pass as they are. Pending is not: until the broker list
    /// is seen, every id of the upstream is unknown.
    pub fn is_identity(&self) -> bool {
        matches!(self, NodeIds::Identity)
    }

    /// Whether the broker list was seen (or none is needed).
    pub fn is_settled(&self) -> bool {
        !matches!(self, NodeIds::Pending)
    }

    /// The upstream's broker list, seen for the first time, decides the
    /// mapping; later lists change nothing (their new ids are extended one
    /// by one by [`Self::to_edge`]).
    pub fn settle(&mut self, upstream_ids: impl IntoIterator<Item = i32>, given: &GivenIds) {
        if self.is_settled() {
            return;
        }
        let upstream: BTreeSet<i32> = upstream_ids.into_iter().filter(|id| *id >= 0).collect();
        if upstream.is_empty() {
            return;
        }
        let mut table = Table::default();
        let mut taken = given.advertised.iter();
        let mut highest = given.highest;
        for id in upstream {
            let Some(edge) = taken.next().copied().or_else(|| fresh(id, highest)) else {
                // No id left above i32::MAX: this broker stays unknown.
                continue;
            };
            highest = Some(highest.map_or(edge, |h| h.max(edge)));
            table.insert(id, edge);
        }
        *self = if table.is_identity() {
            NodeIds::Identity
        } else {
            NodeIds::Mapped(table)
        };
    }

    /// The edge id of upstream id `upstream`: negative ids ("no broker") as
    /// they are; `None` while pending. A settled mapping never refuses: an
    /// id it has not seen (a broker that joined, an offline replica) gets a
    /// fresh edge id.
    pub fn to_edge(&mut self, upstream: i32, given: &mut GivenIds) -> Option<i32> {
        if upstream < 0 {
            return Some(upstream);
        }
        let edge = match self {
            NodeIds::Identity => upstream,
            NodeIds::Pending => return None,
            NodeIds::Mapped(table) => match table.to_edge.get(&upstream) {
                Some(edge) => *edge,
                None => {
                    let highest = given.highest.max(table.highest_edge());
                    let edge = fresh(upstream, highest)?;
                    table.insert(upstream, edge);
                    edge
                }
            },
        };
        given.handed_out(edge);
        Some(edge)
    }

    /// The upstream id of edge id `edge`: negative ids as they are; `None`
    /// for an edge id this upstream has no broker for (or while pending).
    pub fn to_upstream(&self, edge: i32) -> Option<i32> {
        if edge < 0 {
            return Some(edge);
        }
        match self {
            NodeIds::Identity => Some(edge),
            NodeIds::Pending => None,
            NodeIds::Mapped(table) => table.to_upstream.get(&edge).copied(),
        }
    }
}

/// One upstream's mapping together with what clients were given: what the
/// rewriter translates one message with.
pub struct Translator<'a> {
    pub ids: &'a mut NodeIds,
    pub given: &'a mut GivenIds,
}

impl Translator<'_> {
    pub fn is_identity(&self) -> bool {
        self.ids.is_identity()
    }

    /// See [`NodeIds::settle`].
    pub fn settle(&mut self, upstream_ids: impl IntoIterator<Item = i32>) {
        self.ids.settle(upstream_ids, self.given);
    }

    /// See [`NodeIds::to_edge`].
    pub fn to_edge(&mut self, upstream: i32) -> Option<i32> {
        self.ids.to_edge(upstream, self.given)
    }

    /// See [`NodeIds::to_upstream`].
    pub fn to_upstream(&self, edge: i32) -> Option<i32> {
        self.ids.to_upstream(edge)
    }

    /// Whether upstream id `upstream` reaches clients as it is, without
    /// changing the mapping: to decide that an answer needs no re-encoding.
    pub fn keeps(&self, upstream: i32) -> bool {
        upstream < 0
            || match &*self.ids {
                NodeIds::Identity => true,
                NodeIds::Pending => false,
                NodeIds::Mapped(table) => table.to_edge.get(&upstream) == Some(&upstream),
            }
    }
}

/// An edge id for upstream id `id` above every id handed out so far: `id`
/// itself where that is free (so ids stay recognisable), else the next one;
/// none once i32::MAX was handed out.
fn fresh(id: i32, highest: Option<i32>) -> Option<i32> {
    match highest {
        Some(highest) if id <= highest => highest.checked_add(1),
        _ => Some(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(ids: &[i32]) -> GivenIds {
        let mut given = GivenIds::default();
        for id in ids {
            given.advertised(*id);
        }
        given
    }

    fn edges(ids: &mut NodeIds, given: &mut GivenIds, upstream: &[i32]) -> Vec<Option<i32>> {
        upstream.iter().map(|id| ids.to_edge(*id, given)).collect()
    }

    #[test]
    fn the_first_upstream_is_the_identity() {
        let mut ids = NodeIds::Identity;
        let mut given = GivenIds::default();
        assert_eq!(
            edges(&mut ids, &mut given, &[1, 2, 3, 99, -1]),
            [Some(1), Some(2), Some(3), Some(99), Some(-1)]
        );
        assert_eq!(ids.to_upstream(99), Some(99));
        assert_eq!(given.highest, Some(99));
    }

    #[test]
    fn a_standby_takes_over_the_ids_in_order() {
        let mut given = given(&[1, 2, 3]);
        let mut ids = NodeIds::Pending;
        assert_eq!(ids.to_edge(4, &mut given), None, "nothing before the list");
        assert_eq!(ids.to_upstream(1), None);
        assert_eq!(ids.to_edge(-1, &mut given), Some(-1));
        // Listed out of order: the order of the ids counts, not of the list.
        ids.settle([6, 4, 5], &given);
        assert!(!ids.is_identity());
        assert_eq!(
            edges(&mut ids, &mut given, &[4, 5, 6]),
            [Some(1), Some(2), Some(3)]
        );
        assert_eq!(
            [1, 2, 3, 4, 7].map(|edge| ids.to_upstream(edge)),
            [Some(4), Some(5), Some(6), None, None]
        );
        // A second list changes nothing.
        ids.settle([1, 2, 3], &given);
        assert_eq!(ids.to_edge(4, &mut given), Some(1));
    }

    #[test]
    fn extra_brokers_get_fresh_ids_that_collide_with_nothing() {
        // A client also saw 9 (say, an offline replica) without an address.
        let mut given = given(&[1, 2]);
        given.handed_out(9);
        let mut ids = NodeIds::Pending;
        ids.settle([4, 5, 6, 12], &given);
        assert_eq!(
            edges(&mut ids, &mut given, &[4, 5, 6, 12]),
            // 6 is not above 9, which a client may hold: 10. 12 is above
            // everything handed out: it keeps its own id.
            [Some(1), Some(2), Some(10), Some(12)]
        );
        // A broker that joins later, and a replica id no list named.
        assert_eq!(ids.to_edge(7, &mut given), Some(13));
        assert_eq!(ids.to_edge(40, &mut given), Some(40));
        assert_eq!(ids.to_upstream(13), Some(7));
        assert_eq!(ids.to_edge(7, &mut given), Some(13), "sticky");
    }

    #[test]
    fn a_failback_maps_back_to_the_identity() {
        let mut given = given(&[1, 2, 3]);
        let mut standby = NodeIds::Pending;
        standby.settle([4, 5, 6, 7], &given);
        for (upstream, edge) in [(4, 1), (5, 2), (6, 3), (7, 7)] {
            assert_eq!(standby.to_edge(upstream, &mut given), Some(edge));
            given.advertised(edge);
        }
        let mut primary = NodeIds::Pending;
        primary.settle([3, 1, 2], &given);
        assert_eq!(primary, NodeIds::Identity);
        // Edge id 7 has no broker on the primary: routing finds no address
        // for it (see `Discovery`), whatever the mapping says.
        assert_eq!(primary.to_upstream(7), Some(7));
        // And switching again gives the standby the same ids as before.
        let mut again = NodeIds::Pending;
        again.settle([4, 5, 6, 7], &given);
        assert_eq!(
            edges(&mut again, &mut given, &[4, 5, 6, 7]),
            [Some(1), Some(2), Some(3), Some(7)]
        );
    }

    #[test]
    fn same_ids_on_both_clusters_is_the_identity() {
        let given = given(&[1, 2, 3]);
        let mut ids = NodeIds::Pending;
        ids.settle([], &given);
        assert_eq!(ids, NodeIds::Pending, "an empty list settles nothing");
        ids.settle([1, 2, 3, 4], &given);
        assert_eq!(ids, NodeIds::Identity);
    }

    #[test]
    fn a_smaller_standby_leaves_the_highest_ids_unmapped() {
        let mut given = given(&[1, 2, 3]);
        let mut ids = NodeIds::Pending;
        ids.settle([7], &given);
        assert_eq!(ids.to_edge(7, &mut given), Some(1));
        assert_eq!(ids.to_upstream(2), None);
        assert_eq!(ids.to_upstream(3), None);
    }

    #[test]
    fn no_fresh_id_above_the_highest_possible_one() {
        let mut given = given(&[1, i32::MAX]);
        let mut ids = NodeIds::Pending;
        ids.settle([4, 5, 6], &given);
        assert_eq!(
            edges(&mut ids, &mut given, &[4, 5, 6]),
            [Some(1), Some(i32::MAX), None]
        );
    }

    #[test]
    fn nothing_given_yet_keeps_the_upstream_ids() {
        let mut given = GivenIds::default();
        let mut ids = NodeIds::Pending;
        ids.settle([4, 5], &given);
        assert_eq!(ids, NodeIds::Identity);
        assert_eq!(ids.to_edge(5, &mut given), Some(5));
    }
}

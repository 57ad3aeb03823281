//! Discovery: which upstream broker each edge node id is, as the cluster's
//! own answers last said, and how that upstream's node ids map to the edge's
//! ([`NodeIds`]). Nothing here knows edge addresses.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use prometheus_client::metrics::gauge::Gauge;
use strait_edge_config::HostPort;
use tokio::sync::watch;

use super::node_ids::NodeIds;

/// What recording a broker changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    New,
    Moved { from: HostPort },
    Known,
}

/// Which upstream broker each edge node id is, for one upstream cluster.
pub struct Discovery {
    /// By edge node id.
    nodes: Mutex<HashMap<i32, HostPort>>,
    ids: Mutex<NodeIds>,
    /// How many brokers are known (`strait_brokers_discovered`).
    discovered: Gauge,
    /// Bumped whenever a broker is learnt or moves: what [`Self::known`]
    /// waits on.
    changes: watch::Sender<u64>,
}

impl Discovery {
    pub(crate) fn new(discovered: Gauge, ids: NodeIds) -> Self {
        Discovery {
            nodes: Mutex::default(),
            ids: Mutex::new(ids),
            discovered,
            changes: watch::Sender::new(0),
        }
    }

    pub(crate) fn record(&self, edge_id: i32, upstream: &HostPort) -> Seen {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let seen = match nodes.insert(edge_id, upstream.clone()) {
            None => Seen::New,
            Some(from) if &from != upstream => Seen::Moved { from },
            Some(_) => Seen::Known,
        };
        self.discovered.set(nodes.len() as i64);
        drop(nodes);
        if seen != Seen::Known {
            self.changes.send_modify(|version| *version += 1);
        }
        seen
    }

    /// Completes once the broker clients know as `edge_id` has a route on
    /// this upstream (at once if it has one already).
    pub async fn known(&self, edge_id: i32) {
        let mut changes = self.changes.subscribe();
        while self.route(edge_id).is_none() {
            // The sender lives as long as `self`: `changed` cannot fail here.
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Where the broker clients know as `edge_id` is.
    pub fn upstream_of(&self, edge_id: i32) -> Option<HostPort> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.get(&edge_id).cloned()
    }

    /// The upstream's own node id and address of the broker clients know as
    /// `edge_id`, if this upstream has one.
    pub fn route(&self, edge_id: i32) -> Option<(i32, HostPort)> {
        let address = self.upstream_of(edge_id)?;
        Some((self.node_ids().to_upstream(edge_id)?, address))
    }

    /// Whether this upstream's node ids differ from the edge's (or may: a
    /// mapping still pending). Read when a connection opens, to decide what
    /// its rewriter must decode.
    pub fn maps_node_ids(&self) -> bool {
        !self.node_ids().is_identity()
    }

    pub(crate) fn node_ids(&self) -> MutexGuard<'_, NodeIds> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_moved_known() {
        let gauge = Gauge::default();
        let d = Discovery::new(gauge.clone(), NodeIds::Identity);
        let a = HostPort {
            host: "kafka-1".into(),
            port: 9092,
        };
        let b = HostPort {
            host: "kafka-1b".into(),
            port: 9093,
        };
        assert_eq!(d.record(1, &a), Seen::New);
        assert_eq!(d.record(1, &a), Seen::Known);
        assert_eq!(d.record(1, &b), Seen::Moved { from: a });
        assert_eq!(d.upstream_of(1), Some(b.clone()));
        assert_eq!(d.route(1), Some((1, b)));
        assert_eq!(gauge.get(), 1);
        assert_eq!(d.upstream_of(2), None);
        assert!(!d.maps_node_ids());
    }

    #[test]
    fn routes_by_edge_id_to_the_upstream_id() {
        let d = Discovery::new(Gauge::default(), NodeIds::Pending);
        assert!(d.maps_node_ids());
        let mut given = super::super::node_ids::GivenIds::default();
        given.advertised(1);
        d.node_ids().settle([4], &given);
        let west = HostPort {
            host: "west-4".into(),
            port: 9092,
        };
        d.record(1, &west);
        assert_eq!(d.route(1), Some((4, west)));
        assert_eq!(d.route(4), None);
    }

    #[tokio::test]
    async fn known_completes_when_the_broker_is_learnt() {
        let d = std::sync::Arc::new(Discovery::new(Gauge::default(), NodeIds::Identity));
        let waiting = tokio::spawn({
            let d = d.clone();
            async move { d.known(2).await }
        });
        let broker = HostPort {
            host: "kafka-1".into(),
            port: 9092,
        };
        d.record(1, &broker);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "broker 1 is not the one waited for");
        d.record(2, &broker);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("known(2) completes once broker 2 is recorded")
            .unwrap();
        // Already known: at once.
        d.known(1).await;
    }
}

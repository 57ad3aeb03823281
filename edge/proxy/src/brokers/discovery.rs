//! Discovery: which upstream broker each node id is, as the cluster's own
//! Metadata answers last said. Nothing here knows edge addresses.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;
use strait_edge_config::HostPort;

/// What recording a broker changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    New,
    Moved { from: HostPort },
    Known,
}

/// Which upstream broker each node id is, for one upstream cluster.
pub struct Discovery {
    nodes: Mutex<HashMap<i32, HostPort>>,
    /// How many brokers are known (`strait_brokers_discovered`).
    discovered: Gauge,
}

impl Discovery {
    pub(crate) fn new(discovered: Gauge) -> Self {
        Discovery {
            nodes: Mutex::default(),
            discovered,
        }
    }

    pub(crate) fn record(&self, node_id: i32, upstream: &HostPort) -> Seen {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let seen = match nodes.insert(node_id, upstream.clone()) {
            None => Seen::New,
            Some(from) if &from != upstream => Seen::Moved { from },
            Some(_) => Seen::Known,
        };
        self.discovered.set(nodes.len() as i64);
        seen
    }

    pub fn upstream_of(&self, node_id: i32) -> Option<HostPort> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.get(&node_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_moved_known() {
        let gauge = Gauge::default();
        let d = Discovery::new(gauge.clone());
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
        assert_eq!(d.upstream_of(1), Some(b));
        assert_eq!(gauge.get(), 1);
        assert_eq!(d.upstream_of(2), None);
    }
}

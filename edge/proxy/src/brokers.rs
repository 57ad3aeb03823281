//! Port-per-broker addressing: every upstream broker a cluster advertises gets
//! its own port on the edge, bound the first time the broker is seen.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use strait_edge_config::HostPort;
use thiserror::Error;
use tokio::sync::mpsc;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BrokerMapError {
    #[error("no free port left in {first}-{last} for broker {node_id}")]
    PortsExhausted { node_id: i32, first: u16, last: u16 },
}

/// A new broker port, bound and waiting for its accept loop.
pub struct NewBrokerListener {
    pub node_id: i32,
    pub listener: std::net::TcpListener,
}

struct Node {
    port: u16,
    upstream: HostPort,
}

#[derive(Default)]
struct Nodes {
    by_id: HashMap<i32, Node>,
    ports: HashSet<u16>,
}

/// The node id to edge port to upstream address map of one virtual cluster.
pub struct BrokerMap {
    advertised_host: Arc<str>,
    port_range: RangeInclusive<u16>,
    bind_address: IpAddr,
    nodes: Mutex<Nodes>,
    new_listeners: mpsc::UnboundedSender<NewBrokerListener>,
    discovered: Gauge,
}

impl BrokerMap {
    pub fn new(
        advertised_host: &str,
        port_range: RangeInclusive<u16>,
        bind_address: IpAddr,
        discovered: Gauge,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<NewBrokerListener>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let map = BrokerMap {
            advertised_host: advertised_host.into(),
            port_range,
            bind_address,
            nodes: Mutex::default(),
            new_listeners: tx,
            discovered,
        };
        (Arc::new(map), rx)
    }

    pub fn advertised_host(&self) -> &Arc<str> {
        &self.advertised_host
    }

    /// The edge port clients must use for `node_id`, recording where that
    /// broker really is. A newly seen broker gets the lowest free port of the
    /// range that can be bound, and its listener is handed to the accept loop.
    pub fn advertise(&self, node_id: i32, upstream: HostPort) -> Result<u16, BrokerMapError> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(node) = nodes.by_id.get_mut(&node_id) {
            if node.upstream != upstream {
                tracing::info!(node_id, from = %node.upstream, to = %upstream, "broker moved");
                node.upstream = upstream;
            }
            return Ok(node.port);
        }
        for port in self.port_range.clone() {
            if nodes.ports.contains(&port) {
                continue;
            }
            let address = SocketAddr::new(self.bind_address, port);
            // A port taken by another process is skipped, not fatal.
            let Ok(listener) = std::net::TcpListener::bind(address) else {
                continue;
            };
            if listener.set_nonblocking(true).is_err() {
                continue;
            }
            tracing::info!(node_id, %upstream, edge_port = port, "broker discovered");
            nodes.ports.insert(port);
            nodes.by_id.insert(node_id, Node { port, upstream });
            self.discovered.set(nodes.by_id.len() as i64);
            // The receiver lives as long as the cluster runtime; once it is
            // gone the edge is shutting down and the port is never served.
            let _ = self
                .new_listeners
                .send(NewBrokerListener { node_id, listener });
            return Ok(port);
        }
        Err(BrokerMapError::PortsExhausted {
            node_id,
            first: *self.port_range.start(),
            last: *self.port_range.end(),
        })
    }

    /// Where broker `node_id` is, as its cluster last advertised it.
    pub fn upstream_of(&self, node_id: i32) -> Option<HostPort> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.by_id.get(&node_id).map(|node| node.upstream.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    #[tokio::test]
    async fn ports_are_sticky_and_skip_busy_ones() {
        // Hold the first port of the range so the map has to skip it.
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let first = busy.local_addr().unwrap().port();
        let Some(last) = first.checked_add(2) else {
            return;
        };
        let (map, mut rx) = BrokerMap::new(
            "edge.example",
            first..=last,
            "127.0.0.1".parse().unwrap(),
            Gauge::default(),
        );
        let a = map.advertise(1, hp("kafka-1", 9092));
        let b = map.advertise(2, hp("kafka-2", 9092));
        // Ports next to an ephemeral one may be taken by other processes;
        // what must hold is: distinct, in range, never the busy one, sticky.
        if let (Ok(a), Ok(b)) = (a, b) {
            assert_ne!(a, b);
            assert_ne!(a, first);
            assert_ne!(b, first);
            assert_eq!(map.advertise(1, hp("kafka-1b", 9093)), Ok(a));
            assert_eq!(map.upstream_of(1), Some(hp("kafka-1b", 9093)));
            assert_eq!(rx.recv().await.unwrap().node_id, 1);
            assert_eq!(rx.recv().await.unwrap().node_id, 2);
            assert_eq!(
                map.advertise(3, hp("kafka-3", 9092)),
                Err(BrokerMapError::PortsExhausted {
                    node_id: 3,
                    first,
                    last
                })
            );
        }
        assert_eq!(map.upstream_of(42), None);
    }
}

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

/// How brokers are addressed on the edge.
enum Addressing {
    /// A port of `port_range` per broker, all under `advertised_host`.
    PortPerBroker {
        advertised_host: Arc<str>,
        port_range: RangeInclusive<u16>,
        bind_address: IpAddr,
    },
    /// One port; a host name per broker, `prefix` + node id + `suffix`.
    Sni {
        prefix: String,
        suffix: String,
        port: u16,
    },
}

/// The node id to edge address to upstream address map of one virtual cluster.
pub struct BrokerMap {
    addressing: Addressing,
    nodes: Mutex<Nodes>,
    new_listeners: mpsc::UnboundedSender<NewBrokerListener>,
    discovered: Gauge,
}

impl BrokerMap {
    /// Port-per-broker addressing: new brokers' listeners arrive on the receiver.
    pub fn new(
        advertised_host: &str,
        port_range: RangeInclusive<u16>,
        bind_address: IpAddr,
        discovered: Gauge,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<NewBrokerListener>) {
        Self::with_addressing(
            Addressing::PortPerBroker {
                advertised_host: advertised_host.into(),
                port_range,
                bind_address,
            },
            discovered,
        )
    }

    /// SNI addressing: `pattern` contains `$(node_id)`; every broker shares `port`.
    pub fn sni(pattern: &str, port: u16, discovered: Gauge) -> Arc<Self> {
        let (prefix, suffix) = pattern
            .split_once(strait_edge_config::NODE_ID)
            .unwrap_or((pattern, ""));
        Self::with_addressing(
            Addressing::Sni {
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
                port,
            },
            discovered,
        )
        .0
    }

    fn with_addressing(
        addressing: Addressing,
        discovered: Gauge,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<NewBrokerListener>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let map = BrokerMap {
            addressing,
            nodes: Mutex::default(),
            new_listeners: tx,
            discovered,
        };
        (Arc::new(map), rx)
    }

    /// The node id an SNI host name designates, if it follows the pattern.
    pub fn node_for_host(&self, host: &str) -> Option<i32> {
        let Addressing::Sni { prefix, suffix, .. } = &self.addressing else {
            return None;
        };
        let host = host.to_ascii_lowercase();
        let id = host
            .strip_prefix(prefix.as_str())?
            .strip_suffix(suffix.as_str())?;
        // Reject "+5", "05" and the like: exactly the form the edge advertises.
        let node_id: i32 = id.parse().ok()?;
        (node_id.to_string() == id).then_some(node_id)
    }

    /// The address clients must use for `node_id`, recording where that
    /// broker really is. In port-per-broker mode a newly seen broker gets the
    /// lowest free port of the range that can be bound, and its listener is
    /// handed to the accept loop.
    pub fn advertise(
        &self,
        node_id: i32,
        upstream: HostPort,
    ) -> Result<(Arc<str>, u16), BrokerMapError> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let (advertised_host, port_range, bind_address) = match &self.addressing {
            Addressing::Sni {
                prefix,
                suffix,
                port,
            } => {
                let host: Arc<str> = format!("{prefix}{node_id}{suffix}").into();
                let known = nodes.by_id.insert(
                    node_id,
                    Node {
                        port: *port,
                        upstream: upstream.clone(),
                    },
                );
                if known.is_none() {
                    tracing::info!(node_id, %upstream, edge_host = %host, "broker discovered");
                    self.discovered.set(nodes.by_id.len() as i64);
                }
                return Ok((host, *port));
            }
            Addressing::PortPerBroker {
                advertised_host,
                port_range,
                bind_address,
            } => (advertised_host, port_range, *bind_address),
        };
        if let Some(node) = nodes.by_id.get_mut(&node_id) {
            if node.upstream != upstream {
                tracing::info!(node_id, from = %node.upstream, to = %upstream, "broker moved");
                node.upstream = upstream;
            }
            return Ok((advertised_host.clone(), node.port));
        }
        for port in port_range.clone() {
            if nodes.ports.contains(&port) {
                continue;
            }
            let address = SocketAddr::new(bind_address, port);
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
            return Ok((advertised_host.clone(), port));
        }
        Err(BrokerMapError::PortsExhausted {
            node_id,
            first: *port_range.start(),
            last: *port_range.end(),
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
        let a = map.advertise(1, hp("kafka-1", 9092)).map(|(_, p)| p);
        let b = map.advertise(2, hp("kafka-2", 9092)).map(|(_, p)| p);
        // Ports next to an ephemeral one may be taken by other processes;
        // what must hold is: distinct, in range, never the busy one, sticky.
        if let (Ok(a), Ok(b)) = (a, b) {
            assert_ne!(a, b);
            assert_ne!(a, first);
            assert_ne!(b, first);
            assert_eq!(
                map.advertise(1, hp("kafka-1b", 9093)),
                Ok(("edge.example".into(), a))
            );
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

    #[test]
    fn sni_names_map_to_node_ids() {
        let map = BrokerMap::sni(
            "broker-$(node_id).kafka.example.com",
            9443,
            Gauge::default(),
        );
        assert_eq!(
            map.advertise(7, hp("kafka-7", 9092)),
            Ok(("broker-7.kafka.example.com".into(), 9443))
        );
        assert_eq!(map.node_for_host("broker-7.kafka.example.com"), Some(7));
        assert_eq!(map.node_for_host("BROKER-12.kafka.example.com"), Some(12));
        assert_eq!(map.node_for_host("broker-07.kafka.example.com"), None);
        assert_eq!(map.node_for_host("broker-x.kafka.example.com"), None);
        assert_eq!(map.node_for_host("broker-7.other.example.com"), None);
        assert_eq!(map.upstream_of(7), Some(hp("kafka-7", 9092)));
    }
}

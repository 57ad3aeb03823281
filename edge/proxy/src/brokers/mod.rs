//! How a virtual cluster's brokers are addressed on the edge, in three
//! jobs: [`discovery`] (which upstream broker each node id is), the
//! addressing (the edge address clients get for a node id: a port of the
//! range, allocated by [`ports::PortAllocator`], or an SNI host name) and,
//! for ports, binding the listener ([`ports::ListenerBinder`]). A tunneled
//! cluster routes by node id alone: the far edge resolves it.
//!
//! Node ids clients see are the edge's ([`node_ids`]): the first upstream's
//! own, and after a switch the new upstream's mapped onto them, so that the
//! ports and host names clients hold stay valid. Every id-keyed thing here
//! (ports, host names, discovery) is keyed by edge id.

mod discovery;
pub mod node_ids;
mod ports;

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use strait_edge_config::HostPort;
use thiserror::Error;
use tokio::sync::mpsc;

pub use self::discovery::Discovery;
use self::discovery::Seen;
use self::node_ids::{GivenIds, NodeIds, Translator};
pub use self::ports::NewBrokerListener;
use self::ports::{ListenerBinder, PortAllocator};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BrokerMapError {
    #[error("no free port left in {first}-{last} for broker {node_id}")]
    PortsExhausted { node_id: i32, first: u16, last: u16 },
}

/// How brokers are addressed on the edge.
enum Addressing {
    /// A port of the range per broker, all under `advertised_host`.
    PortPerBroker {
        advertised_host: Arc<str>,
        ports: Mutex<PortAllocator>,
        binder: ListenerBinder,
    },
    /// One port; a host name per broker, `prefix` + node id + `suffix`.
    Sni {
        prefix: String,
        suffix: String,
        port: u16,
    },
}

/// The node id to edge address to upstream address map of one virtual cluster.
///
/// Addressing (the ports and host names clients know) lives as long as the
/// cluster's listeners; discovery belongs to one upstream and is replaced
/// when the upstream is ([`BrokerMap::reset_discovery`]), so a broker id of
/// the old cluster never routes to an address of the new one.
pub struct BrokerMap {
    addressing: Addressing,
    discovery: std::sync::RwLock<Arc<Discovery>>,
    discovered: Gauge,
    /// The edge ids clients were given, under every upstream so far.
    given: Mutex<GivenIds>,
}

impl BrokerMap {
    /// Port-per-broker addressing: new brokers' listeners arrive on the receiver.
    pub fn new(
        advertised_host: &str,
        port_range: RangeInclusive<u16>,
        bind_address: IpAddr,
        discovered: Gauge,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<NewBrokerListener>) {
        let (binder, rx) = ListenerBinder::new(bind_address);
        let map = BrokerMap {
            addressing: Addressing::PortPerBroker {
                advertised_host: advertised_host.into(),
                ports: Mutex::new(PortAllocator::new(port_range)),
                binder,
            },
            discovery: std::sync::RwLock::new(Arc::new(first_discovery(&discovered))),
            discovered,
            given: Mutex::default(),
        };
        (Arc::new(map), rx)
    }

    /// SNI addressing: `pattern` contains `$(node_id)`; every broker shares `port`.
    pub fn sni(pattern: &str, port: u16, discovered: Gauge) -> Arc<Self> {
        let (prefix, suffix) = pattern
            .split_once(strait_edge_config::NODE_ID)
            .unwrap_or((pattern, ""));
        Arc::new(BrokerMap {
            addressing: Addressing::Sni {
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
                port,
            },
            discovery: std::sync::RwLock::new(Arc::new(first_discovery(&discovered))),
            discovered,
            given: Mutex::default(),
        })
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

    /// The address clients must use for edge node id `node_id`, recording
    /// where that broker really is. In port-per-broker mode a newly seen broker gets the
    /// lowest free port of the range that can be bound, and its listener is
    /// handed to the accept loop.
    pub fn advertise(
        &self,
        node_id: i32,
        upstream: HostPort,
    ) -> Result<(Arc<str>, u16), BrokerMapError> {
        self.advertise_in(&self.discovery(), node_id, upstream)
    }

    /// [`Self::advertise`], recording into `discovery`: the one of the
    /// upstream the answer came from, which may have been replaced since.
    pub fn advertise_in(
        &self,
        discovery: &Discovery,
        node_id: i32,
        upstream: HostPort,
    ) -> Result<(Arc<str>, u16), BrokerMapError> {
        self.given
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .advertised(node_id);
        match &self.addressing {
            Addressing::Sni {
                prefix,
                suffix,
                port,
            } => {
                let host: Arc<str> = format!("{prefix}{node_id}{suffix}").into();
                record(discovery, node_id, &upstream, &host, *port);
                Ok((host, *port))
            }
            Addressing::PortPerBroker {
                advertised_host,
                ports,
                binder,
            } => {
                let mut ports = ports.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(port) = ports.port_of(node_id) {
                    record(discovery, node_id, &upstream, advertised_host, port);
                    return Ok((advertised_host.clone(), port));
                }
                // A port another process holds is skipped, not fatal.
                let Some((port, listener)) = ports.allocate(node_id, |port| binder.bind(port))
                else {
                    return Err(BrokerMapError::PortsExhausted {
                        node_id,
                        first: *ports.range().start(),
                        last: *ports.range().end(),
                    });
                };
                record(discovery, node_id, &upstream, advertised_host, port);
                binder.hand_over(node_id, listener);
                Ok((advertised_host.clone(), port))
            }
        }
    }

    /// Where broker `node_id` is, as its cluster last advertised it.
    pub fn upstream_of(&self, node_id: i32) -> Option<HostPort> {
        self.discovery().upstream_of(node_id)
    }

    /// The discovery of the current upstream.
    pub fn discovery(&self) -> Arc<Discovery> {
        self.discovery
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs `f` with the node-id mapping of `discovery`'s upstream, to
    /// translate one message. `f` must not advertise (that would wait for
    /// the lock `f` holds): translate first, then rewrite addresses.
    pub fn with_node_ids<R>(
        &self,
        discovery: &Discovery,
        f: impl FnOnce(&mut Translator<'_>) -> R,
    ) -> R {
        // Always in this order: the upstream's mapping, then the cluster's.
        let mut ids = discovery.node_ids();
        let mut given = self.given.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut Translator {
            ids: &mut ids,
            given: &mut given,
        })
    }

    /// Forgets every broker address: the upstream is now another cluster.
    /// Ports and host names stay, so clients keep reaching the edge where
    /// they did, and the new upstream's node ids are mapped onto the ones
    /// clients hold once its broker list is seen. Returns the new (empty)
    /// discovery.
    pub fn reset_discovery(&self) -> Arc<Discovery> {
        let fresh = Arc::new(Discovery::new(self.discovered.clone(), NodeIds::Pending));
        self.discovered.set(0);
        *self.discovery.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        fresh
    }
}

/// The first upstream's ids are the edge's.
fn first_discovery(discovered: &Gauge) -> Discovery {
    Discovery::new(discovered.clone(), NodeIds::Identity)
}

fn record(
    discovery: &Discovery,
    node_id: i32,
    upstream: &HostPort,
    edge_host: &str,
    edge_port: u16,
) {
    match discovery.record(node_id, upstream) {
        Seen::New => {
            // The upstream's own id, where it differs (after a switch).
            let upstream_node_id = discovery.node_ids().to_upstream(node_id);
            tracing::info!(node_id, upstream_node_id, %upstream, edge_host, edge_port, "broker discovered")
        }
        Seen::Moved { from } => {
            tracing::info!(node_id, %from, to = %upstream, "broker moved")
        }
        Seen::Known => {}
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
    fn a_reset_forgets_addresses_but_keeps_names() {
        let map = BrokerMap::sni("b-$(node_id).example", 9443, Gauge::default());
        let old = map.discovery();
        map.advertise(1, hp("east-1", 9092)).unwrap();
        let fresh = map.reset_discovery();
        assert_eq!(
            map.upstream_of(1),
            None,
            "the old cluster's address is gone"
        );
        // An answer from the old upstream, arriving late, records into its own discovery only.
        map.advertise_in(&old, 2, hp("east-2", 9092)).unwrap();
        assert_eq!(map.upstream_of(2), None);
        assert_eq!(
            map.advertise_in(&fresh, 1, hp("west-1", 9092)),
            Ok(("b-1.example".into(), 9443))
        );
        assert_eq!(map.upstream_of(1), Some(hp("west-1", 9092)));
    }

    #[test]
    fn a_new_upstream_takes_over_the_advertised_ids() {
        let map = BrokerMap::sni("b-$(node_id).example", 9443, Gauge::default());
        let first = map.discovery();
        assert!(!first.maps_node_ids());
        for id in [1, 2, 3] {
            map.advertise(id, hp(&format!("east-{id}"), 9092)).unwrap();
        }
        let west = map.reset_discovery();
        assert!(west.maps_node_ids());
        let edge = map.with_node_ids(&west, |ids| {
            assert_eq!(ids.to_edge(5), None, "pending until the broker list");
            ids.settle([5, 6, 4]);
            [4, 5, 6].map(|id| ids.to_edge(id))
        });
        assert_eq!(edge, [Some(1), Some(2), Some(3)]);
        map.advertise_in(&west, 1, hp("west-4", 9092)).unwrap();
        assert_eq!(west.route(1), Some((4, hp("west-4", 9092))));
        // Back to a cluster with the first ids: the identity again.
        let east = map.reset_discovery();
        map.with_node_ids(&east, |ids| ids.settle([1, 2, 3]));
        assert!(!east.maps_node_ids());
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

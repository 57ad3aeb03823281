//! Port allocation and listener binding for port-per-broker addressing, as
//! two jobs: the allocator only decides which port of the range a node id
//! has (sticky, lowest free first); the binder opens the socket and hands
//! it to the cluster's accept loop.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use tokio::sync::mpsc;

/// A new broker port, bound and waiting for its accept loop.
pub struct NewBrokerListener {
    pub node_id: i32,
    pub listener: std::net::TcpListener,
}

pub(crate) struct PortAllocator {
    range: RangeInclusive<u16>,
    by_node: HashMap<i32, u16>,
    taken: HashSet<u16>,
}

impl PortAllocator {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        PortAllocator {
            range,
            by_node: HashMap::new(),
            taken: HashSet::new(),
        }
    }

    pub fn range(&self) -> &RangeInclusive<u16> {
        &self.range
    }

    pub fn port_of(&self, node_id: i32) -> Option<u16> {
        self.by_node.get(&node_id).copied()
    }

    /// The lowest free port for which `claim` succeeds (a port `claim`
    /// refuses, e.g. one another process holds, is skipped), kept for
    /// `node_id` from now on.
    pub fn allocate<T>(
        &mut self,
        node_id: i32,
        mut claim: impl FnMut(u16) -> Option<T>,
    ) -> Option<(u16, T)> {
        for port in self.range.clone() {
            if self.taken.contains(&port) {
                continue;
            }
            if let Some(claimed) = claim(port) {
                self.taken.insert(port);
                self.by_node.insert(node_id, port);
                return Some((port, claimed));
            }
        }
        None
    }
}

pub(crate) struct ListenerBinder {
    bind_address: IpAddr,
    accept_loop: mpsc::UnboundedSender<NewBrokerListener>,
}

impl ListenerBinder {
    pub fn new(bind_address: IpAddr) -> (Self, mpsc::UnboundedReceiver<NewBrokerListener>) {
        let (accept_loop, rx) = mpsc::unbounded_channel();
        (
            ListenerBinder {
                bind_address,
                accept_loop,
            },
            rx,
        )
    }

    /// A non-blocking listener on `port`, or none if it cannot be bound.
    pub fn bind(&self, port: u16) -> Option<std::net::TcpListener> {
        let listener =
            std::net::TcpListener::bind(SocketAddr::new(self.bind_address, port)).ok()?;
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    pub fn hand_over(&self, node_id: i32, listener: std::net::TcpListener) {
        // The receiver lives as long as the cluster runtime; once it is gone
        // the edge is shutting down and the port is never served.
        let _ = self
            .accept_loop
            .send(NewBrokerListener { node_id, listener });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_sticky_lowest_first_and_skips_refused_ports() {
        let mut ports = PortAllocator::new(100..=103);
        assert_eq!(
            ports.allocate(1, |p| (p != 100).then_some(())),
            Some((101, ()))
        );
        // 100 was refused, not taken: the next node may get it.
        assert_eq!(ports.allocate(2, Some), Some((100, 100)));
        assert_eq!(ports.port_of(1), Some(101));
        assert_eq!(ports.allocate(3, |_| None::<()>), None);
        assert_eq!(ports.port_of(3), None);
        assert_eq!(ports.allocate(3, Some).map(|(p, _)| p), Some(102));
        assert_eq!(ports.allocate(4, Some).map(|(p, _)| p), Some(103));
        assert_eq!(ports.allocate(5, Some), None);
    }
}

//! Per-peer tunnel metrics, registered under `mesh_` in the registry the
//! edge passes in.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub peer: String,
    /// `outbound` (opened here for a local client) or `inbound` (opened by
    /// the peer for one of its clients); bytes: `sent` or `received`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub peer: String,
    pub direction: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceOutcomeLabels {
    pub peer: String,
    pub service: String,
    /// Near edge: `forwarded`, `no_tunnel`, `timeout`, `error` or the far
    /// edge's refusal (`not_exported`, `unavailable`, ...); far edge:
    /// `served`, `not_exported`, `unavailable`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceBytesLabels {
    pub peer: String,
    pub service: String,
    /// `to_service` (from the forward's client towards the service) or
    /// `from_service`, at either edge.
    pub direction: String,
}

#[derive(Clone, Default)]
pub struct MeshMetrics {
    pub(crate) connected: Family<PeerLabels, Gauge>,
    pub(crate) rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    pub(crate) cwnd: Family<PeerLabels, Gauge>,
    pub(crate) lost_packets: Family<PeerLabels, Counter>,
    pub(crate) bytes: Family<DirectionLabels, Counter>,
    pub(crate) streams_open: Family<DirectionLabels, Gauge>,
    pub(crate) streams: Family<DirectionLabels, Counter>,
    pub(crate) refusals: Family<RefusalLabels, Counter>,
    pub(crate) connections_refused: Family<ReasonLabels, Counter>,
    /// Connections established, by `direction` (`dialed`, `accepted`).
    pub(crate) connections: Family<DirectionLabels, Counter>,
    pub(crate) address_changes: Family<PeerLabels, Counter>,
    pub(crate) gso_segments: Gauge,
    pub(crate) service_streams: Family<ServiceOutcomeLabels, Counter>,
    pub(crate) service_bytes: Family<ServiceBytesLabels, Counter>,
}

impl MeshMetrics {
    pub fn register(registry: &mut Registry) -> MeshMetrics {
        let m = MeshMetrics::default();
        let r = registry.sub_registry_with_prefix("mesh");
        r.register(
            "peer_connected",
            "1 while a tunnel connection to the peer is up",
            m.connected.clone(),
        );
        r.register(
            "rtt_seconds",
            "Smoothed round-trip time of the peer's tunnel connection",
            m.rtt.clone(),
        );
        r.register(
            "congestion_window_bytes",
            "Congestion window of the peer's tunnel connection",
            m.cwnd.clone(),
        );
        r.register(
            "lost_packets",
            "Packets the tunnel connections to the peer lost",
            m.lost_packets.clone(),
        );
        r.register(
            "bytes",
            "Bytes of the tunnel connections (UDP for QUIC, TLS over TCP), by direction (sent, received)",
            m.bytes.clone(),
        );
        r.register(
            "streams_open",
            "Tunnel streams open, by direction (outbound: for a client here, inbound: for the peer's)",
            m.streams_open.clone(),
        );
        r.register(
            "streams",
            "Tunnel streams opened, by direction",
            m.streams.clone(),
        );
        r.register(
            "stream_refusals",
            "Tunnel streams refused at open, by direction and reason",
            m.refusals.clone(),
        );
        r.register(
            "connections_refused",
            "Tunnel connections refused (handshake failed, unknown peer), by reason",
            m.connections_refused.clone(),
        );
        r.register(
            "connections",
            "Tunnel connections established, by peer and direction (dialed, accepted)",
            m.connections.clone(),
        );
        r.register(
            "peer_address_changes",
            "Times a peer's tunnel connection moved to a new remote address without reconnecting (QUIC migration)",
            m.address_changes.clone(),
        );
        r.register(
            "udp_gso_segments",
            "Datagrams the kernel segments from one send (generic segmentation offload); 1 without GSO",
            m.gso_segments.clone(),
        );
        r.register(
            "service_streams",
            "Service streams (mesh.forwards here, mesh.services at the far edge) by peer, service and outcome",
            m.service_streams.clone(),
        );
        r.register(
            "service_bytes",
            "Bytes relayed on service streams, by peer, service and direction (to_service, from_service)",
            m.service_bytes.clone(),
        );
        m
    }

    pub(crate) fn service_stream(&self, peer: &str, service: &str, outcome: &str) {
        self.service_streams
            .get_or_create(&ServiceOutcomeLabels {
                peer: peer.to_owned(),
                service: service.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The byte counter of one direction of a service's streams.
    pub(crate) fn service_bytes(&self, peer: &str, service: &str, direction: &str) -> Counter {
        self.service_bytes
            .get_or_create(&ServiceBytesLabels {
                peer: peer.to_owned(),
                service: service.to_owned(),
                direction: direction.to_owned(),
            })
            .clone()
    }

    pub(crate) fn connection(&self, peer: &str, direction: &str) {
        self.connections
            .get_or_create(&DirectionLabels {
                peer: peer.to_owned(),
                direction: direction.to_owned(),
            })
            .inc();
    }

    pub(crate) fn refused(&self, peer: &str, direction: &str, reason: &str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                peer: peer.to_owned(),
                direction: direction.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn connection_refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a stream open until the guard drops.
    pub(crate) fn stream(&self, peer: &str, direction: &str) -> StreamGuard {
        let labels = DirectionLabels {
            peer: peer.to_owned(),
            direction: direction.to_owned(),
        };
        self.streams.get_or_create(&labels).inc();
        let open = self.streams_open.get_or_create(&labels).clone();
        open.inc();
        StreamGuard(open)
    }
}

pub(crate) struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

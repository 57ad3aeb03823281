//! The edge's Prometheus metrics. The registry is passed in; nothing is global.
//!
//! Per-request series are resolved once per (virtual cluster, API key) and
//! cached, so the hot path touches only atomics.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use strait_kafka::api_keys::api_key_name;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    virtual_cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    virtual_cluster: String,
    api_key: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values follow Prometheus' snake_case convention
enum Direction {
    client_to_upstream,
    upstream_to_client,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    virtual_cluster: String,
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    virtual_cluster: String,
    mechanism: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    virtual_cluster: String,
    /// `handshake` (refused right after it) or `request` (an open connection cut off).
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    virtual_cluster: String,
    reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to about 6 s.
    Histogram::new(exponential_buckets(0.00005, 2.5, 14))
}

/// Metric families shared by every virtual cluster.
pub struct ProxyMetrics {
    connections_open: Family<ClusterLabels, Gauge>,
    connections: Family<ClusterLabels, Counter>,
    requests: Family<ApiLabels, Counter>,
    request_duration: HistogramFamily<ApiLabels>,
    bytes: Family<BytesLabels, Counter>,
    upstream_connect_errors: Family<ClusterLabels, Counter>,
    upstream_swaps: Family<ClusterLabels, Counter>,
    upstream_auth_failures: Family<AuthLabels, Counter>,
    upstream_refusals: Family<RejectLabels, Counter>,
    frames_rejected: Family<RejectLabels, Counter>,
    connections_limited: Family<RejectLabels, Counter>,
    brokers_discovered: Family<ClusterLabels, Gauge>,
    throttle_seconds: Family<ClusterLabels, Counter<f64, AtomicU64>>,
    identities_denied: Family<DeniedLabels, Counter>,
    /// Entries in the deny list now in force.
    pub deny_list_identities: Gauge,
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = ProxyMetrics {
            connections_open: Family::default(),
            connections: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            bytes: Family::default(),
            upstream_connect_errors: Family::default(),
            upstream_swaps: Family::default(),
            upstream_auth_failures: Family::default(),
            upstream_refusals: Family::default(),
            frames_rejected: Family::default(),
            connections_limited: Family::default(),
            brokers_discovered: Family::default(),
            throttle_seconds: Family::default(),
            identities_denied: Family::default(),
            deny_list_identities: Gauge::default(),
        };
        registry.register(
            "connections_open",
            "Client connections currently open",
            metrics.connections_open.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted",
            metrics.connections.clone(),
        );
        registry.register(
            "requests",
            "Requests received from clients, by API key",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request leaving the edge to its response arriving, by API key",
            metrics.request_duration.clone(),
        );
        registry.register(
            "bytes",
            "Bytes relayed, by direction",
            metrics.bytes.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Failed connections to upstream brokers",
            metrics.upstream_connect_errors.clone(),
        );
        registry.register(
            "upstream_swaps",
            "Times the virtual cluster's upstream was replaced in place (failover, failback, a changed upstream)",
            metrics.upstream_swaps.clone(),
        );
        registry.register(
            "upstream_auth_failures",
            "Upstream connections whose SASL authentication failed (not counted in upstream_connect_errors), by mechanism",
            metrics.upstream_auth_failures.clone(),
        );
        registry.register(
            "upstream_refusals",
            "Upstream connections the far end refused with a reason (a peer edge's policy), by reason",
            metrics.upstream_refusals.clone(),
        );
        registry.register(
            "frames_rejected",
            "Frames refused by the edge (the connection is closed), by reason",
            metrics.frames_rejected.clone(),
        );
        registry.register(
            "connections_limited",
            "Connections refused or closed by a limit, by reason (max_connections: refused at accept; idle_timeout: closed)",
            metrics.connections_limited.clone(),
        );
        registry.register(
            "brokers_discovered",
            "Upstream brokers with a port assigned on the edge",
            metrics.brokers_discovered.clone(),
        );
        registry.register(
            "throttle_seconds",
            "Quota throttle time imposed on clients",
            metrics.throttle_seconds.clone(),
        );
        registry.register(
            "identities_denied",
            "Connections of deny-listed identities closed, by stage (handshake: refused right after it; request: cut off at its next request)",
            metrics.identities_denied.clone(),
        );
        registry.register(
            "deny_list_identities",
            "Identities in the deny list now in force",
            metrics.deny_list_identities.clone(),
        );
        Arc::new(metrics)
    }

    pub fn for_cluster(self: &Arc<Self>, name: &str) -> Arc<ClusterMetrics> {
        let labels = ClusterLabels {
            virtual_cluster: name.to_owned(),
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    virtual_cluster: name.to_owned(),
                    direction,
                })
                .clone()
        };
        Arc::new(ClusterMetrics {
            name: name.to_owned(),
            connections_open: self.connections_open.get_or_create(&labels).clone(),
            connections: self.connections.get_or_create(&labels).clone(),
            upstream_connect_errors: self.upstream_connect_errors.get_or_create(&labels).clone(),
            upstream_swaps: self.upstream_swaps.get_or_create(&labels).clone(),
            brokers_discovered: self.brokers_discovered.get_or_create(&labels).clone(),
            throttle_seconds: self.throttle_seconds.get_or_create(&labels).clone(),
            bytes_in: bytes(Direction::client_to_upstream),
            bytes_out: bytes(Direction::upstream_to_client),
            per_key: (0..256).map(|_| OnceLock::new()).collect(),
            families: self.clone(),
        })
    }
}

/// Handles for one virtual cluster.
pub struct ClusterMetrics {
    name: String,
    pub connections_open: Gauge,
    pub connections: Counter,
    pub upstream_connect_errors: Counter,
    pub upstream_swaps: Counter,
    pub brokers_discovered: Gauge,
    pub throttle_seconds: Counter<f64, AtomicU64>,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    per_key: Box<[OnceLock<RequestMetrics>]>,
    families: Arc<ProxyMetrics>,
}

pub struct RequestMetrics {
    pub count: Counter,
    pub duration: Histogram,
}

impl ClusterMetrics {
    /// The request counter and latency histogram of an API key.
    pub fn request(&self, api_key: i16) -> &RequestMetrics {
        // Unknown keys never get this far (the connection is closed first);
        // any stray one is folded into slot 255 rather than indexing out of range.
        let slot = if (0..255).contains(&api_key) {
            api_key as usize
        } else {
            255
        };
        self.per_key[slot].get_or_init(|| {
            let labels = ApiLabels {
                virtual_cluster: self.name.clone(),
                api_key: api_key_name(api_key),
            };
            RequestMetrics {
                count: self.families.requests.get_or_create(&labels).clone(),
                duration: self
                    .families
                    .request_duration
                    .get_or_create(&labels)
                    .clone(),
            }
        })
    }

    /// One upstream connection whose SASL authentication failed.
    pub fn upstream_auth_failed(&self, mechanism: &str) {
        self.families
            .upstream_auth_failures
            .get_or_create(&AuthLabels {
                virtual_cluster: self.name.clone(),
                mechanism: mechanism.to_owned(),
            })
            .inc();
    }

    /// A connection of a deny-listed identity closed at `stage`.
    pub fn identity_denied(&self, stage: &str) {
        self.families
            .identities_denied
            .get_or_create(&DeniedLabels {
                virtual_cluster: self.name.clone(),
                stage: stage.to_owned(),
            })
            .inc();
    }

    /// An upstream connection the far end refused, for `reason`.
    pub fn upstream_refused(&self, reason: &str) {
        self.families
            .upstream_refusals
            .get_or_create(&RejectLabels {
                virtual_cluster: self.name.clone(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A connection refused or closed by a limit, for `reason`.
    pub fn limited(&self, reason: &str) {
        self.families
            .connections_limited
            .get_or_create(&RejectLabels {
                virtual_cluster: self.name.clone(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.families
            .frames_rejected
            .get_or_create(&RejectLabels {
                virtual_cluster: self.name.clone(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

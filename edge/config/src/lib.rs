//! The edge's configuration.
//!
//! Loading is two steps: YAML is parsed into raw structs that reject unknown
//! keys ([`raw`]), then [`validate`] turns them into the validated [`Config`]
//! the rest of the edge uses, reporting every problem with its path
//! (`virtual_clusters[0].bootstrap: ...`), not just the first one.

#![forbid(unsafe_code)]

mod mesh;
mod mesh_services;
mod offset_reset;
mod probes;
pub mod raw;
mod sasl;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

pub use mesh::{
    Mesh, MeshPeer, MeshTransport, RawMesh, RawMeshBundle, RawMeshIdentity, RawMeshPeer, RawRemote,
    Remote,
};
pub use mesh_services::{MeshForward, MeshService, RawMeshForward, RawMeshService};
pub use offset_reset::OffsetReset;
pub use probes::HealthProbe;
pub use sasl::{read_credential_files, Sasl, SaslMechanism, Secret, SecretSource};
pub use validate::{validate, validate_with, NODE_ID};

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            filter_timeout: Duration::from_secs(20),
            max_buffered_bytes_per_connection: DEFAULT_MAX_BUFFERED_BYTES_PER_CONNECTION,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            max_in_flight_per_connection: DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_read_timeout: DEFAULT_REQUEST_READ_TIMEOUT,
        }
    }
}

/// Default frame limit: the same as Kafka's `socket.request.max.bytes`.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 100 * 1024 * 1024;

/// Default per-connection decode budget. A frame a filter decodes is held
/// whole: 16 MiB takes a producer with `max.request.size` raised well past
/// Kafka's 1 MiB default (a 1 MiB record plus batch overhead is far below),
/// and refuses the 100 MiB length prefix an anonymous client can send for free.
pub const DEFAULT_MAX_BUFFERED_BYTES_PER_CONNECTION: u32 = 16 * 1024 * 1024;
/// Default edge-wide decode budget: sixteen connections assembling a
/// maximal frame at once; more wait (back-pressure), as Kafka's
/// `queued.max.request.bytes` makes a broker stop reading.
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 256 * 1024 * 1024;
/// Default requests awaiting an answer per connection. Clients pipeline
/// few (the Java producer 5, a consumer 1 or 2 per broker); the bound keeps a
/// client that never reads its answers from queueing without end.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: u32 = 1000;
/// Default connections per listener (bootstrap or broker port). Each one
/// costs two file descriptors (client and broker side).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default: as Kafka's `connections.max.idle.ms` (10 minutes).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default: clients give up on a request after `request.timeout.ms` (30 s),
/// so a frame still arriving after that is of no use to anyone.
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A validated edge configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub admin: Option<SocketAddr>,
    pub kms: Vec<strait_kms_core::config::KmsConfig>,
    pub virtual_clusters: Vec<VirtualCluster>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    /// Principals refused on every virtual cluster (exact names, sorted, deduplicated).
    pub deny_identities: Vec<String>,
    pub mesh: Option<Mesh>,
    /// Failover group members whose health this edge probes and reports.
    pub health_probes: Vec<HealthProbe>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest frame accepted from a client or broker, length field excluded.
    pub max_frame_bytes: u32,
    /// How long one filter may take on one message before the connection closes.
    pub filter_timeout: Duration,
    /// Largest request a filter may have to decode on one connection; larger
    /// ones close the connection once their prefix is read.
    pub max_buffered_bytes_per_connection: u32,
    /// Bytes of requests held for decoding across the whole edge; beyond it
    /// connections stop being read until bytes are freed.
    pub max_buffered_bytes: u64,
    /// Requests awaiting an answer per connection; beyond it the connection
    /// is not read.
    pub max_in_flight_per_connection: u32,
    /// Open connections per listener; more are accepted and closed at once.
    pub max_connections: u32,
    /// A connection with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Once a request's first byte is read, the whole frame must arrive within this.
    pub request_read_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Shutdown {
    /// How long SIGTERM waits for in-flight requests before closing connections.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualCluster {
    pub name: String,
    /// Where clients connect. In SNI mode several virtual clusters may share it.
    pub bootstrap: SocketAddr,
    pub brokers: BrokerAddressing,
    pub upstream: Upstream,
    pub tls: Option<Tls>,
    pub quotas: Option<Quotas>,
    pub encryption: Option<strait_encryption::EncryptionConfig>,
    /// `None`: no authorization (allowed by design, with a WARN at start);
    /// `mode: rules` with no rule denies everything; `mode: allow_all` allows all.
    pub authorization: Option<strait_authz::AuthorizationConfig>,
    pub audit: Option<strait_authz::AuditConfig>,
}

/// Per-principal rates; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub produce_bytes_per_second: Option<f64>,
    pub fetch_bytes_per_second: Option<f64>,
    pub requests_per_second: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Quotas {
    pub default: Rates,
    /// (principal glob, rates), first match wins.
    pub principals: Vec<(String, Rates)>,
}

/// How brokers are exposed to clients.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerAddressing {
    /// One port per upstream broker, bound when the broker is discovered.
    PortPerBroker {
        /// Host name or address clients are told to use for every broker.
        advertised_host: String,
        /// Ports handed out, one per broker.
        port_range: RangeInclusive<u16>,
        /// Local address the broker ports are bound on (the bootstrap's by default).
        bind_address: IpAddr,
    },
    /// One TLS port; the broker is chosen by the SNI host name.
    Sni {
        bootstrap_host: String,
        /// Contains `$(node_id)`.
        broker_host_pattern: String,
        advertised_port: u16,
    },
}

/// Client-facing TLS of a virtual cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    pub server: strait_tls::ServerTlsSettings,
    pub reload_interval: Duration,
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `host:port` pairs, tried in turn (empty with `remote`).
    pub bootstrap_servers: Vec<HostPort>,
    /// The brokers are behind this peer edge's virtual cluster.
    pub remote: Option<Remote>,
    pub connect_timeout: Duration,
    pub tls: Option<strait_tls::ClientTlsSettings>,
    /// SASL towards the brokers (SASL_PLAINTEXT, or SASL_SSL with `tls`).
    pub sasl: Option<Sasl>,
    /// Which member of a failover group this upstream is, as the control
    /// plane decided it. Bookkeeping for status and logs: a changed upstream
    /// is swapped in place whether or not it is set.
    pub failover: Option<FailoverState>,
}

/// `upstream.failover`: the decision an upstream follows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverState {
    /// The FailoverGroup.
    pub group: String,
    /// The group's active cluster (the KafkaCluster this upstream is).
    pub cluster: String,
    /// Bumped by every switch; edges report the one they serve.
    pub generation: u64,
    /// Produce is fenced for a planned switch: the edge answers Produce
    /// with a retriable error and measures the replication to the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceState>,
    /// On a standby MirrorMaker 2 replicates into: where its checkpoints
    /// are, so that consumer groups without offsets there resume from
    /// their translated ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints_topic: Option<String>,
    /// Where a consumer group starts on a partition that has neither an
    /// offset committed on the standby nor a checkpoint to translate; none:
    /// wherever the client's own `auto.offset.reset` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset_reset: Option<OffsetReset>,
}

/// `upstream.failover.fence`: a planned switch in preparation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FenceState {
    /// The member the planned switch goes to.
    pub to: String,
    /// Topic globs whose replication is measured; empty: every topic but
    /// internal ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Prefix of the remote topic names on `to` (MM2's default policy:
    /// `<source_alias>.`); none: the names stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One problem found in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// Parses and validates YAML text.
pub fn parse(yaml: &str) -> Result<Config, ConfigErrors> {
    validate(&parse_raw(yaml)?)
}

/// Parses YAML (or JSON, a subset) into the raw structs, unknown keys refused.
pub fn parse_raw(yaml: &str) -> Result<raw::RawConfig, ConfigErrors> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(yaml);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        ConfigErrors(vec![ConfigError {
            path: if path == "." { String::new() } else { path },
            message: err.into_inner().to_string(),
        }])
    })
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {err}", path.display()),
        }])
    })?;
    parse(&text)
}

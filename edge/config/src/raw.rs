//! The configuration exactly as written in YAML. Unknown keys are errors.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub virtual_clusters: Vec<RawVirtualCluster>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub shutdown: RawShutdown,
    /// KMSs that encryption rules name.
    #[serde(default)]
    pub kms: Vec<strait_kms_core::config::KmsConfig>,
    /// Principals (SPIFFE IDs) refused on every virtual cluster: new
    /// handshakes right after they complete, open connections at their next
    /// request.
    #[serde(default)]
    pub deny_identities: Vec<String>,
    /// Tunnels to peer edges.
    pub mesh: Option<crate::mesh::RawMesh>,
    /// Failover group members whose health this edge reports.
    #[serde(default)]
    pub health_probes: Vec<crate::probes::RawHealthProbe>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_frame_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub filter_timeout: Option<Duration>,
    pub max_buffered_bytes_per_connection: Option<u64>,
    pub max_buffered_bytes: Option<u64>,
    pub max_in_flight_per_connection: Option<u64>,
    pub max_connections: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_read_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVirtualCluster {
    pub name: String,
    pub bootstrap: String,
    pub brokers: RawBrokers,
    pub upstream: RawUpstream,
    pub tls: Option<RawTls>,
    pub quotas: Option<RawQuotas>,
    pub encryption: Option<strait_encryption::EncryptionConfig>,
    pub authorization: Option<strait_authz::AuthorizationConfig>,
    pub audit: Option<strait_authz::AuditConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuotas {
    #[serde(default)]
    pub default: RawRates,
    #[serde(default)]
    pub principals: Vec<RawPrincipalRates>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRates {
    pub produce_bytes_per_second: Option<f64>,
    pub fetch_bytes_per_second: Option<f64>,
    pub requests_per_second: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrincipalRates {
    /// Glob over principal names.
    pub principal: String,
    #[serde(flatten)]
    pub rates: RawRates,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// `files` (the default: `cert` and `key`) or `svid`: serve the edge's
    /// own certificate from the control plane's CA (`--join-token`).
    pub identity: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    /// Verifies certificates without a SPIFFE ID; binds no trust domain.
    pub client_ca: Option<String>,
    /// One bundle per trust domain; a certificate with a SPIFFE ID must chain
    /// to the bundle of its ID's trust domain.
    #[serde(default)]
    pub client_trust_bundles: Vec<RawTrustBundle>,
    /// `required`, `optional` or `none`.
    pub client_auth: Option<String>,
    /// Where principals come from, tried in order: `spiffe`, `subject`, `cn`, `dns_san`.
    pub principal: Option<Vec<String>>,
    /// How often the files are checked for changes.
    #[serde(default, with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
}

/// `tls.client_trust_bundles[]`: a trust domain and its bundle, as a file
/// or inline, PEM or SPIFFE bundle (JWK set) format.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrustBundle {
    pub trust_domain: String,
    pub pem_file: Option<String>,
    pub pem: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSni {
    pub bootstrap_host: String,
    /// Must contain `$(node_id)`, e.g. `broker-$(node_id).kafka.example.com`.
    pub broker_host_pattern: String,
    /// Port advertised to clients; the bootstrap port by default.
    pub advertised_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBrokers {
    pub advertised_host: Option<String>,
    /// `FIRST-LAST`, inclusive.
    pub port_range: Option<String>,
    pub bind_address: Option<String>,
    /// Host-name routing on the bootstrap port instead of a port per broker.
    pub sni: Option<RawSni>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default)]
    pub bootstrap_servers: Vec<String>,
    /// Instead of `bootstrap_servers`: the brokers are behind a peer edge.
    pub remote: Option<crate::mesh::RawRemote>,
    pub tls: Option<RawUpstreamTls>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// How the edge authenticates its connections to the brokers.
    pub sasl: Option<RawSasl>,
    /// Written by the control plane for a virtual cluster behind a failover group.
    pub failover: Option<crate::FailoverState>,
}

/// `upstream.sasl`. Credentials are named by where they are, never written
/// here; `password` exists only to refuse it with a helpful message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: String,
    pub username: Option<String>,
    pub username_file: Option<String>,
    pub username_env: Option<String>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    /// Never stored: its value is skipped unread.
    pub password: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: String,
    /// `files` (the default: `cert` and `key`) or `svid` (the edge's own
    /// certificate from the control plane's CA).
    pub identity: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub server_name: Option<String>,
}

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
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
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
    pub bootstrap_servers: Vec<String>,
    pub tls: Option<RawUpstreamTls>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// How the edge authenticates its connections to the brokers.
    pub sasl: Option<RawSasl>,
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
    pub cert: Option<String>,
    pub key: Option<String>,
    pub server_name: Option<String>,
}

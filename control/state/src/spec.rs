//! Typed specs of every resource kind. The wire carries specs as JSON; these
//! structs are the schema, enforced on every write (`deny_unknown_fields`) and
//! reused by clients (the edge) to read what they receive.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::failover_spec::{
    AppliedFailover, FailbackMode, FailoverEvent, FailoverGroupSpec, FailoverMode, FailoverStatus,
    Fence, FenceAction, HealthPolicy, OffsetReset, ReplicationKind, ReplicationLag,
    ReplicationPolicy, ReplicationSpec, FAILOVER_HISTORY,
};
pub use crate::mesh_spec::{
    EdgeMeshSpec, MeshForwardSpec, MeshPeerSpec, MeshServiceSpec, RemoteSpec,
};
use crate::ValidationError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaClusterSpec {
    /// `host:port` of the upstream brokers used to bootstrap.
    pub bootstrap_servers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// How edges authenticate to these brokers. Credentials appear only as
    /// references to files or environment variables on the edge host: no
    /// secret is ever written to the Raft log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<UpstreamSasl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name Kafka (and the edge's configuration) uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The edge's `upstream.sasl`: one username source and one password source.
/// There is deliberately no `password` field (unknown fields are refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSasl {
    pub mechanism: SaslMechanism,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Path on the edge host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_file: Option<String>,
    /// Environment variable of the edge process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_env: Option<String>,
    /// Path on the edge host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Environment variable of the edge process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Name of a TrustBundle whose PEM verifies the brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// `svid`: the edge presents its own certificate from the control
    /// plane's CA (it joined with a token); absent or `files`: the files below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Paths on the edge host of the client certificate presented upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EdgeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertised_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where the edge accepts tunnels from peer edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::mesh_spec::EdgeMeshSpec>,
}

/// A KMS broker's registration (created by the broker itself on its first
/// heartbeat, as an edge creates its Edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KmsBrokerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What a KMS broker writes into its KmsBroker resource's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KmsBrokerStatus {
    pub last_heartbeat_unix_ms: u64,
    /// Control-plane revision of the snapshot (bundles, deny lists) in force.
    #[serde(default)]
    pub config_revision: u64,
    /// `control_plane` or `cache`.
    #[serde(default)]
    pub config_source: String,
    /// Trust domains whose callers it can verify.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub denied_identities: usize,
    #[serde(default)]
    pub version: String,
    /// What is at risk, e.g. the broker's SVID failing to renew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// KekShred orders this broker carried out on its own realms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shredded: Vec<ShreddedKek>,
}

/// One shred a broker carried out (or tried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ShreddedKek {
    pub kek: String,
    pub kms: String,
    pub outcome: String,
}

/// What an edge writes into its Edge resource's status on every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EdgeStatus {
    pub last_heartbeat_unix_ms: u64,
    /// Control-plane revision of the config the edge runs.
    #[serde(default)]
    pub config_revision: u64,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub virtual_clusters: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The failover decision each virtual cluster behind a FailoverGroup
    /// runs on (from the running configuration, not the desired one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<AppliedFailover>,
    /// This edge's view of every member of the failover groups it serves:
    /// the evidence automatic failover counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<crate::failover_health::ClusterHealth>,
    /// For each fenced group: this edge's measurement of the replication
    /// a planned switch waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replication: Vec<ReplicationLag>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualClusterSpec {
    /// Name of the Edge that exposes this virtual cluster.
    pub edge: String,
    /// Name of the KafkaCluster behind it (empty with `remote` or
    /// `failover_group`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    /// Instead of `cluster`: a virtual cluster of a peer edge (MeshPeer
    /// `peer` of this edge), reached through the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<crate::mesh_spec::RemoteSpec>,
    /// Instead of `cluster`: a FailoverGroup; the edge serves whichever of
    /// its members the group's status names active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_group: Option<String>,
    /// With `failover_group`: members of the group this edge reaches
    /// through a peer edge (KafkaCluster name -> that peer's virtual
    /// cluster in front of it), say a standby in another site. The others
    /// are reached directly at their KafkaCluster's bootstrap servers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub remote_members: BTreeMap<String, crate::mesh_spec::RemoteSpec>,
    /// `host:port` the edge listens on for bootstrap.
    pub bootstrap: String,
    pub brokers: BrokerAddressing,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerAddressing {
    pub advertised_host: String,
    /// `first-last`, inclusive; broker N of the upstream maps to `first + N`.
    pub port_range: String,
}

impl BrokerAddressing {
    pub fn ports(&self) -> Result<(u16, u16), String> {
        parse_port_range(&self.port_range)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// `files` (default: `cert_file`, `key_file` on the edge's host) or
    /// `svid`: the edge serves its own certificate from the CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_file: String,
    /// TrustBundle names whose roots verify client certificates (mTLS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_trust_bundles: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
    DescribeConfigs,
    AlterConfigs,
    ClusterAction,
    IdempotentWrite,
    All,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Virtual clusters the rules apply to; empty means every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_clusters: Vec<String>,
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    /// Glob over the client principal (e.g. `spiffe://east/*`).
    pub principal: String,
    pub allow: Vec<Operation>,
    /// Topic name globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Consumer group globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Lease start, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Lease end, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

impl AuthorizationRule {
    /// Lease bounds as unix seconds (validated on write, so parse cannot fail
    /// for stored resources).
    pub fn lease_unix(&self) -> (Option<i64>, Option<i64>) {
        let parse = |s: &Option<String>| s.as_deref().and_then(|v| parse_rfc3339(v).ok());
        (parse(&self.not_before), parse(&self.not_after))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionPolicySpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_clusters: Vec<String>,
    pub rules: Vec<EncryptionRule>,
    #[serde(default)]
    pub unresolved_key_policy: UnresolvedKeyPolicy,
    /// Present (even `{}`): the edges use a keys topic in these clusters
    /// whatever the rules; absent: only when a rule has `also_wrap_for`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_topic: Option<KeysTopicSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionRule {
    /// Topic name globs.
    pub topics: Vec<String>,
    /// Name of the KmsRealm holding the KEK (the realm that makes the DEKs).
    pub kms: String,
    /// KEK name template; `$(topicName)` is replaced by the topic.
    pub kek_template: String,
    /// Federation: every DEK is also wrapped for these realms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_wrap_for: Vec<RealmKekTemplate>,
}

/// A realm and the KEK template there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealmKekTemplate {
    /// Name of a KmsRealm.
    pub kms: String,
    /// `$(topicName)` is replaced by the topic.
    pub kek_template: String,
}

/// Where federated DEKs' wraps live in the policy's clusters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeysTopicSpec {
    /// Default `strait.keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Other sites' keys topics as replicated into the cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_read: Vec<String>,
}

/// Which callers (SPIFFE ID globs) a kms-broker lets run which operations
/// on which realms and KEKs: the unwrap policy between sites. Read by every
/// kms-broker; written by admins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsGrantSpec {
    pub callers: Vec<String>,
    /// Realm (backend) names, or `*`.
    pub kms: Vec<String>,
    /// KEK key-id globs; default every KEK.
    #[serde(default = "every_kek")]
    pub keks: Vec<String>,
    /// `generate`, `unwrap`, `wrap`, `resolve`, `shred`.
    pub operations: Vec<String>,
}

fn every_kek() -> Vec<String> {
    vec!["*".into()]
}

/// An order to crypto-shred `kek` in `kms` (empty: every realm). Brokers
/// delete the key in their realm and refuse it; edges refuse it and drop
/// their cached DEKs. Irreversible: never deleted, never changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekShredSpec {
    pub kek: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub const KMS_OPERATIONS: [&str; 5] = ["generate", "unwrap", "wrap", "resolve", "shred"];

/// What an edge does with a record for a topic whose KEK cannot be resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnresolvedKeyPolicy {
    /// Must be written out: a missing key never turns into plaintext by default.
    PassthroughUnencrypted,
    /// The default (fail closed).
    #[default]
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KmsProvider {
    Vault,
    Aws,
    Broker,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsRealmSpec {
    pub provider: KmsProvider,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Reference to credentials held on the edge/broker host (never the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_mount: Option<String>,
    /// `provider: broker`: the broker's backend KMS (`kms[].name` in the
    /// broker's config); absent: the broker's only backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The site that runs this realm (realm names are global: the same
    /// name means the same KMS at every site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// `provider: broker`: the TLS server name the broker's certificate is
    /// verified against; absent: the endpoint's host. Needed when the
    /// endpoint is a local mesh forward (`https://127.0.0.1:<port>`) to a
    /// remote site's broker: the address is then local, the identity not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustBundleSpec {
    pub trust_domain: String,
    pub pem: String,
}

/// Identities every edge refuses at once, on open connections too: the
/// emergency brake when a key or workload is compromised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyListSpec {
    /// Exact SPIFFE IDs (no patterns).
    pub spiffe_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Grants a role of the control-plane API to the callers whose SPIFFE ID
/// matches one of `identities`. Rules only add: there is no deny rule, and
/// what no rule grants is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRuleSpec {
    /// SPIFFE ID globs: `*` matches within one path segment, `**` across
    /// segments, e.g. `spiffe://example.org/ns/ops/sa/*`.
    pub identities: Vec<String>,
    pub role: AccessRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessRole {
    /// Everything.
    Admin,
    /// What an edge needs; the edge's name is the last segment of the ID.
    Edge,
    /// What a KMS broker needs.
    KmsBroker,
    /// Raft transport between control nodes only.
    Control,
    /// Get/List/Watch of every kind that holds no secret, Members, Status.
    Reader,
}

impl AccessRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessRole::Admin => "admin",
            AccessRole::Edge => "edge",
            AccessRole::KmsBroker => "kms_broker",
            AccessRole::Control => "control",
            AccessRole::Reader => "reader",
        }
    }
}

/// Syntax of a SPIFFE ID glob (shared by AccessRule and the
/// `--admin-identity` flag, so both refuse the same mistakes).
pub fn check_spiffe_glob(glob: &str) -> Result<(), String> {
    let Some(rest) = glob.strip_prefix("spiffe://") else {
        return Err(format!("'{glob}' must start with spiffe://"));
    };
    if rest.is_empty() {
        return Err(format!("'{glob}' names no trust domain"));
    }
    if glob.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("'{glob}' contains whitespace"));
    }
    if glob.contains("***") {
        return Err(format!("'{glob}': use * (one segment) or ** (any depth)"));
    }
    Ok(())
}

/// Whether SPIFFE ID `id` matches `glob`: `*` stays within one path
/// segment, `**` crosses them, so `spiffe://d/edge/*` never matches
/// `spiffe://d/edge/a/b`. Shared by the control plane's access rules and
/// the KMS broker's caller list.
pub fn spiffe_glob_matches(glob: &str, id: &str) -> bool {
    fn matches(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| matches(rest, &s[i..])),
            [b'*', rest @ ..] => {
                let seg = s.iter().position(|&c| c == b'/').unwrap_or(s.len());
                (0..=seg).any(|i| matches(rest, &s[i..]))
            }
            [c, rest @ ..] => s.first() == Some(c) && matches(rest, &s[1..]),
        }
    }
    matches(glob.as_bytes(), id.as_bytes())
}

pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("'{s}' is not a range 'first-last'"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("'{a}' is not a port number"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("'{b}' is not a port number"))?;
    if a == 0 || a > b {
        return Err(format!("range '{s}' is empty or starts at port 0"));
    }
    Ok((a, b))
}

pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("'{s}' is not an RFC 3339 timestamp: {e}"))
}

pub(crate) fn check_host_port(path: &str, v: &str, errs: &mut Vec<ValidationError>) {
    let ok = v
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        errs.push(ValidationError::new(
            path,
            format!("'{v}' is not host:port"),
        ));
    }
}

pub(crate) fn check_name_ref(path: &str, v: &str, errs: &mut Vec<ValidationError>) {
    if let Err(m) = crate::validate_name(v) {
        errs.push(ValidationError::new(path, m));
    }
}

pub(crate) fn check_non_empty<T>(path: &str, v: &[T], errs: &mut Vec<ValidationError>) {
    if v.is_empty() {
        errs.push(ValidationError::new(path, "must not be empty"));
    }
}

/// Kafka's rule for topic names: 1-249 of `[A-Za-z0-9._-]`.
pub(crate) fn is_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_pattern(path: &str, v: &str, errs: &mut Vec<ValidationError>) {
    if v.trim().is_empty() {
        errs.push(ValidationError::new(path, "pattern must not be empty"));
    }
}

/// Semantic checks beyond the serde schema; every error carries its path
/// below `spec`.
pub trait Validate {
    fn validate(&self, errs: &mut Vec<ValidationError>);
}

impl Validate for KafkaClusterSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        check_non_empty("spec.bootstrap_servers", &self.bootstrap_servers, errs);
        for (i, s) in self.bootstrap_servers.iter().enumerate() {
            check_host_port(&format!("spec.bootstrap_servers[{i}]"), s, errs);
        }
        if let Some(tls) = &self.tls {
            if let Some(tb) = &tls.trust_bundle {
                check_name_ref("spec.tls.trust_bundle", tb, errs);
            }
            let files = tls.client_cert_file.is_some() || tls.client_key_file.is_some();
            match tls.identity.as_deref() {
                Some("svid") if files => errs.push(ValidationError::new(
                    "spec.tls.identity",
                    "svid presents the edge's own certificate: remove client_cert_file and client_key_file",
                )),
                Some("svid") => {}
                None | Some("files") => {
                    if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
                        errs.push(ValidationError::new(
                            "spec.tls",
                            "client_cert_file and client_key_file go together",
                        ));
                    }
                }
                Some(other) => errs.push(ValidationError::new(
                    "spec.tls.identity",
                    format!("'{other}' is not one of files, svid"),
                )),
            }
        }
        if let Some(sasl) = &self.sasl {
            // The files and variables live on the edge host; the edge reads
            // and checks them when it applies the configuration.
            for (field, value) in [
                ("username", &sasl.username),
                ("username_file", &sasl.username_file),
                ("username_env", &sasl.username_env),
                ("password_file", &sasl.password_file),
                ("password_env", &sasl.password_env),
            ] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    errs.push(ValidationError::new(
                        &format!("spec.sasl.{field}"),
                        "must not be empty",
                    ));
                }
            }
            let usernames = [&sasl.username, &sasl.username_file, &sasl.username_env]
                .iter()
                .filter(|v| v.is_some())
                .count();
            if usernames != 1 {
                errs.push(ValidationError::new(
                    "spec.sasl",
                    "use exactly one of username, username_file, username_env",
                ));
            }
            if sasl.password_file.is_some() == sasl.password_env.is_some() {
                errs.push(ValidationError::new(
                    "spec.sasl",
                    "use exactly one of password_file, password_env (the password itself is never stored)",
                ));
            }
        }
    }
}

impl Validate for EdgeSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        if let Some(c) = &self.cluster {
            check_name_ref("spec.cluster", c, errs);
        }
        for (i, a) in self.advertised_addresses.iter().enumerate() {
            check_host_port(&format!("spec.advertised_addresses[{i}]"), a, errs);
        }
        if let Some(mesh) = &self.mesh {
            mesh.validate(errs);
        }
    }
}

impl Validate for VirtualClusterSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        check_name_ref("spec.edge", &self.edge, errs);
        let upstreams = [
            !self.cluster.is_empty(),
            self.remote.is_some(),
            self.failover_group.is_some(),
        ];
        match upstreams.iter().filter(|set| **set).count() {
            0 => errs.push(ValidationError::new(
                "spec.cluster",
                "one of cluster, remote, failover_group is required",
            )),
            1 => {}
            _ => errs.push(ValidationError::new(
                "spec",
                "use exactly one of cluster, remote, failover_group",
            )),
        }
        if !self.cluster.is_empty() {
            check_name_ref("spec.cluster", &self.cluster, errs);
        }
        if let Some(remote) = &self.remote {
            check_name_ref("spec.remote.peer", &remote.peer, errs);
            check_name_ref("spec.remote.virtual_cluster", &remote.virtual_cluster, errs);
        }
        if let Some(group) = &self.failover_group {
            check_name_ref("spec.failover_group", group, errs);
        }
        if !self.remote_members.is_empty() && self.failover_group.is_none() {
            errs.push(ValidationError::new(
                "spec.remote_members",
                "only with failover_group: it names members of the group",
            ));
        }
        for (member, remote) in &self.remote_members {
            let path = format!("spec.remote_members.{member}");
            check_name_ref(&path, member, errs);
            check_name_ref(&format!("{path}.peer"), &remote.peer, errs);
            check_name_ref(
                &format!("{path}.virtual_cluster"),
                &remote.virtual_cluster,
                errs,
            );
        }
        check_host_port("spec.bootstrap", &self.bootstrap, errs);
        if self.brokers.advertised_host.trim().is_empty() {
            errs.push(ValidationError::new(
                "spec.brokers.advertised_host",
                "must not be empty",
            ));
        }
        match self.brokers.ports() {
            Err(m) => errs.push(ValidationError::new("spec.brokers.port_range", m)),
            Ok((a, b)) => {
                let boot = self
                    .bootstrap
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                if let Some(p) = boot {
                    if (a..=b).contains(&p) {
                        errs.push(ValidationError::new(
                            "spec.brokers.port_range",
                            format!("range {a}-{b} contains the bootstrap port {p}"),
                        ));
                    }
                }
            }
        }
        if let Some(tls) = &self.tls {
            let files = !tls.cert_file.is_empty() && !tls.key_file.is_empty();
            let none = tls.cert_file.is_empty() && tls.key_file.is_empty();
            match tls.identity.as_deref() {
                None | Some("files") if !files => errs.push(ValidationError::new(
                    "spec.tls",
                    "cert_file and key_file are required (or identity: svid to serve the edge's certificate from the CA)",
                )),
                Some("svid") if !none => errs.push(ValidationError::new(
                    "spec.tls",
                    "identity: svid serves the edge's own certificate: remove cert_file and key_file",
                )),
                None | Some("files") | Some("svid") => {}
                Some(other) => errs.push(ValidationError::new(
                    "spec.tls.identity",
                    format!("'{other}' is not one of files, svid"),
                )),
            }
            // Fail closed: TLS that verifies no client would let anyone in.
            if tls.client_trust_bundles.is_empty() {
                errs.push(ValidationError::new(
                    "spec.tls.client_trust_bundles",
                    "must name at least one TrustBundle: a virtual cluster with tls verifies client certificates",
                ));
            }
            for (i, tb) in tls.client_trust_bundles.iter().enumerate() {
                check_name_ref(&format!("spec.tls.client_trust_bundles[{i}]"), tb, errs);
            }
        }
    }
}

impl Validate for AuthorizationPolicySpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        for (i, vc) in self.virtual_clusters.iter().enumerate() {
            check_name_ref(&format!("spec.virtual_clusters[{i}]"), vc, errs);
        }
        for (i, r) in self.rules.iter().enumerate() {
            let p = format!("spec.rules[{i}]");
            check_pattern(&format!("{p}.principal"), &r.principal, errs);
            check_non_empty(&format!("{p}.allow"), &r.allow, errs);
            if r.topics.is_empty() && r.groups.is_empty() {
                errs.push(ValidationError::new(
                    &p,
                    "a rule needs at least one of topics or groups",
                ));
            }
            for (j, t) in r.topics.iter().enumerate() {
                check_pattern(&format!("{p}.topics[{j}]"), t, errs);
            }
            for (j, g) in r.groups.iter().enumerate() {
                check_pattern(&format!("{p}.groups[{j}]"), g, errs);
            }
            let mut bounds = [None, None];
            for (k, (field, v)) in [("not_before", &r.not_before), ("not_after", &r.not_after)]
                .into_iter()
                .enumerate()
            {
                if let Some(v) = v {
                    match parse_rfc3339(v) {
                        Ok(t) => bounds[k] = Some(t),
                        Err(m) => errs.push(ValidationError::new(&format!("{p}.{field}"), m)),
                    }
                }
            }
            if let [Some(a), Some(b)] = bounds {
                if a >= b {
                    errs.push(ValidationError::new(
                        &format!("{p}.not_after"),
                        "must be later than not_before",
                    ));
                }
            }
        }
    }
}

impl Validate for EncryptionPolicySpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        for (i, vc) in self.virtual_clusters.iter().enumerate() {
            check_name_ref(&format!("spec.virtual_clusters[{i}]"), vc, errs);
        }
        check_non_empty("spec.rules", &self.rules, errs);
        for (i, r) in self.rules.iter().enumerate() {
            let p = format!("spec.rules[{i}]");
            check_non_empty(&format!("{p}.topics"), &r.topics, errs);
            for (j, t) in r.topics.iter().enumerate() {
                check_pattern(&format!("{p}.topics[{j}]"), t, errs);
            }
            check_name_ref(&format!("{p}.kms"), &r.kms, errs);
            if r.kek_template.trim().is_empty() {
                errs.push(ValidationError::new(
                    &format!("{p}.kek_template"),
                    "must not be empty",
                ));
            }
            let mut seen: Vec<&str> = Vec::new();
            for (j, a) in r.also_wrap_for.iter().enumerate() {
                let q = format!("{p}.also_wrap_for[{j}]");
                check_name_ref(&format!("{q}.kms"), &a.kms, errs);
                if a.kms == r.kms {
                    errs.push(ValidationError::new(
                        &format!("{q}.kms"),
                        format!("'{}' is the rule's own realm", a.kms),
                    ));
                }
                if seen.contains(&a.kms.as_str()) {
                    errs.push(ValidationError::new(
                        &format!("{q}.kms"),
                        format!("'{}' is listed twice", a.kms),
                    ));
                }
                seen.push(&a.kms);
                if a.kek_template.trim().is_empty() {
                    errs.push(ValidationError::new(
                        &format!("{q}.kek_template"),
                        "must not be empty",
                    ));
                }
            }
        }
        if let Some(k) = &self.keys_topic {
            for (i, t) in k.name.iter().chain(k.also_read.iter()).enumerate() {
                if !is_topic_name(t) {
                    errs.push(ValidationError::new(
                        &format!("spec.keys_topic[{i}]"),
                        format!("'{t}' is not a Kafka topic name"),
                    ));
                }
            }
        }
    }
}

impl Validate for KmsGrantSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        check_non_empty("spec.callers", &self.callers, errs);
        for (i, c) in self.callers.iter().enumerate() {
            if !c.starts_with("spiffe://") {
                errs.push(ValidationError::new(
                    &format!("spec.callers[{i}]"),
                    "must be a SPIFFE ID glob (spiffe://...)",
                ));
            }
        }
        check_non_empty("spec.kms", &self.kms, errs);
        for (i, k) in self.kms.iter().enumerate() {
            if k != "*" {
                check_name_ref(&format!("spec.kms[{i}]"), k, errs);
            }
        }
        check_non_empty("spec.keks", &self.keks, errs);
        check_non_empty("spec.operations", &self.operations, errs);
        for (i, o) in self.operations.iter().enumerate() {
            if !KMS_OPERATIONS.contains(&o.as_str()) {
                errs.push(ValidationError::new(
                    &format!("spec.operations[{i}]"),
                    format!("'{o}' is not one of {}", KMS_OPERATIONS.join(", ")),
                ));
            }
        }
    }
}

impl Validate for KekShredSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        if self.kek.trim().is_empty() {
            errs.push(ValidationError::new("spec.kek", "must not be empty"));
        }
        for (i, k) in self.kms.iter().enumerate() {
            check_name_ref(&format!("spec.kms[{i}]"), k, errs);
        }
    }
}

impl Validate for KmsRealmSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        if matches!(self.provider, KmsProvider::Vault | KmsProvider::Broker)
            && self.endpoints.is_empty()
        {
            errs.push(ValidationError::new(
                "spec.endpoints",
                "vault and broker realms need at least one endpoint",
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.trim().is_empty() {
                errs.push(ValidationError::new(
                    &format!("spec.endpoints[{i}]"),
                    "must not be empty",
                ));
            } else if self.provider == KmsProvider::Broker && !e.starts_with("https://") {
                // Edges reach brokers only over mTLS.
                errs.push(ValidationError::new(
                    &format!("spec.endpoints[{i}]"),
                    format!("'{e}': broker endpoints are https://host:port"),
                ));
            }
        }
        if self.backend.is_some() && self.provider != KmsProvider::Broker {
            errs.push(ValidationError::new(
                "spec.backend",
                "only a broker realm names a backend",
            ));
        }
        if let Some(name) = &self.server_name {
            if self.provider != KmsProvider::Broker {
                errs.push(ValidationError::new(
                    "spec.server_name",
                    "only a broker realm names a TLS server name",
                ));
            } else if !is_server_name(name) {
                errs.push(ValidationError::new(
                    "spec.server_name",
                    format!("'{name}' is not a DNS name or IP address"),
                ));
            }
        }
    }
}

/// Whether `name` can be a TLS server name (DNS name or IP address): a
/// realm that could never verify is refused when it is written.
fn is_server_name(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

impl Validate for TrustBundleSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        // Edges bind the bundle to this domain and compare it with the
        // domain of each client's SPIFFE ID, which is lower case by spec.
        let valid = !self.trust_domain.is_empty()
            && self.trust_domain.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            });
        if !valid {
            errs.push(ValidationError::new(
                "spec.trust_domain",
                format!(
                    "'{}' is not a trust domain (lower-case letters, digits, '.', '-', '_'; no scheme or path)",
                    self.trust_domain
                ),
            ));
        }
        if !self.pem.contains("-----BEGIN CERTIFICATE-----") {
            errs.push(ValidationError::new(
                "spec.pem",
                "contains no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
    }
}

impl Validate for KmsBrokerSpec {
    fn validate(&self, _: &mut Vec<ValidationError>) {}
}

impl Validate for DenyListSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        for (i, id) in self.spiffe_ids.iter().enumerate() {
            let path = format!("spec.spiffe_ids[{i}]");
            let domain = id
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default();
            let valid_domain = !domain.is_empty()
                && domain.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
                });
            if !valid_domain || id.contains('*') || id.trim() != id {
                errs.push(ValidationError::new(
                    &path,
                    format!("'{id}' is not a SPIFFE ID (spiffe://<trust-domain>/<path>, exact, no patterns)"),
                ));
            }
        }
    }
}

impl Validate for AccessRuleSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        check_non_empty("spec.identities", &self.identities, errs);
        for (i, g) in self.identities.iter().enumerate() {
            if let Err(m) = check_spiffe_glob(g) {
                errs.push(ValidationError::new(&format!("spec.identities[{i}]"), m));
            }
        }
    }
}

// --- Identity kinds (issue 11: the CA, join tokens, issuance records). ---
// Written only by the Identity service; never returned to edges or
// kms-brokers. None holds a secret in the clear: a token's secret appears
// as its SHA-256, a CA key only sealed.

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenSpec {
    /// Equal to the resource name.
    pub id: String,
    /// SHA-256 of the token's secret, lowercase hex.
    pub secret_sha256: String,
    /// Glob over the SPIFFE IDs the token may be redeemed for.
    pub spiffe_id_pattern: String,
    pub expires_at_unix: i64,
    pub uses_left: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedCertificateSpec {
    /// Lowercase hex; equal to the resource name.
    pub serial: String,
    pub spiffe_id: String,
    pub not_after_unix: i64,
    pub ca_generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaGenerationState {
    /// In trust bundles, not signing yet.
    Prepared,
    Active,
    /// In trust bundles until `retire_after_unix`, no longer signing.
    Retiring,
    Retired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateAuthoritySpec {
    pub trust_domain: String,
    pub generation: u64,
    /// The root certificate (public).
    pub cert_pem: String,
    /// The private key sealed by `sealer` (base64 envelope); never the key.
    pub sealed_key: String,
    /// `file` or `kms:<kek>`.
    pub sealer: String,
    pub state: CaGenerationState,
    pub not_after_unix: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate_at_unix: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after_unix: Option<i64>,
}

fn is_lower_hex(s: &str, len: Option<usize>) -> bool {
    !s.is_empty()
        && len.is_none_or(|l| s.len() == l)
        && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_spiffe(path: &str, v: &str, errs: &mut Vec<ValidationError>) {
    let ok = v
        .strip_prefix("spiffe://")
        .and_then(|r| r.split_once('/'))
        .is_some_and(|(td, p)| !td.is_empty() && !p.is_empty());
    if !ok {
        errs.push(ValidationError::new(
            path,
            format!("'{v}' is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"),
        ));
    }
}

impl Validate for JoinTokenSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        if !is_lower_hex(&self.id, Some(16)) {
            errs.push(ValidationError::new(
                "spec.id",
                "must be 16 lowercase hex chars",
            ));
        }
        if !is_lower_hex(&self.secret_sha256, Some(64)) {
            errs.push(ValidationError::new(
                "spec.secret_sha256",
                "must be a SHA-256 in lowercase hex (64 chars); the secret itself is never stored",
            ));
        }
        check_spiffe("spec.spiffe_id_pattern", &self.spiffe_id_pattern, errs);
        if self.expires_at_unix <= 0 {
            errs.push(ValidationError::new(
                "spec.expires_at_unix",
                "must be positive",
            ));
        }
    }
}

impl Validate for IssuedCertificateSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        if !is_lower_hex(&self.serial, None) || self.serial.len() > 40 {
            errs.push(ValidationError::new(
                "spec.serial",
                "must be 1-40 lowercase hex chars",
            ));
        }
        check_spiffe("spec.spiffe_id", &self.spiffe_id, errs);
        if self.not_after_unix <= 0 {
            errs.push(ValidationError::new(
                "spec.not_after_unix",
                "must be positive",
            ));
        }
        if self.ca_generation == 0 {
            errs.push(ValidationError::new(
                "spec.ca_generation",
                "must be positive",
            ));
        }
    }
}

impl Validate for CertificateAuthoritySpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        if self.trust_domain.trim().is_empty() {
            errs.push(ValidationError::new(
                "spec.trust_domain",
                "must not be empty",
            ));
        }
        if self.generation == 0 {
            errs.push(ValidationError::new("spec.generation", "must be positive"));
        }
        if !self.cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            errs.push(ValidationError::new(
                "spec.cert_pem",
                "contains no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
        if self.sealed_key.contains("PRIVATE KEY") {
            errs.push(ValidationError::new(
                "spec.sealed_key",
                "looks like a clear private key; only a sealed key may be stored",
            ));
        } else if self.sealed_key.trim().is_empty() {
            errs.push(ValidationError::new("spec.sealed_key", "must not be empty"));
        }
        if self.sealer != "file" && !self.sealer.starts_with("kms:") {
            errs.push(ValidationError::new(
                "spec.sealer",
                format!("'{}' is not a sealer (file or kms:<kek>)", self.sealer),
            ));
        }
        if self.state == CaGenerationState::Prepared && self.activate_at_unix.is_none() {
            errs.push(ValidationError::new(
                "spec.activate_at_unix",
                "a prepared generation needs its activation time",
            ));
        }
        if self.state == CaGenerationState::Retiring && self.retire_after_unix.is_none() {
            errs.push(ValidationError::new(
                "spec.retire_after_unix",
                "a retiring generation needs its retirement time",
            ));
        }
    }
}

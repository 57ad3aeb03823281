//! The control plane's replicated state machine. Pure: `apply` takes a
//! command and returns its outcome and the watch events it produced; no IO,
//! no clocks, no randomness, so every replica computes the same result.

mod failover;
pub mod failover_health;
mod failover_spec;
mod mesh_spec;
pub mod spec;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use spec::Validate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    KafkaCluster,
    Edge,
    VirtualCluster,
    AuthorizationPolicy,
    EncryptionPolicy,
    KmsRealm,
    TrustBundle,
    FailoverGroup,
    /// Who may call the control plane, and as what (see `spec::AccessRuleSpec`).
    AccessRule,
    DenyList,
    // Identity (issue 11): written by the Identity service only.
    JoinToken,
    IssuedCertificate,
    CertificateAuthority,
    /// A KMS broker's registration; its status is the broker's heartbeat.
    KmsBroker,
    /// A peer edge of one edge (`spec::MeshPeerSpec`).
    MeshPeer,
    /// Which callers a kms-broker lets use which realm and KEKs
    /// (`spec::KmsGrantSpec`): the unwrap policy between sites.
    KmsGrant,
    /// A crypto-shred order for a KEK, every realm or some (`spec::KekShredSpec`);
    /// irreversible: never deleted, never changed.
    KekShred,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::KafkaCluster,
        Kind::Edge,
        Kind::VirtualCluster,
        Kind::AuthorizationPolicy,
        Kind::EncryptionPolicy,
        Kind::KmsRealm,
        Kind::TrustBundle,
        Kind::FailoverGroup,
        Kind::AccessRule,
        Kind::DenyList,
        Kind::JoinToken,
        Kind::IssuedCertificate,
        Kind::CertificateAuthority,
        Kind::KmsBroker,
        Kind::MeshPeer,
        Kind::KmsGrant,
        Kind::KekShred,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::KafkaCluster => "KafkaCluster",
            Kind::Edge => "Edge",
            Kind::VirtualCluster => "VirtualCluster",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::EncryptionPolicy => "EncryptionPolicy",
            Kind::KmsRealm => "KmsRealm",
            Kind::TrustBundle => "TrustBundle",
            Kind::FailoverGroup => "FailoverGroup",
            Kind::AccessRule => "AccessRule",
            Kind::DenyList => "DenyList",
            Kind::JoinToken => "JoinToken",
            Kind::IssuedCertificate => "IssuedCertificate",
            Kind::CertificateAuthority => "CertificateAuthority",
            Kind::KmsBroker => "KmsBroker",
            Kind::MeshPeer => "MeshPeer",
            Kind::KmsGrant => "KmsGrant",
            Kind::KekShred => "KekShred",
        }
    }

    /// Accepts the canonical name in any case, its plural, and short aliases.
    pub fn parse(s: &str) -> Result<Kind, String> {
        let l = s.to_ascii_lowercase();
        let l = l.strip_suffix('s').filter(|_| l.len() > 3).unwrap_or(&l);
        let k = match l {
            "kafkacluster" | "kc" | "cluster" => Kind::KafkaCluster,
            "edge" => Kind::Edge,
            "virtualcluster" | "vc" => Kind::VirtualCluster,
            "authorizationpolicy" | "authorizationpolicie" | "authz" | "ap" => {
                Kind::AuthorizationPolicy
            }
            "encryptionpolicy" | "encryptionpolicie" | "enc" | "ep" => Kind::EncryptionPolicy,
            "kmsrealm" | "kms" => Kind::KmsRealm,
            "trustbundle" | "tb" => Kind::TrustBundle,
            "failovergroup" | "fg" => Kind::FailoverGroup,
            "accessrule" | "ar" => Kind::AccessRule,
            "denylist" | "deny" => Kind::DenyList,
            "jointoken" | "token" => Kind::JoinToken,
            "issuedcertificate" | "cert" | "certificate" => Kind::IssuedCertificate,
            "certificateauthority" | "certificateauthoritie" | "ca" => Kind::CertificateAuthority,
            "kmsbroker" | "kb" => Kind::KmsBroker,
            "meshpeer" | "peer" | "mp" => Kind::MeshPeer,
            "kmsgrant" | "grant" => Kind::KmsGrant,
            "kekshred" | "shred" => Kind::KekShred,
            _ => {
                let names: Vec<_> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(format!(
                    "unknown kind '{s}' (expected one of {})",
                    names.join(", ")
                ));
            }
        };
        Ok(k)
    }

    /// Checks `spec` against the kind's schema and semantic rules.
    pub fn validate_spec(self, spec: &Value) -> Result<(), Vec<ValidationError>> {
        fn check<T: DeserializeOwned + Validate>(spec: &Value) -> Result<(), Vec<ValidationError>> {
            let t: T = typed(spec).map_err(|e| vec![e])?;
            let mut errs = Vec::new();
            t.validate(&mut errs);
            if errs.is_empty() {
                Ok(())
            } else {
                Err(errs)
            }
        }
        match self {
            Kind::KafkaCluster => check::<spec::KafkaClusterSpec>(spec),
            Kind::Edge => check::<spec::EdgeSpec>(spec),
            Kind::VirtualCluster => check::<spec::VirtualClusterSpec>(spec),
            Kind::AuthorizationPolicy => check::<spec::AuthorizationPolicySpec>(spec),
            Kind::EncryptionPolicy => check::<spec::EncryptionPolicySpec>(spec),
            Kind::KmsRealm => check::<spec::KmsRealmSpec>(spec),
            Kind::TrustBundle => check::<spec::TrustBundleSpec>(spec),
            Kind::FailoverGroup => check::<spec::FailoverGroupSpec>(spec),
            Kind::AccessRule => check::<spec::AccessRuleSpec>(spec),
            Kind::DenyList => check::<spec::DenyListSpec>(spec),
            Kind::JoinToken => check::<spec::JoinTokenSpec>(spec),
            Kind::IssuedCertificate => check::<spec::IssuedCertificateSpec>(spec),
            Kind::CertificateAuthority => check::<spec::CertificateAuthoritySpec>(spec),
            Kind::KmsBroker => check::<spec::KmsBrokerSpec>(spec),
            Kind::MeshPeer => check::<spec::MeshPeerSpec>(spec),
            Kind::KmsGrant => check::<spec::KmsGrantSpec>(spec),
            Kind::KekShred => check::<spec::KekShredSpec>(spec),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Deserializes a spec into its typed form, reporting the failing field path
/// (prefixed by `spec`).
pub fn typed<T: DeserializeOwned>(spec: &Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let p = e.path().to_string();
        let path = if p == "." || p.is_empty() {
            "spec".to_string()
        } else {
            format!("spec.{p}")
        };
        ValidationError::new(&path, e.into_inner().to_string())
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValidationError {
    pub path: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Names and label keys: 1-253 chars of `[a-z0-9.-]`, starting and ending
/// alphanumeric (DNS-subdomain-like, so names can appear in hostnames).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let edges = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 253 || !ok_chars || !edges {
        return Err(format!(
            "'{name}' is not a valid name (1-253 of a-z, 0-9, '-', '.', alphanumeric at both ends)"
        ));
    }
    Ok(())
}

fn validate_label_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= 253
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(format!("'{k}' is not a valid label key"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub kind: Kind,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub spec: Value,
    #[serde(default)]
    pub status: Value,
    pub revision: u64,
    pub create_revision: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Create or replace spec and labels. `expected_revision`: `Some(0)` =
    /// must not exist, `Some(n)` = current revision must be `n`.
    Apply {
        kind: Kind,
        name: String,
        labels: BTreeMap<String, String>,
        spec: Value,
        expected_revision: Option<u64>,
    },
    Delete {
        kind: Kind,
        name: String,
        expected_revision: Option<u64>,
    },
    /// Refused for a FailoverGroup, whose status only `Failover` writes.
    UpdateStatus {
        kind: Kind,
        name: String,
        status: Value,
    },
    /// Makes `to` the active cluster of FailoverGroup `group` (see
    /// `failover.rs`). `by` and `at_unix_ms` are filled in by the API node,
    /// so every replica records the same thing.
    Failover {
        group: String,
        /// None: the first standby that is not active, or the primary
        /// with `failback`.
        to: Option<String>,
        /// Compare-and-set on the group's generation (0: never failed over).
        expected_generation: Option<u64>,
        planned: bool,
        failback: bool,
        reason: Option<String>,
        by: String,
        at_unix_ms: u64,
        /// Raise or lift a produce fence instead of switching.
        #[serde(default)]
        fence: spec::FenceAction,
    },
    /// Committed by a new leader; changes nothing.
    Noop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Applied { resource: Resource, changed: bool },
    Deleted { revision: u64 },
    StatusUpdated { resource: Resource },
    Noop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("invalid {kind} '{name}': {}", display_errs(.errors))]
    Invalid {
        kind: Kind,
        name: String,
        errors: Vec<ValidationError>,
    },
    #[error("{kind} '{name}' not found")]
    NotFound { kind: Kind, name: String },
    #[error("{kind} '{name}' already exists at revision {actual}")]
    AlreadyExists {
        kind: Kind,
        name: String,
        actual: u64,
    },
    #[error("{kind} '{name}': revision conflict (expected {expected}, found {actual})")]
    Conflict {
        kind: Kind,
        name: String,
        expected: u64,
        actual: u64,
    },
    /// A failover decided on a stale view of the group.
    #[error("FailoverGroup '{name}': generation {expected} expected, {actual} found")]
    GenerationConflict {
        name: String,
        expected: u64,
        actual: u64,
    },
    /// A crypto-shred cannot be undone: the key material is gone from the
    /// KMS, and edges and brokers must keep refusing the KEK.
    #[error(
        "{kind} '{name}' is irreversible: a shredded KEK stays shredded (it cannot be {what})"
    )]
    Irreversible {
        kind: Kind,
        name: String,
        what: &'static str,
    },
}

fn display_errs(errs: &[ValidationError]) -> String {
    errs.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub revision: u64,
    pub event_type: EventType,
    /// For deletes: the resource as it was, with `revision` = the delete's.
    pub resource: Resource,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revision {requested} has been compacted (oldest available is {oldest})")]
pub struct Compacted {
    pub requested: u64,
    pub oldest: u64,
}

/// Validates a command before it is proposed, so errors reach the caller
/// without a Raft round trip. `apply` checks again; both use the same code.
pub fn validate_command(cmd: &Command) -> Result<(), CommandError> {
    if let Some(req) = failover::Request::of(cmd) {
        return req.validate();
    }
    if let Command::Apply {
        kind,
        name,
        labels,
        spec,
        ..
    } = cmd
    {
        let mut errors = Vec::new();
        if let Err(m) = validate_name(name) {
            errors.push(ValidationError::new("name", m));
        }
        for k in labels.keys() {
            if let Err(m) = validate_label_key(k) {
                errors.push(ValidationError::new(&format!("labels.{k}"), m));
            }
        }
        if !spec.is_object() {
            errors.push(ValidationError::new("spec", "must be a mapping"));
        } else if let Err(mut e) = kind.validate_spec(spec) {
            errors.append(&mut e);
        }
        if !errors.is_empty() {
            return Err(CommandError::Invalid {
                kind: *kind,
                name: name.clone(),
                errors,
            });
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(with = "resources_as_vec")]
    resources: BTreeMap<(Kind, String), Resource>,
    revision: u64,
    events: VecDeque<Event>,
    /// Highest revision whose events were dropped from `events`.
    compacted: u64,
    history_limit: usize,
}

impl State {
    /// `history_limit`: how many events are kept for Watch resumption.
    pub fn new(history_limit: usize) -> Self {
        Self {
            resources: BTreeMap::new(),
            revision: 0,
            events: VecDeque::new(),
            compacted: 0,
            history_limit: history_limit.max(1),
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn compacted_revision(&self) -> u64 {
        self.compacted
    }

    pub fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit.max(1);
        self.trim();
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&Resource> {
        self.resources.get(&(kind, name.to_string()))
    }

    pub fn list<'a>(
        &'a self,
        kind: Option<Kind>,
        selector: &'a Selector,
    ) -> impl Iterator<Item = &'a Resource> + 'a {
        self.resources
            .values()
            .filter(move |r| kind.is_none_or(|k| r.kind == k) && selector.matches(&r.labels))
    }

    /// Events with revision >= `from`, oldest first.
    pub fn events_from(&self, from: u64) -> Result<impl Iterator<Item = &Event>, Compacted> {
        if from <= self.compacted {
            return Err(Compacted {
                requested: from,
                oldest: self.compacted + 1,
            });
        }
        Ok(self.events.iter().filter(move |e| e.revision >= from))
    }

    pub fn apply(&mut self, cmd: &Command) -> (Result<Outcome, CommandError>, Vec<Event>) {
        if let Err(e) = validate_command(cmd) {
            return (Err(e), Vec::new());
        }
        let res = match cmd {
            Command::Noop => Ok((Outcome::Noop, None)),
            Command::Apply {
                kind,
                name,
                labels,
                spec,
                expected_revision,
            } => self.do_apply(*kind, name, labels, spec, *expected_revision),
            Command::Delete {
                kind,
                name,
                expected_revision,
            } => self.do_delete(*kind, name, *expected_revision),
            Command::UpdateStatus { kind, name, status } => {
                self.do_update_status(*kind, name, status)
            }
            Command::Failover { .. } => match failover::Request::of(cmd) {
                Some(req) => self.do_failover(&req),
                None => Ok((Outcome::Noop, None)),
            },
        };
        match res {
            Ok((outcome, event)) => {
                let events: Vec<Event> = event.into_iter().collect();
                for e in &events {
                    self.events.push_back(e.clone());
                }
                self.trim();
                (Ok(outcome), events)
            }
            Err(e) => (Err(e), Vec::new()),
        }
    }

    fn trim(&mut self) {
        while self.events.len() > self.history_limit {
            if let Some(e) = self.events.pop_front() {
                self.compacted = e.revision;
            }
        }
    }

    fn check_cas(
        kind: Kind,
        name: &str,
        current: Option<&Resource>,
        expected: Option<u64>,
    ) -> Result<(), CommandError> {
        match (expected, current) {
            (None, _) => Ok(()),
            (Some(0), None) => Ok(()),
            (Some(0), Some(r)) => Err(CommandError::AlreadyExists {
                kind,
                name: name.to_string(),
                actual: r.revision,
            }),
            (Some(_), None) => Err(CommandError::NotFound {
                kind,
                name: name.to_string(),
            }),
            (Some(e), Some(r)) if e == r.revision => Ok(()),
            (Some(e), Some(r)) => Err(CommandError::Conflict {
                kind,
                name: name.to_string(),
                expected: e,
                actual: r.revision,
            }),
        }
    }

    fn do_apply(
        &mut self,
        kind: Kind,
        name: &str,
        labels: &BTreeMap<String, String>,
        spec: &Value,
        expected: Option<u64>,
    ) -> Result<(Outcome, Option<Event>), CommandError> {
        let key = (kind, name.to_string());
        let current = self.resources.get(&key);
        Self::check_cas(kind, name, current, expected)?;
        if let Some(r) = current {
            if r.spec == *spec && r.labels == *labels {
                // Idempotent re-apply: no new revision, no event.
                return Ok((
                    Outcome::Applied {
                        resource: r.clone(),
                        changed: false,
                    },
                    None,
                ));
            }
            if kind == Kind::KekShred && r.spec != *spec {
                return Err(CommandError::Irreversible {
                    kind,
                    name: name.to_string(),
                    what: "changed",
                });
            }
            if kind == Kind::FailoverGroup {
                failover::check_spec_keeps_active(name, r, spec)?;
            }
        }
        self.revision += 1;
        let rev = self.revision;
        let resource = Resource {
            kind,
            name: name.to_string(),
            labels: labels.clone(),
            spec: spec.clone(),
            status: current.map(|r| r.status.clone()).unwrap_or(Value::Null),
            revision: rev,
            create_revision: current.map(|r| r.create_revision).unwrap_or(rev),
        };
        self.resources.insert(key, resource.clone());
        Ok((
            Outcome::Applied {
                resource: resource.clone(),
                changed: true,
            },
            Some(Event {
                revision: rev,
                event_type: EventType::Put,
                resource,
            }),
        ))
    }

    fn do_delete(
        &mut self,
        kind: Kind,
        name: &str,
        expected: Option<u64>,
    ) -> Result<(Outcome, Option<Event>), CommandError> {
        let key = (kind, name.to_string());
        let Some(current) = self.resources.get(&key) else {
            return Err(CommandError::NotFound {
                kind,
                name: name.to_string(),
            });
        };
        if kind == Kind::KekShred {
            return Err(CommandError::Irreversible {
                kind,
                name: name.to_string(),
                what: "deleted",
            });
        }
        Self::check_cas(kind, name, Some(current), expected)?;
        let mut resource = self.resources.remove(&key).expect("checked above");
        self.revision += 1;
        resource.revision = self.revision;
        Ok((
            Outcome::Deleted {
                revision: self.revision,
            },
            Some(Event {
                revision: self.revision,
                event_type: EventType::Delete,
                resource,
            }),
        ))
    }

    fn do_update_status(
        &mut self,
        kind: Kind,
        name: &str,
        status: &Value,
    ) -> Result<(Outcome, Option<Event>), CommandError> {
        if kind == Kind::FailoverGroup {
            // One writer, one decision: a status written beside Failover
            // would skip its compare-and-set and its history.
            return Err(CommandError::Invalid {
                kind,
                name: name.to_string(),
                errors: vec![ValidationError::new(
                    "status",
                    "a FailoverGroup's status is written by Failover only (straitctl failover)",
                )],
            });
        }
        let key = (kind, name.to_string());
        let Some(r) = self.resources.get_mut(&key) else {
            return Err(CommandError::NotFound {
                kind,
                name: name.to_string(),
            });
        };
        self.revision += 1;
        r.status = status.clone();
        r.revision = self.revision;
        let resource = r.clone();
        Ok((
            Outcome::StatusUpdated {
                resource: resource.clone(),
            },
            Some(Event {
                revision: self.revision,
                event_type: EventType::Put,
                resource,
            }),
        ))
    }
}

mod resources_as_vec {
    use super::{Kind, Resource};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<(Kind, String), Resource>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let v: Vec<&Resource> = m.values().collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(Kind, String), Resource>, D::Error> {
        let v: Vec<Resource> = Vec::deserialize(d)?;
        Ok(v.into_iter()
            .map(|r| ((r.kind, r.name.clone()), r))
            .collect())
    }
}

/// Label selector: comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let t = if let Some((k, v)) = part.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Term::Absent(k.trim().into())
            } else {
                Term::Exists(part.into())
            };
            let key = match &t {
                Term::Eq(k, _) | Term::Ne(k, _) | Term::Exists(k) | Term::Absent(k) => k,
            };
            validate_label_key(key).map_err(|m| format!("label selector '{part}': {m}"))?;
            terms.push(t);
        }
        Ok(Selector { terms })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_failover;
#[cfg(test)]
mod tests_identity;

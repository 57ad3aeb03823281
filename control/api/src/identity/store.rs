//! The identity kinds as the Identity service reads and writes them through
//! Raft. Conversions between the stored specs and `strait-control-ca` types.

use std::collections::BTreeMap;

use serde_json::Value;
use strait_control_ca::issued::IssuedRecord;
use strait_control_ca::{CaState, Generation, TokenRecord};
use strait_control_raft::Node;
use strait_control_state::spec::{
    CaGenerationState, CertificateAuthoritySpec, DenyListSpec, IssuedCertificateSpec, JoinTokenSpec,
};
use strait_control_state::{typed, Command, Kind, Outcome, Selector};
use tonic::Status;

use crate::status_of;

pub fn ca_name(generation: u64) -> String {
    format!("ca-{generation}")
}

pub fn to_ca_state(s: CaGenerationState) -> CaState {
    match s {
        CaGenerationState::Prepared => CaState::Prepared,
        CaGenerationState::Active => CaState::Active,
        CaGenerationState::Retiring => CaState::Retiring,
        CaGenerationState::Retired => CaState::Retired,
    }
}

pub fn from_ca_state(s: CaState) -> CaGenerationState {
    match s {
        CaState::Prepared => CaGenerationState::Prepared,
        CaState::Active => CaGenerationState::Active,
        CaState::Retiring => CaGenerationState::Retiring,
        CaState::Retired => CaGenerationState::Retired,
    }
}

/// A stored CA generation with the revision to compare-and-set against.
#[derive(Debug, Clone)]
pub struct StoredCa {
    pub spec: CertificateAuthoritySpec,
    pub revision: u64,
}

impl StoredCa {
    pub fn generation(&self) -> Generation {
        Generation {
            generation: self.spec.generation,
            state: to_ca_state(self.spec.state),
            cert_pem: self.spec.cert_pem.clone(),
            not_after_unix: self.spec.not_after_unix,
            activate_at_unix: self.spec.activate_at_unix,
            retire_after_unix: self.spec.retire_after_unix,
        }
    }
}

/// CA generations of `trust_domain` in the local replica.
pub fn cas(node: &Node, trust_domain: &str) -> Vec<StoredCa> {
    let state = node.state();
    let all = Selector::default();
    state
        .list(Some(Kind::CertificateAuthority), &all)
        .filter_map(|r| {
            let spec: CertificateAuthoritySpec = typed(&r.spec).ok()?;
            (spec.trust_domain == trust_domain).then_some(StoredCa {
                spec,
                revision: r.revision,
            })
        })
        .collect()
}

pub fn issued(node: &Node) -> Vec<IssuedRecord> {
    let state = node.state();
    let all = Selector::default();
    state
        .list(Some(Kind::IssuedCertificate), &all)
        .filter_map(|r| {
            let s: IssuedCertificateSpec = typed(&r.spec).ok()?;
            Some(IssuedRecord {
                serial_hex: s.serial,
                spiffe_id: s.spiffe_id,
                not_after_unix: s.not_after_unix,
                ca_generation: s.ca_generation,
            })
        })
        .collect()
}

/// Expired join tokens (names), for pruning.
pub fn expired_tokens(node: &Node, now: i64) -> Vec<String> {
    let state = node.state();
    let all = Selector::default();
    state
        .list(Some(Kind::JoinToken), &all)
        .filter_map(|r| {
            let s: JoinTokenSpec = typed(&r.spec).ok()?;
            (s.expires_at_unix <= now).then(|| r.name.clone())
        })
        .collect()
}

/// The DenyList naming `spiffe_id`, if any (name, reason).
pub fn denied(node: &Node, spiffe_id: &str) -> Option<(String, Option<String>)> {
    let state = node.state();
    let all = Selector::default();
    let found = state.list(Some(Kind::DenyList), &all).find_map(|r| {
        let s: DenyListSpec = typed(&r.spec).ok()?;
        s.spiffe_ids
            .iter()
            .any(|i| i == spiffe_id)
            .then(|| (r.name.clone(), s.reason.clone()))
    });
    found
}

pub fn token(node: &Node, id: &str) -> Option<(TokenRecord, u64)> {
    let state = node.state();
    let r = state.get(Kind::JoinToken, id)?;
    let s: JoinTokenSpec = typed(&r.spec).ok()?;
    Some((
        TokenRecord {
            id: s.id,
            secret_sha256: s.secret_sha256,
            spiffe_id_pattern: s.spiffe_id_pattern,
            expires_at_unix: s.expires_at_unix,
            uses_left: s.uses_left,
        },
        r.revision,
    ))
}

pub fn token_spec(t: &TokenRecord) -> Value {
    serde_json::to_value(JoinTokenSpec {
        id: t.id.clone(),
        secret_sha256: t.secret_sha256.clone(),
        spiffe_id_pattern: t.spiffe_id_pattern.clone(),
        expires_at_unix: t.expires_at_unix,
        uses_left: t.uses_left,
    })
    .expect("spec serializes")
}

/// Writes `spec` as `kind/name` with compare-and-set.
pub async fn put(
    node: &Node,
    kind: Kind,
    name: &str,
    spec: Value,
    expected_revision: Option<u64>,
) -> Result<u64, Status> {
    let cmd = Command::Apply {
        kind,
        name: name.to_string(),
        labels: BTreeMap::new(),
        spec,
        expected_revision,
    };
    match node.propose(&cmd).await.map_err(status_of)? {
        Outcome::Applied { resource, .. } => Ok(resource.revision),
        other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
    }
}

pub async fn delete(node: &Node, kind: Kind, name: &str) -> Result<(), Status> {
    let cmd = Command::Delete {
        kind,
        name: name.to_string(),
        expected_revision: None,
    };
    node.propose(&cmd).await.map_err(status_of)?;
    Ok(())
}

//! The control plane's federation resources, applied by the broker:
//!
//! * `KmsGrant` (spec `{"callers":[...],"kms":[...],"keks":[...],"operations":[...]}`):
//!   added to the file's `grants:` ([`crate::policy`]). One that does not
//!   validate grants nothing (and is logged).
//! * `KekShred` (spec `{"kek":"kek-secret-orders","kms":["vault-east"],"reason":"..."}`,
//!   empty `kms` = every realm): when it names one of this broker's direct
//!   (non-`broker:`) backends, or no backend at all, the broker calls
//!   `shred_kek` on each such backend, once (a ledger in the cache
//!   directory remembers it across restarts), audits the outcome, and from
//!   then refuses generate/unwrap/wrap of that KEK name on every backend,
//!   even if the key came back from a backup. The refusal starts before
//!   the shred is attempted, and stays when the KekShred is deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use strait_kms_core::{KekRef, KmsError, KmsSet};

use crate::grants::{Grant, GrantConfig};
use crate::policy::{Policy, Shredded, ShreddedKek};

/// The kinds (by name) the broker follows for federation.
pub const KMS_GRANT: &str = "KmsGrant";
pub const KEK_SHRED: &str = "KekShred";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekShredSpec {
    pub kek: String,
    /// Backend (realm) names; empty: every realm.
    #[serde(default)]
    pub kms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The `KmsGrant` and `KekShred` resources last seen, by name, as the
/// control plane sent them (checked when applied, so a cached one is
/// checked again by a newer broker).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSnapshot {
    pub revision: u64,
    pub grants: BTreeMap<String, serde_json::Value>,
    pub shreds: BTreeMap<String, serde_json::Value>,
}

/// One shred this broker did (or tried): what its KmsBroker status lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShredStatus {
    pub kek: String,
    pub kms: String,
    /// `shredded`, or the error kind and message (`not_found: ...`).
    pub outcome: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShredRecord {
    kek: String,
    kms: String,
    outcome: String,
    /// `KekShred/<name>: <reason>`.
    label: String,
    /// The key's id at that backend before it was shredded (AWS: the key
    /// id the alias resolved to), refused as well as the name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ids: Vec<String>,
    /// The last attempt failed transiently: it is tried again.
    #[serde(default)]
    retry: bool,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ledger {
    records: Vec<ShredRecord>,
}

/// What a KekShred asks of this broker: the label refusals carry and the
/// direct backends to shred on (none when it does not concern this broker).
fn applies(name: &str, spec: &KekShredSpec, direct: &BTreeSet<String>) -> (String, Vec<String>) {
    let label = match spec.reason.as_deref().filter(|r| !r.is_empty()) {
        Some(r) => format!("KekShred/{name}: {r}"),
        None => format!("KekShred/{name}"),
    };
    let targets = if spec.kms.is_empty() {
        direct.iter().cloned().collect()
    } else {
        spec.kms
            .iter()
            .filter(|k| direct.contains(*k))
            .cloned()
            .collect()
    };
    (label, targets)
}

/// Parses and checks one KmsGrant; `None` (logged) when it does not hold.
pub fn kms_grant(name: &str, spec: &serde_json::Value) -> Option<Grant> {
    let path = format!("KmsGrant/{name}");
    let parsed: GrantConfig = match serde_json::from_value(spec.clone()) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(grant = %path, error = %e, "KmsGrant left out: it grants nothing");
            return None;
        }
    };
    let mut errors = Vec::new();
    parsed.validate_into(&path, None, &mut errors);
    if errors.is_empty() {
        Some(parsed.compile(path))
    } else {
        for e in &errors {
            tracing::warn!(grant = %path, error = %e, "KmsGrant left out: it grants nothing");
        }
        None
    }
}

/// Parses one KekShred; `None` (logged) when it is unusable.
pub fn kek_shred(name: &str, spec: &serde_json::Value) -> Option<KekShredSpec> {
    match serde_json::from_value::<KekShredSpec>(spec.clone()) {
        Ok(s) if !s.kek.trim().is_empty() && s.kms.iter().all(|k| !k.trim().is_empty()) => Some(s),
        Ok(_) => {
            tracing::warn!(target: "strait::audit", kek_shred = %name, "KekShred ignored: kek and every kms name must be non-empty");
            None
        }
        Err(e) => {
            tracing::warn!(target: "strait::audit", kek_shred = %name, error = %e, "KekShred ignored: unreadable spec");
            None
        }
    }
}

/// Applies [`FederationSnapshot`]s to the [`Policy`] and shreds what they
/// ask on the broker's direct backends.
pub struct Shredder {
    kms: KmsSet,
    direct: BTreeSet<String>,
    policy: Arc<Policy>,
    ledger: Mutex<Ledger>,
    path: Option<PathBuf>,
    /// (KEK name, label) of every KekShred of the last snapshot that
    /// concerns this broker, refused whether or not its shred is done.
    current: Mutex<Vec<(String, String)>>,
}

impl Shredder {
    /// `direct`: names of the backends that are not `broker:` entries.
    /// `ledger`: the file remembering the shreds done (`None`: in memory);
    /// what it holds is refused from now on.
    pub fn new(
        kms: KmsSet,
        direct: impl IntoIterator<Item = String>,
        policy: Arc<Policy>,
        ledger: Option<PathBuf>,
    ) -> Result<Shredder, String> {
        let loaded = match &ledger {
            Some(p) if p.exists() => {
                let text = std::fs::read(p)
                    .map_err(|e| format!("reading the shred ledger {}: {e}", p.display()))?;
                // Fail closed: an unreadable ledger could hide a shredded
                // KEK, so the broker does not start on it.
                serde_json::from_slice(&text)
                    .map_err(|e| format!("the shred ledger {} is unreadable: {e}", p.display()))?
            }
            _ => Ledger::default(),
        };
        let s = Shredder {
            kms,
            direct: direct.into_iter().collect(),
            policy,
            ledger: Mutex::new(loaded),
            path: ledger,
            current: Mutex::new(Vec::new()),
        };
        s.refuse();
        Ok(s)
    }

    /// The shreds done or tried, for the KmsBroker status.
    pub fn status(&self) -> Vec<ShredStatus> {
        self.lock()
            .records
            .iter()
            .map(|r| ShredStatus {
                kek: r.kek.clone(),
                kms: r.kms.clone(),
                outcome: r.outcome.clone(),
            })
            .collect()
    }

    /// Whether a shred failed transiently and waits for another attempt.
    pub fn has_pending(&self) -> bool {
        self.lock().records.iter().any(|r| r.retry)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses every KEK of the ledger and of the last snapshot.
    fn refuse(&self) {
        let mut set: Shredded = BTreeMap::new();
        for r in &self.lock().records {
            let e = set.entry(r.kek.clone()).or_insert_with(|| ShreddedKek {
                label: r.label.clone(),
                ids: Vec::new(),
            });
            e.ids
                .extend(r.ids.iter().filter(|id| **id != r.kek).cloned());
        }
        for (kek, label) in self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            set.entry(kek.clone()).or_insert_with(|| ShreddedKek {
                label: label.clone(),
                ids: Vec::new(),
            });
        }
        self.policy.set_shredded(set);
    }

    fn persist(&self) {
        let Some(path) = &self.path else { return };
        let bytes = serde_json::to_vec_pretty(&*self.lock()).expect("ledger serializes");
        let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
        if let Err(e) = strait_control_client::write_atomic(dir, path, &bytes) {
            // The refusal holds in memory; the next shred or restart writes again.
            tracing::error!(target: "strait::audit", error = %e, "could not write the shred ledger");
        }
    }

    /// Grants to the policy; refusals at once; then every shred not yet
    /// done (or that failed transiently), one after the other.
    pub async fn apply(&self, snap: &FederationSnapshot) {
        let mut attempted = 0;
        for (kek, kms, label) in self.grant_and_refuse(snap) {
            let done = self
                .lock()
                .records
                .iter()
                .any(|r| r.kek == kek && r.kms == kms && !r.retry);
            if !done {
                self.shred(&kek, &kms, &label).await;
                attempted += 1;
            }
        }
        tracing::info!(
            revision = snap.revision,
            attempted,
            pending = self.has_pending(),
            "KEK shreds of the snapshot done"
        );
    }

    /// The part of [`Shredder::apply`] that asks no backend: the grants and
    /// the refusals of `snap` in force now. Returns the shreds it asks for
    /// as (KEK, backend, label).
    pub fn grant_and_refuse(&self, snap: &FederationSnapshot) -> Vec<(String, String, String)> {
        let grants: Vec<Grant> = snap
            .grants
            .iter()
            .filter_map(|(name, spec)| kms_grant(name, spec))
            .collect();
        let count = grants.len();
        self.policy.set_control_grants(grants);
        let mut concerned = Vec::new();
        let mut work = Vec::new();
        for (name, spec) in &snap.shreds {
            let Some(spec) = kek_shred(name, spec) else {
                continue;
            };
            let (label, targets) = applies(name, &spec, &self.direct);
            if spec.kms.is_empty() || !targets.is_empty() {
                concerned.push((spec.kek.clone(), label.clone()));
            }
            for kms in targets {
                work.push((spec.kek.clone(), kms, label.clone()));
            }
        }
        tracing::info!(
            revision = snap.revision,
            kms_grants = count,
            kek_shreds = concerned.len(),
            "control-plane grants and KEK shreds applied"
        );
        // Fail closed: refused before the backends are even asked.
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = concerned;
        self.refuse();
        work
    }

    async fn shred(&self, kek: &str, kms: &str, label: &str) {
        let Some(backend) = self.kms.get(kms).cloned() else {
            return;
        };
        let key = KekRef::new(kek);
        // The key's id there (AWS: what its alias names), refused too: an
        // edge generates under the id it resolved, not the name.
        let ids = match backend.resolve_alias(kek).await {
            Ok(k) => vec![k.key_id],
            Err(_) => Vec::new(),
        };
        let result = backend.shred_kek(&key).await;
        let outcome = match &result {
            Ok(()) => "shredded".to_string(),
            Err(e) => format!("{}: {e}", e.kind()),
        };
        tracing::warn!(target: "strait::audit", kek, kms, %outcome, shred = label, "KEK shred from the control plane");
        {
            let mut ledger = self.lock();
            ledger.records.retain(|r| !(r.kek == kek && r.kms == kms));
            ledger.records.push(ShredRecord {
                kek: kek.to_string(),
                kms: kms.to_string(),
                outcome,
                label: label.to_string(),
                ids,
                retry: matches!(result, Err(KmsError::Unavailable(_))),
            });
        }
        self.persist();
        // The refusal set gains the key's ids.
        self.refuse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_shreds_concern_this_broker() {
        let direct: BTreeSet<String> = ["vault-east".to_string(), "dev".to_string()].into();
        let spec = |kms: &[&str]| KekShredSpec {
            kek: "kek-a".into(),
            kms: kms.iter().map(|s| s.to_string()).collect(),
            reason: Some("breach".into()),
        };
        assert_eq!(
            applies("s", &spec(&[]), &direct),
            (
                "KekShred/s: breach".into(),
                vec!["dev".into(), "vault-east".into()]
            )
        );
        assert_eq!(
            applies("s", &spec(&["vault-east", "aws-west"]), &direct).1,
            vec!["vault-east".to_string()]
        );
        assert!(applies("s", &spec(&["aws-west"]), &direct).1.is_empty());
        assert!(kek_shred("s", &serde_json::json!({"kek": "k", "colour": 1})).is_none());
        assert!(kek_shred("s", &serde_json::json!({"kek": ""})).is_none());
        assert_eq!(
            kek_shred("s", &serde_json::json!({"kek": "k"})),
            Some(KekShredSpec {
                kek: "k".into(),
                kms: Vec::new(),
                reason: None
            })
        );
        assert!(kms_grant("g", &serde_json::json!({"callers": ["spiffe://a.example/x"], "kms": ["*"], "operations": ["fly"]})).is_none());
        assert!(kms_grant("g", &serde_json::json!({"callers": ["spiffe://a.example/x"], "kms": ["*"], "operations": ["unwrap"]})).is_some());
    }
}

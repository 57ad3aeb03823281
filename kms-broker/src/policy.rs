//! The decision for each call: the caller ([`Callers`]: `callers` and the
//! deny lists), then the KEKs this broker has shredded, then the grants
//! (from the file's `grants:` and the control plane's `KmsGrant`s).
//!
//! * No grant at all (none in the file, none from the control plane):
//!   every operation but `shred` is allowed to every caller, as before
//!   grants existed.
//! * Any grant: a call is allowed only when some grant matches its caller,
//!   backend, KEK and operation.
//! * `shred` is only ever allowed by a grant naming it.
//!
//! Every refusal is audited (`strait::audit`, decision="refused") and
//! counted in `strait_kms_broker_refusals_total{operation,reason}`; an
//! allowed wrap/unwrap/shred by a caller of another trust domain, and
//! every allowed shred, is audited too (decision="allowed").

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::{Request, Status};

use crate::callers::{Callers, Operation, Refusal};
use crate::grants::{kek_names, Grant, GrantOp};
use crate::tls::spiffe_id_of_der;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    operation: &'static str,
    reason: &'static str,
}

/// A KEK this broker refuses to use again, whatever the backend says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShreddedKek {
    /// Why, as callers read it: `KekShred/<name>: <reason>`.
    pub label: String,
    /// Other ids of the same key (AWS: the key id the alias resolved to
    /// when it was shredded, which is what edges generate under).
    pub ids: Vec<String>,
}

/// Shredded KEKs by the name the KekShred gave.
pub type Shredded = BTreeMap<String, ShreddedKek>;

pub struct Policy {
    callers: Arc<Callers>,
    trust_domain: String,
    /// `None`: the file has no `grants:`.
    file_grants: Option<Vec<Grant>>,
    control_grants: ArcSwap<Vec<Grant>>,
    shredded: ArcSwap<Shredded>,
    refusals: Family<RefusalLabels, Counter>,
}

impl Policy {
    /// `trust_domain`: the broker's own (a caller of another one is
    /// audited when allowed to wrap, unwrap or shred). The refusals counter
    /// is registered into `registry`.
    pub fn new(
        callers: Arc<Callers>,
        trust_domain: impl Into<String>,
        file_grants: Option<Vec<Grant>>,
        registry: &mut Registry,
    ) -> Arc<Policy> {
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "strait_kms_broker_refusals",
            "Calls the KMS broker refused, by operation and reason (no_identity, not_a_caller, deny_listed, shredded, no_grant)",
            refusals.clone(),
        );
        Arc::new(Policy {
            callers,
            trust_domain: trust_domain.into(),
            file_grants,
            control_grants: ArcSwap::from_pointee(Vec::new()),
            shredded: ArcSwap::from_pointee(BTreeMap::new()),
            refusals,
        })
    }

    pub fn callers(&self) -> &Arc<Callers> {
        &self.callers
    }

    /// Replaces the grants that came from the control plane.
    pub fn set_control_grants(&self, grants: Vec<Grant>) {
        self.control_grants.store(Arc::new(grants));
    }

    /// Replaces the set of shredded KEKs.
    pub fn set_shredded(&self, shredded: Shredded) {
        self.shredded.store(Arc::new(shredded));
    }

    /// Grants in force (file and control plane).
    pub fn grant_count(&self) -> usize {
        self.file_grants.as_ref().map_or(0, Vec::len) + self.control_grants.load().len()
    }

    /// Refusals counted for `operation` (a grant name) and `reason`.
    pub fn refusal_count(&self, operation: GrantOp, reason: &'static str) -> u64 {
        self.refusals
            .get_or_create(&RefusalLabels {
                operation: operation.as_str(),
                reason,
            })
            .get()
    }

    /// Which shredded KEK `key_id` is, if any (by name, `alias/<name>`, an
    /// alias ARN, or an id it had when it was shredded).
    fn shredded_label(&self, key_id: &str) -> Option<String> {
        let shredded = self.shredded.load();
        kek_names(key_id)
            .find_map(|n| shredded.get(n))
            .or_else(|| {
                shredded.values().find(|s| {
                    s.ids
                        .iter()
                        .any(|id| key_id == id || key_id.ends_with(&format!("/{id}")))
                })
            })
            .map(|s| s.label.clone())
    }

    /// The decision for `id` doing `op` on `backend`'s `kek` (the alias for
    /// `resolve`).
    pub fn decide(&self, id: &str, op: Operation, backend: &str, kek: &str) -> Result<(), Refusal> {
        self.callers.decide(id, op)?;
        let on = || {
            format!(
                "{id} may not {} on kms {backend:?} for kek {kek:?}",
                op.as_str()
            )
        };
        let uses_key = matches!(
            op,
            Operation::GenerateDek | Operation::UnwrapDek | Operation::WrapDek
        );
        if uses_key {
            if let Some(label) = self.shredded_label(kek) {
                return Err(Refusal {
                    reason: "shredded",
                    message: format!("{} (the KEK is shredded: {label})", on()),
                });
            }
        }
        let control = self.control_grants.load();
        let configured = self.file_grants.is_some() || !control.is_empty();
        let grant = op.grant();
        if !configured && grant != GrantOp::Shred {
            return Ok(());
        }
        let allowed = self
            .file_grants
            .iter()
            .flatten()
            .chain(control.iter())
            .any(|g| g.allows(id, grant, backend, kek));
        if allowed {
            return Ok(());
        }
        let why = if configured {
            "no grant allows it"
        } else {
            "shred needs a grant that names it"
        };
        Err(Refusal {
            reason: "no_grant",
            message: format!("{} ({why})", on()),
        })
    }

    fn refused(&self, op: Operation, reason: &'static str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                operation: op.grant().as_str(),
                reason,
            })
            .inc();
    }

    /// Checks the caller of `req` for `op` on `backend`'s `kek`, audits
    /// the decision as the module docs say, and returns the caller's ID.
    #[allow(clippy::result_large_err)]
    pub fn check<T>(
        &self,
        req: &Request<T>,
        op: Operation,
        backend: &str,
        kek: &str,
    ) -> Result<String, Status> {
        let grant = op.grant().as_str();
        let Some(id) = caller_id(req) else {
            // The handshake already requires a SPIFFE certificate; this is
            // the belt to those braces.
            let msg = format!(
                "{} needs a client certificate with a SPIFFE ID",
                op.as_str()
            );
            tracing::warn!(target: "strait::audit", operation = grant, kms = backend, kek, decision = "refused", reason = %msg, "kms-broker call refused");
            self.refused(op, "no_identity");
            return Err(Status::unauthenticated(msg));
        };
        match self.decide(&id, op, backend, kek) {
            Ok(()) => {
                let foreign = trust_domain_of(&id) != Some(self.trust_domain.as_str());
                let audited = match op {
                    Operation::ShredKek => true,
                    Operation::WrapDek | Operation::UnwrapDek => foreign,
                    _ => false,
                };
                if audited {
                    tracing::warn!(target: "strait::audit", caller = %id, operation = grant, kms = backend, kek, decision = "allowed", "kms-broker call allowed");
                }
                Ok(id)
            }
            Err(r) => {
                tracing::warn!(target: "strait::audit", caller = %id, operation = grant, kms = backend, kek, decision = "refused", reason = %r.message, "kms-broker call refused");
                self.refused(op, r.reason);
                Err(Status::permission_denied(r.message))
            }
        }
    }
}

fn caller_id<T>(req: &Request<T>) -> Option<String> {
    req.peer_certs()
        .and_then(|certs| certs.first().and_then(|c| spiffe_id_of_der(c.as_ref())))
}

/// `spiffe://<domain>/...` -> `<domain>`.
pub fn trust_domain_of(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://")?.split('/').next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::GrantConfig;

    fn grants(yaml: &str) -> Vec<Grant> {
        serde_yaml_ng::from_str::<Vec<GrantConfig>>(yaml)
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, g)| g.compile(format!("grants[{i}]")))
            .collect()
    }

    fn policy(file: Option<Vec<Grant>>) -> Arc<Policy> {
        let callers = Callers::new(vec![
            "spiffe://east.example/edge/*".into(),
            "spiffe://west.example/edge/*".into(),
        ]);
        Policy::new(callers, "east.example", file, &mut Registry::default())
    }

    const EAST: &str = "spiffe://east.example/edge/e1";
    const WEST: &str = "spiffe://west.example/edge/w1";

    #[test]
    fn without_grants_everything_but_shred() {
        let p = policy(None);
        for op in [
            Operation::GenerateDek,
            Operation::UnwrapDek,
            Operation::WrapDek,
            Operation::ResolveAlias,
        ] {
            assert_eq!(p.decide(WEST, op, "vault", "kek-a"), Ok(()));
        }
        let r = p
            .decide(EAST, Operation::ShredKek, "vault", "kek-a")
            .unwrap_err();
        assert_eq!(
            (r.reason, r.message.as_str()),
            (
                "no_grant",
                "spiffe://east.example/edge/e1 may not KmsBroker/ShredKek on kms \"vault\" for kek \"kek-a\" (shred needs a grant that names it)"
            )
        );
        // The callers still come first.
        let r = p
            .decide(
                "spiffe://north.example/edge/n",
                Operation::UnwrapDek,
                "vault",
                "kek-a",
            )
            .unwrap_err();
        assert_eq!(r.reason, "not_a_caller");
    }

    #[test]
    fn with_grants_only_what_they_allow() {
        let p = policy(Some(grants(
            r#"
- { callers: ["spiffe://east.example/edge/*"], kms: ["*"], operations: [generate, unwrap, wrap, resolve] }
- { callers: ["spiffe://west.example/edge/*"], kms: [vault], keks: ["kek-a"], operations: [unwrap] }
"#,
        )));
        assert_eq!(
            p.decide(WEST, Operation::UnwrapDek, "vault", "kek-a"),
            Ok(())
        );
        let r = p
            .decide(WEST, Operation::UnwrapDek, "vault", "kek-b")
            .unwrap_err();
        assert_eq!(
            r.message,
            "spiffe://west.example/edge/w1 may not KmsBroker/UnwrapDek on kms \"vault\" for kek \"kek-b\" (no grant allows it)"
        );
        assert!(p
            .decide(WEST, Operation::WrapDek, "vault", "kek-a")
            .is_err());
        assert_eq!(p.decide(EAST, Operation::WrapDek, "aws", "kek-b"), Ok(()));
        assert!(p
            .decide(EAST, Operation::ShredKek, "vault", "kek-a")
            .is_err());
        // Control-plane grants add to the file's.
        p.set_control_grants(grants(
            r#"[{ callers: ["spiffe://east.example/edge/e1"], kms: [vault], operations: [shred] }]"#,
        ));
        assert_eq!(
            p.decide(EAST, Operation::ShredKek, "vault", "kek-a"),
            Ok(())
        );
        assert_eq!(p.grant_count(), 3);
    }

    #[test]
    fn control_plane_grants_alone_turn_grants_on() {
        let p = policy(None);
        p.set_control_grants(grants(
            r#"[{ callers: ["spiffe://west.example/edge/*"], kms: ["*"], operations: [unwrap] }]"#,
        ));
        assert_eq!(
            p.decide(WEST, Operation::UnwrapDek, "vault", "kek-a"),
            Ok(())
        );
        assert_eq!(
            p.decide(EAST, Operation::GenerateDek, "vault", "kek-a")
                .unwrap_err()
                .reason,
            "no_grant"
        );
        p.set_control_grants(Vec::new());
        assert_eq!(
            p.decide(EAST, Operation::GenerateDek, "vault", "kek-a"),
            Ok(())
        );
    }

    #[test]
    fn shredded_keks_are_refused_on_every_backend_by_every_name() {
        let p = policy(None);
        p.set_shredded(BTreeMap::from([(
            "kek-orders".to_string(),
            ShreddedKek {
                label: "KekShred/orders: breach".into(),
                ids: vec!["1234abcd-12ab-34cd-56ef-1234567890ab".into()],
            },
        )]));
        for kek in [
            "kek-orders",
            "alias/kek-orders",
            "arn:aws:kms:eu-west-1:1:alias/kek-orders",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:eu-west-1:1:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            for op in [
                Operation::GenerateDek,
                Operation::UnwrapDek,
                Operation::WrapDek,
            ] {
                for backend in ["vault", "aws"] {
                    let r = p.decide(EAST, op, backend, kek).unwrap_err();
                    assert_eq!(r.reason, "shredded", "{kek}");
                    assert!(
                        r.message
                            .ends_with("(the KEK is shredded: KekShred/orders: breach)"),
                        "{}",
                        r.message
                    );
                }
            }
        }
        assert_eq!(
            p.decide(EAST, Operation::UnwrapDek, "vault", "kek-orders-2"),
            Ok(())
        );
        assert_eq!(
            p.decide(EAST, Operation::ResolveAlias, "vault", "kek-orders"),
            Ok(())
        );
    }

    #[test]
    fn trust_domains() {
        assert_eq!(
            trust_domain_of("spiffe://a.example/edge/x"),
            Some("a.example")
        );
        assert_eq!(trust_domain_of("spiffe://a.example"), Some("a.example"));
        assert_eq!(trust_domain_of("https://a.example/x"), None);
    }
}

//! Who may call the broker: the caller's SPIFFE ID (its certificate already
//! chained to the bundle of the trust domain it names, see [`crate::tls`])
//! must match one of the configured globs and be on no deny list. Deny by
//! default; every refusal is audited.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tonic::{Request, Status};

use crate::tls::spiffe_id_of_der;

/// An operation of `strait.kms.v1.KmsBroker`, as named in refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    GenerateDek,
    UnwrapDek,
    ResolveAlias,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::GenerateDek => "KmsBroker/GenerateDek",
            Operation::UnwrapDek => "KmsBroker/UnwrapDek",
            Operation::ResolveAlias => "KmsBroker/ResolveAlias",
        }
    }
}

/// Denied identities, each with the DenyList (and reason) that names it.
pub type DenyLists = BTreeMap<String, String>;

pub struct Callers {
    allowed: Vec<String>,
    denied: ArcSwap<DenyLists>,
}

impl Callers {
    /// `allowed`: SPIFFE ID globs (`*` one segment, `**` any depth), each
    /// already checked with `check_spiffe_glob`.
    pub fn new(allowed: Vec<String>) -> Arc<Callers> {
        Arc::new(Callers {
            allowed,
            denied: ArcSwap::from_pointee(BTreeMap::new()),
        })
    }

    pub fn set_deny_lists(&self, denied: DenyLists) {
        self.denied.store(Arc::new(denied));
    }

    pub fn denied_count(&self) -> usize {
        self.denied.load().len()
    }

    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    /// The decision for `id` calling `op`: `Err(message)` names the identity
    /// and the operation.
    pub fn decide(&self, id: &str, op: Operation) -> Result<(), String> {
        if let Some(why) = self.denied.load().get(id) {
            return Err(format!("{id} may not {} ({why})", op.as_str()));
        }
        if self
            .allowed
            .iter()
            .any(|g| strait_control_client::state::spec::spiffe_glob_matches(g, id))
        {
            Ok(())
        } else {
            Err(format!(
                "{id} may not {} (not in the broker's callers)",
                op.as_str()
            ))
        }
    }

    /// Checks the caller of `req`; refusals are audited.
    #[allow(clippy::result_large_err)]
    pub fn check<T>(&self, req: &Request<T>, op: Operation) -> Result<String, Status> {
        let id = req
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| spiffe_id_of_der(c.as_ref())));
        let Some(id) = id else {
            // The handshake already requires a SPIFFE certificate; this is
            // the belt to those braces.
            let msg = format!(
                "{} needs a client certificate with a SPIFFE ID",
                op.as_str()
            );
            tracing::warn!(target: "audit", operation = op.as_str(), reason = %msg, "kms-broker call refused");
            return Err(Status::unauthenticated(msg));
        };
        match self.decide(&id, op) {
            Ok(()) => Ok(id),
            Err(msg) => {
                tracing::warn!(target: "audit", caller = %id, operation = op.as_str(), reason = %msg, "kms-broker call refused");
                Err(Status::permission_denied(msg))
            }
        }
    }
}

/// Every denied identity of `lists` (name -> (ids, reason)), labelled with
/// the DenyList that names it.
pub fn deny_lists<'a>(
    lists: impl IntoIterator<Item = (&'a String, &'a [String], Option<&'a str>)>,
) -> DenyLists {
    let mut out = BTreeMap::new();
    for (name, ids, reason) in lists {
        let label = match reason {
            Some(r) => format!("deny-listed by DenyList/{name}: {r}"),
            None => format!("deny-listed by DenyList/{name}"),
        };
        let unique: BTreeSet<&String> = ids.iter().collect();
        for id in unique {
            out.entry(id.clone()).or_insert_with(|| label.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let c = Callers::new(vec![
            "spiffe://example.org/edge/*".into(),
            "spiffe://example.org/ns/enc/sa/**".into(),
        ]);
        let ok = |id: &str| c.decide(id, Operation::UnwrapDek);
        assert_eq!(ok("spiffe://example.org/edge/e1"), Ok(()));
        assert_eq!(ok("spiffe://example.org/ns/enc/sa/a/b"), Ok(()));
        assert_eq!(
            ok("spiffe://example.org/edge/e1/x"),
            Err("spiffe://example.org/edge/e1/x may not KmsBroker/UnwrapDek (not in the broker's callers)".into())
        );
        assert!(ok("spiffe://other.org/edge/e1").is_err());
        assert!(ok("spiffe://example.org/admin/alice").is_err());
        let name = "leak".to_string();
        let ids = vec!["spiffe://example.org/edge/e1".to_string()];
        c.set_deny_lists(deny_lists([(&name, ids.as_slice(), Some("key leaked"))]));
        assert_eq!(
            ok("spiffe://example.org/edge/e1"),
            Err("spiffe://example.org/edge/e1 may not KmsBroker/UnwrapDek (deny-listed by DenyList/leak: key leaked)".into())
        );
        assert_eq!(ok("spiffe://example.org/edge/e2"), Ok(()));
        c.set_deny_lists(BTreeMap::new());
        assert_eq!(ok("spiffe://example.org/edge/e1"), Ok(()));
    }
}

//! Who may call the broker: the caller's SPIFFE ID (its certificate already
//! chained to the bundle of the trust domain it names, see [`crate::tls`])
//! must match one of the configured globs and be on no deny list. Deny by
//! default. The first step of [`crate::policy::Policy`], which audits and
//! counts every refusal.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::grants::GrantOp;

/// An operation of `strait.kms.v1.KmsBroker`, as named in refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    GenerateDek,
    UnwrapDek,
    ResolveAlias,
    WrapDek,
    ShredKek,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::GenerateDek => "KmsBroker/GenerateDek",
            Operation::UnwrapDek => "KmsBroker/UnwrapDek",
            Operation::ResolveAlias => "KmsBroker/ResolveAlias",
            Operation::WrapDek => "KmsBroker/WrapDek",
            Operation::ShredKek => "KmsBroker/ShredKek",
        }
    }

    /// The name grants use for it.
    pub fn grant(self) -> GrantOp {
        match self {
            Operation::GenerateDek => GrantOp::Generate,
            Operation::UnwrapDek => GrantOp::Unwrap,
            Operation::ResolveAlias => GrantOp::Resolve,
            Operation::WrapDek => GrantOp::Wrap,
            Operation::ShredKek => GrantOp::Shred,
        }
    }
}

/// Why a call is refused: `reason` labels the refusals metric, `message`
/// is what the caller reads (it names the identity and the operation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
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

    /// The decision for `id` calling `op`: the refusal names the identity
    /// and the operation.
    pub fn decide(&self, id: &str, op: Operation) -> Result<(), Refusal> {
        if let Some(why) = self.denied.load().get(id) {
            return Err(Refusal {
                reason: "deny_listed",
                message: format!("{id} may not {} ({why})", op.as_str()),
            });
        }
        if self
            .allowed
            .iter()
            .any(|g| strait_control_client::state::spec::spiffe_glob_matches(g, id))
        {
            Ok(())
        } else {
            Err(Refusal {
                reason: "not_a_caller",
                message: format!("{id} may not {} (not in the broker's callers)", op.as_str()),
            })
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
        let ok = |id: &str| c.decide(id, Operation::UnwrapDek).map_err(|r| r.message);
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

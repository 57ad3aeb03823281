//! The emergency deny list: identities refused on every virtual cluster,
//! whatever their authorization says.
//!
//! The set is swapped atomically when the configuration changes. Each
//! connection checks it before every request it reads, and caches the
//! answer until the set is replaced, so the cost per request is one atomic
//! load and a pointer comparison.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use strait_filter::Principal;

/// The current deny set, shared by every cluster of an edge.
#[derive(Clone, Default)]
pub struct DenyList {
    current: Arc<ArcSwap<HashSet<Arc<str>>>>,
    size: Gauge,
}

impl DenyList {
    pub fn new(size: Gauge) -> Self {
        DenyList {
            current: Arc::default(),
            size,
        }
    }

    /// Replaces the set; returns whether it changed.
    pub fn replace(&self, identities: &[String]) -> bool {
        let next: HashSet<Arc<str>> = identities.iter().map(|id| Arc::from(id.as_str())).collect();
        if **self.current.load() == next {
            return false;
        }
        self.size.set(next.len() as i64);
        self.current.store(Arc::new(next));
        true
    }

    pub fn is_denied(&self, principal: &Principal) -> bool {
        contains(&self.current.load(), principal)
    }

    /// A per-connection view that rechecks only when the set changed.
    pub fn check(&self, principal: Principal) -> DenyCheck {
        let seen = self.current.load_full();
        let denied = contains(&seen, &principal);
        DenyCheck {
            list: self.clone(),
            principal,
            seen,
            denied,
        }
    }
}

fn contains(set: &HashSet<Arc<str>>, principal: &Principal) -> bool {
    match principal {
        Principal::Named(name) => set.contains(name),
        Principal::Anonymous => false,
    }
}

/// One connection's view of the deny list.
pub struct DenyCheck {
    list: DenyList,
    principal: Principal,
    seen: Arc<HashSet<Arc<str>>>,
    denied: bool,
}

impl DenyCheck {
    pub fn denied(&mut self) -> bool {
        let current = self.list.current.load();
        if !Arc::ptr_eq(&current, &self.seen) {
            self.seen = Arc::clone(&current);
            self.denied = contains(&self.seen, &self.principal);
        }
        self.denied
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_checks_see_replacements() {
        let list = DenyList::default();
        let alice = Principal::Named("spiffe://example.org/ns/a/sa/alice".into());
        let mut check = list.check(alice.clone());
        assert!(!check.denied());
        assert!(list.replace(&["spiffe://example.org/ns/a/sa/alice".to_owned()]));
        assert!(!list.replace(&["spiffe://example.org/ns/a/sa/alice".to_owned()]));
        assert!(check.denied());
        assert!(list.is_denied(&alice));
        assert!(!list.is_denied(&Principal::Anonymous));
        assert!(list.replace(&[]));
        assert!(!check.denied());
    }
}

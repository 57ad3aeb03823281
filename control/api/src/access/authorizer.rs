//! The policy, the rules in the replicated state, and the audit trail put
//! together for the gRPC services.

use std::sync::Arc;

use strait_control_state::spec::AccessRuleSpec;
use strait_control_state::{Kind, Selector, State};
use tonic::{Request, Status};

use super::audit::{Audit, AuditOutcome};
use super::identity::Caller;
use super::policy::{Access, Decision, Grants, Operation, Policy, RaftMethod};

/// The AccessRule resources of `state`, typed. Rules were validated on
/// write; one that no longer parses grants nothing.
pub fn rules_of(state: &State) -> Vec<AccessRuleSpec> {
    state
        .list(Some(Kind::AccessRule), &Selector::default())
        .filter_map(|r| serde_json::from_value(r.spec.clone()).ok())
        .collect()
}

type RuleSource = dyn Fn() -> Vec<AccessRuleSpec> + Send + Sync;

/// Cheap to clone; one per node, shared by every service.
///
/// Use from a service handler:
/// ```ignore
/// let caller = authz.caller(&req);
/// authz.check(&caller, Operation::Identity(IdentityMethod::Issue))?;
/// // ... do the work, then for a write:
/// authz.audit_write(&caller, &Operation::Identity(IdentityMethod::Issue).into(), &result);
/// ```
#[derive(Clone)]
pub struct Authorizer {
    inner: Arc<Inner>,
}

struct Inner {
    policy: Policy,
    tls: bool,
    rules: Box<RuleSource>,
    audit: Audit,
}

impl Authorizer {
    /// `tls`: whether the listener verifies client certificates; without it
    /// every caller is [`Caller::InsecureLocal`] (the operator's choice,
    /// refused off loopback by the binary).
    pub fn new(
        policy: Policy,
        tls: bool,
        rules: impl Fn() -> Vec<AccessRuleSpec> + Send + Sync + 'static,
        audit: Audit,
    ) -> Authorizer {
        Authorizer {
            inner: Arc::new(Inner {
                policy,
                tls,
                rules: Box::new(rules),
                audit,
            }),
        }
    }

    pub fn caller<T>(&self, req: &Request<T>) -> Caller {
        Caller::of(req, self.inner.tls)
    }

    /// Allows or refuses `access` for `caller`; a refusal is audited and
    /// comes back as the gRPC status to return.
    pub fn check<'a>(
        &self,
        caller: &Caller,
        access: impl Into<Access<'a>>,
    ) -> Result<Grants, Status> {
        let access = access.into();
        let rules = (self.inner.rules)();
        match self.inner.policy.decide(caller, &access, &rules) {
            Decision::Allow(g) => Ok(g),
            Decision::Unauthenticated(msg) => {
                self.inner
                    .audit
                    .record(caller, &access, AuditOutcome::Unauthenticated, &msg);
                Err(Status::unauthenticated(msg))
            }
            Decision::Denied(msg) => {
                self.inner
                    .audit
                    .record(caller, &access, AuditOutcome::Denied, &msg);
                Err(Status::permission_denied(msg))
            }
        }
    }

    /// Refuses `access` after the fact: the kind was allowed but this
    /// resource is out of the caller's scope (an edge asking for another
    /// edge's VirtualCluster).
    pub fn refuse(&self, caller: &Caller, access: &Access<'_>) -> Status {
        let msg = super::policy::denied(caller, access);
        self.inner
            .audit
            .record(caller, access, AuditOutcome::Denied, &msg);
        Status::permission_denied(msg)
    }

    /// Records the result of an authorized write.
    pub fn audit_write<T>(&self, caller: &Caller, access: &Access<'_>, result: &Result<T, Status>) {
        match result {
            Ok(_) => self
                .inner
                .audit
                .record(caller, access, AuditOutcome::Ok, ""),
            Err(s) => self
                .inner
                .audit
                .record(caller, access, AuditOutcome::Failed, s.message()),
        }
    }

    /// For the Raft transport: only control nodes may send Raft messages.
    pub fn raft_interceptor(&self) -> impl tonic::service::Interceptor + Clone {
        let authz = self.clone();
        move |req: Request<()>| -> Result<Request<()>, Status> {
            let caller = authz.caller(&req);
            authz.check(&caller, Operation::Raft(RaftMethod::Send))?;
            Ok(req)
        }
    }
}

impl From<Operation> for Access<'static> {
    fn from(op: Operation) -> Self {
        Access::op(op)
    }
}

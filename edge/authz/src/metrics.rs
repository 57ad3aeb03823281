//! Authorization and audit metrics, registered into a registry passed in.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values follow Prometheus' snake_case convention
enum Outcome {
    allow,
    deny,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    virtual_cluster: String,
    result: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditLabels {
    decision: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum ReloadResult {
    ok,
    rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

/// `authz_decisions_total{virtual_cluster,result}`,
/// `authz_audit_lines_written_total`, `authz_audit_lines_dropped_total{decision}`,
/// `authz_rule_reloads_total{result}`. Cheap to clone (shared counters).
#[derive(Clone, Debug)]
pub struct AuthzMetrics {
    decisions: Family<DecisionLabels, Counter>,
    audit_written: Counter,
    audit_dropped: Family<AuditLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
}

/// The two decision counters of one virtual cluster, resolved once.
#[derive(Clone, Debug)]
pub(crate) struct DecisionCounters {
    pub allow: Counter,
    pub deny: Counter,
}

impl AuthzMetrics {
    pub fn register(registry: &mut Registry) -> AuthzMetrics {
        let metrics = AuthzMetrics {
            decisions: Family::default(),
            audit_written: Counter::default(),
            audit_dropped: Family::default(),
            reloads: Family::default(),
        };
        registry.register(
            "authz_decisions",
            "Authorization decisions (one per resource checked) by result",
            metrics.decisions.clone(),
        );
        registry.register(
            "authz_audit_lines_written",
            "Audit lines written",
            metrics.audit_written.clone(),
        );
        registry.register(
            "authz_audit_lines_dropped",
            "Audit lines dropped because the writer fell behind (allow lines only in normal operation)",
            metrics.audit_dropped.clone(),
        );
        registry.register(
            "authz_rule_reloads",
            "Rule file reloads by result (rejected reloads keep the old rules)",
            metrics.reloads.clone(),
        );
        metrics
    }

    pub(crate) fn decision_counters(&self, virtual_cluster: &str) -> DecisionCounters {
        let counter = |result| {
            self.decisions
                .get_or_create(&DecisionLabels {
                    virtual_cluster: virtual_cluster.to_owned(),
                    result,
                })
                .clone()
        };
        DecisionCounters {
            allow: counter(Outcome::allow),
            deny: counter(Outcome::deny),
        }
    }

    pub(crate) fn audit_written(&self) -> &Counter {
        &self.audit_written
    }

    pub(crate) fn audit_dropped(&self, allowed: bool) {
        let decision = if allowed {
            Outcome::allow
        } else {
            Outcome::deny
        };
        self.audit_dropped
            .get_or_create(&AuditLabels { decision })
            .inc();
    }

    pub(crate) fn reload(&self, ok: bool) {
        let result = if ok {
            ReloadResult::ok
        } else {
            ReloadResult::rejected
        };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }
}

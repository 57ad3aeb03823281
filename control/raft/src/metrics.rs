//! Prometheus metrics of one node, registered into a registry the caller owns.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug)]
pub struct RaftMetrics {
    pub proposals: Counter,
    pub proposals_dropped: Counter,
    pub applied_entries: Counter,
    pub leader_changes: Counter,
    pub snapshots_taken: Counter,
    pub snapshots_installed: Counter,
    pub term: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub is_leader: Gauge,
    /// Duration of one fsynced redb transaction per Ready.
    pub persist_seconds: Histogram,
    /// Entries appended per Ready (batching effectiveness).
    pub entries_per_ready: Histogram,
}

impl RaftMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            proposals: Counter::default(),
            proposals_dropped: Counter::default(),
            applied_entries: Counter::default(),
            leader_changes: Counter::default(),
            snapshots_taken: Counter::default(),
            snapshots_installed: Counter::default(),
            term: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            is_leader: Gauge::default(),
            persist_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            entries_per_ready: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        };
        let r = registry.sub_registry_with_prefix("strait_control_raft");
        r.register(
            "proposals",
            "Proposals submitted on this node",
            m.proposals.clone(),
        );
        r.register(
            "proposals_dropped",
            "Proposals refused because no leader was known",
            m.proposals_dropped.clone(),
        );
        r.register(
            "applied_entries",
            "Log entries applied",
            m.applied_entries.clone(),
        );
        r.register(
            "leader_changes",
            "Leader changes observed",
            m.leader_changes.clone(),
        );
        r.register(
            "snapshots_taken",
            "Snapshots taken locally",
            m.snapshots_taken.clone(),
        );
        r.register(
            "snapshots_installed",
            "Snapshots received from a leader and installed",
            m.snapshots_installed.clone(),
        );
        r.register("term", "Current Raft term", m.term.clone());
        r.register("commit_index", "Raft commit index", m.commit_index.clone());
        r.register(
            "applied_index",
            "Raft applied index",
            m.applied_index.clone(),
        );
        r.register(
            "is_leader",
            "1 if this node is the leader",
            m.is_leader.clone(),
        );
        r.register(
            "persist_seconds",
            "Duration of the fsynced write of one Ready",
            m.persist_seconds.clone(),
        );
        r.register(
            "entries_per_ready",
            "Log entries persisted per Ready",
            m.entries_per_ready.clone(),
        );
        m
    }
}

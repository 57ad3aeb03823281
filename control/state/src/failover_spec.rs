//! Disaster-recovery failover (issue 14): a FailoverGroup names a primary
//! KafkaCluster and its standbys; its status is the one decision which of
//! them is active, written only by `Command::Failover` (compare-and-set on
//! the generation), so every edge follows the same decision.

use serde::{Deserialize, Serialize};

use crate::spec::{check_name_ref, check_non_empty, is_topic_name, Validate};
use crate::ValidationError;

/// How many switches a group's status remembers.
pub const FAILOVER_HISTORY: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverGroupSpec {
    pub primary: String,
    /// In order of preference: a failover without a target goes to the
    /// first one that is not active.
    pub standby: Vec<String>,
    #[serde(default)]
    pub health: HealthPolicy,
    #[serde(default)]
    pub mode: FailoverMode,
    /// Whether the group returns to the primary by itself once it is
    /// healthy again (`automatic`), or only when an operator says so.
    #[serde(default)]
    pub failback: FailbackMode,
    /// How the standbys receive the primary's data. Validated and stored;
    /// offset translation at a switch uses it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationSpec>,
}

impl FailoverGroupSpec {
    /// The decision in force: the stored status, or the primary at
    /// generation 0 before the first failover. A status that does not read
    /// as a FailoverStatus (one an admin wrote through UpdateStatus before
    /// Failover existed) carries no decision and counts as none.
    pub fn in_force(&self, status: &serde_json::Value) -> FailoverStatus {
        serde_json::from_value::<FailoverStatus>(status.clone()).unwrap_or_else(|_| {
            FailoverStatus {
                active: self.primary.clone(),
                generation: 0,
                previous: None,
                planned: false,
                reason: None,
                by: String::new(),
                at_unix_ms: 0,
                history: Vec::new(),
                fence: None,
            }
        })
    }

    /// The primary, then the standbys in order.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.primary.as_str()).chain(self.standby.iter().map(String::as_str))
    }

    pub fn is_member(&self, cluster: &str) -> bool {
        self.members().any(|m| m == cluster)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthPolicy {
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Consecutive failed checks before a cluster counts as down.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Consecutive successful checks before a cluster that was down counts
    /// as healthy again: hysteresis, so a flapping cluster does not bounce
    /// the group back and forth.
    #[serde(default = "default_recovery_threshold")]
    pub recovery_threshold: u32,
    /// How many observers (edges, and the control plane's own probe) must
    /// agree before an automatic switch: a cluster is down, or a standby
    /// up, only when at least this many and a strict majority of the
    /// observers that report on it say so. One observer alone (an edge cut
    /// off from the cluster) never decides.
    #[serde(default = "default_quorum")]
    pub quorum: u32,
    /// After a switch, the controller does not switch the group again for
    /// this long (hysteresis against flapping); an operator still may.
    #[serde(default = "default_hold_down_ms")]
    pub hold_down_ms: u64,
    /// Whether the control plane's leader also probes the members (a TCP
    /// connection to a bootstrap server) and counts as one observer.
    #[serde(default = "default_true")]
    pub control_plane_probe: bool,
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_recovery_threshold() -> u32 {
    3
}
fn default_quorum() -> u32 {
    2
}
fn default_hold_down_ms() -> u64 {
    30_000
}
fn default_true() -> bool {
    true
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            interval_ms: default_interval_ms(),
            failure_threshold: default_failure_threshold(),
            recovery_threshold: default_recovery_threshold(),
            quorum: default_quorum(),
            hold_down_ms: default_hold_down_ms(),
            control_plane_probe: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailoverMode {
    #[default]
    Manual,
    Automatic,
}

/// Manual by default: going back is a second outage for the clients, which
/// an operator schedules once replication has caught up the other way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailbackMode {
    #[default]
    Manual,
    Automatic,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSpec {
    pub kind: ReplicationKind,
    /// MirrorMaker 2's alias of the primary in the standbys: remote topics
    /// are `<alias>.<topic>` there.
    pub source_alias: String,
    /// Where MM2 writes translated consumer offsets; default
    /// `<source_alias>.checkpoints.internal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints_topic: Option<String>,
    /// MM2's replication policy: `default` names remote topics
    /// `<source_alias>.<topic>`, `identity` keeps the names.
    #[serde(default)]
    pub policy: ReplicationPolicy,
    /// Topic globs whose replication a planned switch waits for; empty:
    /// every topic but internal ones (`__*`, MM2's `*.internal`,
    /// `mm2-*`, `heartbeats`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Where a group starts, on a standby, on a partition with no offset
    /// committed there and no checkpoint to translate.
    #[serde(default, skip_serializing_if = "OffsetReset::is_client")]
    pub offset_reset: OffsetReset,
}

/// `spec.replication.offset_reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OffsetReset {
    /// The client's own `auto.offset.reset` decides.
    #[default]
    Client,
    /// The standby's log start: nothing is skipped, everything is re-read.
    Earliest,
    /// The standby's end: nothing is re-read, what was not read is skipped.
    Latest,
    /// The first record written at or after this long before the switch:
    /// re-reads bounded by time, whatever MM2 had or had not checkpointed.
    BeforeSwitchMs(u64),
}

impl OffsetReset {
    fn is_client(&self) -> bool {
        *self == OffsetReset::Client
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationPolicy {
    #[default]
    Default,
    Identity,
}

impl ReplicationSpec {
    /// The standby's name of the primary's `topic`.
    pub fn remote_topic(&self, topic: &str) -> String {
        match self.policy {
            ReplicationPolicy::Default => format!("{}.{topic}", self.source_alias),
            ReplicationPolicy::Identity => topic.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationKind {
    #[serde(rename = "mirrormaker2")]
    MirrorMaker2,
}

/// A FailoverGroup's status: which member is active, since when and why.
/// Absent until the first failover: the primary at generation 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverStatus {
    pub active: String,
    /// Bumped by every switch; what `expected_generation` compares with,
    /// and what edges report they serve.
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// A planned switch (both sides up, e.g. a drill) rather than an outage.
    #[serde(default)]
    pub planned: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The caller's identity, as the API node saw it.
    pub by: String,
    pub at_unix_ms: u64,
    /// The last [`FAILOVER_HISTORY`] switches, oldest first (this one last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<FailoverEvent>,
    /// Produce is fenced at this generation, for a planned switch in
    /// progress; the switch (a new generation) or a lift clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
}

/// A planned switchover's first step (`straitctl failover --planned`):
/// every edge answers Produce for the group with a retriable error, so
/// clients retry and nothing new reaches the active cluster while
/// replication catches up to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    /// The member the planned switch goes to.
    pub to: String,
    pub by: String,
    pub at_unix_ms: u64,
}

/// What `Command::Failover` does: switch (the default, and every entry
/// written before fences existed), or raise or lift a produce fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FenceAction {
    #[default]
    Switch,
    Raise,
    Lift,
}

/// One edge's measurement of how far `to` is behind `from` for a fenced
/// group (`EdgeStatus.replication`): the planned switch waits for a
/// caught-up one from every edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationLag {
    pub group: String,
    pub from: String,
    pub to: String,
    /// Every compared partition's last record is the standby's last
    /// record, and the active cluster's end offsets did not move since
    /// the measurement before.
    pub caught_up: bool,
    /// Partitions compared.
    pub partitions: u32,
    /// Partitions not caught up yet, `topic-N` (at most a few named).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub behind: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub checked_at_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverEvent {
    pub from: String,
    pub to: String,
    pub generation: u64,
    #[serde(default)]
    pub planned: bool,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at_unix_ms: u64,
}

/// One virtual cluster of an edge that follows a failover group, as the
/// edge runs it (`EdgeStatus.failover`): lets an operator see that every
/// edge has moved to the new generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedFailover {
    pub virtual_cluster: String,
    pub group: String,
    pub cluster: String,
    pub generation: u64,
    /// Produce fenced for a planned switch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fenced: bool,
}

impl Validate for FailoverGroupSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        check_name_ref("spec.primary", &self.primary, errs);
        check_non_empty("spec.standby", &self.standby, errs);
        for (i, s) in self.standby.iter().enumerate() {
            let path = format!("spec.standby[{i}]");
            check_name_ref(&path, s, errs);
            if *s == self.primary {
                errs.push(ValidationError::new(
                    &path,
                    "the primary cannot be its own standby",
                ));
            } else if self.standby[..i].contains(s) {
                errs.push(ValidationError::new(
                    &path,
                    format!("'{s}' is listed twice"),
                ));
            }
        }
        for (field, value) in [
            ("interval_ms", self.health.interval_ms),
            (
                "failure_threshold",
                u64::from(self.health.failure_threshold),
            ),
            (
                "recovery_threshold",
                u64::from(self.health.recovery_threshold),
            ),
            ("quorum", u64::from(self.health.quorum)),
        ] {
            if value == 0 {
                errs.push(ValidationError::new(
                    &format!("spec.health.{field}"),
                    "must be positive",
                ));
            }
        }
        if let Some(r) = &self.replication {
            // The alias prefixes remote topics (`<alias>.<topic>`): a '.'
            // in it would make the prefix ambiguous.
            let alias_ok = !r.source_alias.is_empty()
                && r.source_alias
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
            if !alias_ok {
                errs.push(ValidationError::new(
                    "spec.replication.source_alias",
                    format!(
                        "'{}' is not a MirrorMaker 2 cluster alias (letters, digits, '-', '_')",
                        r.source_alias
                    ),
                ));
            }
            if let Some(t) = &r.checkpoints_topic {
                if !is_topic_name(t) {
                    errs.push(ValidationError::new(
                        "spec.replication.checkpoints_topic",
                        format!("'{t}' is not a Kafka topic name"),
                    ));
                }
            }
        }
    }
}

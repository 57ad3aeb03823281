//! The FailoverGroups an edge follows: a virtual cluster with
//! `failover_group` is served from whichever member the group's status
//! names active, so the edge needs the spec and the status together.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use strait_control_state::spec::{FailoverGroupSpec, FailoverStatus, VirtualClusterSpec};
use strait_control_state::Kind;

use crate::Store;

/// A FailoverGroup and the decision in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowedGroup {
    pub spec: FailoverGroupSpec,
    /// None before the first failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<FailoverStatus>,
}

impl FollowedGroup {
    /// The active cluster and the generation: the status's, or the primary
    /// at generation 0 before the first failover (as the state machine
    /// counts it).
    pub fn active(&self) -> (&str, u64) {
        match &self.status {
            Some(s) => (&s.active, s.generation),
            None => (&self.spec.primary, 0),
        }
    }
}

/// The groups `vcs` follow, by name. A group that does not exist (yet) is
/// absent: the edge's translation then refuses the virtual cluster.
pub(crate) fn followed_groups(
    store: &Store,
    vcs: &BTreeMap<String, VirtualClusterSpec>,
) -> BTreeMap<String, FollowedGroup> {
    let mut out = BTreeMap::new();
    for name in vcs.values().filter_map(|v| v.failover_group.as_ref()) {
        let Some(stored) = store.get(&(Kind::FailoverGroup, name.clone())) else {
            continue;
        };
        let spec = match serde_json::from_value::<FailoverGroupSpec>(stored.spec.clone()) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(group = %name, error = %e, "skipping FailoverGroup this client cannot read");
                continue;
            }
        };
        // Only Failover writes the status; one that does not read carries
        // no decision (the state machine counts it the same way).
        let status = serde_json::from_value::<FailoverStatus>(stored.status.clone()).ok();
        out.insert(name.clone(), FollowedGroup { spec, status });
    }
    out
}

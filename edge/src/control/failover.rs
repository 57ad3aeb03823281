//! Virtual clusters behind a FailoverGroup: served from the group's active
//! cluster as the control plane decided it, and reported back in the
//! edge's status so an operator sees every edge reach the new generation.

use anyhow::Context;
use serde_json::{json, Value};
use strait_control_client::state::spec::{
    AppliedFailover, OffsetReset, ReplicationPolicy, VirtualClusterSpec,
};
use strait_control_client::EdgeSnapshot;
use strait_edge_config::Config;

/// The active cluster of `group` and the `upstream.failover` that records
/// it. Fails closed: with an unknown group, or an active cluster the edge
/// was not given (as a KafkaCluster, or behind a peer in `remote_members`),
/// the edge keeps its running configuration rather than guess a member.
pub(super) fn active_cluster<'s>(
    snapshot: &'s EdgeSnapshot,
    virtual_cluster: &str,
    vc: &VirtualClusterSpec,
    group: &str,
) -> anyhow::Result<(&'s str, Value)> {
    let followed = snapshot.failover_groups.get(group).with_context(|| {
        format!("VirtualCluster {virtual_cluster}: FailoverGroup '{group}' is not known")
    })?;
    let (active, generation) = followed.active();
    // MM2 replicates the primary into the standbys; its checkpoints there
    // translate the groups' offsets once a standby is active.
    let checkpoints_topic = followed
        .spec
        .replication
        .as_ref()
        .filter(|_| active != followed.spec.primary)
        .map(|r| {
            r.checkpoints_topic
                .clone()
                .unwrap_or_else(|| format!("{}.checkpoints.internal", r.source_alias))
        });
    // Only where there is a standby to place groups on, as for checkpoints.
    let offset_reset = match followed.spec.replication.as_ref() {
        Some(r) if active != followed.spec.primary => match r.offset_reset {
            OffsetReset::Client => None,
            OffsetReset::Earliest => Some(json!("earliest")),
            OffsetReset::Latest => Some(json!("latest")),
            OffsetReset::BeforeSwitchMs(ms) => {
                let switched_at = followed.status.as_ref().map_or(0, |s| s.at_unix_ms);
                Some(json!({ "timestamp_ms": switched_at.saturating_sub(ms) }))
            }
        },
        _ => None,
    };
    let fence = followed
        .status
        .as_ref()
        .and_then(|s| s.fence.as_ref())
        .map(|f| {
            let replication = followed.spec.replication.as_ref();
            json!({
                "to": f.to,
                "topics": replication.map(|r| r.topics.clone()).unwrap_or_default(),
                "remote_prefix": replication
                    .filter(|r| r.policy == ReplicationPolicy::Default)
                    .map(|r| format!("{}.", r.source_alias)),
            })
        });
    if let Some(member) = vc
        .remote_members
        .keys()
        .find(|m| !followed.spec.is_member(m))
    {
        anyhow::bail!(
            "VirtualCluster {virtual_cluster}: remote_members names '{member}', which is not a member of FailoverGroup '{group}'"
        );
    }
    if !snapshot.kafka_clusters.contains_key(active) && !vc.remote_members.contains_key(active) {
        anyhow::bail!(
            "VirtualCluster {virtual_cluster}: FailoverGroup '{group}' is at generation {generation} on KafkaCluster '{active}', which is not known"
        );
    }
    Ok((
        active,
        json!({ "group": group, "cluster": active, "generation": generation, "fence": fence,
                "checkpoints_topic": checkpoints_topic, "offset_reset": offset_reset }),
    ))
}

/// `EdgeStatus.failover`: the decisions the running configuration follows.
pub fn applied_failover(config: &Config) -> Vec<AppliedFailover> {
    config
        .virtual_clusters
        .iter()
        .filter_map(|vc| {
            let f = vc.upstream.failover.as_ref()?;
            Some(AppliedFailover {
                virtual_cluster: vc.name.clone(),
                group: f.group.clone(),
                cluster: f.cluster.clone(),
                generation: f.generation,
                fenced: f.fence.is_some(),
            })
        })
        .collect()
}

/// `health_probes`: every member of every FailoverGroup a virtual cluster
/// of this edge follows, probed through the member's own upstream (TLS and
/// SASL as the edge would connect), at the group's health policy. The
/// control plane counts what they find; the edge never switches on them.
/// A member whose KafkaCluster is not known here gets no probe (no view is
/// not a vote for up).
pub(super) fn health_probes(snapshot: &EdgeSnapshot, pem_dir: &std::path::Path) -> Vec<Value> {
    let followed: std::collections::BTreeSet<&str> = snapshot
        .virtual_clusters
        .values()
        .filter_map(|vc| vc.failover_group.as_deref())
        .collect();
    // Members this edge reaches through a peer edge are probed through it
    // (the first virtual cluster of the group that names one decides).
    let through_peer = |group: &str, member: &str| {
        snapshot
            .virtual_clusters
            .values()
            .filter(|vc| vc.failover_group.as_deref() == Some(group))
            .find_map(|vc| vc.remote_members.get(member))
    };
    let mut probes = Vec::new();
    for group in followed {
        let Some(g) = snapshot.failover_groups.get(group) else {
            continue;
        };
        let health = &g.spec.health;
        for member in g.spec.members() {
            let upstream = match through_peer(group, member) {
                Some(remote) => json!({ "remote": {
                    "peer": remote.peer, "virtual_cluster": remote.virtual_cluster } }),
                None if snapshot.kafka_clusters.contains_key(member) => {
                    let owner = format!("FailoverGroup {group} member");
                    match super::kafka_upstream(snapshot, &owner, member, pem_dir) {
                        Ok(upstream) => upstream,
                        Err(_) => continue,
                    }
                }
                None => continue,
            };
            probes.push(json!({
                "group": group,
                "cluster": member,
                "interval": format!("{}ms", health.interval_ms),
                "failure_threshold": health.failure_threshold,
                "recovery_threshold": health.recovery_threshold,
                "upstream": upstream,
            }));
        }
    }
    probes
}

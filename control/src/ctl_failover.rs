//! straitctl's failover commands: `failover`, `failback`, and what
//! `get fg` shows of a group (the decision and each edge's view of it).

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use strait_control_client::ControlClient;
use strait_control_state::failover_health::ClusterHealth;
use strait_control_state::spec::{
    AppliedFailover, FailoverGroupSpec, FailoverStatus, ReplicationLag,
};
use strait_control_state::Kind;
use strait_proto::control as pb;

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// The FailoverGroup.
    name: String,
    /// The member to make active; default the first standby that is not.
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
pub struct FailbackArgs {
    /// The FailoverGroup; its primary becomes active again.
    name: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct Common {
    /// A planned switch with nothing lost (maintenance, a drill): fence
    /// produce at every edge, wait until replication has caught up, then
    /// switch; without it, switch now (an outage).
    #[arg(long)]
    planned: bool,
    /// Why, for the group's history and the audit trail.
    #[arg(long)]
    reason: Option<String>,
    /// Switch only if the group is at this generation. Default: the
    /// generation read just before, so that a request retried after an
    /// unknown outcome cannot switch twice.
    #[arg(long = "expect-generation", value_name = "N")]
    expect_generation: Option<u64>,
    /// With --planned: how long to wait for every edge to fence produce and
    /// for replication to catch up before giving up (the fence is lifted).
    #[arg(long = "lag-timeout", value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    lag_timeout: std::time::Duration,
}

/// The decision in force, as the state machine counts it: the status, or
/// the primary at generation 0 before the first failover.
fn in_force(r: &pb::Resource) -> Result<FailoverStatus> {
    let spec: FailoverGroupSpec = serde_json::from_str(&r.spec_json)
        .with_context(|| format!("FailoverGroup/{}: unreadable spec", r.name))?;
    let status = serde_json::from_str(&r.status_json).unwrap_or(Value::Null);
    Ok(spec.in_force(&status))
}

pub async fn run_failover(client: &ControlClient, args: FailoverArgs) -> Result<()> {
    switch(client, &args.name, args.to, false, args.common).await
}

pub async fn run_failback(client: &ControlClient, args: FailbackArgs) -> Result<()> {
    switch(client, &args.name, None, true, args.common).await
}

async fn switch(
    client: &ControlClient,
    name: &str,
    to: Option<String>,
    failback: bool,
    common: Common,
) -> Result<()> {
    let expected = match common.expect_generation {
        Some(n) => n,
        None => {
            let r = client
                .get(Kind::FailoverGroup.as_str(), name)
                .await
                .map_err(crate::status_err)?;
            in_force(&r)?.generation
        }
    };
    if common.planned {
        return crate::ctl_planned::run(
            client,
            crate::ctl_planned::Planned {
                group: name,
                to,
                failback,
                reason: common.reason,
                expected,
                lag_timeout: common.lag_timeout,
            },
        )
        .await;
    }
    let r = client
        .failover(pb::FailoverRequest {
            group: name.to_string(),
            to,
            expected_generation: Some(expected),
            planned: common.planned,
            failback,
            reason: common.reason,
            fence: pb::FenceAction::Switch as i32,
        })
        .await
        .map_err(crate::status_err)?;
    let status: FailoverStatus = serde_json::from_str(&r.status_json)
        .map_err(|e| anyhow!("FailoverGroup/{name}: unreadable status in the answer: {e}"))?;
    println!(
        "FailoverGroup/{name}: active {} at generation {} (was {})",
        status.active,
        status.generation,
        status.previous.as_deref().unwrap_or("-")
    );
    Ok(())
}

/// `status.edges` of one group: what every edge reports it runs, from the
/// `failover` entries of its heartbeat (an edge with several virtual
/// clusters behind the group shows the one furthest behind), and its last
/// health evidence on each member (`health`), which automatic failover
/// counts.
pub fn edges_view(group: &str, edges: &[pb::Resource]) -> Value {
    let mut out = BTreeMap::new();
    for edge in edges {
        // Only `failover` and `health` are read, so an edge newer or older
        // than this straitctl (other status fields) still shows.
        let status = serde_json::from_str::<Value>(&edge.status_json).unwrap_or_default();
        let applied = status
            .get("failover")
            .and_then(|f| serde_json::from_value::<Vec<AppliedFailover>>(f.clone()).ok())
            .unwrap_or_default();
        let health = status
            .get("health")
            .and_then(|h| serde_json::from_value::<Vec<ClusterHealth>>(h.clone()).ok())
            .unwrap_or_default();
        let laggard = applied
            .iter()
            .filter(|f| f.group == group)
            .min_by_key(|f| (f.generation, f.virtual_cluster.clone()));
        let mut view = match laggard {
            Some(f) => json!({
                "generation": f.generation,
                "cluster": f.cluster,
                "virtual_cluster": f.virtual_cluster,
            }),
            None => json!({}),
        };
        let members: BTreeMap<&str, Value> = health
            .iter()
            .filter(|h| h.group == group)
            .map(|h| {
                let mut v = json!({
                    "state": h.state,
                    "consecutive_failures": h.consecutive_failures,
                    "checked_at_unix_ms": h.checked_at_unix_ms,
                });
                if let Some(e) = &h.last_error {
                    v["last_error"] = json!(e);
                }
                (h.cluster.as_str(), v)
            })
            .collect();
        if !members.is_empty() {
            view["health"] = json!(members);
        }
        if laggard.is_some_and(|f| f.fenced) {
            view["fenced"] = json!(true);
        }
        let replication = status
            .get("replication")
            .and_then(|r| serde_json::from_value::<Vec<ReplicationLag>>(r.clone()).ok())
            .unwrap_or_default();
        if let Some(r) = replication.into_iter().find(|r| r.group == group) {
            view["replication"] = serde_json::to_value(&r).unwrap_or_default();
        }
        if view.as_object().is_some_and(|o| !o.is_empty()) {
            out.insert(edge.name.clone(), view);
        }
    }
    json!(out)
}

/// Rewrites the status of each FailoverGroup in `rows` to what it means:
/// the decision in force (also before the first failover) and `edges`.
pub fn annotate(rows: &mut [pb::Resource], edges: &[pb::Resource]) {
    for r in rows
        .iter_mut()
        .filter(|r| r.kind == Kind::FailoverGroup.as_str())
    {
        let mut v = match serde_json::from_str::<FailoverStatus>(&r.status_json) {
            Ok(status) => serde_json::to_value(&status).unwrap_or_default(),
            Err(_) => match in_force(r) {
                // Nothing recorded yet: only what is in force.
                Ok(s) => json!({ "active": s.active, "generation": s.generation }),
                Err(_) => continue,
            },
        };
        v["edges"] = edges_view(&r.name, edges);
        r.status_json = v.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(kind: &str, name: &str, spec: Value, status: Value) -> pb::Resource {
        pb::Resource {
            kind: kind.into(),
            name: name.into(),
            spec_json: spec.to_string(),
            status_json: if status.is_null() {
                String::new()
            } else {
                status.to_string()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_group_shows_its_decision_and_every_edges_generation() {
        let applied = |vc: &str, cluster: &str, generation: u64| json!({"virtual_cluster": vc, "group": "pay", "cluster": cluster, "generation": generation});
        let edges = vec![
            res(
                "Edge",
                "east",
                json!({}),
                json!({"last_heartbeat_unix_ms": 1, "failover": [applied("pay", "west", 2)],
                       "health": [{"group": "pay", "cluster": "east", "state": "down",
                                   "consecutive_failures": 4, "consecutive_successes": 0,
                                   "last_error": "connection refused", "checked_at_unix_ms": 9},
                                  {"group": "other", "cluster": "x", "state": "up",
                                   "checked_at_unix_ms": 9}],
                       "a_field_of_a_newer_edge": true}),
            ),
            // Two virtual clusters behind the group: the one behind counts.
            res(
                "Edge",
                "north",
                json!({}),
                json!({"last_heartbeat_unix_ms": 1,
                       "failover": [applied("pay-a", "west", 2), applied("pay-b", "east", 1)]}),
            ),
            res(
                "Edge",
                "idle",
                json!({}),
                json!({"last_heartbeat_unix_ms": 1}),
            ),
        ];
        let spec = json!({"primary": "east", "standby": ["west"]});
        let mut rows = vec![
            res(
                "FailoverGroup",
                "pay",
                spec.clone(),
                json!({"active": "west", "generation": 2, "previous": "east",
                       "by": "spiffe://d/admin/a", "at_unix_ms": 7}),
            ),
            res("FailoverGroup", "fresh", spec, Value::Null),
        ];
        annotate(&mut rows, &edges);
        let pay: Value = serde_json::from_str(&rows[0].status_json).unwrap();
        assert_eq!(pay["active"], "west");
        assert_eq!(pay["generation"], 2);
        assert_eq!(
            pay["edges"],
            json!({
                "east": {"generation": 2, "cluster": "west", "virtual_cluster": "pay",
                         "health": {"east": {"state": "down", "consecutive_failures": 4,
                                             "checked_at_unix_ms": 9, "last_error": "connection refused"}}},
                "north": {"generation": 1, "cluster": "east", "virtual_cluster": "pay-b"},
            })
        );
        // Before the first failover: the primary at generation 0.
        let fresh: Value = serde_json::from_str(&rows[1].status_json).unwrap();
        assert_eq!(
            (fresh["active"].clone(), fresh["generation"].clone()),
            (json!("east"), json!(0))
        );
        assert_eq!(fresh["edges"], json!({}));
    }
}

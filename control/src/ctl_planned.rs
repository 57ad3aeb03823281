//! `straitctl failover NAME --planned`: a switchover with nothing lost.
//! 1. Raise the group's produce fence (one Raft entry, compare-and-set on
//!    the generation): every edge answers Produce with a retriable error
//!    and measures the replication to the target.
//! 2. Wait until every edge serving the group reports the fence in force
//!    and, in a measurement made after all of them were fenced, that the
//!    target ends with the active cluster's last record on every mirrored
//!    partition.
//! 3. Switch (the same entry as an unplanned failover, which clears the
//!    fence); clients retry their fenced batches on the new cluster.
//!
//! If that does not happen within `--lag-timeout`, the fence is lifted and
//! the group stays where it was: producers resume on the active cluster.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use strait_control_client::ControlClient;
use strait_control_state::spec::{AppliedFailover, EdgeStatus, FailoverStatus, ReplicationLag};
use strait_control_state::Kind;
use strait_proto::control as pb;

/// An edge whose heartbeat is older than this does not count as fenced:
/// it may be cut off from the control plane and still producing.
const FRESH_MS: u64 = 10_000;
/// A measurement counts if it ended this long after the one seen when the
/// last edge reported the fence (one full measurement cycle later).
const AFTER_FENCE_MS: u64 = 1_000;
const POLL: Duration = Duration::from_millis(250);

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub struct Planned<'a> {
    pub group: &'a str,
    pub to: Option<String>,
    pub failback: bool,
    pub reason: Option<String>,
    pub expected: u64,
    pub lag_timeout: Duration,
}

fn request(p: &Planned<'_>, to: Option<String>, fence: pb::FenceAction) -> pb::FailoverRequest {
    pb::FailoverRequest {
        group: p.group.to_string(),
        to,
        expected_generation: Some(p.expected),
        planned: true,
        failback: p.failback,
        reason: p.reason.clone(),
        fence: fence as i32,
    }
}

fn status_of(r: &pb::Resource) -> Result<FailoverStatus> {
    serde_json::from_str(&r.status_json).map_err(|e| {
        anyhow!(
            "FailoverGroup/{}: unreadable status in the answer: {e}",
            r.name
        )
    })
}

pub async fn run(client: &ControlClient, p: Planned<'_>) -> Result<()> {
    let name = p.group;
    let raised = client
        .failover(request(&p, p.to.clone(), pb::FenceAction::Raise))
        .await
        .map_err(crate::status_err)?;
    let status = status_of(&raised)?;
    let fence = status
        .fence
        .ok_or_else(|| anyhow!("FailoverGroup/{name}: the fence was not recorded"))?;
    println!(
        "FailoverGroup/{name}: produce fenced at generation {} for a switch from {} to {}",
        status.generation, status.active, fence.to
    );
    let started = Instant::now();
    let mut waiting = Waiting::default();
    let mut said = String::new();
    let outcome = loop {
        let edges = client
            .list(Kind::Edge.as_str(), "")
            .await
            .map_err(crate::status_err)?;
        match waiting.observe(name, p.expected, &edges.resources, now_unix_ms()) {
            Ok(()) => break Ok(()),
            Err(why) => {
                if why != said {
                    println!("  waiting: {why}");
                    said = why.clone();
                }
                if started.elapsed() >= p.lag_timeout {
                    break Err(why);
                }
            }
        }
        tokio::time::sleep(POLL).await;
    };
    if let Err(why) = outcome {
        let lifted = client
            .failover(request(&p, None, pb::FenceAction::Lift))
            .await;
        let after = match lifted {
            Ok(_) => format!("produce unfenced, {} stays active", status.active),
            Err(e) => format!("and lifting the fence failed too: {}", e.message()),
        };
        bail!(
            "FailoverGroup/{name}: no switch, replication did not catch up within {:?} ({why}); {after}",
            p.lag_timeout
        );
    }
    let caught_up = started.elapsed();
    let switched = client
        .failover(request(&p, Some(fence.to.clone()), pb::FenceAction::Switch))
        .await
        .map_err(crate::status_err)?;
    let status = status_of(&switched)?;
    println!(
        "FailoverGroup/{name}: active {} at generation {} (was {}); replication caught up {:.1} s after the fence",
        status.active,
        status.generation,
        status.previous.as_deref().unwrap_or("-"),
        caught_up.as_secs_f64()
    );
    Ok(())
}

/// What the wait has seen so far.
#[derive(Default)]
struct Waiting {
    /// Per edge, the end of its last measurement when every edge had
    /// reported the fence; None until then.
    fenced_marks: Option<BTreeMap<String, u64>>,
}

impl Waiting {
    /// Ok once the switch is safe; otherwise why not yet.
    fn observe(
        &mut self,
        group: &str,
        generation: u64,
        edges: &[pb::Resource],
        now: u64,
    ) -> Result<(), String> {
        let mut serving: BTreeMap<String, (EdgeStatus, bool)> = BTreeMap::new();
        for e in edges {
            let Ok(status) = serde_json::from_str::<EdgeStatus>(&e.status_json) else {
                continue;
            };
            let entries: Vec<&AppliedFailover> = status
                .failover
                .iter()
                .filter(|f| f.group == group)
                .collect();
            if entries.is_empty() {
                continue;
            }
            let fenced = entries
                .iter()
                .all(|f| f.fenced && f.generation == generation);
            serving.insert(e.name.clone(), (status, fenced));
        }
        if serving.is_empty() {
            return Err("no edge reports serving the group".into());
        }
        let stale: Vec<&str> = serving
            .iter()
            .filter(|(_, (s, _))| now.saturating_sub(s.last_heartbeat_unix_ms) > FRESH_MS)
            .map(|(n, _)| n.as_str())
            .collect();
        if !stale.is_empty() {
            return Err(format!("no recent heartbeat from {}", stale.join(", ")));
        }
        let unfenced: Vec<&str> = serving
            .iter()
            .filter(|(_, (_, fenced))| !fenced)
            .map(|(n, _)| n.as_str())
            .collect();
        if !unfenced.is_empty() {
            return Err(format!("not fenced yet: {}", unfenced.join(", ")));
        }
        let lag = |s: &EdgeStatus| -> Option<ReplicationLag> {
            s.replication.iter().find(|r| r.group == group).cloned()
        };
        let marks = self.fenced_marks.get_or_insert_with(|| {
            serving
                .iter()
                .map(|(n, (s, _))| (n.clone(), lag(s).map_or(0, |r| r.checked_at_unix_ms)))
                .collect()
        });
        let mut not_yet = Vec::new();
        for (edge, (s, _)) in &serving {
            let mark = marks.get(edge).copied().unwrap_or(0);
            match lag(s) {
                Some(r) if r.caught_up && r.checked_at_unix_ms >= mark + AFTER_FENCE_MS => {}
                Some(r) if !r.behind.is_empty() => {
                    not_yet.push(format!("{edge}: {} behind ({})", r.to, r.behind.join(", ")))
                }
                Some(r) if r.error.is_some() => {
                    not_yet.push(format!("{edge}: {}", r.error.unwrap_or_default()))
                }
                Some(_) => not_yet.push(format!("{edge}: measuring")),
                None => not_yet.push(format!("{edge}: no replication measurement yet")),
            }
        }
        if not_yet.is_empty() {
            Ok(())
        } else {
            Err(not_yet.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn edge(name: &str, heartbeat: u64, fenced: bool, lag: Option<(bool, u64)>) -> pb::Resource {
        let mut status = json!({
            "last_heartbeat_unix_ms": heartbeat,
            "failover": [{"virtual_cluster": "vc", "group": "g", "cluster": "east", "generation": 4, "fenced": fenced}],
        });
        if let Some((caught_up, at)) = lag {
            status["replication"] = json!([{"group": "g", "from": "east", "to": "west", "caught_up": caught_up,
                                             "partitions": 3, "checked_at_unix_ms": at}]);
        }
        pb::Resource {
            kind: "Edge".into(),
            name: name.into(),
            status_json: status.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn the_switch_waits_for_every_edge_fenced_then_a_later_caught_up_measurement() {
        let now = 100_000;
        let mut w = Waiting::default();
        // One edge not fenced yet: no switch, whatever the other measured.
        let edges = [
            edge("a", now, true, Some((true, now))),
            edge("b", now, false, None),
        ];
        assert_eq!(
            w.observe("g", 4, &edges, now).unwrap_err(),
            "not fenced yet: b"
        );
        // A silent edge may be cut off and still producing.
        let edges = [
            edge("a", now, true, Some((true, now))),
            edge("b", now - 20_000, true, None),
        ];
        assert_eq!(
            w.observe("g", 4, &edges, now).unwrap_err(),
            "no recent heartbeat from b"
        );
        // Both fenced: the measurements seen now were (maybe) made before.
        let edges = [
            edge("a", now, true, Some((true, now))),
            edge("b", now, true, Some((true, now))),
        ];
        assert!(w.observe("g", 4, &edges, now).is_err());
        // Only measurements a cycle later count, from every edge.
        let edges = [
            edge("a", now, true, Some((true, now + 1_000))),
            edge("b", now, true, Some((false, now + 1_000))),
        ];
        assert_eq!(w.observe("g", 4, &edges, now).unwrap_err(), "b: measuring");
        let edges = [
            edge("a", now, true, Some((true, now + 1_000))),
            edge("b", now, true, Some((true, now + 1_500))),
        ];
        assert_eq!(w.observe("g", 4, &edges, now), Ok(()));
        // Fenced at another generation does not count.
        let mut w = Waiting::default();
        assert_eq!(
            w.observe("g", 5, &edges, now).unwrap_err(),
            "not fenced yet: a, b"
        );
    }
}

//! The failover controller: on the Raft leader only, it gathers health
//! evidence for every FailoverGroup in `mode: automatic` (each edge's
//! `status.health`, plus the leader's own probe of the members) and
//! proposes the switch [`automatic_decision`] calls for, with
//! compare-and-set on the generation, so a switch an operator made in the
//! meantime, or a second leader for a moment, cannot make two.
//!
//! Edges never switch on their own: one cut off from the control plane
//! keeps its last generation, whatever its own probes say.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use strait_control_raft::Node;
use strait_control_state::failover_health::{
    automatic_decision, Decision, HealthState, ProbeCounter, Vote,
};
use strait_control_state::spec::{EdgeStatus, FailoverGroupSpec, KafkaClusterSpec};
use strait_control_state::{typed, Command, Kind, Outcome, Selector};
use tokio::task::JoinSet;

use crate::access::{Access, Authorizer, Caller, ControlMethod, Operation};
use crate::status_of;

/// How often the controller looks at the evidence.
const TICK: Duration = Duration::from_millis(200);
/// Evidence older than this (by the observer's clock, compared with the
/// leader's) is not counted: an edge that stopped reporting has no vote.
const MIN_STALE_AFTER_MS: u64 = 10_000;
/// The longest the leader's own probe waits for a TCP connection.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
pub const CONTROL_PLANE_OBSERVER: &str = "control-plane";

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs until the process ends.
pub fn spawn_failover_controller(node: Node, authz: Authorizer) {
    tokio::spawn(async move {
        let mut controller = Controller {
            node,
            authz,
            probes: HashMap::new(),
            last_said: HashMap::new(),
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            controller.tick().await;
        }
    });
}

/// The leader's own probe of one member: its counter and when it is due.
struct Probe {
    counter: ProbeCounter,
    next_at_ms: u64,
}

struct Controller {
    node: Node,
    authz: Authorizer,
    /// (group, cluster) → the leader's own view; cleared when this node is
    /// not the leader, so a new leader starts from `unknown`.
    probes: HashMap<(String, String), Probe>,
    /// The last reason logged per group, so the log says only changes.
    last_said: HashMap<String, String>,
}

/// What one tick needs from the state, copied out of the lock.
struct Snapshot {
    groups: Vec<(String, FailoverGroupSpec, serde_json::Value)>,
    clusters: BTreeMap<String, KafkaClusterSpec>,
    edges: Vec<(String, EdgeStatus)>,
}

impl Controller {
    fn snapshot(&self) -> Snapshot {
        let state = self.node.state();
        let all = Selector::default();
        let groups = state
            .list(Some(Kind::FailoverGroup), &all)
            .filter_map(|r| {
                let spec: FailoverGroupSpec = typed(&r.spec).ok()?;
                Some((r.name.clone(), spec, r.status.clone()))
            })
            .collect();
        let clusters = state
            .list(Some(Kind::KafkaCluster), &all)
            .filter_map(|r| Some((r.name.clone(), typed(&r.spec).ok()?)))
            .collect();
        let edges = state
            .list(Some(Kind::Edge), &all)
            .filter_map(|r| {
                let status: EdgeStatus = serde_json::from_value(r.status.clone()).ok()?;
                Some((r.name.clone(), status))
            })
            .collect();
        Snapshot {
            groups,
            clusters,
            edges,
        }
    }

    async fn tick(&mut self) {
        let status = self.node.status();
        if status.leader_id != status.id {
            self.probes.clear();
            self.last_said.clear();
            return;
        }
        let snapshot = self.snapshot();
        let now = now_unix_ms();
        self.run_probes(&snapshot, now).await;
        for (name, spec, status_json) in &snapshot.groups {
            if spec.mode != strait_control_state::spec::FailoverMode::Automatic {
                continue;
            }
            let in_force = spec.in_force(status_json);
            let votes = self.votes(name, spec, &snapshot, now);
            match automatic_decision(spec, &in_force, &votes, now) {
                Decision::Stay(why) => {
                    if self.last_said.get(name) != Some(&why) {
                        tracing::info!(group = %name, generation = in_force.generation, "failover controller: {why}");
                        self.last_said.insert(name.clone(), why);
                    }
                }
                Decision::Switch {
                    to,
                    from_generation,
                    failback,
                    reason,
                } => {
                    self.switch(name, to, from_generation, failback, reason)
                        .await
                }
            }
        }
    }

    /// Every observer's latest view of every member of `group`.
    fn votes(
        &self,
        group: &str,
        spec: &FailoverGroupSpec,
        snapshot: &Snapshot,
        now: u64,
    ) -> Vec<Vote> {
        let stale_after = MIN_STALE_AFTER_MS.max(spec.health.interval_ms.saturating_mul(4));
        let mut votes = Vec::new();
        for (edge, status) in &snapshot.edges {
            if now.saturating_sub(status.last_heartbeat_unix_ms) > stale_after {
                continue;
            }
            for h in status.health.iter().filter(|h| h.group == group) {
                if !spec.is_member(&h.cluster) {
                    continue;
                }
                let fresh = now.saturating_sub(h.checked_at_unix_ms) <= stale_after;
                votes.push(Vote {
                    observer: format!("edge/{edge}"),
                    cluster: h.cluster.clone(),
                    // A view too old to trust is no view.
                    state: if fresh { h.state } else { HealthState::Unknown },
                });
            }
        }
        if spec.health.control_plane_probe {
            for member in spec.members() {
                let state = self
                    .probes
                    .get(&(group.to_string(), member.to_string()))
                    .map_or(HealthState::Unknown, |p| p.counter.state);
                votes.push(Vote {
                    observer: CONTROL_PLANE_OBSERVER.into(),
                    cluster: member.to_string(),
                    state,
                });
            }
        }
        votes
    }

    /// The leader's own probes that are due: a TCP connection to any of
    /// the member's bootstrap servers. The brokers' TLS and SASL are the
    /// edges' to hold, so this is the weaker evidence; the edges' probes
    /// speak Kafka.
    async fn run_probes(&mut self, snapshot: &Snapshot, now: u64) {
        let mut due = JoinSet::new();
        for (group, spec, _) in &snapshot.groups {
            if spec.mode != strait_control_state::spec::FailoverMode::Automatic
                || !spec.health.control_plane_probe
            {
                continue;
            }
            for member in spec.members() {
                let key = (group.clone(), member.to_string());
                let probe = self.probes.entry(key.clone()).or_insert(Probe {
                    counter: ProbeCounter::default(),
                    next_at_ms: now,
                });
                if probe.next_at_ms > now {
                    continue;
                }
                probe.next_at_ms = now + spec.health.interval_ms;
                let servers = snapshot
                    .clusters
                    .get(member)
                    .map(|c| c.bootstrap_servers.clone())
                    .unwrap_or_default();
                let timeout = Duration::from_millis(spec.health.interval_ms).min(MAX_PROBE_TIMEOUT);
                due.spawn(async move { (key, tcp_probe(&servers, timeout).await) });
            }
        }
        while let Some(done) = due.join_next().await {
            let Ok((key, ok)) = done else { continue };
            let Some(spec) = snapshot.groups.iter().find(|g| g.0 == key.0).map(|g| &g.1) else {
                continue;
            };
            if let Some(probe) = self.probes.get_mut(&key) {
                let before = probe.counter.state;
                let after = probe.counter.observe(ok, &spec.health);
                if before != after {
                    tracing::info!(group = %key.0, cluster = %key.1, state = ?after, "failover controller: the control plane's probe changed its view");
                }
            }
        }
    }

    async fn switch(
        &mut self,
        group: &str,
        to: String,
        from_generation: u64,
        failback: bool,
        reason: String,
    ) {
        let by = format!("failover-controller (control node {})", self.node.id());
        let cmd = Command::Failover {
            group: group.to_string(),
            to: Some(to.clone()),
            expected_generation: Some(from_generation),
            planned: false,
            failback,
            reason: Some(reason.clone()),
            by,
            at_unix_ms: now_unix_ms(),
            fence: Default::default(),
        };
        let access = Access::resource(
            Operation::Control(ControlMethod::Failover),
            Kind::FailoverGroup,
            group,
        );
        let result = self.node.propose(&cmd).await.map_err(status_of);
        match &result {
            Ok(Outcome::StatusUpdated { .. }) => {
                tracing::warn!(group = %group, to = %to, generation = from_generation + 1, "automatic failover: {reason}");
                self.last_said.remove(group);
            }
            Ok(other) => {
                tracing::warn!(group = %group, "automatic failover: unexpected outcome {other:?}")
            }
            // Someone else switched first (an operator, or this node's
            // previous term): the next tick sees the new decision.
            Err(s) => {
                tracing::warn!(group = %group, to = %to, "automatic failover not committed: {}", s.message())
            }
        }
        self.authz
            .audit_write(&Caller::Local("failover-controller"), &access, &result);
    }
}

/// Whether any of `servers` takes a TCP connection within `timeout`.
async fn tcp_probe(servers: &[String], timeout: Duration) -> bool {
    for server in servers {
        if let Ok(Ok(_)) =
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(server)).await
        {
            return true;
        }
    }
    false
}

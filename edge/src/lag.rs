//! Replication lag of a planned switchover: while a FailoverGroup's produce
//! is fenced, this edge compares the active cluster with the fence's
//! target, partition by partition, and reports in its heartbeat
//! (`EdgeStatus.replication`) whether the target has caught up. straitctl
//! switches once every edge serving the group is fenced and reports so.
//!
//! Caught up means, for every partition of the mirrored topics: the
//! target's last data record is the active cluster's last data record
//! (offset aside: MirrorMaker 2 keeps timestamps, keys and values, not
//! offsets), and the active cluster's end offsets did not move since the
//! measurement before (nothing was still being written, e.g. by a request
//! sent before the fence).

pub(crate) mod tails;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use strait_control_client::state::spec::ReplicationLag;
use strait_edge_config::{Config, Upstream as UpstreamConfig};
use strait_proxy::upstream::Upstream;
use strait_proxy::RemoteUpstreams;
use tokio_util::sync::CancellationToken;

use crate::health::now_unix_ms;
use tails::{Tail, Tails};

const INTERVAL: Duration = Duration::from_millis(500);
/// Partitions named in a report, at most.
const NAMED: usize = 5;

/// One fenced group to measure, from the running configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LagCheck {
    pub group: String,
    pub from: String,
    pub to: String,
    pub topics: Vec<String>,
    pub remote_prefix: Option<String>,
    /// The two members' upstreams, from this edge's `health_probes`.
    pub from_upstream: Option<UpstreamConfig>,
    pub to_upstream: Option<UpstreamConfig>,
}

/// The checks `config` calls for: one per fenced group.
pub fn wanted(config: &Config) -> Vec<LagCheck> {
    let upstream_of = |group: &str, cluster: &str| {
        config
            .health_probes
            .iter()
            .find(|p| p.group == group && p.cluster == cluster)
            .map(|p| p.upstream.clone())
    };
    let mut out: Vec<LagCheck> = Vec::new();
    for vc in &config.virtual_clusters {
        let Some(f) = &vc.upstream.failover else {
            continue;
        };
        let Some(fence) = &f.fence else { continue };
        if out.iter().any(|c| c.group == f.group) {
            continue;
        }
        out.push(LagCheck {
            group: f.group.clone(),
            from: f.cluster.clone(),
            to: fence.to.clone(),
            topics: fence.topics.clone(),
            remote_prefix: fence.remote_prefix.clone(),
            from_upstream: upstream_of(&f.group, &f.cluster),
            to_upstream: upstream_of(&f.group, &fence.to),
        });
    }
    out
}

/// The running checks; dropping it stops them.
pub struct LagChecks {
    config: Vec<LagCheck>,
    reports: Arc<Mutex<Vec<ReplicationLag>>>,
    _stop: tokio_util::sync::DropGuard,
}

impl LagChecks {
    /// `remote`: the mesh's tunnels, for members behind a peer edge.
    pub fn start(checks: Vec<LagCheck>, remote: Option<Arc<dyn RemoteUpstreams>>) -> LagChecks {
        let stop = CancellationToken::new();
        let reports = Arc::new(Mutex::new(Vec::new()));
        for check in &checks {
            tokio::spawn(run(
                check.clone(),
                remote.clone(),
                reports.clone(),
                stop.child_token(),
            ));
        }
        LagChecks {
            config: checks,
            reports,
            _stop: stop.drop_guard(),
        }
    }

    pub fn config(&self) -> &[LagCheck] {
        &self.config
    }

    pub fn reports(&self) -> Vec<ReplicationLag> {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn connect(
    owner: &str,
    config: &Option<UpstreamConfig>,
    cluster: &str,
    remote: Option<&Arc<dyn RemoteUpstreams>>,
    stop: &CancellationToken,
) -> Result<Arc<dyn Upstream>, String> {
    let config = config
        .as_ref()
        .ok_or_else(|| format!("no upstream for KafkaCluster '{cluster}' (health_probes)"))?;
    strait_proxy::own_upstream_of(owner, config, remote, None, stop.clone())
        .map_err(|e| e.to_string())
}

async fn run(
    check: LagCheck,
    remote: Option<Arc<dyn RemoteUpstreams>>,
    reports: Arc<Mutex<Vec<ReplicationLag>>>,
    stop: CancellationToken,
) {
    let owner = format!("replication check {}", check.group);
    let remote = remote.as_ref();
    let upstreams =
        connect(&owner, &check.from_upstream, &check.from, remote, &stop).and_then(|from| {
            Ok((
                from,
                connect(&owner, &check.to_upstream, &check.to, remote, &stop)?,
            ))
        });
    let filter = topic_filter(&check.topics);
    let mut previous_ends: Option<BTreeMap<(String, i32), i64>> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut report = ReplicationLag {
            group: check.group.clone(),
            from: check.from.clone(),
            to: check.to.clone(),
            caught_up: false,
            partitions: 0,
            behind: Vec::new(),
            error: None,
            checked_at_unix_ms: 0,
        };
        let measured = match (&upstreams, &filter) {
            (Ok((from, to)), Ok(filter)) => {
                measure(
                    from.as_ref(),
                    to.as_ref(),
                    filter,
                    check.remote_prefix.as_deref(),
                )
                .await
            }
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        match measured {
            Ok((from_tails, to_tails)) => {
                let ends: BTreeMap<_, _> =
                    from_tails.iter().map(|(k, t)| (k.clone(), t.end)).collect();
                let behind = compare(&from_tails, &to_tails, check.remote_prefix.as_deref());
                let still = previous_ends.as_ref() != Some(&ends);
                report.partitions = u32::try_from(from_tails.len()).unwrap_or(u32::MAX);
                report.caught_up = behind.is_empty() && !still;
                report.behind = behind.into_iter().take(NAMED).collect();
                if still && report.behind.is_empty() {
                    report.error =
                        Some("the active cluster's end offsets moved since the last check".into());
                }
                previous_ends = Some(ends);
            }
            Err(e) => {
                previous_ends = None;
                report.error = Some(e);
            }
        }
        report.checked_at_unix_ms = now_unix_ms();
        let mut all = reports.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|r| r.group != report.group);
        all.push(report);
    }
}

/// Topics to compare: the globs, or every topic but internal ones and
/// MirrorMaker 2's own.
fn topic_filter(globs: &[String]) -> Result<Option<GlobSet>, String> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).map_err(|e| format!("topic glob '{g}': {e}"))?);
    }
    b.build().map(Some).map_err(|e| e.to_string())
}

fn is_replication_internal(topic: &str) -> bool {
    topic.starts_with("__")
        || topic.starts_with("mm2-")
        || topic.ends_with(".internal")
        || topic == "heartbeats"
        || topic.ends_with(".heartbeats")
}

async fn measure(
    from: &dyn Upstream,
    to: &dyn Upstream,
    filter: &Option<GlobSet>,
    remote_prefix: Option<&str>,
) -> Result<(Tails, Tails), String> {
    let names: Vec<String> = tails::topic_names(from)
        .await
        .map_err(|e| format!("active cluster: {e}"))?
        .into_iter()
        .filter(|(name, internal)| !internal && !is_replication_internal(name))
        .filter(|(name, _)| filter.as_ref().is_none_or(|f| f.is_match(name)))
        .map(|(name, _)| name)
        .collect();
    let from_tails = tails::tails(from, &names)
        .await
        .map_err(|e| format!("active cluster: {e}"))?;
    let remote: Vec<String> = names
        .iter()
        .map(|n| remote_name(n, remote_prefix))
        .collect();
    let to_tails = tails::tails(to, &remote)
        .await
        .map_err(|e| format!("target cluster: {e}"))?;
    Ok((from_tails, to_tails))
}

fn remote_name(topic: &str, prefix: Option<&str>) -> String {
    format!("{}{topic}", prefix.unwrap_or(""))
}

/// The partitions of `from` whose last data record `to` does not end with,
/// as `topic-N`.
fn compare(from: &Tails, to: &Tails, remote_prefix: Option<&str>) -> Vec<String> {
    let mut behind = Vec::new();
    for ((topic, partition), tail) in from {
        let remote = to.get(&(remote_name(topic, remote_prefix), *partition));
        let caught_up = match (&tail.last, remote) {
            // Nothing (left) in the partition: nothing to replicate.
            (None, _) if tail.end == tail.start => true,
            // Only control records near the end: cannot tell, so not yet.
            (None, _) => false,
            (Some(_), None) => false,
            (
                Some((_, ts, key, value)),
                Some(Tail {
                    last: Some((_, rts, rkey, rvalue)),
                    ..
                }),
            ) => ts == rts && key == rkey && value == rvalue,
            (Some(_), Some(_)) => false,
        };
        if !caught_up {
            behind.push(format!("{topic}-{partition}"));
        }
    }
    behind
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn tail(end: i64, last: Option<(i64, &'static str)>) -> Tail {
        Tail {
            end,
            start: 0,
            last: last.map(|(ts, v)| (end - 1, ts, None, Some(Bytes::from_static(v.as_bytes())))),
        }
    }

    #[test]
    fn a_partition_is_caught_up_when_the_target_ends_with_its_last_record() {
        let mut from = Tails::new();
        from.insert(("orders".into(), 0), tail(10, Some((7, "r9"))));
        from.insert(("orders".into(), 1), tail(5, Some((8, "r4"))));
        from.insert(("orders".into(), 2), tail(0, None));
        from.insert(("orders".into(), 3), tail(3, None));
        from.insert(("audit".into(), 0), tail(2, Some((9, "a1"))));
        let mut to = Tails::new();
        // Offsets differ (MM2 started later); the last record is the same.
        to.insert(("east.orders".into(), 0), tail(4, Some((7, "r9"))));
        // Behind: an older record last.
        to.insert(("east.orders".into(), 1), tail(4, Some((6, "r3"))));
        // An empty partition needs nothing.
        to.insert(("east.orders".into(), 2), tail(0, None));
        // `east.audit` missing altogether; orders-3 holds control records only.
        assert_eq!(
            compare(&from, &to, Some("east.")),
            vec!["audit-0", "orders-1", "orders-3"]
        );
        // The same timestamp and value under identity naming.
        let mut same = Tails::new();
        same.insert(("audit".into(), 0), tail(2, Some((9, "a1"))));
        let mut only_audit = Tails::new();
        only_audit.insert(("audit".into(), 0), tail(2, Some((9, "a1"))));
        assert!(compare(&only_audit, &same, None).is_empty());
    }

    #[test]
    fn internal_topics_are_not_compared() {
        for t in [
            "__consumer_offsets",
            "mm2-offset-syncs.west.internal",
            "east.checkpoints.internal",
            "heartbeats",
            "east.heartbeats",
        ] {
            assert!(is_replication_internal(t), "{t}");
        }
        assert!(!is_replication_internal("orders"));
    }
}

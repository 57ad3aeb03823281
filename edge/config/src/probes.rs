//! `health_probes:` the member clusters of failover groups this edge
//! probes, so the control plane can count its view as evidence for an
//! automatic failover. A control-plane-configured edge gets one per member
//! of each group it serves; the edge only reports, it never switches.

use std::time::Duration;

use serde::Deserialize;

use crate::raw::RawUpstream;
use crate::validate::{validate_upstream, Errors};
use crate::Upstream;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthProbe {
    pub group: String,
    pub cluster: String,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    pub failure_threshold: Option<u32>,
    pub recovery_threshold: Option<u32>,
    pub upstream: RawUpstream,
}

/// One member cluster to probe (a Kafka ApiVersions exchange through
/// `upstream`, TLS and SASL included, within `interval`). A member behind a
/// peer edge has `upstream.remote` and is probed through the tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthProbe {
    pub group: String,
    pub cluster: String,
    pub interval: Duration,
    /// Consecutive failures before the cluster counts as down.
    pub failure_threshold: u32,
    /// Consecutive successes before a down cluster counts as up again.
    pub recovery_threshold: u32,
    pub upstream: Upstream,
}

pub(crate) fn validate_probes(
    raw: &[RawHealthProbe],
    mesh: Option<&crate::mesh::RawMesh>,
    errors: &mut Errors,
) -> Vec<HealthProbe> {
    let mut probes = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let path = format!("health_probes[{i}]");
        let before = errors.0.len();
        for (field, value) in [("group", &p.group), ("cluster", &p.cluster)] {
            if value.trim().is_empty() {
                errors.push(format!("{path}.{field}"), "must not be empty");
            }
        }
        if raw[..i]
            .iter()
            .any(|q| q.group == p.group && q.cluster == p.cluster)
        {
            errors.push(
                format!("{path}.cluster"),
                format!("'{}' of group '{}' is probed twice", p.cluster, p.group),
            );
        }
        let interval = p.interval.unwrap_or(Duration::from_secs(1));
        if interval < Duration::from_millis(10) {
            errors.push(format!("{path}.interval"), "must be at least 10ms");
        }
        let threshold = |v: Option<u32>, field: &str, errors: &mut Errors| {
            let v = v.unwrap_or(3);
            if v == 0 {
                errors.push(format!("{path}.{field}"), "must be positive");
            }
            v
        };
        let failure_threshold = threshold(p.failure_threshold, "failure_threshold", errors);
        let recovery_threshold = threshold(p.recovery_threshold, "recovery_threshold", errors);
        if p.upstream.failover.is_some() {
            errors.push(
                format!("{path}.upstream.failover"),
                "a probe reaches one member: bootstrap_servers (with tls, sasl) or remote, and connect_timeout",
            );
        }
        let upstream = validate_upstream(&p.upstream, &format!("{path}.upstream"), mesh, errors);
        if errors.0.len() != before {
            continue;
        }
        if let Some(upstream) = upstream {
            probes.push(HealthProbe {
                group: p.group.clone(),
                cluster: p.cluster.clone(),
                interval,
                failure_threshold,
                recovery_threshold,
                upstream,
            });
        }
    }
    probes
}

#[cfg(test)]
mod tests {
    #[test]
    fn probes_are_validated_with_their_paths() {
        let yaml = r#"
virtual_clusters: []
health_probes:
  - { group: dr, cluster: east, interval: 500ms, upstream: { bootstrap_servers: ["127.0.0.1:9092"] } }
  - { group: dr, cluster: east, failure_threshold: 0, upstream: { bootstrap_servers: ["nohost"] } }
  - { group: dr, cluster: west, interval: 1ms, upstream: { remote: { peer: p, virtual_cluster: v } } }
"#;
        let raw = crate::parse_raw(yaml).unwrap();
        let errors = crate::validate::validate_with(&raw, true).unwrap_err();
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "health_probes[1].cluster",
            "health_probes[1].failure_threshold",
            "health_probes[1].upstream.bootstrap_servers[0]",
            "health_probes[2].interval",
            // A remote member is probed through a peer of mesh.peers.
            "health_probes[2].upstream.remote.peer",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        assert!(
            !paths.iter().any(|p| p.starts_with("health_probes[0]")),
            "{paths:?}"
        );

        let good = crate::parse(
            r#"
virtual_clusters:
  - { name: vc, bootstrap: "127.0.0.1:19092", brokers: { advertised_host: 127.0.0.1, port_range: 19100-19110 }, upstream: { bootstrap_servers: ["127.0.0.1:9092"] } }
health_probes:
  - { group: dr, cluster: east, interval: 500ms, recovery_threshold: 5, upstream: { bootstrap_servers: ["127.0.0.1:9092"], connect_timeout: 2s } }
"#,
        )
        .unwrap();
        let p = &good.health_probes[0];
        assert_eq!(
            (
                p.interval.as_millis(),
                p.failure_threshold,
                p.recovery_threshold
            ),
            (500, 3, 5)
        );
        assert_eq!(p.upstream.connect_timeout.as_secs(), 2);
    }
}

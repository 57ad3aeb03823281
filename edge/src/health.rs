//! Health probes of failover groups' member clusters (`health_probes`):
//! this edge's evidence for the control plane's automatic failover,
//! reported in its heartbeat (`EdgeStatus.health`) and as
//! `strait_failover_probe_state{group,cluster}`. The edge only reports: it
//! never switches a group on its own, so an edge cut off from the control
//! plane keeps serving its last generation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use strait_control_client::state::failover_health::{ClusterHealth, HealthState, ProbeCounter};
use strait_control_client::state::spec::HealthPolicy;
use strait_edge_config::HealthProbe;
use strait_kafka::kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, RequestKind, ResponseKind,
};
use strait_proxy::own_conn::OwnConn;
use strait_proxy::upstream::{Upstream, UpstreamTarget};
use strait_proxy::RemoteUpstreams;
use tokio_util::sync::CancellationToken;

/// Probe connections name themselves in the brokers' logs.
const CLIENT_ID: &str = "strait-edge-probe";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    group: String,
    cluster: String,
}

/// `strait_failover_probe_state`: 1 up, 0 down, -1 not probed yet.
#[derive(Clone, Default)]
pub struct ProbeMetrics {
    state: Family<ProbeLabels, Gauge>,
}

impl ProbeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "failover_probe_state",
            "This edge's view of a failover group member: 1 up, 0 down, -1 not probed yet",
            m.state.clone(),
        );
        m
    }
}

/// The running probes; dropping it stops them.
pub struct Probes {
    config: Vec<HealthProbe>,
    reports: Arc<Mutex<Vec<ClusterHealth>>>,
    _stop: tokio_util::sync::DropGuard,
}

impl Probes {
    /// Starts one task per probe. A probe whose upstream cannot be built
    /// (an unreadable CA file, say) reports the cluster down with the
    /// reason: a view nobody can trust must not count as up. A member behind
    /// a peer edge (`upstream.remote`) is probed through `remote`'s tunnel:
    /// the peer edge and its cluster answer together, or the member is down.
    pub fn start(
        probes: &[HealthProbe],
        metrics: &ProbeMetrics,
        remote: Option<Arc<dyn RemoteUpstreams>>,
    ) -> Probes {
        let stop = CancellationToken::new();
        let reports = Arc::new(Mutex::new(
            probes
                .iter()
                .map(|p| ClusterHealth {
                    group: p.group.clone(),
                    cluster: p.cluster.clone(),
                    state: HealthState::Unknown,
                    consecutive_failures: 0,
                    consecutive_successes: 0,
                    last_error: None,
                    checked_at_unix_ms: 0,
                })
                .collect::<Vec<_>>(),
        ));
        for (index, probe) in probes.iter().enumerate() {
            let gauge = metrics
                .state
                .get_or_create(&ProbeLabels {
                    group: probe.group.clone(),
                    cluster: probe.cluster.clone(),
                })
                .clone();
            gauge.set(-1);
            tokio::spawn(run(
                probe.clone(),
                remote.clone(),
                index,
                reports.clone(),
                gauge,
                stop.child_token(),
            ));
        }
        Probes {
            config: probes.to_vec(),
            reports,
            _stop: stop.drop_guard(),
        }
    }

    pub fn config(&self) -> &[HealthProbe] {
        &self.config
    }

    pub fn reports(&self) -> Vec<ClusterHealth> {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn run(
    probe: HealthProbe,
    remote: Option<Arc<dyn RemoteUpstreams>>,
    index: usize,
    reports: Arc<Mutex<Vec<ClusterHealth>>>,
    gauge: Gauge,
    stop: CancellationToken,
) {
    let policy = HealthPolicy {
        interval_ms: u64::try_from(probe.interval.as_millis()).unwrap_or(u64::MAX),
        failure_threshold: probe.failure_threshold,
        recovery_threshold: probe.recovery_threshold,
        ..HealthPolicy::default()
    };
    let owner = format!("health probe {}/{}", probe.group, probe.cluster);
    let upstream: Result<Arc<dyn Upstream>, String> =
        strait_proxy::own_upstream_of(&owner, &probe.upstream, remote.as_ref(), None, stop.clone())
            .map_err(|e| e.to_string());
    // A live probe's answer takes a round trip; one that takes a whole
    // interval counts as failed (the next one is due).
    let timeout = probe
        .interval
        .max(Duration::from_millis(500))
        .min(probe.upstream.connect_timeout);
    let mut counter = ProbeCounter::default();
    let mut conn: Option<OwnConn> = None;
    let mut tick = tokio::time::interval(probe.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = match &upstream {
            Ok(upstream) => {
                match tokio::time::timeout(timeout, probe_once(upstream.as_ref(), &mut conn)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(format!("no ApiVersions answer within {timeout:?}")),
                }
            }
            Err(e) => Err(e.clone()),
        };
        if result.is_err() {
            // The next probe starts from a fresh connection.
            conn = None;
        }
        let before = counter.state;
        let state = counter.observe(result.is_ok(), &policy);
        gauge.set(match state {
            HealthState::Up => 1,
            HealthState::Down => 0,
            HealthState::Unknown => -1,
        });
        if before != state {
            match &result {
                Err(e) => {
                    tracing::warn!(group = %probe.group, cluster = %probe.cluster, ?state, "failover probe: {e}")
                }
                Ok(()) => {
                    tracing::info!(group = %probe.group, cluster = %probe.cluster, ?state, "failover probe: the cluster answers")
                }
            }
        }
        let mut reports = reports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(report) = reports.get_mut(index) {
            report.state = state;
            report.consecutive_failures = counter.consecutive_failures;
            report.consecutive_successes = counter.consecutive_successes;
            if let Err(e) = result {
                report.last_error = Some(e);
            }
            report.checked_at_unix_ms = now_unix_ms();
        }
    }
}

/// One ApiVersions exchange with the member's bootstrap, on the kept
/// connection (a new one after a failure): SIGKILLed brokers reset it,
/// hung ones time out.
async fn probe_once(upstream: &dyn Upstream, conn: &mut Option<OwnConn>) -> Result<(), String> {
    if conn.is_none() {
        *conn = Some(
            OwnConn::open(upstream, &UpstreamTarget::Bootstrap, CLIENT_ID)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let Some(c) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let answer = c
        .call(
            ApiKey::ApiVersions,
            0,
            RequestKind::ApiVersions(ApiVersionsRequest::default()),
        )
        .await
        .map_err(|e| e.to_string())?;
    match answer {
        ResponseKind::ApiVersions(r) if r.error_code == 0 => Ok(()),
        ResponseKind::ApiVersions(r) => Err(format!("ApiVersions error code {}", r.error_code)),
        _ => Err("an answer that is not ApiVersions".into()),
    }
}

//! The Strait edge's data path.
//!
//! [`Edge::start`] binds every virtual cluster's bootstrap port and serves
//! until [`Edge::shutdown`], which stops accepting, lets open connections
//! finish the requests they have read, and closes what is left after the
//! drain timeout.

#![forbid(unsafe_code)]

pub mod admin;
pub mod brokers;
pub mod cluster;
pub mod connection;
pub mod deny;
mod drained;
pub mod limits;
pub mod metrics;
pub mod own_conn;
pub mod quota;
pub mod rewrite;
pub mod sasl;
pub mod sni;
pub mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use std::net::SocketAddr;

use strait_edge_config::{BrokerAddressing, Config, VirtualCluster};
use strait_filter::FilterFactory;
use strait_tls::{
    ClientTls, CredentialLabel, CredentialReceiver, CredentialWatcher, ServedCertificate,
    TlsMetrics,
};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{ClusterRuntime, ClusterTls, NewUpstream, RuntimeParts};
use crate::connection::ConnectionSettings;
use crate::deny::DenyList;
use crate::limits::BufferBudget;
use crate::metrics::ProxyMetrics;
use crate::quota::QuotaPolicy;
use crate::sasl::UpstreamSasl;
use crate::sni::{SniListener, SniRoutes};
use crate::upstream::{DirectTcp, Upstream};

#[derive(Debug, Error)]
pub enum StartError {
    #[error("virtual cluster '{name}': invalid quota principal pattern: {reason}")]
    Quota { name: String, reason: String },
    #[error("virtual cluster '{name}': {source}")]
    Tls {
        name: String,
        #[source]
        source: strait_tls::TlsError,
    },
    #[error("virtual cluster '{name}': upstream.remote: {reason}")]
    Remote { name: String, reason: String },
    #[error("virtual cluster '{name}': cannot bind bootstrap {address}: {source}")]
    Bind {
        name: String,
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How often the client certificate presented to the brokers is re-read.
const UPSTREAM_CREDENTIAL_INTERVAL: Duration = Duration::from_secs(1);

/// A running edge.
pub struct Edge {
    clusters: BTreeMap<String, ClusterEntry>,
    sni: HashMap<SocketAddr, SniEntry>,
    metrics: Arc<ProxyMetrics>,
    tls_metrics: TlsMetrics,
    ready: Arc<AtomicBool>,
    settings: ConnectionSettings,
    drain_timeout: Duration,
    deny: DenyList,
    /// The edge's own SVID, for listeners with `tls.identity: svid`.
    svid: Option<CredentialReceiver>,
    /// Upstreams of virtual clusters behind peer edges (`upstream.remote`).
    remote: Option<Arc<dyn RemoteUpstreams>>,
    /// Where the running clusters are published for tunnel ingress.
    tunnel_targets: Option<watch::Sender<TunnelTargets>>,
}

/// The running virtual clusters by name, as a tunnel's far end looks them
/// up for the streams peers open.
pub type TunnelTargets = Arc<HashMap<String, Arc<ClusterRuntime>>>;

/// Makes the upstream of a virtual cluster whose brokers are behind a peer
/// edge (the mesh implements it; the proxy knows no tunnels).
pub trait RemoteUpstreams: Send + Sync {
    fn upstream(
        &self,
        remote: &strait_edge_config::Remote,
        connect_timeout: Duration,
    ) -> Result<Arc<dyn Upstream>, String>;
}

/// What an edge may be started with besides its configuration.
#[derive(Default)]
pub struct EdgeExtras {
    /// The edge's SVID (a channel its renewal feeds), for listeners and
    /// upstream connections with `identity: svid`.
    pub svid: Option<CredentialReceiver>,
    /// Needed by virtual clusters with `upstream.remote`.
    pub remote: Option<Arc<dyn RemoteUpstreams>>,
    /// Receives the running clusters after every change.
    pub tunnel_targets: Option<watch::Sender<TunnelTargets>>,
}

/// The direct upstream of a virtual cluster as its `upstream` section
/// describes it (bootstrap servers, TLS with live client credentials, SASL),
/// and its SASL credentials to replace in place. Whoever else talks to the
/// cluster's brokers on the edge's behalf (the keys topic of record
/// encryption) connects the same way. Credential watchers stop with `stop`.
pub fn direct_upstream(
    vc: &VirtualCluster,
    tls_metrics: Option<TlsMetrics>,
    svid: Option<&CredentialReceiver>,
    stop: CancellationToken,
) -> Result<(DirectTcp, Option<Arc<UpstreamSasl>>), StartError> {
    direct_upstream_of(&vc.name, &vc.upstream, tls_metrics, svid, stop)
}

/// The upstream of the edge's own connections to a cluster (health probes,
/// replication checks, offsets and keys topics of a failover group's
/// member): direct as [`direct_upstream_of`], or through the peer edge of
/// `upstream.remote`, where the edge's connections forward its own SPIFFE
/// ID. Named `owner` in logs and metrics.
pub fn own_upstream_of(
    owner: &str,
    upstream: &strait_edge_config::Upstream,
    remote: Option<&Arc<dyn RemoteUpstreams>>,
    svid: Option<&CredentialReceiver>,
    stop: CancellationToken,
) -> Result<Arc<dyn Upstream>, StartError> {
    match &upstream.remote {
        Some(through) => remote
            .ok_or_else(|| "this edge has no mesh section".to_string())
            .and_then(|r| r.upstream(through, upstream.connect_timeout))
            .map_err(|reason| StartError::Remote {
                name: owner.to_string(),
                reason,
            }),
        None => direct_upstream_of(owner, upstream, None, svid, stop)
            .map(|(direct, _)| Arc::new(direct) as Arc<dyn Upstream>),
    }
}

/// [`direct_upstream`] for any owner of an `upstream:` section (a health
/// probe, say), named `owner` in logs and metrics.
pub fn direct_upstream_of(
    owner: &str,
    upstream: &strait_edge_config::Upstream,
    tls_metrics: Option<TlsMetrics>,
    svid: Option<&CredentialReceiver>,
    stop: CancellationToken,
) -> Result<(DirectTcp, Option<Arc<UpstreamSasl>>), StartError> {
    let mut direct = DirectTcp::new(upstream.bootstrap_servers.clone(), upstream.connect_timeout);
    if let Some(tls) = &upstream.tls {
        let tls_error = |source| StartError::Tls {
            name: owner.to_string(),
            source,
        };
        let config = ClientTls::start(
            tls,
            CredentialLabel {
                owner: owner.to_string(),
                certificate: "upstream_client",
            },
            tls_metrics,
            UPSTREAM_CREDENTIAL_INTERVAL,
            stop,
            svid,
        )
        .map_err(tls_error)?;
        direct = direct.with_tls_config(tls, config).map_err(tls_error)?;
    }
    let sasl = upstream.sasl.as_ref().map(|sasl| {
        if sasl.mechanism == strait_edge_config::SaslMechanism::Plain && upstream.tls.is_none()
        {
            tracing::warn!(owner = %owner, "SASL PLAIN without upstream.tls: the password crosses the network in clear");
        }
        UpstreamSasl::new(sasl)
    });
    if let Some(sasl) = &sasl {
        direct = direct.with_sasl(sasl.clone());
    }
    Ok((direct, sasl))
}

struct ClusterEntry {
    config: VirtualCluster,
    runtime: Arc<ClusterRuntime>,
    /// The upstream credentials, replaced in place on rotation.
    sasl: Option<Arc<UpstreamSasl>>,
    stop_accepting: CancellationToken,
    drain: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
}

struct SniEntry {
    routes: SniRoutes,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Filters to add to each virtual cluster's connections, by cluster name.
pub type FiltersByCluster = HashMap<String, Vec<Arc<dyn FilterFactory>>>;

/// What [`Edge::apply`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Kept their listeners and connections to clients; only the upstream
    /// was replaced (a failover, or a changed `upstream`).
    pub switched: Vec<String>,
}

impl Edge {
    pub async fn start(
        config: &Config,
        metrics: Arc<ProxyMetrics>,
        tls_metrics: TlsMetrics,
        filters: FiltersByCluster,
        ready: Arc<AtomicBool>,
    ) -> Result<Edge, StartError> {
        Self::start_with_svid(config, metrics, tls_metrics, filters, ready, None).await
    }

    /// [`Edge::start`], with the edge's SVID (a channel its renewal feeds)
    /// for the listeners whose `tls.identity` is `svid`.
    pub async fn start_with_svid(
        config: &Config,
        metrics: Arc<ProxyMetrics>,
        tls_metrics: TlsMetrics,
        filters: FiltersByCluster,
        ready: Arc<AtomicBool>,
        svid: Option<CredentialReceiver>,
    ) -> Result<Edge, StartError> {
        let extras = EdgeExtras {
            svid,
            ..EdgeExtras::default()
        };
        Self::start_with_extras(config, metrics, tls_metrics, filters, ready, extras).await
    }

    /// [`Edge::start`] with [`EdgeExtras`].
    pub async fn start_with_extras(
        config: &Config,
        metrics: Arc<ProxyMetrics>,
        tls_metrics: TlsMetrics,
        filters: FiltersByCluster,
        ready: Arc<AtomicBool>,
        extras: EdgeExtras,
    ) -> Result<Edge, StartError> {
        let mut edge = Edge {
            svid: extras.svid,
            remote: extras.remote,
            tunnel_targets: extras.tunnel_targets,
            clusters: BTreeMap::new(),
            sni: HashMap::new(),
            metrics: metrics.clone(),
            tls_metrics,
            ready: ready.clone(),
            settings: ConnectionSettings::new(
                &config.limits,
                BufferBudget::new(config.limits.max_buffered_bytes),
            ),
            drain_timeout: config.shutdown.drain_timeout,
            deny: DenyList::new(metrics.deny_list_identities.clone()),
        };
        if let Err(err) = edge.apply(config, filters).await {
            edge.shutdown().await;
            return Err(err);
        }
        ready.store(true, Ordering::Release);
        Ok(edge)
    }

    /// Puts a deny list in force at once: open connections of a listed
    /// identity are closed at their next request. [`Edge::apply`] does this
    /// too; call it on its own when the rest of a new configuration cannot be
    /// applied, since a revocation must not wait for an unrelated fix.
    pub fn set_deny_list(&self, identities: &[String]) {
        if self.deny.replace(identities) {
            tracing::info!(
                identities = identities.len(),
                "deny list changed; denied identities are cut off at their next request"
            );
        }
    }

    /// Puts new upstreams for `upstream.remote` clusters in place (the mesh
    /// was reconfigured): every remote cluster is stopped and drained now, and
    /// the next [`Edge::apply`] starts it again on them.
    pub async fn replace_remote_upstreams(&mut self, remote: Option<Arc<dyn RemoteUpstreams>>) {
        self.remote = remote;
        let remote_clusters: Vec<String> = self
            .clusters
            .iter()
            .filter(|(_, e)| e.config.upstream.remote.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for name in remote_clusters {
            if let Some(entry) = self.clusters.remove(&name) {
                self.retire(entry).await;
            }
        }
    }

    pub fn cluster_names(&self) -> impl Iterator<Item = &str> {
        self.clusters.keys().map(String::as_str)
    }

    /// Moves the edge to `config` without a restart. Virtual clusters whose
    /// configuration is unchanged keep their listeners and connections (new
    /// connections get the new `filters`); changed ones are stopped, drained
    /// in the background and started anew; removed ones are drained. Limits
    /// apply to clusters started from now on.
    pub async fn apply(
        &mut self,
        config: &Config,
        mut filters: FiltersByCluster,
    ) -> Result<ApplyReport, StartError> {
        // The edge-wide budget is kept unless its size changed: connections
        // of clusters started before and after share it.
        let budget = if self.settings.budget.total() as u64
            == config
                .limits
                .max_buffered_bytes
                .min(Semaphore::MAX_PERMITS as u64)
        {
            self.settings.budget.clone()
        } else {
            BufferBudget::new(config.limits.max_buffered_bytes)
        };
        self.settings = ConnectionSettings::new(&config.limits, budget);
        self.drain_timeout = config.shutdown.drain_timeout;
        self.set_deny_list(&config.deny_identities);
        let mut report = ApplyReport::default();
        let wanted: HashMap<&str, &VirtualCluster> = config
            .virtual_clusters
            .iter()
            .map(|vc| (vc.name.as_str(), vc))
            .collect();

        let stale: Vec<String> = self
            .clusters
            .iter()
            .filter(|(name, entry)| {
                !wanted
                    .get(name.as_str())
                    .is_some_and(|vc| same_runtime(vc, &entry.config))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let (Some(vc), Some(entry)) = (wanted.get(name.as_str()), self.clusters.get(&name)) {
                if swappable(vc, &entry.config) {
                    // The new upstream's connections get the new filters
                    // from their first byte (a produce fence, say): set
                    // them before the swap lets any in.
                    if let Some(factories) = filters.get(&name) {
                        entry.runtime.set_filters(factories.clone());
                    }
                    let vc = (*vc).clone();
                    self.switch_upstream(&vc).await?;
                    report.switched.push(name);
                    continue;
                }
            }
            if let Some(entry) = self.clusters.remove(&name) {
                self.retire(entry).await;
                if wanted.contains_key(name.as_str()) {
                    report.replaced.push(name);
                } else {
                    report.removed.push(name);
                }
            }
        }
        for vc in &config.virtual_clusters {
            let factories = filters.remove(&vc.name).unwrap_or_default();
            if let Some(entry) = self.clusters.get_mut(&vc.name) {
                entry.runtime.set_filters(factories);
                if let (Some(current), Some(sasl)) = (&entry.sasl, &vc.upstream.sasl) {
                    if entry.config.upstream.sasl.as_ref() != Some(sasl) {
                        tracing::info!(virtual_cluster = %vc.name, mechanism = %sasl.mechanism, "upstream SASL credentials changed; new connections use them");
                    }
                    current.replace(sasl);
                }
                entry.config = vc.clone();
                if !report.switched.contains(&vc.name) {
                    report.unchanged.push(vc.name.clone());
                }
                continue;
            }
            let entry = self.start_cluster(vc, factories).await?;
            if !report.replaced.contains(&vc.name) {
                report.added.push(vc.name.clone());
            }
            self.clusters.insert(vc.name.clone(), entry);
        }
        if !report.added.is_empty()
            || !report.replaced.is_empty()
            || !report.removed.is_empty()
            || !report.switched.is_empty()
        {
            tracing::info!(?report.added, ?report.replaced, ?report.removed, ?report.switched, "configuration applied");
        }
        self.publish_tunnel_targets();
        Ok(report)
    }

    fn publish_tunnel_targets(&self) {
        if let Some(targets) = &self.tunnel_targets {
            let running = self
                .clusters
                .iter()
                .map(|(name, entry)| (name.clone(), entry.runtime.clone()))
                .collect();
            targets.send_replace(Arc::new(running));
        }
    }

    async fn start_cluster(
        &mut self,
        vc: &VirtualCluster,
        factories: Vec<Arc<dyn FilterFactory>>,
    ) -> Result<ClusterEntry, StartError> {
        let stop_accepting = CancellationToken::new();
        let drain = CancellationToken::new();
        let kill = CancellationToken::new();
        let tracker = TaskTracker::new();
        let upstream_stop = stop_accepting.child_token();
        let (upstream, sasl) = self.build_upstream(vc, upstream_stop.clone())?;
        self.start_runtime(
            vc,
            factories,
            (upstream, upstream_stop),
            sasl,
            [stop_accepting, drain, kill],
            tracker,
        )
        .await
    }

    /// The upstream `vc` names: through a peer edge, or direct.
    #[allow(clippy::type_complexity)]
    fn build_upstream(
        &self,
        vc: &VirtualCluster,
        stop: CancellationToken,
    ) -> Result<(Arc<dyn Upstream>, Option<Arc<UpstreamSasl>>), StartError> {
        if let Some(remote) = &vc.upstream.remote {
            let upstream = self
                .remote
                .as_ref()
                .ok_or_else(|| "this edge has no mesh section".to_string())
                .and_then(|r| r.upstream(remote, vc.upstream.connect_timeout))
                .map_err(|reason| StartError::Remote {
                    name: vc.name.clone(),
                    reason,
                })?;
            return Ok((upstream, None));
        }
        let (direct, sasl) =
            direct_upstream(vc, Some(self.tls_metrics.clone()), self.svid.as_ref(), stop)?;
        Ok((Arc::new(direct), sasl))
    }

    /// Replaces a running cluster's upstream in place (see
    /// [`ClusterRuntime::swap_upstream`]).
    async fn switch_upstream(&mut self, vc: &VirtualCluster) -> Result<(), StartError> {
        let Some(entry) = self.clusters.get(&vc.name) else {
            return Ok(());
        };
        let stop = entry.stop_accepting.child_token();
        let (upstream, sasl) = self.build_upstream(vc, stop.clone())?;
        let drain_timeout = self.drain_timeout;
        if let Some(entry) = self.clusters.get_mut(&vc.name) {
            entry.runtime.swap_upstream(
                NewUpstream {
                    upstream,
                    failover: vc.upstream.failover.clone(),
                    stop,
                },
                drain_timeout,
            );
            entry.sasl = sasl;
        }
        Ok(())
    }

    /// The client-facing half of a cluster, whatever its upstream.
    async fn start_runtime(
        &mut self,
        vc: &VirtualCluster,
        factories: Vec<Arc<dyn FilterFactory>>,
        (upstream, upstream_stop): (Arc<dyn Upstream>, CancellationToken),
        sasl: Option<Arc<UpstreamSasl>>,
        [stop_accepting, drain, kill]: [CancellationToken; 3],
        tracker: TaskTracker,
    ) -> Result<ClusterEntry, StartError> {
        let tls = match &vc.tls {
            Some(tls) => Some(ClusterTls {
                config: match (&tls.server.certificate, &self.svid) {
                    (ServedCertificate::Svid, Some(svid)) => {
                        CredentialWatcher::start_with_credentials(
                            &vc.name,
                            tls.server.clone(),
                            svid.clone(),
                            self.tls_metrics.clone(),
                            tls.reload_interval,
                            stop_accepting.clone(),
                        )
                    }
                    _ => CredentialWatcher::start(
                        &vc.name,
                        tls.server.clone(),
                        self.tls_metrics.clone(),
                        tls.reload_interval,
                        stop_accepting.clone(),
                    ),
                }
                .map_err(|source| StartError::Tls {
                    name: vc.name.clone(),
                    source,
                })?,
                principal_sources: tls.server.principal_sources.clone(),
                handshake_timeout: tls.handshake_timeout,
                metrics: self.tls_metrics.clone(),
            }),
            None => None,
        };
        let cluster_metrics = self.metrics.for_cluster(&vc.name);
        let quotas = match &vc.quotas {
            Some(quotas) => Some(Arc::new(
                QuotaPolicy::new(
                    quotas.default,
                    &quotas.principals,
                    cluster_metrics.throttle_seconds.clone(),
                )
                .map_err(|err| StartError::Quota {
                    name: vc.name.clone(),
                    reason: err.to_string(),
                })?,
            )),
            None => None,
        };
        let parts = RuntimeParts {
            upstream,
            upstream_stop,
            filters: factories,
            metrics: cluster_metrics,
            settings: self.settings.clone(),
            tls,
            quotas,
            stop_accepting: stop_accepting.clone(),
            drain: drain.clone(),
            kill: kill.clone(),
            tracker: tracker.clone(),
            deny: self.deny.clone(),
        };
        let runtime =
            ClusterRuntime::start(vc, parts)
                .await
                .map_err(|source| StartError::Bind {
                    name: vc.name.clone(),
                    address: vc.bootstrap,
                    source,
                })?;
        if matches!(vc.brokers, BrokerAddressing::Sni { .. }) {
            self.add_sni_route(vc.bootstrap, runtime.clone()).await?;
        }
        Ok(ClusterEntry {
            config: vc.clone(),
            runtime,
            sasl,
            stop_accepting,
            drain,
            kill,
            tracker,
        })
    }

    async fn add_sni_route(
        &mut self,
        address: SocketAddr,
        runtime: Arc<ClusterRuntime>,
    ) -> Result<(), StartError> {
        if let Some(entry) = self.sni.get(&address) {
            entry
                .routes
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .push(runtime);
            return Ok(());
        }
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartError::Bind {
                name: runtime.name.to_string(),
                address,
                source,
            })?;
        tracing::info!(%address, "listening (TLS, routed by SNI)");
        let routes: SniRoutes = Arc::new(RwLock::new(vec![runtime]));
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            SniListener {
                listener,
                routes: routes.clone(),
                max_connections: self.settings.max_connections,
            }
            .run(stop.clone(), TaskTracker::new()),
        );
        self.sni.insert(address, SniEntry { routes, stop, task });
        Ok(())
    }

    /// Stops a cluster's listeners now and drains its connections in the
    /// background, closing what is left after the drain timeout.
    async fn retire(&mut self, entry: ClusterEntry) {
        let address = entry.config.bootstrap;
        if let Some(sni) = self.sni.get(&address) {
            let empty = {
                let mut routes = sni.routes.write().unwrap_or_else(|e| e.into_inner());
                routes.retain(|r| !Arc::ptr_eq(r, &entry.runtime));
                routes.is_empty()
            };
            if empty {
                if let Some(sni) = self.sni.remove(&address) {
                    sni.stop.cancel();
                    let _ = sni.task.await;
                }
            }
        }
        entry.runtime.stop_listening().await;
        entry.drain.cancel();
        entry.tracker.close();
        let timeout = self.drain_timeout;
        tokio::spawn(async move {
            if tokio::time::timeout(timeout, entry.tracker.wait())
                .await
                .is_err()
            {
                entry.kill.cancel();
            }
            drop(entry.stop_accepting);
        });
    }

    /// Stops accepting, drains open connections for up to the drain timeout,
    /// and returns whether every connection finished in time.
    pub async fn shutdown(mut self) -> bool {
        self.ready.store(false, Ordering::Release);
        for sni in std::mem::take(&mut self.sni).into_values() {
            sni.stop.cancel();
            let _ = sni.task.await;
        }
        let entries: Vec<ClusterEntry> = std::mem::take(&mut self.clusters).into_values().collect();
        for entry in &entries {
            entry.runtime.stop_listening().await;
            entry.drain.cancel();
            entry.tracker.close();
        }
        let all = futures_wait_all(entries.iter().map(|e| e.tracker.clone()).collect());
        let drained = tokio::time::timeout(self.drain_timeout, all).await.is_ok();
        if drained {
            tracing::info!("all connections drained");
        } else {
            tracing::warn!(
                timeout = ?self.drain_timeout,
                "drain timeout reached; closing the remaining connections"
            );
            for entry in &entries {
                entry.kill.cancel();
            }
        }
        drained
    }
}

/// Whether `b` can become `a` by replacing only its upstream: the listeners,
/// TLS, quotas and what clients are offered stay. Turning upstream SASL on or
/// off changes what clients are offered (the edge answers their SASL): that
/// restarts. A direct upstream and a peer edge's (`remote`) swap both ways:
/// brokers are routed by node id either way, the tunnel ignoring the
/// address the far edge advertised (a standby behind a peer edge).
fn swappable(a: &VirtualCluster, b: &VirtualCluster) -> bool {
    if a.upstream.sasl.is_some() != b.upstream.sasl.is_some() {
        return false;
    }
    let with_upstream_of_a = VirtualCluster {
        upstream: a.upstream.clone(),
        ..b.clone()
    };
    same_runtime(a, &with_upstream_of_a)
}

/// Whether two configurations of a virtual cluster can share one runtime:
/// everything but what filters carry (authorization, audit, encryption), which
/// changes through the filter factories and live rule reloads instead, and
/// upstream SASL credentials, which are replaced in place (turning SASL on or
/// off changes what clients are offered, so that still replaces the cluster).
fn same_runtime(a: &VirtualCluster, b: &VirtualCluster) -> bool {
    if a.upstream.sasl.is_some() != b.upstream.sasl.is_some() {
        return false;
    }
    let strip = |vc: &VirtualCluster| {
        let mut upstream = vc.upstream.clone();
        upstream.sasl = None;
        VirtualCluster {
            authorization: None,
            audit: None,
            encryption: None,
            upstream,
            ..vc.clone()
        }
    };
    strip(a) == strip(b)
}

async fn futures_wait_all(trackers: Vec<TaskTracker>) {
    for tracker in trackers {
        tracker.wait().await;
    }
}

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
pub mod metrics;
pub mod quota;
pub mod rewrite;
pub mod sni;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use strait_edge_config::{BrokerAddressing, Config};
use strait_filter::FilterFactory;
use strait_tls::{CredentialWatcher, TlsMetrics};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{ClusterRuntime, ClusterTls, RuntimeParts};
use crate::connection::ConnectionSettings;
use crate::metrics::ProxyMetrics;
use crate::quota::QuotaPolicy;
use crate::sni::SniListener;
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
    #[error("virtual cluster '{name}': cannot bind bootstrap {address}: {source}")]
    Bind {
        name: String,
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running edge.
pub struct Edge {
    clusters: Vec<Arc<ClusterRuntime>>,
    stop_accepting: CancellationToken,
    drain: CancellationToken,
    tracker: TaskTracker,
    ready: Arc<AtomicBool>,
    drain_timeout: Duration,
}

/// Filters to add to each virtual cluster's connections, by cluster name.
pub type FiltersByCluster = HashMap<String, Vec<Arc<dyn FilterFactory>>>;

impl Edge {
    pub async fn start(
        config: &Config,
        metrics: Arc<ProxyMetrics>,
        tls_metrics: TlsMetrics,
        mut filters: FiltersByCluster,
        ready: Arc<AtomicBool>,
    ) -> Result<Edge, StartError> {
        let stop_accepting = CancellationToken::new();
        let drain = CancellationToken::new();
        let tracker = TaskTracker::new();
        let settings = ConnectionSettings {
            max_frame_bytes: config.limits.max_frame_bytes,
            filter_timeout: config.limits.filter_timeout,
        };
        let mut clusters = Vec::new();
        let mut sni_routes: HashMap<SocketAddr, Vec<Arc<ClusterRuntime>>> = HashMap::new();
        let result = async {
            for vc in &config.virtual_clusters {
                let mut direct = DirectTcp::new(
                    vc.upstream.bootstrap_servers.clone(),
                    vc.upstream.connect_timeout,
                );
                if let Some(tls) = &vc.upstream.tls {
                    direct = direct.with_tls(tls).map_err(|source| StartError::Tls {
                        name: vc.name.clone(),
                        source,
                    })?;
                }
                let upstream: Arc<dyn Upstream> = Arc::new(direct);
                let tls = match &vc.tls {
                    Some(tls) => Some(ClusterTls {
                        config: CredentialWatcher::start(
                            &vc.name,
                            tls.server.clone(),
                            tls_metrics.clone(),
                            tls.reload_interval,
                            stop_accepting.clone(),
                        )
                        .map_err(|source| StartError::Tls {
                            name: vc.name.clone(),
                            source,
                        })?,
                        principal_sources: tls.server.principal_sources.clone(),
                        handshake_timeout: tls.handshake_timeout,
                        metrics: tls_metrics.clone(),
                    }),
                    None => None,
                };
                let cluster_metrics = metrics.for_cluster(&vc.name);
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
                    quotas,
                    upstream,
                    filters: filters.remove(&vc.name).unwrap_or_default(),
                    metrics: cluster_metrics,
                    settings,
                    tls,
                    stop_accepting: stop_accepting.clone(),
                    drain: drain.clone(),
                    tracker: tracker.clone(),
                };
                let runtime = ClusterRuntime::start(vc, parts)
                    .await
                    .map_err(|source| StartError::Bind {
                        name: vc.name.clone(),
                        address: vc.bootstrap,
                        source,
                    })?;
                if matches!(vc.brokers, BrokerAddressing::Sni { .. }) {
                    sni_routes.entry(vc.bootstrap).or_default().push(runtime.clone());
                }
                clusters.push(runtime);
            }
            for (address, routes) in sni_routes {
                let listener = TcpListener::bind(address)
                    .await
                    .map_err(|source| StartError::Bind {
                        name: routes.iter().map(|r| r.name.to_string()).collect::<Vec<_>>().join(","),
                        address,
                        source,
                    })?;
                tracing::info!(
                    %address,
                    virtual_clusters = ?routes.iter().map(|r| r.name.to_string()).collect::<Vec<_>>(),
                    "listening (TLS, routed by SNI)"
                );
                let hello_timeout = Duration::from_secs(10);
                tracker.spawn(
                    SniListener {
                        listener,
                        routes,
                        hello_timeout,
                    }
                    .run(stop_accepting.clone(), tracker.clone()),
                );
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            stop_accepting.cancel();
            return Err(err);
        }
        ready.store(true, Ordering::Release);
        Ok(Edge {
            clusters,
            stop_accepting,
            drain,
            tracker,
            ready,
            drain_timeout: config.shutdown.drain_timeout,
        })
    }

    pub fn cluster_names(&self) -> impl Iterator<Item = &str> {
        self.clusters.iter().map(|c| &*c.name)
    }

    /// Stops accepting, drains open connections for up to the drain timeout,
    /// and returns whether every connection finished in time.
    pub async fn shutdown(self) -> bool {
        self.ready.store(false, Ordering::Release);
        self.stop_accepting.cancel();
        self.drain.cancel();
        self.tracker.close();
        let drained = tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_ok();
        if drained {
            tracing::info!("all connections drained");
        } else {
            tracing::warn!(
                timeout = ?self.drain_timeout,
                "drain timeout reached; closing the remaining connections"
            );
        }
        drained
    }
}

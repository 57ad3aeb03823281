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
pub mod rewrite;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use strait_edge_config::Config;
use strait_filter::FilterFactory;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::ClusterRuntime;
use crate::connection::ConnectionSettings;
use crate::metrics::ProxyMetrics;
use crate::upstream::{DirectTcp, Upstream};

#[derive(Debug, Error)]
pub enum StartError {
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
        for vc in &config.virtual_clusters {
            let upstream: Arc<dyn Upstream> = Arc::new(DirectTcp::new(
                vc.upstream.bootstrap_servers.clone(),
                vc.upstream.connect_timeout,
            ));
            let runtime = ClusterRuntime::start(
                vc,
                upstream,
                filters.remove(&vc.name).unwrap_or_default(),
                metrics.for_cluster(&vc.name),
                settings,
                stop_accepting.clone(),
                drain.clone(),
                tracker.clone(),
            )
            .await;
            match runtime {
                Ok(runtime) => clusters.push(runtime),
                Err(source) => {
                    stop_accepting.cancel();
                    return Err(StartError::Bind {
                        name: vc.name.clone(),
                        address: vc.bootstrap,
                        source,
                    });
                }
            }
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

//! One virtual cluster at run time: its bootstrap listener, the broker
//! listeners bound as brokers are discovered, and the connections they accept.

use std::net::SocketAddr;
use std::sync::Arc;

use strait_edge_config::VirtualCluster;
use strait_filter::{ConnectionInfo, Endpoint, Filter, FilterChain, FilterFactory, Principal};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::brokers::{BrokerMap, NewBrokerListener};
use crate::connection::{relay, ConnectionError, ConnectionSettings};
use crate::metrics::ClusterMetrics;
use crate::rewrite::{AddressRewriteFilter, ApiVersionsFilter};
use crate::upstream::{Upstream, UpstreamTarget};

/// Everything a virtual cluster's connections share.
pub struct ClusterRuntime {
    pub name: Arc<str>,
    brokers: Arc<BrokerMap>,
    upstream: Arc<dyn Upstream>,
    filters: Vec<Arc<dyn FilterFactory>>,
    metrics: Arc<ClusterMetrics>,
    settings: ConnectionSettings,
    /// Stops accepting.
    stop_accepting: CancellationToken,
    /// Asks open connections to finish what they have read and close.
    drain: CancellationToken,
    tracker: TaskTracker,
}

impl ClusterRuntime {
    /// Binds the bootstrap port and starts serving. Broker ports are bound
    /// later, as the first Metadata response names each broker.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &VirtualCluster,
        upstream: Arc<dyn Upstream>,
        filters: Vec<Arc<dyn FilterFactory>>,
        metrics: Arc<ClusterMetrics>,
        settings: ConnectionSettings,
        stop_accepting: CancellationToken,
        drain: CancellationToken,
        tracker: TaskTracker,
    ) -> std::io::Result<Arc<Self>> {
        let bootstrap = TcpListener::bind(config.bootstrap).await?;
        let (brokers, new_brokers) = BrokerMap::new(
            &config.brokers.advertised_host,
            config.brokers.port_range.clone(),
            config.brokers.bind_address,
            metrics.brokers_discovered.clone(),
        );
        let runtime = Arc::new(ClusterRuntime {
            name: config.name.as_str().into(),
            brokers,
            upstream,
            filters,
            metrics,
            settings,
            stop_accepting,
            drain,
            tracker: tracker.clone(),
        });
        tracing::info!(
            virtual_cluster = %runtime.name,
            bootstrap = %config.bootstrap,
            "listening"
        );
        tracker.spawn(runtime.clone().accept_loop(bootstrap, Endpoint::Bootstrap));
        tracker.spawn(runtime.clone().broker_listeners(new_brokers));
        Ok(runtime)
    }

    async fn broker_listeners(
        self: Arc<Self>,
        mut new: mpsc::UnboundedReceiver<NewBrokerListener>,
    ) {
        loop {
            let next = tokio::select! {
                _ = self.stop_accepting.cancelled() => return,
                next = new.recv() => next,
            };
            let Some(NewBrokerListener { node_id, listener }) = next else {
                return;
            };
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    self.tracker.spawn(
                        self.clone()
                            .accept_loop(listener, Endpoint::Broker(node_id)),
                    );
                }
                Err(err) => {
                    tracing::error!(virtual_cluster = %self.name, node_id, %err, "cannot serve broker port");
                }
            }
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, endpoint: Endpoint) {
        loop {
            let accepted = tokio::select! {
                _ = self.stop_accepting.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::info_span!(
                        "connection",
                        virtual_cluster = %self.name,
                        client = %peer,
                        endpoint = ?endpoint
                    );
                    self.tracker
                        .spawn(self.clone().serve(stream, peer, endpoint).instrument(span));
                }
                Err(err) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(virtual_cluster = %self.name, %err, "accept failed");
                    tokio::select! {
                        _ = self.stop_accepting.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }

    async fn serve(self: Arc<Self>, client: TcpStream, peer: SocketAddr, endpoint: Endpoint) {
        self.metrics.connections.inc();
        self.metrics.connections_open.inc();
        let _open = scopeguard(&self.metrics.connections_open);
        client.set_nodelay(true).ok();

        let target = match endpoint {
            Endpoint::Bootstrap => UpstreamTarget::Bootstrap,
            Endpoint::Broker(node_id) => match self.brokers.upstream_of(node_id) {
                Some(address) => UpstreamTarget::Broker { node_id, address },
                None => {
                    tracing::warn!(node_id, "no address known for this broker");
                    return;
                }
            },
        };
        let upstream = match self.upstream.connect(&target).await {
            Ok(upstream) => upstream,
            Err(err) => {
                // The client sees a closed connection and retries, as with a broker that is down.
                self.metrics.upstream_connect_errors.inc();
                tracing::warn!(%err, "upstream unreachable; closing the client connection");
                return;
            }
        };
        let info = ConnectionInfo {
            virtual_cluster: self.name.clone(),
            client_addr: peer,
            endpoint,
            principal: Principal::Anonymous,
        };
        let mut filters: Vec<Box<dyn Filter>> = vec![
            Box::new(ApiVersionsFilter),
            Box::new(AddressRewriteFilter::new(self.brokers.clone())),
        ];
        filters.extend(self.filters.iter().map(|factory| factory.create(&info)));
        let chain = FilterChain::new(filters);
        tracing::debug!("connection open");
        match relay(
            client,
            upstream,
            info,
            chain,
            self.metrics.clone(),
            self.settings,
            self.drain.clone(),
        )
        .await
        {
            Ok(()) => tracing::debug!("connection closed"),
            Err(err) => {
                if let Some(reason) = err.rejection_reason() {
                    self.metrics.rejected(reason);
                    tracing::warn!(%err, reason, "closing connection");
                } else {
                    log_close(&err);
                }
            }
        }
    }
}

fn log_close(err: &ConnectionError) {
    match err {
        ConnectionError::Io(_) | ConnectionError::UpstreamClosed => {
            tracing::debug!(%err, "connection closed")
        }
        _ => tracing::info!(%err, "connection closed"),
    }
}

/// Decrements the open-connections gauge however the connection ends.
struct GaugeGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn scopeguard(gauge: &prometheus_client::metrics::gauge::Gauge) -> GaugeGuard<'_> {
    GaugeGuard(gauge)
}

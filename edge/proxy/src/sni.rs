//! One TLS port shared by several virtual clusters: the ClientHello's SNI
//! host name picks the cluster and the broker, before any certificate is sent.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use strait_tls::tokio_rustls::rustls::server::Acceptor;
use strait_tls::tokio_rustls::LazyConfigAcceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::ClusterRuntime;
use crate::limits::{ConnectionCount, WarnLimiter};

/// The virtual clusters served on one SNI port; changes as clusters come and go.
pub type SniRoutes = Arc<RwLock<Vec<Arc<ClusterRuntime>>>>;

pub struct SniListener {
    pub listener: TcpListener,
    pub routes: SniRoutes,
    pub hello_timeout: Duration,
    /// Open connections this port serves; more are accepted and closed at once.
    pub max_connections: u32,
}

impl SniListener {
    pub async fn run(self, stop: CancellationToken, tracker: TaskTracker) {
        let routes = self.routes;
        let open = ConnectionCount::new(self.max_connections);
        let refusals = WarnLimiter::new(Duration::from_secs(10));
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = open.try_open() else {
                        drop(stream);
                        // The port is shared: counted on every cluster it serves.
                        for runtime in routes.read().unwrap_or_else(|e| e.into_inner()).iter() {
                            runtime.count_limited("max_connections");
                        }
                        if let Some(suppressed) = refusals.allow() {
                            tracing::warn!(client = %peer, max_connections = self.max_connections, suppressed, "connection refused: the SNI listener has max_connections open (logged at most every 10 s)");
                        }
                        continue;
                    };
                    let span = tracing::info_span!("connection", client = %peer);
                    let routed = route(stream, peer, routes.clone(), self.hello_timeout);
                    tracker.spawn(
                        async move {
                            let _slot = slot;
                            routed.await
                        }
                        .instrument(span),
                    );
                }
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }
}

async fn route(stream: TcpStream, peer: SocketAddr, routes: SniRoutes, hello_timeout: Duration) {
    stream.set_nodelay(true).ok();
    let start = match tokio::time::timeout(
        hello_timeout,
        LazyConfigAcceptor::new(Acceptor::default(), strait_tls::buffered(stream)),
    )
    .await
    {
        Ok(Ok(start)) => start,
        Ok(Err(err)) => {
            tracing::info!(%err, "no valid TLS ClientHello");
            return;
        }
        Err(_) => {
            tracing::info!("no TLS ClientHello in time");
            return;
        }
    };
    let host = start.client_hello().server_name().map(str::to_owned);
    let routes: Vec<Arc<ClusterRuntime>> = routes.read().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(host) = host else {
        refuse(&routes, "no_sni", "");
        return;
    };
    for runtime in &routes {
        if let Some(endpoint) = runtime.sni_route(&host) {
            runtime.clone().serve_sni(start, peer, endpoint).await;
            return;
        }
    }
    refuse(&routes, "unknown_sni", &host);
}

fn refuse(routes: &[Arc<ClusterRuntime>], reason: &str, host: &str) {
    if let Some(metrics) = routes.first().and_then(|r| r.tls_metrics()) {
        metrics.handshake("", Some(reason));
    }
    tracing::info!(
        host,
        reason,
        "TLS connection refused: no virtual cluster serves this name"
    );
}

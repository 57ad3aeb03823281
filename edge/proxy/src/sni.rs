//! One TLS port shared by several virtual clusters: the ClientHello's SNI
//! host name picks the cluster and the broker, before any certificate is sent.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use strait_tls::handshake_failure_reason;
use strait_tls::tokio_rustls::rustls::server::Acceptor;
use strait_tls::tokio_rustls::LazyConfigAcceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::ClusterRuntime;
use crate::limits::{ConnectionCount, WarnLimiter, WarnLimiters};

/// `tls.handshake_timeout`'s default, for a port whose clusters are all gone.
const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The virtual clusters served on one SNI port; changes as clusters come and go.
pub type SniRoutes = Arc<RwLock<Vec<Arc<ClusterRuntime>>>>;

pub struct SniListener {
    pub listener: TcpListener,
    pub routes: SniRoutes,
    /// Open connections this port serves; more are accepted and closed at once.
    pub max_connections: u32,
}

impl SniListener {
    pub async fn run(self, stop: CancellationToken, tracker: TaskTracker) {
        let routes = self.routes;
        let open = ConnectionCount::new(self.max_connections);
        let refusals = WarnLimiter::new(Duration::from_secs(10));
        let hello_failures = Arc::new(HelloFailures {
            warnings: WarnLimiters::new(Duration::from_secs(10)),
        });
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
                    let routed = route(stream, peer, routes.clone(), hello_failures.clone());
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

/// WARN lines for connections refused before any cluster was picked, at most
/// one every 10 s per reason (a scanner or a misconfigured client repeats
/// itself); every refusal is counted in `tls_handshakes_total` regardless.
struct HelloFailures {
    warnings: WarnLimiters,
}

impl HelloFailures {
    fn refuse(&self, routes: &[Arc<ClusterRuntime>], reason: &'static str, detail: &str) {
        // The port is shared and no cluster was chosen: counted under no virtual cluster.
        if let Some(metrics) = routes.first().and_then(|r| r.tls_metrics()) {
            metrics.handshake("", Some(reason));
        }
        if reason == "eof" {
            // A TCP probe (a load balancer's health check) connects and closes: not worth a WARN.
            tracing::debug!(reason, "TLS connection closed before its ClientHello");
            return;
        }
        let Some(suppressed) = self.warnings.allow(reason) else {
            return;
        };
        let why = match reason {
            "no_sni" => "the ClientHello names no server, so no virtual cluster can be picked",
            "unknown_sni" => "no virtual cluster serves this name",
            "timeout" => "no TLS ClientHello in time",
            _ => "no valid TLS ClientHello",
        };
        tracing::warn!(
            reason,
            detail,
            suppressed,
            "TLS connection refused on the SNI port: {why} (logged at most every 10 s per reason; suppressed counts the lines held back, every refusal is in tls_handshakes_total)"
        );
    }
}

async fn route(
    stream: TcpStream,
    peer: SocketAddr,
    routes: SniRoutes,
    failures: Arc<HelloFailures>,
) {
    stream.set_nodelay(true).ok();
    let routes: Vec<Arc<ClusterRuntime>> = routes.read().unwrap_or_else(|e| e.into_inner()).clone();
    // The ClientHello comes before the cluster is known: the most patient of
    // the clusters sharing the port sets how long it may take.
    let hello_timeout = routes
        .iter()
        .filter_map(|runtime| runtime.handshake_timeout())
        .max()
        .unwrap_or(DEFAULT_HELLO_TIMEOUT);
    let hello = tokio::time::timeout(
        hello_timeout,
        LazyConfigAcceptor::new(Acceptor::default(), strait_tls::buffered(stream)),
    )
    .await;
    let start = match hello {
        Ok(Ok(start)) => start,
        Ok(Err(err)) => {
            failures.refuse(&routes, handshake_failure_reason(&err), &err.to_string());
            return;
        }
        Err(_) => {
            failures.refuse(&routes, "timeout", "");
            return;
        }
    };
    let Some(host) = start.client_hello().server_name().map(str::to_owned) else {
        failures.refuse(&routes, "no_sni", "");
        return;
    };
    for runtime in &routes {
        if let Some(endpoint) = runtime.sni_route(&host) {
            runtime.clone().serve_sni(start, peer, endpoint).await;
            return;
        }
    }
    failures.refuse(&routes, "unknown_sni", &host);
}

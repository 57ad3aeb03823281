//! One virtual cluster at run time: its bootstrap listener, the broker
//! listeners bound as brokers are discovered, and the connections they accept.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use strait_edge_config::{BrokerAddressing, FailoverState, VirtualCluster};
use strait_filter::{ConnectionInfo, Endpoint, Filter, FilterChain, FilterFactory, Principal};
use strait_tls::tokio_rustls::rustls::ServerConfig;
use strait_tls::tokio_rustls::{StartHandshake, TlsAcceptor};
use strait_tls::{
    handshake_failure_reason, principal_of, trust_domain_refusal, PrincipalSource, TlsMetrics,
};
use tokio::io::BufReader;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::brokers::{BrokerMap, Discovery, NewBrokerListener};
use crate::connection::{relay_checked, ConnectionError, ConnectionSettings, Drain};
use crate::deny::DenyList;
use crate::limits::{ConnectionCount, WarnLimiter, WarnLimiters};
use crate::metrics::ClusterMetrics;
use crate::quota::QuotaPolicy;
use crate::rewrite::edge_filters_for;
use crate::sasl::client::ClientSaslFilter;
use crate::upstream::{ConnectContext, ConnectError, Upstream, UpstreamTarget};

/// Client-facing TLS of a virtual cluster.
pub struct ClusterTls {
    /// The newest server configuration; replaced when certificate files change.
    pub config: watch::Receiver<Arc<ServerConfig>>,
    pub principal_sources: Vec<PrincipalSource>,
    pub handshake_timeout: Duration,
    pub metrics: TlsMetrics,
}

/// The upstream a virtual cluster's new connections go to, with what ends
/// the connections opened on it when it is replaced.
struct UpstreamGeneration {
    upstream: Arc<dyn Upstream>,
    /// The brokers of this upstream.
    discovery: Arc<Discovery>,
    /// How many times the upstream was replaced before this one.
    swaps: u64,
    failover: Option<FailoverState>,
    /// Drains this generation's connections (a child of the cluster's drain).
    drain: CancellationToken,
    /// Cancelled before `drain` when its drain has idempotent producers bump
    /// their epoch (see `bumps_epochs`).
    switched: CancellationToken,
    /// Closes them at once (a child of the cluster's kill).
    kill: CancellationToken,
    /// Ends the upstream's background tasks (e.g. its client certificate
    /// watcher) once its connections are gone.
    stop: CancellationToken,
}

/// A replacement upstream for [`ClusterRuntime::swap_upstream`].
pub struct NewUpstream {
    pub upstream: Arc<dyn Upstream>,
    pub failover: Option<FailoverState>,
    /// Handed to the upstream's background tasks; cancelled once the
    /// upstream is replaced in turn and its connections are gone.
    pub stop: CancellationToken,
}

/// Everything a virtual cluster's connections share.
pub struct ClusterRuntime {
    pub name: Arc<str>,
    brokers: Arc<BrokerMap>,
    /// Set in SNI mode: the host name that designates the bootstrap.
    sni_bootstrap_host: Option<String>,
    /// Replaced in place on failover; each connection keeps the one it
    /// opened on.
    upstream: std::sync::RwLock<Arc<UpstreamGeneration>>,
    /// The edge authenticates upstream itself: clients' SASL is answered here.
    upstream_sasl: bool,
    /// Replaced on reconfiguration; each connection takes the list current when it opens.
    filters: std::sync::RwLock<Arc<Vec<Arc<dyn FilterFactory>>>>,
    metrics: Arc<ClusterMetrics>,
    settings: ConnectionSettings,
    tls: Option<ClusterTls>,
    quotas: Option<Arc<QuotaPolicy>>,
    /// Stops accepting.
    stop_accepting: CancellationToken,
    /// Asks open connections to finish what they have read and close.
    drain: CancellationToken,
    /// Closes open connections at once (after a drain timed out).
    kill: CancellationToken,
    tracker: TaskTracker,
    deny: DenyList,
    /// Accept loops, awaited on stop so their ports are free again.
    listeners: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Failed handshakes are WARN lines, at most one per reason and interval:
    /// a scanner must not be able to flood the log, and one kind of failure
    /// must not hide another.
    handshake_warnings: WarnLimiters,
}

/// What a cluster runtime needs besides its configuration.
pub struct RuntimeParts {
    pub upstream: Arc<dyn Upstream>,
    /// Handed to the upstream's background tasks (see [`NewUpstream::stop`]).
    pub upstream_stop: CancellationToken,
    pub filters: Vec<Arc<dyn FilterFactory>>,
    pub metrics: Arc<ClusterMetrics>,
    pub settings: ConnectionSettings,
    pub tls: Option<ClusterTls>,
    pub quotas: Option<Arc<QuotaPolicy>>,
    pub stop_accepting: CancellationToken,
    pub drain: CancellationToken,
    pub kill: CancellationToken,
    pub tracker: TaskTracker,
    /// The edge's deny list.
    pub deny: DenyList,
}

impl ClusterRuntime {
    /// Starts a virtual cluster. In port-per-broker mode this binds the
    /// bootstrap port and serves it; broker ports are bound later, as the
    /// first Metadata response names each broker. In SNI mode the caller
    /// owns the shared listener and routes handshakes with [`Self::sni_route`].
    pub async fn start(config: &VirtualCluster, parts: RuntimeParts) -> std::io::Result<Arc<Self>> {
        let discovered = parts.metrics.brokers_discovered.clone();
        let (brokers, new_brokers, sni_bootstrap_host) = match &config.brokers {
            BrokerAddressing::PortPerBroker {
                advertised_host,
                port_range,
                bind_address,
            } => {
                let (map, rx) = BrokerMap::new(
                    advertised_host,
                    port_range.clone(),
                    *bind_address,
                    discovered,
                );
                (map, Some(rx), None)
            }
            BrokerAddressing::Sni {
                bootstrap_host,
                broker_host_pattern,
                advertised_port,
            } => (
                BrokerMap::sni(broker_host_pattern, *advertised_port, discovered),
                None,
                Some(bootstrap_host.clone()),
            ),
        };
        let bootstrap = match new_brokers {
            Some(_) => Some(TcpListener::bind(config.bootstrap).await?),
            None => None,
        };
        let first = UpstreamGeneration {
            upstream: parts.upstream,
            discovery: brokers.discovery(),
            swaps: 0,
            failover: config.upstream.failover.clone(),
            drain: parts.drain.child_token(),
            switched: CancellationToken::new(),
            kill: parts.kill.child_token(),
            stop: parts.upstream_stop,
        };
        let runtime = Arc::new(ClusterRuntime {
            name: config.name.as_str().into(),
            brokers,
            sni_bootstrap_host,
            upstream: std::sync::RwLock::new(Arc::new(first)),
            upstream_sasl: config.upstream.sasl.is_some(),
            filters: std::sync::RwLock::new(Arc::new(parts.filters)),
            metrics: parts.metrics,
            settings: parts.settings,
            tls: parts.tls,
            quotas: parts.quotas,
            stop_accepting: parts.stop_accepting,
            drain: parts.drain,
            kill: parts.kill,
            tracker: parts.tracker.clone(),
            deny: parts.deny,
            listeners: std::sync::Mutex::default(),
            handshake_warnings: WarnLimiters::new(Duration::from_secs(10)),
        });
        if let (Some(bootstrap), Some(new_brokers)) = (bootstrap, new_brokers) {
            tracing::info!(
                virtual_cluster = %runtime.name,
                bootstrap = %config.bootstrap,
                tls = runtime.tls.is_some(),
                "listening"
            );
            let bootstrap_loop = parts
                .tracker
                .spawn(runtime.clone().accept_loop(bootstrap, Endpoint::Bootstrap));
            let brokers_loop = parts
                .tracker
                .spawn(runtime.clone().broker_listeners(new_brokers));
            runtime.keep_listener(bootstrap_loop);
            runtime.keep_listener(brokers_loop);
        }
        Ok(runtime)
    }

    /// The endpoint an SNI host name designates in this cluster, if any.
    pub fn sni_route(&self, host: &str) -> Option<Endpoint> {
        if self
            .sni_bootstrap_host
            .as_deref()
            .is_some_and(|bootstrap| bootstrap.eq_ignore_ascii_case(host))
        {
            return Some(Endpoint::Bootstrap);
        }
        let node_id = self.brokers.node_for_host(host)?;
        // Only brokers the edge has advertised: anything else is refused at
        // the handshake. After a swap, ids of the old upstream are served too
        // (see `serve_via`).
        let generation = self.current_upstream();
        (generation.swaps > 0 || generation.discovery.upstream_of(node_id).is_some())
            .then_some(Endpoint::Broker(node_id))
    }

    /// Sends new connections to `next` from now on, without touching the
    /// listeners: clients keep the bootstrap and broker addresses they know.
    /// Connections opened on the old upstream are drained (answers to what
    /// they sent are delivered, then they close, so clients reconnect and
    /// fetch metadata from the new one) and closed after `drain_timeout`.
    /// Broker addresses learnt from the old upstream are forgotten, so no
    /// answer mixes the two clusters.
    pub fn swap_upstream(&self, next: NewUpstream, drain_timeout: Duration) {
        let old = {
            let mut current = self.upstream.write().unwrap_or_else(|e| e.into_inner());
            let generation = UpstreamGeneration {
                upstream: next.upstream,
                discovery: self.brokers.reset_discovery(),
                swaps: current.swaps + 1,
                failover: next.failover,
                drain: self.drain.child_token(),
                switched: CancellationToken::new(),
                kill: self.kill.child_token(),
                stop: next.stop,
            };
            std::mem::replace(&mut *current, Arc::new(generation))
        };
        let current = self.current_upstream();
        self.metrics.upstream_swaps.inc();
        tracing::info!(
            target: "strait::audit",
            event = "upstream_switched",
            virtual_cluster = %self.name,
            from = ?old.failover.as_ref().map(|f| (&f.cluster, f.generation)),
            to = ?current.failover.as_ref().map(|f| (&f.cluster, f.generation)),
            "upstream replaced in place; connections to the old one are drained"
        );
        if bumps_epochs(&old, &current) {
            old.switched.cancel();
        }
        old.drain.cancel();
        tokio::spawn(async move {
            tokio::time::sleep(drain_timeout).await;
            old.kill.cancel();
            old.stop.cancel();
        });
    }

    /// The failover decision the current upstream follows, if any.
    pub fn failover(&self) -> Option<FailoverState> {
        self.current_upstream().failover.clone()
    }

    fn current_upstream(&self) -> Arc<UpstreamGeneration> {
        self.upstream
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Filters for connections opened from now on.
    pub fn set_filters(&self, filters: Vec<Arc<dyn FilterFactory>>) {
        *self.filters.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(filters);
    }

    fn keep_listener(&self, handle: tokio::task::JoinHandle<()>) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    /// Stops accepting and returns once every port of this cluster is closed.
    pub async fn stop_listening(&self) {
        self.stop_accepting.cancel();
        // A broker listener may be registered while the first ones are awaited.
        loop {
            let handles: Vec<_> =
                std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|e| e.into_inner()));
            if handles.is_empty() {
                return;
            }
            for handle in handles {
                let _ = handle.await;
            }
        }
    }

    pub fn tls_metrics(&self) -> Option<&TlsMetrics> {
        self.tls.as_ref().map(|tls| &tls.metrics)
    }

    pub fn handshake_timeout(&self) -> Option<Duration> {
        self.tls.as_ref().map(|tls| tls.handshake_timeout)
    }

    /// Finishes a TLS handshake whose ClientHello was routed here by SNI, then serves.
    pub async fn serve_sni(
        self: Arc<Self>,
        start: StartHandshake<BufReader<TcpStream>>,
        peer: SocketAddr,
        endpoint: Endpoint,
    ) {
        let Some(tls) = &self.tls else {
            return;
        };
        let config = tls.config.borrow().clone();
        let handshake =
            tokio::time::timeout(tls.handshake_timeout, start.into_stream(config)).await;
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return self.handshake_failed(&err),
            Err(_) => {
                return self.handshake_failed(&std::io::Error::from(std::io::ErrorKind::TimedOut))
            }
        };
        let principal = principal_of(
            stream.get_ref().1.peer_certificates(),
            &tls.principal_sources,
        );
        tls.metrics.handshake(&self.name, None);
        self.serve(stream, peer, endpoint, principal).await;
    }

    /// Counts and audits a connection closed because its identity is deny-listed.
    fn identity_denied(&self, principal: &Principal, stage: &str) {
        self.metrics.identity_denied(stage);
        tracing::warn!(
            target: "strait::audit",
            event = "identity_denied",
            virtual_cluster = %self.name,
            %principal,
            stage,
            "connection closed: identity is on the deny list"
        );
    }

    fn handshake_failed(&self, err: &std::io::Error) {
        let reason = handshake_failure_reason(err);
        if let Some(tls) = &self.tls {
            tls.metrics.handshake(&self.name, Some(reason));
        }
        if reason == "eof" {
            // A TCP probe (a load balancer's health check) connects and closes: not worth a WARN.
            tracing::debug!(virtual_cluster = %self.name, reason, "TLS handshake abandoned by the client");
            return;
        }
        let Some(suppressed) = self.handshake_warnings.allow(reason) else {
            return;
        };
        if let Some(refusal) = trust_domain_refusal(err) {
            // A certificate that claims an identity its CA may not vouch for.
            tracing::warn!(virtual_cluster = %self.name, %refusal, reason, suppressed, "TLS handshake refused (logged at most every 10 s per reason; suppressed counts the lines held back, every failure is in tls_handshakes_total)");
        } else {
            tracing::warn!(virtual_cluster = %self.name, %err, reason, suppressed, "TLS handshake failed (logged at most every 10 s per reason; suppressed counts the lines held back, every failure is in tls_handshakes_total)");
        }
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
                    let handle = self.tracker.spawn(
                        self.clone()
                            .accept_loop(listener, Endpoint::Broker(node_id)),
                    );
                    self.keep_listener(handle);
                }
                Err(err) => {
                    tracing::error!(virtual_cluster = %self.name, node_id, %err, "cannot serve broker port");
                }
            }
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, endpoint: Endpoint) {
        let open = ConnectionCount::new(self.settings.max_connections);
        let refusals = WarnLimiter::new(Duration::from_secs(10));
        loop {
            let accepted = tokio::select! {
                _ = self.stop_accepting.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = open.try_open() else {
                        // Accepted and closed at once: left in the backlog,
                        // the client would only time out later.
                        drop(stream);
                        self.metrics.limited("max_connections");
                        if let Some(suppressed) = refusals.allow() {
                            tracing::warn!(
                                virtual_cluster = %self.name,
                                client = %peer,
                                endpoint = ?endpoint,
                                max_connections = self.settings.max_connections,
                                suppressed,
                                "connection refused: the listener has max_connections open (lines like this are logged at most every 10 s; suppressed counts the ones held back)"
                            );
                        }
                        continue;
                    };
                    let span = tracing::info_span!(
                        "connection",
                        virtual_cluster = %self.name,
                        client = %peer,
                        endpoint = ?endpoint
                    );
                    let serve = self.clone().accepted(stream, peer, endpoint);
                    self.tracker.spawn(
                        async move {
                            let _slot = slot;
                            serve.await
                        }
                        .instrument(span),
                    );
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

    /// A TCP connection on one of this cluster's own ports.
    async fn accepted(self: Arc<Self>, client: TcpStream, peer: SocketAddr, endpoint: Endpoint) {
        client.set_nodelay(true).ok();
        let Some(tls) = &self.tls else {
            return self
                .serve(client, peer, endpoint, Principal::Anonymous)
                .await;
        };
        let acceptor = TlsAcceptor::from(tls.config.borrow().clone());
        let stream = match tokio::time::timeout(
            tls.handshake_timeout,
            acceptor.accept(strait_tls::buffered(client)),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return self.handshake_failed(&err),
            Err(_) => {
                return self.handshake_failed(&std::io::Error::from(std::io::ErrorKind::TimedOut))
            }
        };
        let principal = principal_of(
            stream.get_ref().1.peer_certificates(),
            &tls.principal_sources,
        );
        tls.metrics.handshake(&self.name, None);
        tracing::debug!(%principal, "TLS established");
        self.serve(stream, peer, endpoint, principal).await;
    }

    /// Whether connections to broker `node_id` can be relayed now (its
    /// address upstream is known).
    pub fn knows_broker(&self, node_id: i32) -> bool {
        self.brokers.upstream_of(node_id).is_some()
    }

    /// Serves a client connection that arrived through a tunnel from peer
    /// edge `via` as if it had connected to `endpoint` here, with the
    /// principal the peer established (the caller checked that the peer may
    /// assert it). It gets this cluster's filters, authorization, quotas,
    /// deny list and audit, and is drained with the cluster.
    pub fn spawn_tunneled<S>(
        self: &Arc<Self>,
        client: S,
        peer: SocketAddr,
        endpoint: Endpoint,
        principal: Principal,
        via: Arc<str>,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let span = tracing::info_span!(
            "connection",
            virtual_cluster = %self.name,
            client = %peer,
            via_peer = %via,
            endpoint = ?endpoint
        );
        self.tracker.spawn(
            self.clone()
                .serve_via(client, peer, endpoint, principal, Some(via))
                .instrument(span),
        );
    }

    /// Counts a connection refused or closed by a limit (a shared SNI port's).
    pub fn count_limited(&self, reason: &str) {
        self.metrics.limited(reason);
    }

    /// Whether the cluster still takes connections.
    pub fn is_accepting(&self) -> bool {
        !self.stop_accepting.is_cancelled()
    }

    async fn serve<S>(
        self: Arc<Self>,
        client: S,
        peer: SocketAddr,
        endpoint: Endpoint,
        principal: Principal,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        self.serve_via(client, peer, endpoint, principal, None)
            .await
    }

    async fn serve_via<S>(
        self: Arc<Self>,
        client: S,
        peer: SocketAddr,
        endpoint: Endpoint,
        principal: Principal,
        via_peer: Option<Arc<str>>,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        self.metrics.connections.inc();
        self.metrics.connections_open.inc();
        let _open = scopeguard(&self.metrics.connections_open);
        // Before the broker is reached: a deny-listed identity gets nothing
        // but a completed handshake and a closed connection.
        if self.deny.is_denied(&principal) {
            self.identity_denied(&principal, "handshake");
            return;
        }

        let generation = self.current_upstream();
        // Set when a broker connection goes to the bootstrap for want of a
        // route: it is drained once the broker is learnt (see below).
        let mut relayed_for_unknown_broker = None;
        let target = match endpoint {
            Endpoint::Bootstrap => UpstreamTarget::Bootstrap,
            // `node_id` is the edge's; the target names the upstream's own
            // (a tunneled upstream routes by it).
            Endpoint::Broker(node_id) => match generation.discovery.route(node_id) {
                Some((node_id, address)) => UpstreamTarget::Broker { node_id, address },
                // An edge id the new upstream has no broker for, yet (its
                // metadata has not been seen) or at all (it has fewer
                // brokers than the one it replaced): any broker of it
                // answers (a request for a partition it does not lead gets
                // NOT_LEADER_OR_FOLLOWER, and the client refreshes its
                // metadata), so no client is left with a dangling id.
                None if generation.swaps > 0 => {
                    tracing::debug!(
                        node_id,
                        "broker not known on the new upstream yet: relaying to its bootstrap"
                    );
                    relayed_for_unknown_broker = Some(node_id);
                    UpstreamTarget::Bootstrap
                }
                None => {
                    tracing::warn!(node_id, "no address known for this broker");
                    return;
                }
            },
        };
        let context = ConnectContext {
            virtual_cluster: self.name.clone(),
            principal: principal.clone(),
        };
        let connect = generation.upstream.connect_as(&target, &context);
        let connected = tokio::select! {
            connected = connect => connected,
            // Replaced while connecting (e.g. to a primary that is gone):
            // the client reconnects to the new one.
            _ = generation.drain.cancelled() => return,
        };
        let (upstream, session_expires_at) = match connected {
            Ok(connection) => (connection.io, connection.session_expires_at),
            Err(ConnectError::Refused {
                upstream,
                label,
                reason,
            }) => {
                // No retry helps until the far side's policy changes: counted
                // apart, and logged with the reason it gave.
                self.metrics.upstream_refused(label);
                tracing::warn!(%upstream, %reason, "the upstream refused the connection; closing the client connection");
                return;
            }
            Err(err @ ConnectError::Authentication { mechanism, .. }) => {
                // Closed like an unreachable broker; counted apart, since no
                // retry fixes it until the credentials do.
                self.metrics.upstream_auth_failed(mechanism.as_str());
                tracing::warn!(%err, "upstream SASL authentication failed; closing the client connection");
                return;
            }
            Err(err) => {
                // The client sees a closed connection and retries, as with a broker that is down.
                self.metrics.upstream_connect_errors.inc();
                tracing::warn!(%err, "upstream unreachable; closing the client connection");
                return;
            }
        };
        let info = ConnectionInfo {
            via_peer,
            virtual_cluster: self.name.clone(),
            client_addr: peer,
            endpoint,
            principal,
        };
        let factories = self
            .filters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let configured: Vec<Box<dyn Filter>> = factories
            .iter()
            .map(|factory| factory.create(&info))
            .collect();
        // The edge's own filters depend on what the configured ones decode.
        let mut filters: Vec<Box<dyn Filter>> = Vec::from(edge_filters_for(
            self.brokers.clone(),
            generation.discovery.clone(),
            &configured,
        ));
        if self.upstream_sasl {
            // Before the configured filters, so none of them sees client SASL.
            filters.push(Box::new(ClientSaslFilter));
        }
        filters.extend(configured);
        let chain = FilterChain::new(filters);
        let quota = self
            .quotas
            .as_ref()
            .and_then(|quotas| quotas.for_principal(&info.principal));
        tracing::debug!("connection open");
        // A drain of the cluster drains this connection too; the end of the
        // upstream SASL session drains only this one.
        let drain = generation.drain.child_token();
        let session_end = close_before_expiry(session_expires_at, drain.clone());
        let rerouted = drain_once_known(
            generation.discovery.clone(),
            relayed_for_unknown_broker,
            drain.clone(),
        );
        let deny = self.deny.check(info.principal.clone());
        let relayed = relay_checked(
            client,
            upstream,
            info,
            chain,
            quota,
            self.metrics.clone(),
            self.settings.clone(),
            Drain {
                token: drain,
                switched: generation.switched.clone(),
            },
            Some(deny),
        );
        let result = tokio::select! {
            result = relayed => result,
            _ = generation.kill.cancelled() => {
                tracing::info!("drain timeout: connection closed");
                return;
            }
            never = session_end => match never {},
            never = rerouted => match never {},
        };
        match result {
            Ok(()) => tracing::debug!("connection closed"),
            Err(ConnectionError::IdentityDenied(principal)) => {
                self.identity_denied(&Principal::Named(principal.into()), "request");
            }
            Err(err @ ConnectionError::IdleTimeout(_)) => {
                self.metrics.limited("idle_timeout");
                tracing::info!(%err, "closing idle connection");
            }
            // A filter stuck on a dependency (a KMS that stopped answering) costs the client its
            // connection: an operator must see it.
            Err(err @ ConnectionError::FilterTimeout(_)) => {
                self.metrics.limited("filter_timeout");
                tracing::warn!(%err, "closing connection");
            }
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

/// KIP-368: a broker that announced a session lifetime closes the
/// connection once it has passed, unless it was re-authenticated. The edge
/// does not re-authenticate between a client's requests; it drains the client
/// connection (stops reading requests at a frame boundary, delivers the
/// answers to those sent, closes) at 85-95 % of the lifetime, like the Java
/// client's re-authentication window, so the client reconnects and gets a
/// fresh session before the broker would cut it. The jitter keeps
/// connections opened together from all reconnecting at once.
/// Never completes: it only cancels `drain`.
async fn close_before_expiry(
    expires_at: Option<tokio::time::Instant>,
    drain: CancellationToken,
) -> std::convert::Infallible {
    if let Some(expires_at) = expires_at {
        let now = tokio::time::Instant::now();
        let lifetime = expires_at.saturating_duration_since(now);
        let share = rand::Rng::random_range(&mut rand::rng(), 0.85..0.95);
        tokio::time::sleep(lifetime.mul_f64(share)).await;
        tracing::debug!(
            ?lifetime,
            "upstream SASL session ends soon: closing the client connection at a frame boundary so it reconnects"
        );
        drain.cancel();
    }
    std::future::pending().await
}

/// Whether the drain of a swap from `old` to `new` answers idempotent
/// producers' batches `UNKNOWN_PRODUCER_ID`, so that they bump their epoch
/// (see crate::drained): when they move to another cluster with their
/// sequences, and when a fence goes up (its first answer to them is the
/// same error; a `NOT_LEADER_OR_FOLLOWER` from the drain before it would
/// make that one fatal to librdkafka). Not from a fenced upstream: the
/// fence told them already, and answered them since with another error,
/// after which librdkafka takes `UNKNOWN_PRODUCER_ID` as fatal. Not when
/// the cluster stays otherwise (a fence lifted).
fn bumps_epochs(old: &UpstreamGeneration, new: &UpstreamGeneration) -> bool {
    match (&old.failover, &new.failover) {
        (Some(old), _) if old.fence.is_some() => false,
        (Some(old), Some(new)) => old.cluster != new.cluster || new.fence.is_some(),
        _ => true,
    }
}

/// A connection for a broker the new upstream had no route for went to its
/// bootstrap, whichever broker that is. A client keeps one connection per
/// broker id and sends that broker's partitions over it, so without this it
/// would be answered NOT_LEADER_OR_FOLLOWER for as long as the connection
/// lives, however often it refreshes metadata. Once the broker is learnt
/// (from the first Metadata answer through the edge), the connection is
/// drained, and the client's reconnect reaches the right broker.
/// Never completes: it only cancels `drain`.
async fn drain_once_known(
    discovery: Arc<Discovery>,
    edge_id: Option<i32>,
    drain: CancellationToken,
) -> std::convert::Infallible {
    if let Some(edge_id) = edge_id {
        discovery.known(edge_id).await;
        tracing::debug!(
            node_id = edge_id,
            "broker learnt on the new upstream: draining the connection relayed to its bootstrap"
        );
        drain.cancel();
    }
    std::future::pending().await
}

fn log_close(err: &ConnectionError) {
    match err {
        // A TLS failure after the handshake is a configuration problem an operator must see: e.g. a
        // TLS 1.3 broker that requires a client certificate sends its alert only after the edge's
        // handshake completed, so the refusal shows up here rather than at connect time.
        ConnectionError::Io(io) if tls_error(io).is_some() => {
            tracing::warn!(%err, "TLS error on an established connection; closing it")
        }
        ConnectionError::Io(_) | ConnectionError::UpstreamClosed => {
            tracing::debug!(%err, "connection closed")
        }
        _ => tracing::info!(%err, "connection closed"),
    }
}

fn tls_error(io: &std::io::Error) -> Option<&strait_tls::tokio_rustls::rustls::Error> {
    io.get_ref()?.downcast_ref()
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

//! One live tunnel connection per peer: dialed (addresses in turn, with
//! backoff) or accepted, published on a `watch` channel that tunnel
//! upstreams read for every new stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use quinn::{Connection, Endpoint};
use rand::Rng;
use strait_edge_config::{HostPort, MeshPeer, MeshService};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::header::ForwardedPrincipal;
use crate::metrics::{MeshMetrics, PeerLabels};

/// Application close code when a peer is refused after the handshake.
pub(crate) const CLOSE_UNKNOWN_PEER: u32 = 1;
/// Application close code of a shutting-down edge.
pub(crate) const CLOSE_SHUTDOWN: u32 = 2;
/// Application close code of a connection whose peer stopped answering.
pub(crate) const CLOSE_UNRESPONSIVE: u32 = 3;

/// What a peer may do here, from `mesh.peers[]`.
pub struct PeerPolicy {
    pub name: Arc<str>,
    pub spiffe_id: String,
    pub addresses: Vec<HostPort>,
    /// Globs of named principals it may forward.
    may_assert: GlobSet,
    /// `anonymous` is listed in `may_assert`.
    may_assert_anonymous: bool,
    pub exports: Vec<String>,
    /// The services exported to it, with the address each is dialed at.
    services: HashMap<String, HostPort>,
}

impl PeerPolicy {
    /// `services`: the edge's `mesh.services`; the peer reaches only those
    /// its `export_services` name (validated to exist).
    pub fn new(peer: &MeshPeer, services: &[MeshService]) -> Result<Self, String> {
        let mut exported = HashMap::new();
        for name in &peer.export_services {
            let service = services
                .iter()
                .find(|s| &s.name == name)
                .ok_or_else(|| format!("export_services: '{name}' is not in mesh.services"))?;
            exported.insert(name.clone(), service.address.clone());
        }
        let mut globs = GlobSetBuilder::new();
        for glob in peer.may_assert.iter().filter(|g| *g != "anonymous") {
            globs.add(Glob::new(glob).map_err(|e| format!("may_assert '{glob}': {e}"))?);
        }
        Ok(PeerPolicy {
            name: peer.name.as_str().into(),
            spiffe_id: peer.spiffe_id.clone(),
            addresses: peer.addresses.clone(),
            may_assert: globs.build().map_err(|e| e.to_string())?,
            may_assert_anonymous: peer.may_assert.iter().any(|g| g == "anonymous"),
            exports: peer.exports.clone(),
            services: exported,
        })
    }

    /// Where the service `name` is dialed, if it is exported to this peer.
    pub fn service(&self, name: &str) -> Option<&HostPort> {
        self.services.get(name)
    }

    /// A peer may always assert its own SPIFFE ID, the one its handshake
    /// proved: those are the peer edge's own connections (its health probes
    /// and replication checks of a failover group member behind this edge).
    pub fn may_assert(&self, principal: &ForwardedPrincipal) -> bool {
        match principal {
            ForwardedPrincipal::Anonymous => self.may_assert_anonymous,
            ForwardedPrincipal::Named(name) if *name == self.spiffe_id => true,
            ForwardedPrincipal::Named(name) => self.may_assert.is_match(name),
        }
    }

    pub fn exports(&self, virtual_cluster: &str) -> bool {
        self.exports.iter().any(|e| e == virtual_cluster)
    }
}

/// A live connection to a peer, on either transport.
#[derive(Clone)]
pub(crate) enum Tunnel {
    Quic(Connection),
    /// TLS-over-TCP: HTTP/2 streams, opened only by the dialing side.
    H2 {
        send: h2::client::SendRequest<bytes::Bytes>,
        id: u64,
        closed: Arc<std::sync::atomic::AtomicBool>,
    },
}

impl Tunnel {
    pub fn is_alive(&self) -> bool {
        match self {
            Tunnel::Quic(c) => c.close_reason().is_none(),
            Tunnel::H2 { closed, .. } => !closed.load(std::sync::atomic::Ordering::Acquire),
        }
    }

    fn id(&self) -> u64 {
        match self {
            Tunnel::Quic(c) => c.stable_id() as u64,
            Tunnel::H2 { id, .. } => *id,
        }
    }

    /// Datagrams received on the connection so far (QUIC; none for HTTP/2,
    /// where TCP notices a dead peer by itself).
    pub fn packets_received(&self) -> Option<u64> {
        match self {
            Tunnel::Quic(c) => Some(c.stats().udp_rx.datagrams),
            Tunnel::H2 { .. } => None,
        }
    }

    pub fn close_unresponsive(&self) {
        if let Tunnel::Quic(c) = self {
            c.close(CLOSE_UNRESPONSIVE.into(), b"peer unresponsive");
        }
    }

    /// A new stream to the peer.
    pub async fn open(&self) -> std::io::Result<Box<dyn crate::stream::StreamIo>> {
        match self {
            Tunnel::Quic(conn) => {
                let (send, recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
                Ok(Box::new(crate::stream::QuicStream { send, recv }))
            }
            Tunnel::H2 { send, .. } => {
                let mut ready = send.clone().ready().await.map_err(std::io::Error::other)?;
                let request = http::Request::post("https://strait-peer/tunnel")
                    .body(())
                    .map_err(std::io::Error::other)?;
                let (response, stream) = ready
                    .send_request(request, false)
                    .map_err(std::io::Error::other)?;
                Ok(Box::new(crate::stream::H2Stream::new(
                    stream,
                    crate::stream::H2Recv::Waiting(response),
                )))
            }
        }
    }
}

/// A peer's current connection (none while it is down).
pub(crate) struct PeerLink {
    pub policy: PeerPolicy,
    pub connection: watch::Sender<Option<Tunnel>>,
}

impl PeerLink {
    pub fn new(policy: PeerPolicy) -> Self {
        PeerLink {
            policy,
            connection: watch::channel(None).0,
        }
    }

    /// Publishes `conn` unless a live one is in place already (both sides
    /// dialed: the first one up stays, the other still serves the streams
    /// opened on it).
    pub fn offer(&self, conn: &Tunnel) -> bool {
        self.connection.send_if_modified(|current| {
            if current.as_ref().is_some_and(Tunnel::is_alive) {
                return false;
            }
            *current = Some(conn.clone());
            true
        })
    }

    /// Withdraws `conn` if it is the published one.
    pub fn withdraw(&self, conn: &Tunnel) {
        self.connection.send_if_modified(|current| {
            if current.as_ref().is_some_and(|c| c.id() == conn.id()) {
                *current = None;
                return true;
            }
            false
        });
    }
}

/// Backoff between dial rounds: 200 ms doubling to 10 s, with jitter in
/// [d/2, d] so that edges restarted together do not dial in lockstep.
fn backoff(attempt: u32) -> Duration {
    let d = Duration::from_millis(200)
        .saturating_mul(1 << attempt.min(6))
        .min(Duration::from_secs(10));
    d.mul_f64(rand::rng().random_range(0.5..=1.0))
}

async fn resolve(address: &HostPort) -> std::io::Result<Vec<SocketAddr>> {
    Ok(
        tokio::net::lookup_host((address.host.as_str(), address.port))
            .await?
            .collect(),
    )
}

/// How a peer is dialed.
pub(crate) enum Dialer {
    Quic {
        endpoint: Endpoint,
        config: quinn::ClientConfig,
    },
    TlsTcp {
        connector: tokio_rustls::TlsConnector,
    },
}

/// A dialed connection and what resolves (with the reason) when it closes.
pub(crate) struct Dialed {
    pub tunnel: Tunnel,
    closed: std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>,
}

/// HTTP/2 PINGs every [`KEEPALIVE`]; returns once one goes unanswered for
/// [`DEAD_AFTER`] (the peer was killed or cut off: TCP alone would notice
/// only after minutes of retransmissions), as QUIC's idle timeout does.
pub(crate) async fn h2_keepalive(ping: Option<h2::PingPong>) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE).await;
        match tokio::time::timeout(DEAD_AFTER, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return err.to_string(),
            Err(_) => return format!("no answer to a keepalive within {DEAD_AFTER:?}"),
        }
    }
}

/// Keepalive interval and dead-peer timeout of both transports.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(2);
pub(crate) const DEAD_AFTER: Duration = Duration::from_secs(10);

/// The h2 settings of TLS-over-TCP tunnels, sized like the QUIC transport.
pub(crate) fn h2_windows() -> (u32, u32) {
    (8 << 20, 64 << 20)
}

impl Dialer {
    async fn dial(
        &self,
        addr: SocketAddr,
        peer: &str,
        metrics: &MeshMetrics,
    ) -> Result<Dialed, String> {
        match self {
            Dialer::Quic { endpoint, config } => {
                let conn = endpoint
                    .connect_with(config.clone(), addr, "strait-peer")
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                let (sampled, peer, metrics) = (conn.clone(), peer.to_owned(), metrics.clone());
                Ok(Dialed {
                    tunnel: Tunnel::Quic(conn),
                    closed: Box::pin(async move {
                        sample_until_closed(&sampled, &peer, &metrics)
                            .await
                            .to_string()
                    }),
                })
            }
            Dialer::TlsTcp { connector } => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                tcp.set_nodelay(true).ok();
                let name = rustls::pki_types::ServerName::try_from("strait-peer")
                    .map_err(|e| e.to_string())?;
                let tls = connector
                    .connect(name, strait_tls::buffered(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
                let (stream_window, connection_window) = h2_windows();
                let (send, mut connection) = h2::client::Builder::new()
                    .initial_window_size(stream_window)
                    .initial_connection_window_size(connection_window)
                    .handshake::<_, bytes::Bytes>(tls)
                    .await
                    .map_err(|e| e.to_string())?;
                let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                let flag = closed.clone();
                let labels = PeerLabels {
                    peer: peer.to_owned(),
                };
                let connected = metrics.connected.get_or_create(&labels).clone();
                connected.inc();
                let ping = connection.ping_pong();
                tokio::spawn(async move {
                    let reason = tokio::select! {
                        result = connection => match result {
                            Ok(()) => "closed".to_owned(),
                            Err(e) => e.to_string(),
                        },
                        // Dropping the connection closes the socket.
                        dead = h2_keepalive(ping) => dead,
                    };
                    flag.store(true, std::sync::atomic::Ordering::Release);
                    connected.dec();
                    let _ = done_tx.send(reason);
                });
                Ok(Dialed {
                    tunnel: Tunnel::H2 {
                        send,
                        id: rand::rng().random(),
                        closed,
                    },
                    closed: Box::pin(
                        async move { done_rx.await.unwrap_or_else(|_| "closed".into()) },
                    ),
                })
            }
        }
    }
}

/// Keeps a dialed connection to `link`'s peer up until `stop`; `on_up`
/// serves the streams the peer opens on each new connection.
pub(crate) async fn keep_dialed(
    dialer: Dialer,
    link: Arc<PeerLink>,
    metrics: MeshMetrics,
    stop: CancellationToken,
    on_up: impl Fn(&Tunnel) + Send + 'static,
) {
    let peer = link.policy.name.clone();
    let mut attempt = 0u32;
    loop {
        let mut connected = None;
        'addresses: for address in &link.policy.addresses {
            let addrs = match resolve(address).await {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%peer, %address, %err, "cannot resolve the peer's address");
                    continue;
                }
            };
            for addr in addrs {
                let outcome = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = tokio::time::timeout(Duration::from_secs(10), dialer.dial(addr, &peer, &metrics)) => r,
                };
                match outcome {
                    Ok(Ok(dialed)) => {
                        connected = Some((addr, dialed));
                        break 'addresses;
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(%peer, %addr, %err, "tunnel handshake with the peer failed")
                    }
                    Err(_) => tracing::warn!(%peer, %addr, "no answer from the peer within 10s"),
                }
            }
        }
        let Some((addr, dialed)) = connected else {
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff(attempt)) => continue,
            }
        };
        tracing::info!(%peer, remote = %addr, "tunnel to the peer is up (dialed)");
        metrics.connection(&peer, "dialed");
        let up_since = tokio::time::Instant::now();
        link.offer(&dialed.tunnel);
        on_up(&dialed.tunnel);
        let tunnel = dialed.tunnel;
        let reason = tokio::select! {
            _ = stop.cancelled() => {
                if let Tunnel::Quic(conn) = &tunnel {
                    conn.close(CLOSE_SHUTDOWN.into(), b"edge shutting down");
                }
                link.withdraw(&tunnel);
                return;
            }
            reason = dialed.closed => reason,
        };
        link.withdraw(&tunnel);
        tracing::warn!(%peer, %reason, "tunnel to the peer is down; redialing");
        // A connection that lasted resets the backoff; one that failed at once does not.
        attempt = if up_since.elapsed() > Duration::from_secs(30) {
            0
        } else {
            attempt.saturating_add(1)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff(attempt)) => {}
        }
    }
}

/// Publishes the connection's path statistics every second until it
/// closes; returns why it closed.
pub(crate) async fn sample_until_closed(
    conn: &Connection,
    peer: &str,
    metrics: &MeshMetrics,
) -> quinn::ConnectionError {
    let labels = PeerLabels {
        peer: peer.to_owned(),
    };
    let direction = |d: &str| crate::metrics::DirectionLabels {
        peer: peer.to_owned(),
        direction: d.to_owned(),
    };
    let connected = metrics.connected.get_or_create(&labels).clone();
    connected.inc();
    let (mut lost, mut sent, mut received) = (0u64, 0u64, 0u64);
    let mut remote = conn.remote_address();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let reason = loop {
        tokio::select! {
            reason = conn.closed() => break reason,
            _ = tick.tick() => {}
        }
        // quinn validates a new path before moving to it: a changed remote
        // address here is a migration (NAT rebinding, a new interface),
        // carried on by the same connection and its streams.
        let now_remote = conn.remote_address();
        if now_remote != remote {
            tracing::info!(%peer, from = %remote, to = %now_remote, "tunnel connection migrated to the peer's new address");
            metrics.address_changes.get_or_create(&labels).inc();
            remote = now_remote;
        }
        let stats = conn.stats();
        metrics
            .rtt
            .get_or_create(&labels)
            .set(stats.path.rtt.as_secs_f64());
        metrics
            .cwnd
            .get_or_create(&labels)
            .set(i64::try_from(stats.path.cwnd).unwrap_or(i64::MAX));
        // Connection statistics start at zero: count what grew since the
        // last sample.
        metrics
            .lost_packets
            .get_or_create(&labels)
            .inc_by(stats.path.lost_packets.saturating_sub(lost));
        lost = stats.path.lost_packets;
        metrics
            .bytes
            .get_or_create(&direction("sent"))
            .inc_by(stats.udp_tx.bytes.saturating_sub(sent));
        sent = stats.udp_tx.bytes;
        metrics
            .bytes
            .get_or_create(&direction("received"))
            .inc_by(stats.udp_rx.bytes.saturating_sub(received));
        received = stats.udp_rx.bytes;
    };
    connected.dec();
    reason
}

/// The configured peer an accepted connection's certificate names, or none
/// (counted and audited: the handshake verified the chain, but the ID is no
/// configured peer's).
pub(crate) fn accepted_peer(
    links: &std::collections::HashMap<String, Arc<PeerLink>>,
    chain: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    remote: SocketAddr,
    metrics: &MeshMetrics,
) -> Option<Arc<PeerLink>> {
    let id = crate::tls::peer_spiffe_id(chain);
    let link = id
        .as_deref()
        .and_then(|id| links.values().find(|l| l.policy.spiffe_id == id))
        .cloned();
    if link.is_none() {
        metrics.connection_refused("unknown_peer");
        tracing::warn!(target: "strait_mesh::audit", %remote, identity = id.as_deref().unwrap_or("none"), "tunnel connection refused: not a configured peer");
    }
    link
}

/// How long an accepted connection has for its handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection's handshake, bounded; a failure is counted and
/// logged, whichever transport it was.
pub(crate) async fn accepted_handshake<T, E: std::fmt::Display>(
    handshake: impl std::future::Future<Output = Result<T, E>>,
    remote: SocketAddr,
    metrics: &MeshMetrics,
) -> Option<T> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err(err)) => {
            metrics.connection_refused("handshake");
            tracing::warn!(%remote, %err, "tunnel connection refused: handshake failed");
            None
        }
        Err(_) => {
            metrics.connection_refused("handshake_timeout");
            tracing::warn!(%remote, "tunnel connection refused: no handshake within {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PeerPolicy;
    use crate::header::ForwardedPrincipal;
    use strait_edge_config::{MeshPeer, MeshTransport};

    #[test]
    fn a_peer_asserts_its_globs_and_its_own_identity_only() {
        let peer = MeshPeer {
            name: "edge-west".into(),
            addresses: vec![],
            spiffe_id: "spiffe://west.example/edge/edge-west".into(),
            transport: MeshTransport::Quic,
            may_assert: vec!["spiffe://west.example/ns/shop/*".into()],
            exports: vec![],
            export_services: vec![],
        };
        let policy = PeerPolicy::new(&peer, &[]).unwrap();
        let named = |s: &str| ForwardedPrincipal::Named(s.into());
        assert!(policy.may_assert(&named("spiffe://west.example/ns/shop/sa/orders")));
        // Its own connections (probes, replication checks) carry its own ID.
        assert!(policy.may_assert(&named("spiffe://west.example/edge/edge-west")));
        assert!(!policy.may_assert(&named("spiffe://west.example/edge/edge-north")));
        assert!(!policy.may_assert(&named("spiffe://west.example/ns/ops/sa/admin")));
        assert!(!policy.may_assert(&ForwardedPrincipal::Anonymous));
    }
}

//! One live tunnel connection per peer: dialed (addresses in turn, with
//! backoff) or accepted, published on a `watch` channel that tunnel
//! upstreams read for every new stream. When both edges of a pair dial at
//! once, both keep the same one of the two connections and retire the
//! other once nothing uses it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint};
use rand::Rng;
use strait_edge_config::HostPort;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{MeshMetrics, PeerLabels};
pub(crate) use crate::policy::PeerPolicy;
use crate::tunnel::{Tunnel, CLOSE_DUPLICATE, CLOSE_SHUTDOWN};

/// A peer's live connections and the one in use (none while it is down).
pub(crate) struct PeerLink {
    pub policy: PeerPolicy,
    /// The connection new streams go on.
    pub connection: watch::Sender<Option<Tunnel>>,
    /// Every connection up now, the one in use among them.
    live: std::sync::Mutex<Vec<Tunnel>>,
    /// Whether the pair keeps the connections this edge dialed (its SPIFFE
    /// ID sorts before the peer's); unknown without an ID of its own.
    keeps_own_dials: Option<bool>,
}

/// How long a duplicate connection may keep streams that are still open on
/// it before it is closed anyway (its clients reconnect, onto the kept one).
const RETIRE_GRACE: Duration = Duration::from_secs(30);
/// A duplicate idle for this long is closed.
const RETIRE_IDLE: Duration = Duration::from_secs(2);

/// Which connection of a pair both edges use: one the edge with the lower
/// SPIFFE ID dialed, the newest of those (an edge dials anew only once it
/// believes its last connection gone); without that rule, the oldest.
/// `connections`: (id, dialed here), ids growing in the order they came up.
pub(crate) fn preferred(
    connections: impl IntoIterator<Item = (u64, bool)>,
    keeps_own_dials: Option<bool>,
) -> Option<u64> {
    let connections = connections.into_iter();
    match keeps_own_dials {
        Some(keep) => connections
            .max_by_key(|&(id, dialed_here)| (dialed_here == keep, id))
            .map(|(id, _)| id),
        None => connections.min_by_key(|&(id, _)| id).map(|(id, _)| id),
    }
}

impl PeerLink {
    /// `own_id`: this edge's SPIFFE ID, which breaks the tie when both
    /// edges dial.
    pub fn new(policy: PeerPolicy, own_id: Option<&str>) -> Self {
        let keeps_own_dials = own_id.map(|own| own < policy.spiffe_id.as_str());
        PeerLink {
            policy,
            connection: watch::channel(None).0,
            live: Default::default(),
            keeps_own_dials,
        }
    }

    /// Adds a connection that came up; true if new streams go on it.
    pub fn offer(&self, tunnel: &Tunnel) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.push(tunnel.clone());
        self.republish(&mut live);
        self.connection
            .borrow()
            .as_ref()
            .is_some_and(|t| t.id() == tunnel.id())
    }

    /// Removes a connection that closed; another live one takes its place.
    pub fn withdraw(&self, tunnel: &Tunnel) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|t| t.id() != tunnel.id());
        self.republish(&mut live);
    }

    fn republish(&self, live: &mut Vec<Tunnel>) {
        live.retain(Tunnel::is_alive);
        let chosen = preferred(
            live.iter().map(|t| (t.id(), t.meta.dialed_here)),
            self.keeps_own_dials,
        );
        for t in live.iter() {
            let superseded = self.keeps_own_dials.is_some() && Some(t.id()) != chosen;
            t.meta
                .superseded
                .store(superseded, std::sync::atomic::Ordering::Release);
        }
        let next = chosen.and_then(|id| live.iter().find(|t| t.id() == id).cloned());
        self.connection.send_if_modified(|current| {
            if current.as_ref().map(Tunnel::id) == next.as_ref().map(Tunnel::id) {
                return false;
            }
            *current = next;
            true
        });
    }

    /// Closes `tunnel` once it is a duplicate (the pair uses the other) and
    /// no stream uses it, or [`RETIRE_GRACE`] after it became one; returns
    /// when it is closed.
    ///
    /// Only the edge that dialed a connection retires it, for one the peer
    /// dialed to it (the only way a connection it dialed is superseded).
    /// A peer of several instances sharing one SPIFFE ID (HA edges) may
    /// dial from each: those connections all stay, each instance using its
    /// own, where retiring one would have its instance redial for ever.
    pub async fn retire_when_superseded(&self, tunnel: &Tunnel) {
        if self.keeps_own_dials.is_none() || !tunnel.meta.dialed_here {
            return;
        }
        let peer = &self.policy.name;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let (mut superseded_since, mut idle_since) = (None, None);
        while tunnel.is_alive() {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            if !tunnel
                .meta
                .superseded
                .load(std::sync::atomic::Ordering::Acquire)
            {
                (superseded_since, idle_since) = (None, None);
                continue;
            }
            let since = *superseded_since.get_or_insert(now);
            let streams = tunnel.open_streams();
            idle_since = if streams == 0 {
                Some(idle_since.unwrap_or(now))
            } else {
                None
            };
            let idle = idle_since.is_some_and(|t| now - t >= RETIRE_IDLE);
            if idle || now - since >= RETIRE_GRACE {
                tracing::info!(%peer, streams, dialed_here = tunnel.meta.dialed_here, "closing a duplicate tunnel connection: the pair keeps the other one");
                tunnel.close(CLOSE_DUPLICATE, b"duplicate connection");
                return;
            }
        }
    }

    /// Resolves once no live connection is in use: the dialer waits for
    /// that, so a pair whose other edge dialed keeps that one connection.
    async fn until_down(&self) {
        let mut published = self.connection.subscribe();
        let _ = published
            .wait_for(|c| !c.as_ref().is_some_and(Tunnel::is_alive))
            .await;
    }
}

/// Retires `tunnel` in the background if it turns out to be a duplicate.
pub(crate) fn spawn_retire(link: &Arc<PeerLink>, tunnel: &Tunnel) {
    let (link, tunnel) = (link.clone(), tunnel.clone());
    tokio::spawn(async move { link.retire_when_superseded(&tunnel).await });
}

/// A closed connection was the pair's duplicate (not an outage).
pub(crate) fn is_duplicate(tunnel: &Tunnel) -> bool {
    tunnel
        .meta
        .superseded
        .load(std::sync::atomic::Ordering::Acquire)
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

/// Keepalive interval and dead-peer timeout of both transports.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(2);
pub(crate) const DEAD_AFTER: Duration = Duration::from_secs(10);

/// Runs a multiplexed TLS-over-TCP connection until it ends, counted in
/// `mesh_connected`; returns why it ended.
pub(crate) fn run_mux<T>(
    tls: T,
    remote: SocketAddr,
    dialed_here: bool,
    peer: &str,
    metrics: &MeshMetrics,
) -> (
    Tunnel,
    impl std::future::Future<Output = String> + Send + 'static,
)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let direction = |d: &str| crate::metrics::DirectionLabels {
        peer: peer.to_owned(),
        direction: d.to_owned(),
    };
    // One lookup per statement: a family's entry guard held across a
    // second lookup that inserts would deadlock on its lock.
    let sent = metrics.bytes.get_or_create(&direction("sent")).clone();
    let received = metrics.bytes.get_or_create(&direction("received")).clone();
    let counters = crate::mux::MuxCounters { sent, received };
    let (handle, driven) = crate::mux::start(tls, dialed_here, counters);
    let connected = metrics
        .connected
        .get_or_create(&PeerLabels {
            peer: peer.to_owned(),
        })
        .clone();
    connected.inc();
    let ended = async move {
        let reason = driven.await;
        connected.dec();
        reason
    };
    (Tunnel::mux(handle, remote, dialed_here), ended)
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
                    tunnel: Tunnel::quic(conn, true),
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
                let (tunnel, ended) = run_mux(tls, addr, true, peer, metrics);
                // The connection makes progress only while polled: its own
                // task, which hands back why it ended.
                let ended = tokio::spawn(ended);
                Ok(Dialed {
                    tunnel,
                    closed: Box::pin(
                        async move { ended.await.unwrap_or_else(|_| "closed".to_owned()) },
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
        // A connection the peer dialed serves both directions: none more.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = link.until_down() => {}
        }
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
        spawn_retire(&link, &tunnel);
        let reason = tokio::select! {
            _ = stop.cancelled() => {
                tunnel.close(CLOSE_SHUTDOWN, b"edge shutting down");
                link.withdraw(&tunnel);
                return;
            }
            reason = dialed.closed => reason,
        };
        link.withdraw(&tunnel);
        if is_duplicate(&tunnel) {
            tracing::info!(%peer, %reason, "duplicate tunnel connection closed; the pair keeps the other one");
        } else {
            tracing::warn!(%peer, %reason, "tunnel to the peer is down; redialing");
        }
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
    use super::preferred;

    #[test]
    fn both_edges_of_a_pair_prefer_the_same_connection() {
        // Connection 1 dialed by the edge whose ID sorts first (A), 2 by B:
        // A sees (1, dialed here), (2, accepted); B the opposite.
        assert_eq!(preferred([(1, true), (2, false)], Some(true)), Some(1));
        assert_eq!(preferred([(1, false), (2, true)], Some(false)), Some(1));
        // Order of arrival does not matter.
        assert_eq!(preferred([(2, false), (1, true)], Some(true)), Some(1));
        // Two dialed by the keeper (it redialed): the newer one.
        assert_eq!(preferred([(1, true), (3, true)], Some(true)), Some(3));
        assert_eq!(preferred([(1, false), (3, false)], Some(false)), Some(3));
        // Only the other edge's dial: that one.
        assert_eq!(preferred([(4, false)], Some(true)), Some(4));
        // No tie-break known: the first up stays.
        assert_eq!(preferred([(5, true), (6, false)], None), Some(5));
        assert_eq!(preferred([], Some(true)), None);
    }
}

//! The mesh: tunnels between Strait edges.
//!
//! One QUIC connection per peer edge (ALPN `strait/1`, TLS 1.3, mutual
//! authentication by SPIFFE ID, see [`tls`]); one bidirectional stream per
//! proxied client connection, so a Kafka connection's request pipeline keeps
//! its order. Each stream starts with a [`header::StreamHeader`] naming the
//! far virtual cluster, the broker endpoint and the principal the near edge
//! authenticated; the far edge answers before any Kafka byte flows. Where
//! UDP is blocked, the same streams run over one TLS-over-TCP connection
//! multiplexed by yamux ([`mux`]). Either edge may dial; streams go both
//! ways on a connection, and a pair keeps one ([`links`]).
//!
//! * Near side: [`upstream::TunnelUpstream`] is the proxy's upstream of a
//!   virtual cluster with `upstream.remote`; the proxy runs its listeners,
//!   address rewriting and filters as for a local cluster.
//! * Far side: [`ingress`] checks the peer's `exports` and `may_assert`,
//!   then hands the stream to the named virtual cluster, whose filters
//!   (authorization, encryption, quotas, audit) apply to the forwarded
//!   principal as to a local client.
//! * Services: [`services`] relays raw TCP both ways, for traffic that is
//!   not Kafka (kms-broker to kms-broker gRPC, inside its own mTLS): a
//!   `mesh.forwards` listener here opens one stream (header kind 2) per
//!   connection, and the far edge dials the `mesh.services` address the
//!   stream names if the peer's `export_services` lists it.

#![forbid(unsafe_code)]

pub mod header;
mod ingress;
mod links;
mod metered;
pub mod metrics;
mod mux;
mod open;
mod policy;
mod reset;
mod services;
mod stream;
mod tcp;
pub mod tls;
mod tunnel;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;
use strait_edge_config::{Mesh as MeshConfig, MeshTransport, Remote};
use strait_proxy::upstream::Upstream;
use strait_proxy::{RemoteUpstreams, TunnelTargets};
use strait_tls::{
    CredentialLabel, CredentialReceiver, FileCredentials, ServedCertificate, TrustBundleSettings,
};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::links::{PeerLink, PeerPolicy};
use crate::metrics::MeshMetrics;
pub use crate::reset::seed_in as reset_seed_in;
use crate::tls::{MeshRoots, MeshTrust};
use crate::tunnel::{Tunnel, CLOSE_SHUTDOWN, CLOSE_UNKNOWN_PEER};
pub use crate::upstream::TunnelUpstream;

#[derive(Debug, Error)]
pub enum MeshError {
    #[error("mesh.identity: {0}")]
    Identity(String),
    #[error("mesh.identity: source: svid, but this edge has no SVID (join with --join-token)")]
    NoSvid,
    #[error("mesh.trust_bundles: {0}")]
    Bundle(String),
    #[error("mesh.peers: {0}")]
    Peer(String),
    #[error("mesh: {0}")]
    Tls(String),
    #[error("mesh listener {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How often the mesh identity's files are checked for a new pair.
const CREDENTIAL_INTERVAL: Duration = Duration::from_secs(1);

/// Sized for thousands of client connections per tunnel and high
/// bandwidth-delay links: a stream may have 8 MiB in flight and a
/// connection 64 MiB (so 50 ms at ~10 Gbit/s), which also bounds what a
/// tunnel buffers. Keepalives every 2 s keep a live connection from idling
/// out; a peer silent for 10 s is dead (killed, cut off): the connection
/// closes, its streams reset so clients reconnect and retry, and the dialer
/// redials. That is well inside Kafka clients' 30 s request timeout.
fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(16_384))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(8 << 20))
        .receive_window(VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .keep_alive_interval(Some(links::KEEPALIVE))
        .max_idle_timeout(Some(
            links::DEAD_AFTER
                .try_into()
                .expect("10 s is a valid QUIC idle timeout"),
        ));
    // Path MTU discovery up to jumbo frames: every packet costs a seal and
    // a syscall share, so bigger packets where the path allows them (data
    // centre links, loopback) cut the tunnel's CPU; probes that are too big
    // are simply lost, and the connection stays at what worked.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(8952);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

fn load_roots(bundles: &[TrustBundleSettings]) -> Result<MeshRoots, MeshError> {
    let mut roots = MeshRoots {
        by_domain: Default::default(),
    };
    for bundle in bundles {
        let (_, certs) = bundle
            .load()
            .map_err(|e| MeshError::Bundle(e.to_string()))?;
        roots.by_domain.insert(bundle.trust_domain.clone(), certs);
    }
    Ok(roots)
}

/// Re-reads the trust bundles every [`CREDENTIAL_INTERVAL`] (a CA rotation
/// rewrites the file the control plane's bundles are kept in) and swaps
/// changed roots in; a bundle that cannot be read keeps the last good one.
/// It alone swaps roots in, so a new bundle list ([`Mesh::set_trust_bundles`])
/// and a file's new content cannot undo each other.
async fn watch_trust(
    mut bundles: watch::Receiver<Vec<TrustBundleSettings>>,
    mut current: MeshRoots,
    trust: Arc<MeshTrust>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(CREDENTIAL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            changed = bundles.changed() => if changed.is_err() { return },
        }
        let list = bundles.borrow_and_update().clone();
        let roots = match load_roots(&list) {
            Ok(roots) if roots == current => continue,
            Ok(roots) => roots,
            Err(err) => {
                tracing::warn!(%err, "mesh trust bundles unreadable; keeping the last good ones");
                continue;
            }
        };
        match trust.replace(&roots) {
            Ok(()) => {
                tracing::info!(
                    roots = roots.by_domain.values().map(Vec::len).sum::<usize>(),
                    "mesh trust bundles changed; new tunnel handshakes use them"
                );
                current = roots;
            }
            Err(err) => {
                tracing::warn!(%err, "mesh trust bundles unusable; keeping the last good ones")
            }
        }
    }
}

/// A running mesh: the QUIC endpoint, one link per peer.
pub struct Mesh {
    endpoint: Endpoint,
    /// The bundle list the trust watcher follows.
    trust_bundles: watch::Sender<Vec<TrustBundleSettings>>,
    links: Arc<HashMap<String, Arc<PeerLink>>>,
    metrics: MeshMetrics,
    /// This edge's SPIFFE ID (its mesh certificate's), forwarded as the
    /// principal of its own connections through a tunnel.
    own_id: Option<Arc<str>>,
    stop: CancellationToken,
    /// The accept loops and dialers: they hold the sockets, so a
    /// reconfigured mesh can bind the same addresses once they are done.
    tasks: tokio_util::task::TaskTracker,
}

impl Mesh {
    /// Binds `mesh.listen` (if any), dials every peer with an address and
    /// accepts the configured peers' connections. `targets` are the local
    /// virtual clusters streams from peers are handed to.
    ///
    /// `svid_reset_seed`: for an SVID identity (its key lives only in
    /// memory), a secret that outlives the process, from which the
    /// stateless-reset key is derived (see [`reset_seed_in`]); a file
    /// identity derives it from its key file.
    pub async fn start(
        config: &MeshConfig,
        svid: Option<CredentialReceiver>,
        svid_reset_seed: Option<Vec<u8>>,
        targets: watch::Receiver<TunnelTargets>,
        metrics: MeshMetrics,
    ) -> Result<Mesh, MeshError> {
        let stop = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let credentials = match &config.identity {
            ServedCertificate::Files { cert, key } => FileCredentials::start(
                cert.clone(),
                key.clone(),
                CredentialLabel {
                    owner: "mesh".into(),
                    certificate: "mesh",
                },
                None,
                CREDENTIAL_INTERVAL,
                stop.clone(),
            )
            .map_err(|e| MeshError::Identity(e.to_string()))?,
            ServedCertificate::Svid => svid.ok_or(MeshError::NoSvid)?,
        };
        let own_id = tls::peer_spiffe_id(Some(&credentials.borrow().cert)).map(Arc::from);
        let reset_seed = match &config.identity {
            ServedCertificate::Files { key, .. } => std::fs::read(key).ok(),
            ServedCertificate::Svid => svid_reset_seed,
        };
        let endpoint_config = || reset::endpoint_config(reset_seed.as_deref());
        let roots = load_roots(&config.trust_bundles)?;
        let trust = MeshTrust::new(&roots).map_err(MeshError::Bundle)?;
        let (trust_bundles, bundles_rx) = watch::channel(config.trust_bundles.clone());
        tasks.spawn(watch_trust(bundles_rx, roots, trust.clone(), stop.clone()));
        let mut links = HashMap::new();
        for peer in &config.peers {
            let policy = PeerPolicy::new(peer, &config.services).map_err(MeshError::Peer)?;
            links.insert(
                peer.name.clone(),
                Arc::new(PeerLink::new(policy, own_id.as_deref())),
            );
        }
        let links = Arc::new(links);
        let endpoint = match config.listen {
            Some(address) => {
                let server =
                    tls::server_config(credentials.clone(), &trust).map_err(MeshError::Tls)?;
                let crypto = QuicServerConfig::try_from(server)
                    .map_err(|e| MeshError::Tls(e.to_string()))?;
                let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
                server.transport_config(transport());
                let endpoint = rebind(|| {
                    Endpoint::new(
                        endpoint_config(),
                        Some(server.clone()),
                        std::net::UdpSocket::bind(address)?,
                        quinn::default_runtime()
                            .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?,
                    )
                })
                .await
                .map_err(|source| MeshError::Bind { address, source })?;
                tracing::info!(%address, "mesh listening (QUIC)");
                endpoint
            }
            None => {
                let address = SocketAddr::from(([0, 0, 0, 0], 0));
                std::net::UdpSocket::bind(address)
                    .and_then(|socket| {
                        Endpoint::new(
                            endpoint_config(),
                            None,
                            socket,
                            quinn::default_runtime().ok_or_else(|| {
                                std::io::Error::other("no async runtime for QUIC")
                            })?,
                        )
                    })
                    .map_err(|source| MeshError::Bind { address, source })?
            }
        };
        let gso = gso_segments(&endpoint);
        metrics.gso_segments.set(i64::try_from(gso).unwrap_or(1));
        tracing::info!(
            gso_segments = gso,
            "mesh UDP socket (segmentation offload: {})",
            if gso > 1 { "on" } else { "off" }
        );
        if config.listen.is_some() {
            tasks.spawn(accept_loop(
                endpoint.clone(),
                links.clone(),
                targets.clone(),
                metrics.clone(),
                stop.clone(),
            ));
        }
        if let Some(address) = config.listen_tcp {
            let mut server =
                tls::server_config(credentials.clone(), &trust).map_err(MeshError::Tls)?;
            server.alpn_protocols = vec![tls::ALPN_TCP.to_vec()];
            let listener = rebind(|| {
                let socket = std::net::TcpListener::bind(address)?;
                socket.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(socket)
            })
            .await
            .map_err(|source| MeshError::Bind { address, source })?;
            tracing::info!(%address, "mesh listening (TLS over TCP)");
            tasks.spawn(tcp::accept_loop(
                listener,
                tokio_rustls::TlsAcceptor::from(Arc::new(server)),
                links.clone(),
                targets.clone(),
                metrics.clone(),
                stop.clone(),
            ));
        }
        for forward in &config.forwards {
            let link = links.get(&forward.peer).cloned().ok_or_else(|| {
                MeshError::Peer(format!(
                    "forwards: '{}' is not a peer in mesh.peers",
                    forward.peer
                ))
            })?;
            let address = forward.listen;
            let listener = rebind(|| {
                let socket = std::net::TcpListener::bind(address)?;
                socket.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(socket)
            })
            .await
            .map_err(|source| MeshError::Bind { address, source })?;
            tracing::info!(%address, peer = %forward.peer, service = %forward.service, "mesh forward listening");
            tasks.spawn(services::forward_loop(
                listener,
                forward.clone(),
                link,
                metrics.clone(),
                stop.clone(),
            ));
        }
        for (peer, link) in links.iter().filter(|(_, l)| !l.policy.addresses.is_empty()) {
            let client = tls::client_config(credentials.clone(), &trust, &link.policy.spiffe_id)
                .map_err(MeshError::Peer)?;
            let transport_of = config
                .peers
                .iter()
                .find(|p| &p.name == peer)
                .map_or(MeshTransport::Quic, |p| p.transport);
            let dialer = match transport_of {
                MeshTransport::Quic => {
                    let crypto = QuicClientConfig::try_from(client)
                        .map_err(|e| MeshError::Tls(e.to_string()))?;
                    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
                    client.transport_config(transport());
                    links::Dialer::Quic {
                        endpoint: endpoint.clone(),
                        config: client,
                    }
                }
                MeshTransport::TlsTcp => {
                    let mut client = client;
                    client.alpn_protocols = vec![tls::ALPN_TCP.to_vec()];
                    links::Dialer::TlsTcp {
                        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
                    }
                }
            };
            let (serve_link, serve_targets, serve_metrics) =
                (link.clone(), targets.clone(), metrics.clone());
            tasks.spawn(links::keep_dialed(
                dialer,
                link.clone(),
                metrics.clone(),
                stop.clone(),
                // The peer opens streams on our connection too.
                move |tunnel| {
                    tokio::spawn(ingress::serve_streams(
                        tunnel.clone(),
                        serve_link.clone(),
                        serve_targets.clone(),
                        serve_metrics.clone(),
                    ));
                },
            ));
        }
        tasks.close();
        Ok(Mesh {
            endpoint,
            trust_bundles,
            links,
            metrics,
            own_id,
            stop,
            tasks,
        })
    }

    /// Trusts `bundles` from the next handshake on, on both sides, without
    /// touching the tunnels that are up (they were verified against roots
    /// that are still valid, as in a CA rotation); on an error nothing
    /// changes. A peer whose domain lost its bundle can no longer connect.
    pub fn set_trust_bundles(&self, bundles: &[TrustBundleSettings]) -> Result<(), MeshError> {
        // Checked here so the caller hears of an error; swapped in by the
        // watcher, which then follows the new list.
        MeshTrust::new(&load_roots(bundles)?).map_err(MeshError::Bundle)?;
        self.trust_bundles.send_replace(bundles.to_vec());
        Ok(())
    }

    /// What the proxy asks for the upstream of `upstream.remote` clusters.
    pub fn upstreams(&self) -> Arc<dyn RemoteUpstreams> {
        Arc::new(MeshUpstreams {
            links: self.links.clone(),
            metrics: self.metrics.clone(),
            own_id: self.own_id.clone(),
        })
    }

    /// Every peer by name, and whether its tunnel is up now (for `/readyz`).
    pub fn tunnel_states(&self) -> strait_proxy::admin::TunnelStates {
        let links = self.links.clone();
        Arc::new(move || {
            let mut states: Vec<(String, bool)> = links
                .iter()
                .map(|(name, l)| (name.clone(), l.connection.borrow().is_some()))
                .collect();
            states.sort();
            states
        })
    }

    /// Closes every tunnel (streams still open are reset) and waits briefly
    /// for the peers to acknowledge.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"edge shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// How many datagrams the kernel will segment from one send on a socket
/// like the endpoint's (quinn probes `UDP_SEGMENT` and uses it when it
/// works; 1 means one syscall per packet).
fn gso_segments(endpoint: &Endpoint) -> usize {
    let ip = endpoint
        .local_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
        .and_then(|socket| quinn::udp::UdpSocketState::new((&socket).into()))
        .map_or(1, |state| state.max_gso_segments())
}

/// Binds, retrying for up to 5 s while the address is still in use: a
/// reconfigured mesh binds the address the previous one just released, and
/// its sockets close only once their last tasks have been dropped.
async fn rebind<T>(mut bind: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match bind() {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

struct MeshUpstreams {
    links: Arc<HashMap<String, Arc<PeerLink>>>,
    metrics: MeshMetrics,
    own_id: Option<Arc<str>>,
}

impl RemoteUpstreams for MeshUpstreams {
    fn upstream(
        &self,
        remote: &Remote,
        connect_timeout: Duration,
    ) -> Result<Arc<dyn Upstream>, String> {
        let link = self
            .links
            .get(&remote.peer)
            .ok_or_else(|| format!("'{}' is not a peer in mesh.peers", remote.peer))?;
        Ok(Arc::new(TunnelUpstream {
            link: link.clone(),
            remote_cluster: remote.virtual_cluster.clone(),
            connect_timeout,
            metrics: self.metrics.clone(),
            own_id: self.own_id.clone(),
        }))
    }
}

/// Accepts peers' connections: the handshake verified the certificate
/// against its domain's bundle; the SPIFFE ID must be a configured peer's.
async fn accept_loop(
    endpoint: Endpoint,
    links: Arc<HashMap<String, Arc<PeerLink>>>,
    targets: watch::Receiver<TunnelTargets>,
    metrics: MeshMetrics,
    stop: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        let (links, targets, metrics) = (links.clone(), targets.clone(), metrics.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let Some(conn) = links::accepted_handshake(
                std::future::IntoFuture::into_future(incoming),
                remote,
                &metrics,
            )
            .await
            else {
                return;
            };
            let chain = conn
                .peer_identity()
                .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
            let Some(link) = links::accepted_peer(
                &links,
                chain.as_deref().map(Vec::as_slice),
                remote,
                &metrics,
            ) else {
                conn.close(CLOSE_UNKNOWN_PEER.into(), b"not a configured peer");
                return;
            };
            let peer = link.policy.name.clone();
            tracing::info!(%peer, %remote, "tunnel from the peer is up (accepted)");
            metrics.connection(&peer, "accepted");
            let tunnel = Tunnel::quic(conn.clone(), false);
            link.offer(&tunnel);
            tokio::spawn(ingress::serve_streams(
                tunnel.clone(),
                link.clone(),
                targets,
                metrics.clone(),
            ));
            links::spawn_retire(&link, &tunnel);
            let reason = links::sample_until_closed(&conn, &peer, &metrics).await;
            link.withdraw(&tunnel);
            if links::is_duplicate(&tunnel) {
                tracing::info!(%peer, %reason, "duplicate tunnel connection from the peer closed; the pair keeps the other one");
            } else {
                tracing::info!(%peer, %reason, "tunnel from the peer closed");
            }
        });
    }
}

//! Named TCP services through the tunnels (stream kind 2).
//!
//! Far side: a peer's stream naming a service exported to it is relayed to
//! the service's address. Near side: each connection accepted on a
//! `mesh.forwards` listener becomes one such stream to the peer. Bytes are
//! copied raw both ways and never read, so a TLS session between the two
//! ends (kms-broker to kms-broker gRPC) stays end to end: the edges see
//! neither its keys nor its plaintext, and the service authenticates its
//! client itself. Buffers are bounded ([`COPY_BUFFER`] each way), so a slow
//! reader back-pressures its own stream only.

use std::sync::Arc;
use std::time::Duration;

use strait_edge_config::MeshForward;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::header::{Answer, ForwardedPrincipal, RefusalCode, StreamHeader, StreamTarget};
use crate::links::PeerLink;
use crate::metered::Metered;
use crate::metrics::MeshMetrics;
use crate::open::{live_tunnel, open_stream};
use crate::stream::{StreamIo, TunnelStream};
use crate::tunnel::Tunnel;

/// Bytes buffered per direction of a relayed connection.
const COPY_BUFFER: usize = 64 * 1024;
/// How long the far edge tries to connect to a service's address.
pub(crate) const SERVICE_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the near edge waits for the far edge's answer.
pub(crate) const FORWARD_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Far side: `header` names a service; relays `io` to it if it is exported
/// to `link`'s peer and answers, or refuses (counted and audited like the
/// other refusals).
pub(crate) async fn serve(
    mut io: Box<dyn StreamIo>,
    header: StreamHeader,
    tunnel: &Tunnel,
    link: &PeerLink,
    metrics: &MeshMetrics,
) {
    let peer = &link.policy.name;
    let service = header.name.as_str();
    let refuse = |code: RefusalCode, reason: String| {
        metrics.refused(peer, "inbound", code.label());
        metrics.service_stream(peer, service, code.label());
        tracing::warn!(target: "strait_mesh::audit", %peer, service, reason = code.label(), "tunnel service stream refused: {reason}");
        Answer::Refuse { code, reason }
    };
    let Some(address) = link.policy.service(service) else {
        // Unknown and not exported are not told apart, as for clusters.
        let answer = refuse(
            RefusalCode::NotExported,
            format!("service '{service}' is not exported to {peer}"),
        );
        let _ = answer.refuse(&mut io).await;
        return;
    };
    let dialed = tokio::time::timeout(
        SERVICE_DIAL_TIMEOUT,
        TcpStream::connect((address.host.as_str(), address.port)),
    )
    .await;
    let upstream = match dialed {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => {
            let answer = refuse(
                RefusalCode::Unavailable,
                format!("service '{service}' at {address}: {err}"),
            );
            let _ = answer.refuse(&mut io).await;
            return;
        }
        Err(_) => {
            let answer = refuse(
                RefusalCode::Unavailable,
                format!("service '{service}' at {address}: no connection within {SERVICE_DIAL_TIMEOUT:?}"),
            );
            let _ = answer.refuse(&mut io).await;
            return;
        }
    };
    upstream.set_nodelay(true).ok();
    if Answer::Accept.write_to(&mut io).await.is_err() {
        return;
    }
    metrics.service_stream(peer, service, "served");
    let stream = TunnelStream::new(io, metrics.stream(peer, "inbound"), tunnel.count_stream());
    relay(stream, upstream, peer, service, metrics).await;
}

/// Near side: accepts connections on `listener` until `stop`, each relayed
/// through its own stream to `forward.service` at the peer.
pub(crate) async fn forward_loop(
    listener: TcpListener,
    forward: MeshForward,
    link: Arc<PeerLink>,
    metrics: MeshMetrics,
    stop: CancellationToken,
) {
    let forward = Arc::new(forward);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors, say: pause instead of spinning.
                    tracing::warn!(listen = %forward.listen, %err, "mesh forward accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        tcp.set_nodelay(true).ok();
        let (forward, link, metrics) = (forward.clone(), link.clone(), metrics.clone());
        tokio::spawn(async move {
            forward_one(tcp, remote, &forward, &link, &metrics).await;
        });
    }
}

async fn forward_one(
    tcp: TcpStream,
    remote: std::net::SocketAddr,
    forward: &MeshForward,
    link: &PeerLink,
    metrics: &MeshMetrics,
) {
    let (peer, service) = (&forward.peer, forward.service.as_str());
    // No waiting for a tunnel that is down: the client's connection is
    // closed at once (dropped), and it retries as with a service that is
    // down, instead of hanging on a connection nothing answers.
    let Some(tunnel) = live_tunnel(link) else {
        metrics.service_stream(peer, service, "no_tunnel");
        tracing::warn!(%peer, service, %remote, "mesh forward: no tunnel to the peer; connection closed");
        return;
    };
    let header = StreamHeader {
        name: service.to_owned(),
        target: StreamTarget::Service,
        principal: ForwardedPrincipal::Anonymous,
    };
    match open_stream(&tunnel, peer, &header, FORWARD_OPEN_TIMEOUT, metrics).await {
        Ok(io) => {
            metrics.service_stream(peer, service, "forwarded");
            let stream =
                TunnelStream::new(io, metrics.stream(peer, "outbound"), tunnel.count_stream());
            relay(tcp, stream, peer, service, metrics).await;
        }
        Err(err) => {
            metrics.service_stream(peer, service, err.label());
            tracing::warn!(%peer, service, %remote, ?err, "mesh forward: the peer did not take the stream; connection closed");
        }
    }
}

/// Copies both ways until both sides are done (a half-close is passed on),
/// or either breaks; counts the bytes.
async fn relay<C, S>(client: C, service_side: S, peer: &str, service: &str, metrics: &MeshMetrics)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Metered::new(
        client,
        vec![metrics.service_bytes(peer, service, "to_service")],
        None,
    );
    let mut service_side = Metered::new(
        service_side,
        vec![metrics.service_bytes(peer, service, "from_service")],
        None,
    );
    if let Err(err) = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut service_side,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await
    {
        tracing::debug!(%peer, service, %err, "service stream ended with an error");
    }
}

//! The far side: streams a peer opens are checked against its policy
//! (exports, `may_assert`) and handed to the virtual cluster they name, as
//! client connections with the principal the peer forwarded.

use std::sync::Arc;
use std::time::Duration;

use strait_filter::{Endpoint, Principal};
use strait_proxy::TunnelTargets;
use tokio::sync::watch;

use crate::header::{Answer, ForwardedPrincipal, RefusalCode, StreamHeader, StreamTarget};
use crate::links::PeerLink;
use crate::metrics::MeshMetrics;
use crate::stream::TunnelStream;
use crate::tunnel::Tunnel;

/// How long a peer has to send a stream's header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the streams `link`'s peer opens on `tunnel` until it closes.
pub(crate) async fn serve_streams(
    tunnel: Tunnel,
    link: Arc<PeerLink>,
    targets: watch::Receiver<TunnelTargets>,
    metrics: MeshMetrics,
) {
    while let Some(io) = tunnel.accept().await {
        let (tunnel, link, targets, metrics) = (
            tunnel.clone(),
            link.clone(),
            targets.clone(),
            metrics.clone(),
        );
        tokio::spawn(async move {
            stream_opened(io, &tunnel, &link, &targets, &metrics).await;
        });
    }
    tracing::debug!(peer = %link.policy.name, "no more streams on this tunnel connection");
}

/// Why a stream is refused, or the cluster and endpoint it is served on.
fn decide(
    header: &StreamHeader,
    link: &PeerLink,
    targets: &TunnelTargets,
) -> Result<(Arc<strait_proxy::cluster::ClusterRuntime>, Endpoint), (RefusalCode, String)> {
    let peer = &link.policy.name;
    let runtime = targets
        .get(&header.name)
        .filter(|_| link.policy.exports(&header.name))
        .ok_or_else(|| {
            (
                RefusalCode::NotExported,
                format!(
                    "virtual cluster '{}' is not exported to {peer}",
                    header.name
                ),
            )
        })?;
    if !link.policy.may_assert(&header.principal) {
        return Err((
            RefusalCode::PrincipalNotAllowed,
            format!("{peer} may not assert {}", header.principal.as_str()),
        ));
    }
    if !runtime.is_accepting() {
        return Err((
            RefusalCode::Unavailable,
            format!("virtual cluster '{}' is shutting down", header.name),
        ));
    }
    let endpoint = match header.target {
        StreamTarget::Bootstrap => Endpoint::Bootstrap,
        StreamTarget::Broker(node_id) if runtime.knows_broker(node_id) => Endpoint::Broker(node_id),
        // Served before a cluster is looked for.
        StreamTarget::Service | StreamTarget::Keepalive => {
            return Err((
                RefusalCode::Malformed,
                "this stream names no virtual cluster".into(),
            ))
        }
        StreamTarget::Broker(node_id) => {
            return Err((
                RefusalCode::UnknownBroker,
                format!(
                "broker {node_id} of '{}' is not known here yet (ask the bootstrap for metadata)",
                header.name
            ),
            ))
        }
    };
    Ok((runtime.clone(), endpoint))
}

async fn stream_opened(
    mut io: Box<dyn crate::stream::StreamIo>,
    tunnel: &Tunnel,
    link: &PeerLink,
    targets: &watch::Receiver<TunnelTargets>,
    metrics: &MeshMetrics,
) {
    let peer = &link.policy.name;
    let header = match tokio::time::timeout(HEADER_TIMEOUT, StreamHeader::read_from(&mut io)).await
    {
        Ok(Ok(header)) => header,
        Ok(Err(err)) => {
            let label = err
                .answer()
                .map(|a| match a {
                    Answer::Refuse { code, .. } => code.label(),
                    Answer::Accept => "accept",
                })
                .unwrap_or("io");
            metrics.refused(peer, "inbound", label);
            tracing::warn!(%peer, %err, "tunnel stream refused: bad header");
            if let Some(answer) = err.answer() {
                let _ = answer.refuse(&mut io).await;
            }
            return;
        }
        Err(_) => {
            metrics.refused(peer, "inbound", "header_timeout");
            tracing::warn!(%peer, "tunnel stream refused: no header within {HEADER_TIMEOUT:?}");
            return;
        }
    };
    match header.target {
        StreamTarget::Keepalive => return crate::mux::echo(io).await,
        StreamTarget::Service => {
            return crate::services::serve(io, header, tunnel, link, metrics).await
        }
        StreamTarget::Bootstrap | StreamTarget::Broker(_) => {}
    }
    let decision = decide(&header, link, &targets.borrow());
    let (runtime, endpoint) = match decision {
        Ok(found) => found,
        Err((code, reason)) => {
            metrics.refused(peer, "inbound", code.label());
            // Refusals of identities are security events: on the audit target.
            tracing::warn!(target: "strait_mesh::audit", %peer, virtual_cluster = %header.name, principal = %header.principal.as_str(), reason = code.label(), "tunnel stream refused: {reason}");
            let _ = Answer::Refuse { code, reason }.refuse(&mut io).await;
            return;
        }
    };
    if Answer::Accept.write_to(&mut io).await.is_err() {
        return;
    }
    let principal = match header.principal {
        ForwardedPrincipal::Anonymous => Principal::Anonymous,
        ForwardedPrincipal::Named(name) => Principal::Named(name.into()),
    };
    let stream = TunnelStream::new(io, metrics.stream(peer, "inbound"), tunnel.count_stream());
    runtime.spawn_tunneled(
        stream,
        tunnel.remote_address(),
        endpoint,
        principal,
        peer.clone(),
    );
}

//! The TLS-over-TCP fallback for networks that block UDP: one TLS 1.3
//! connection per peer (same certificates, same verification, ALPN
//! [`crate::tls::ALPN_TCP`]), multiplexed by yamux ([`crate::mux`]) into
//! streams that carry the same stream header and bytes as QUIC streams.
//! Either side opens streams, whichever dialed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use strait_proxy::TunnelTargets;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::links::{
    accepted_handshake, accepted_peer, is_duplicate, run_mux, spawn_retire, PeerLink,
};
use crate::metrics::MeshMetrics;
use crate::tunnel::CLOSE_SHUTDOWN;

pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    links: Arc<HashMap<String, Arc<PeerLink>>>,
    targets: watch::Receiver<TunnelTargets>,
    metrics: MeshMetrics,
    stop: CancellationToken,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "mesh TCP accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        tcp.set_nodelay(true).ok();
        let (acceptor, links, targets, metrics, stop) = (
            acceptor.clone(),
            links.clone(),
            targets.clone(),
            metrics.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let handshake = acceptor.accept(strait_tls::buffered(tcp));
            let Some(tls) = accepted_handshake(handshake, remote, &metrics).await else {
                return;
            };
            let chain = tls.get_ref().1.peer_certificates();
            let Some(link) = accepted_peer(&links, chain, remote, &metrics) else {
                return;
            };
            let peer = link.policy.name.clone();
            tracing::info!(%peer, %remote, "tunnel from the peer is up (accepted, TLS over TCP)");
            metrics.connection(&peer, "accepted");
            let (tunnel, ended) = run_mux(tls, remote, false, &peer, &metrics);
            link.offer(&tunnel);
            tokio::spawn(crate::ingress::serve_streams(
                tunnel.clone(),
                link.clone(),
                targets,
                metrics.clone(),
            ));
            spawn_retire(&link, &tunnel);
            tokio::pin!(ended);
            let reason = tokio::select! {
                reason = &mut ended => reason,
                _ = stop.cancelled() => {
                    tunnel.close(CLOSE_SHUTDOWN, b"edge shutting down");
                    ended.await
                }
            };
            link.withdraw(&tunnel);
            if is_duplicate(&tunnel) {
                tracing::info!(%peer, %reason, "duplicate tunnel connection from the peer closed; the pair keeps the other one");
            } else {
                tracing::info!(%peer, %reason, "tunnel from the peer closed (TLS over TCP)");
            }
        });
    }
}

//! The TLS-over-TCP fallback for networks that block UDP: one TLS 1.3
//! connection per peer (same certificates, same verification, ALPN
//! `strait/1`), multiplexed with HTTP/2 streams that carry the same stream
//! header and bytes as QUIC streams. The dialer opens the streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use strait_proxy::TunnelTargets;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::links::{accepted_handshake, accepted_peer, h2_windows, PeerLink};
use crate::metrics::{MeshMetrics, PeerLabels};

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
            let (stream_window, connection_window) = h2_windows();
            let mut conn = match h2::server::Builder::new()
                .initial_window_size(stream_window)
                .initial_connection_window_size(connection_window)
                .max_concurrent_streams(16_384)
                .handshake::<_, bytes::Bytes>(tls)
                .await
            {
                Ok(conn) => conn,
                Err(err) => {
                    metrics.connection_refused("h2");
                    tracing::warn!(%remote, %err, "tunnel connection refused: not HTTP/2");
                    return;
                }
            };
            let peer = link.policy.name.clone();
            tracing::info!(%peer, %remote, "tunnel from the peer is up (accepted, TLS over TCP)");
            metrics.connection(&peer, "accepted");
            let connected = metrics
                .connected
                .get_or_create(&PeerLabels {
                    peer: peer.to_string(),
                })
                .clone();
            connected.inc();
            let ping = conn.ping_pong();
            tokio::select! {
                _ = crate::ingress::serve_h2_streams(conn, remote, link, targets, metrics) => {}
                dead = crate::links::h2_keepalive(ping) => {
                    tracing::warn!(%peer, reason = %dead, "tunnel from the peer is dead (TLS over TCP); closing it");
                }
                _ = stop.cancelled() => {}
            }
            connected.dec();
            tracing::info!(%peer, "tunnel from the peer closed (TLS over TCP)");
        });
    }
}

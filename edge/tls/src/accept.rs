//! The TLS accept loop for a tonic server (`serve_with_incoming`): TCP
//! connections accepted, handshakes completed off the accept loop, and only
//! finished sessions handed to tonic. A refused certificate drops that
//! connection alone and is audited with its reason.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::server::trust_domain_refusal;

/// What `serve_with_incoming` takes.
pub type TlsIncoming = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// A client that neither finishes nor fails its handshake is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts on `listener` until tonic drops the stream. `service` names the
/// server in the audit line of a refused handshake.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: &'static str,
) -> TlsIncoming {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, service, "accept failed");
                    // Out of descriptors and the like: back off a little.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        // A port probe or a client that gave up: nothing refused.
                        tracing::debug!(%peer, error = %e, service, "connection closed during the handshake")
                    }
                    Ok(Err(e)) => {
                        let reason = trust_domain_refusal(&e)
                            .map_or_else(|| e.to_string(), |t| t.to_string());
                        tracing::warn!(target: "audit", %peer, %reason, service, "TLS handshake refused")
                    }
                    Err(_) => tracing::debug!(%peer, service, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

//! Opening a stream to a peer, shared by the tunnel upstream (Kafka
//! clients of a remote virtual cluster) and the service forwards: a new
//! stream on the live connection, the header, the far edge's answer within
//! a deadline, and an unresponsive connection dropped so it redials.

use std::time::Duration;

use crate::header::{Answer, RefusalCode, StreamHeader};
use crate::links::PeerLink;
use crate::metrics::MeshMetrics;
use crate::stream::StreamIo;
use crate::tunnel::Tunnel;

#[derive(Debug)]
pub(crate) enum OpenError {
    /// The stream could not be opened or the exchange broke.
    Io(std::io::Error),
    /// No answer within the deadline.
    Timeout,
    /// The far edge refused (already counted in `mesh_stream_refusals`).
    Refused { code: RefusalCode, reason: String },
}

impl OpenError {
    /// The `outcome` label of service stream metrics.
    pub fn label(&self) -> &'static str {
        match self {
            OpenError::Io(_) => "error",
            OpenError::Timeout => "timeout",
            OpenError::Refused { code, .. } => code.label(),
        }
    }
}

/// The peer's connection if one is up now.
pub(crate) fn live_tunnel(link: &PeerLink) -> Option<Tunnel> {
    link.connection
        .borrow()
        .as_ref()
        .filter(|t| t.is_alive())
        .cloned()
}

/// Opens a stream on `tunnel` and exchanges `header` for the far edge's
/// answer, all within `timeout`; the stream is returned only on accept.
pub(crate) async fn open_stream(
    tunnel: &Tunnel,
    peer: &str,
    header: &StreamHeader,
    timeout: Duration,
    metrics: &MeshMetrics,
) -> Result<Box<dyn StreamIo>, OpenError> {
    let heard_before = tunnel.heard_from_peer();
    let exchange = async {
        let mut io = tunnel.open().await.map_err(OpenError::Io)?;
        header
            .write_to(&mut io)
            .await
            .map_err(|e| OpenError::Io(std::io::Error::other(e)))?;
        let answer = Answer::read_from(&mut io)
            .await
            .map_err(|e| OpenError::Io(std::io::Error::other(e)))?;
        Ok::<_, OpenError>((io, answer))
    };
    let (io, answer) = match tokio::time::timeout(timeout, exchange).await {
        Ok(exchanged) => exchanged?,
        Err(_) => {
            // A live peer acknowledges the header within a round trip even
            // when it is too busy to answer. Nothing heard at all means the
            // peer is gone without closing (killed, cut off): drop the
            // connection now, so the dialer reconnects and the other
            // streams fail fast, instead of after the idle timeout.
            if tunnel.heard_from_peer() == heard_before {
                tracing::warn!(%peer, ?timeout, "tunnel to the peer is unresponsive (nothing heard since a stream was opened); closing it to reconnect");
                tunnel.close_unresponsive();
            }
            return Err(OpenError::Timeout);
        }
    };
    match answer {
        Answer::Accept => Ok(io),
        Answer::Refuse { code, reason } => {
            metrics.refused(peer, "outbound", code.label());
            Err(OpenError::Refused { code, reason })
        }
    }
}

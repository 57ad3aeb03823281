//! The near side: a virtual cluster whose upstream is a peer edge's virtual
//! cluster opens one tunnel stream per client connection.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use strait_filter::Principal;
use strait_proxy::upstream::{
    BoxedIo, ConnectContext, ConnectError, Upstream, UpstreamConnection, UpstreamTarget,
};

use crate::header::{ForwardedPrincipal, StreamHeader, StreamTarget};
use crate::links::PeerLink;
use crate::metrics::MeshMetrics;
use crate::open::{open_stream, OpenError};
use crate::stream::TunnelStream;

pub struct TunnelUpstream {
    pub(crate) link: Arc<PeerLink>,
    /// The virtual cluster's name at the peer.
    pub(crate) remote_cluster: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) metrics: MeshMetrics,
    /// This edge's SPIFFE ID: the principal of the edge's own connections
    /// (health probes, replication checks, offsets of a failover group's
    /// member behind the peer), which the far edge lets a peer assert.
    pub(crate) own_id: Option<Arc<str>>,
}

impl TunnelUpstream {
    fn label(&self) -> String {
        format!(
            "peer {} (virtual cluster {})",
            self.link.policy.name, self.remote_cluster
        )
    }

    async fn open(
        &self,
        target: &UpstreamTarget,
        principal: &Principal,
    ) -> Result<TunnelStream, ConnectError> {
        let peer = &self.link.policy.name;
        let mut connection = self.link.connection.subscribe();
        // A peer that is down now may be back within the connect timeout
        // (the dialer retries); a client is refused only after that.
        let conn = tokio::time::timeout(
            self.connect_timeout,
            connection.wait_for(|c| c.as_ref().is_some_and(|t| t.is_alive())),
        )
        .await
        .map_err(|_| ConnectError::Timeout {
            address: format!("{} (no tunnel)", self.label()),
            timeout: self.connect_timeout,
        })?
        .map_err(|_| ConnectError::NoBootstrap("the mesh has stopped".into()))?
        .clone()
        .ok_or_else(|| ConnectError::NoBootstrap("no tunnel".into()))?;
        let header = StreamHeader {
            name: self.remote_cluster.clone(),
            target: match target {
                UpstreamTarget::Bootstrap => StreamTarget::Bootstrap,
                UpstreamTarget::Broker { node_id, .. } => StreamTarget::Broker(*node_id),
            },
            principal: match principal {
                Principal::Anonymous => ForwardedPrincipal::Anonymous,
                Principal::Named(name) => ForwardedPrincipal::Named(name.to_string()),
            },
        };
        match open_stream(&conn, peer, &header, self.connect_timeout, &self.metrics).await {
            Ok(io) => Ok(TunnelStream::new(
                io,
                self.metrics.stream(peer, "outbound"),
                conn.count_stream(),
            )),
            Err(OpenError::Io(source)) => Err(ConnectError::Io {
                address: self.label(),
                source,
            }),
            Err(OpenError::Timeout) => Err(ConnectError::Timeout {
                address: self.label(),
                timeout: self.connect_timeout,
            }),
            Err(OpenError::Refused { code, reason }) => Err(ConnectError::Refused {
                upstream: self.label(),
                label: code.label(),
                reason,
            }),
        }
    }
}

#[async_trait]
impl Upstream for TunnelUpstream {
    /// The edge's own connection, not a client's: it forwards the edge's
    /// own SPIFFE ID, the identity the tunnel's handshake proved. Without
    /// one (a mesh certificate naming no single SPIFFE ID) it is refused:
    /// the far edge would have to trust an identity nobody established.
    async fn connect(&self, target: &UpstreamTarget) -> Result<BoxedIo, ConnectError> {
        let Some(own_id) = &self.own_id else {
            return Err(ConnectError::Refused {
                upstream: self.label(),
                label: "no_principal",
                reason: "this edge's mesh certificate names no single SPIFFE ID to forward".into(),
            });
        };
        let stream = self.open(target, &Principal::Named(own_id.clone())).await?;
        Ok(Box::new(stream))
    }

    async fn connect_as(
        &self,
        target: &UpstreamTarget,
        context: &ConnectContext,
    ) -> Result<UpstreamConnection, ConnectError> {
        let stream = self.open(target, &context.principal).await?;
        Ok(UpstreamConnection {
            io: Box::new(stream),
            session_expires_at: None,
        })
    }
}

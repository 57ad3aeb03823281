//! The upstream seam: how the edge reaches a broker of a virtual cluster.
//!
//! The connection code only asks an [`Upstream`] for a byte stream to the
//! bootstrap or to broker N. Direct TCP is one implementation; TLS to the
//! brokers and QUIC tunnels to another edge plug in here without touching the
//! data path. With `upstream.sasl`, the stream is authenticated to the
//! broker before it is handed over ([`crate::sasl`]).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use strait_edge_config::{HostPort, SaslMechanism};
use strait_tls::tokio_rustls::rustls::pki_types::ServerName;
use strait_tls::tokio_rustls::TlsConnector;
use strait_tls::{ClientTls, ClientTlsSettings};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::sasl::{SaslFailure, UpstreamSasl};

/// A bidirectional byte stream to a broker.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpstreamIo for T {}

pub type BoxedIo = Box<dyn UpstreamIo>;

/// Where a client connection must be relayed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// Any of the cluster's bootstrap servers.
    Bootstrap,
    /// One broker, at the address its cluster last advertised for it.
    Broker { node_id: i32, address: HostPort },
}

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot connect to {address}: {source}")]
    Io {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {address}: no answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("no bootstrap server reachable ({0})")]
    NoBootstrap(String),
    /// The far end refused the connection for a reason it named (a peer
    /// edge: not exported, principal not allowed, ...). `label` is the
    /// metrics label of the reason.
    #[error("{upstream} refused the connection: {reason}")]
    Refused {
        upstream: String,
        label: &'static str,
        reason: String,
    },
    /// The broker refused the edge's SASL credentials, or its answers did not
    /// verify. `message` is the broker's (or the check's), never a credential.
    #[error("cannot authenticate to {address} with SASL {mechanism}: {message}")]
    Authentication {
        address: String,
        mechanism: SaslMechanism,
        message: String,
    },
}

/// An upstream connection ready for client bytes.
pub struct UpstreamConnection {
    pub io: BoxedIo,
    /// When the broker will end the connection's SASL session (KIP-368)
    /// unless it is re-authenticated; `None` for no limit.
    pub session_expires_at: Option<tokio::time::Instant>,
}

/// What an upstream may need to know about the client connection it is
/// opened for (a tunnel forwards the principal; direct TCP needs nothing).
#[derive(Debug, Clone)]
pub struct ConnectContext {
    pub virtual_cluster: std::sync::Arc<str>,
    pub principal: strait_filter::Principal,
}

#[async_trait]
pub trait Upstream: Send + Sync {
    async fn connect(&self, target: &UpstreamTarget) -> Result<BoxedIo, ConnectError>;

    /// Like [`Upstream::connect`], with what the connection's session allows.
    async fn connect_session(
        &self,
        target: &UpstreamTarget,
    ) -> Result<UpstreamConnection, ConnectError> {
        Ok(UpstreamConnection {
            io: self.connect(target).await?,
            session_expires_at: None,
        })
    }

    /// Like [`Upstream::connect_session`], for the client connection
    /// described by `context`; what the proxy calls.
    async fn connect_as(
        &self,
        target: &UpstreamTarget,
        context: &ConnectContext,
    ) -> Result<UpstreamConnection, ConnectError> {
        let _ = context;
        self.connect_session(target).await
    }
}

/// TCP to the brokers, optionally wrapped in TLS.
pub struct DirectTcp {
    bootstrap_servers: Vec<HostPort>,
    connect_timeout: Duration,
    tls: Option<UpstreamTls>,
    sasl: Option<Arc<UpstreamSasl>>,
    // Spreads bootstrap connections over the servers, and moves past a dead one.
    next_bootstrap: AtomicUsize,
}

struct UpstreamTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl DirectTcp {
    pub fn new(bootstrap_servers: Vec<HostPort>, connect_timeout: Duration) -> Self {
        DirectTcp {
            bootstrap_servers,
            connect_timeout,
            tls: None,
            sasl: None,
            next_bootstrap: AtomicUsize::new(0),
        }
    }

    /// Every connection is authenticated with these credentials (which may
    /// be replaced while the upstream is in use).
    pub fn with_sasl(mut self, sasl: Arc<UpstreamSasl>) -> Self {
        self.sasl = Some(sasl);
        self
    }

    async fn open(&self, address: &HostPort) -> Result<UpstreamConnection, ConnectError> {
        let mut io = self.connect_io(address).await?;
        let Some(sasl) = &self.sasl else {
            return Ok(UpstreamConnection {
                io,
                session_expires_at: None,
            });
        };
        // Its own connect_timeout, like the TCP connect and the TLS handshake.
        match tokio::time::timeout(self.connect_timeout, sasl.authenticate(&mut io)).await {
            Ok((_, Ok(session))) => Ok(UpstreamConnection {
                io,
                session_expires_at: session.expires_at,
            }),
            Ok((mechanism, Err(SaslFailure::Rejected(message)))) => {
                Err(ConnectError::Authentication {
                    address: address.to_string(),
                    mechanism,
                    message,
                })
            }
            Ok((_, Err(SaslFailure::Io(source)))) => Err(ConnectError::Io {
                address: format!("{address} (SASL)"),
                source,
            }),
            Err(_) => Err(ConnectError::Timeout {
                address: format!("{address} (SASL)"),
                timeout: self.connect_timeout,
            }),
        }
    }

    /// Brokers are reached over TLS, verified against `settings.ca`, with
    /// the client certificate as it is now.
    pub fn with_tls(self, settings: &ClientTlsSettings) -> Result<Self, strait_tls::TlsError> {
        let config = ClientTls::load(settings)?;
        self.with_tls_config(settings, config)
    }

    /// Brokers are reached over TLS with `config` (e.g. from
    /// [`ClientTls::start`], whose client certificate is swapped live).
    pub fn with_tls_config(
        mut self,
        settings: &ClientTlsSettings,
        config: Arc<strait_tls::tokio_rustls::rustls::ClientConfig>,
    ) -> Result<Self, strait_tls::TlsError> {
        let server_name = match &settings.server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|err| {
                strait_tls::TlsError::Verifier(format!("invalid server_name '{name}': {err}"))
            })?),
            None => None,
        };
        self.tls = Some(UpstreamTls {
            connector: TlsConnector::from(config),
            server_name,
        });
        Ok(self)
    }

    async fn connect_io(&self, address: &HostPort) -> Result<BoxedIo, ConnectError> {
        let tcp = self.connect_one(address).await?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let server_name = match &tls.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(address.host.clone()).map_err(|err| ConnectError::Io {
                address: address.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, err),
            })?,
        };
        let handshake = tls
            .connector
            .connect(server_name, strait_tls::buffered(tcp));
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(stream)) => Ok(Box::new(stream)),
            Ok(Err(source)) => Err(ConnectError::Io {
                address: format!("{address} (TLS)"),
                source,
            }),
            Err(_) => Err(ConnectError::Timeout {
                address: format!("{address} (TLS)"),
                timeout: self.connect_timeout,
            }),
        }
    }

    async fn connect_one(&self, address: &HostPort) -> Result<TcpStream, ConnectError> {
        let text = address.to_string();
        let connect = TcpStream::connect((address.host.as_str(), address.port));
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => {
                // Kafka frames are latency sensitive; batching is done by the clients.
                stream
                    .set_nodelay(true)
                    .map_err(|source| ConnectError::Io {
                        address: text.clone(),
                        source,
                    })?;
                Ok(stream)
            }
            Ok(Err(source)) => Err(ConnectError::Io {
                address: text,
                source,
            }),
            Err(_) => Err(ConnectError::Timeout {
                address: text,
                timeout: self.connect_timeout,
            }),
        }
    }
}

#[async_trait]
impl Upstream for DirectTcp {
    async fn connect(&self, target: &UpstreamTarget) -> Result<BoxedIo, ConnectError> {
        Ok(self.connect_session(target).await?.io)
    }

    async fn connect_session(
        &self,
        target: &UpstreamTarget,
    ) -> Result<UpstreamConnection, ConnectError> {
        match target {
            UpstreamTarget::Broker { address, .. } => self.open(address).await,
            UpstreamTarget::Bootstrap => {
                let count = self.bootstrap_servers.len();
                let start = self.next_bootstrap.fetch_add(1, Ordering::Relaxed);
                let mut failures = Vec::new();
                for offset in 0..count {
                    let server = &self.bootstrap_servers[(start + offset) % count];
                    match self.open(server).await {
                        Ok(connection) => return Ok(connection),
                        // The other servers check the same credentials: trying them
                        // too would only multiply failed logins (and lockouts).
                        Err(err @ ConnectError::Authentication { .. }) => return Err(err),
                        Err(err) => failures.push(err.to_string()),
                    }
                }
                Err(ConnectError::NoBootstrap(failures.join("; ")))
            }
        }
    }
}

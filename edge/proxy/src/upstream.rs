//! The upstream seam: how the edge reaches a broker of a virtual cluster.
//!
//! The connection code only asks an [`Upstream`] for a byte stream to the
//! bootstrap or to broker N. Direct TCP is one implementation; TLS to the
//! brokers and QUIC tunnels to another edge plug in here without touching the
//! data path.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use strait_edge_config::HostPort;
use strait_tls::tokio_rustls::rustls::pki_types::ServerName;
use strait_tls::tokio_rustls::TlsConnector;
use strait_tls::{ClientTls, ClientTlsSettings};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

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
}

#[async_trait]
pub trait Upstream: Send + Sync {
    async fn connect(&self, target: &UpstreamTarget) -> Result<BoxedIo, ConnectError>;
}

/// TCP to the brokers, optionally wrapped in TLS.
pub struct DirectTcp {
    bootstrap_servers: Vec<HostPort>,
    connect_timeout: Duration,
    tls: Option<UpstreamTls>,
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
            next_bootstrap: AtomicUsize::new(0),
        }
    }

    /// Brokers are reached over TLS, verified against `settings.ca`.
    pub fn with_tls(mut self, settings: &ClientTlsSettings) -> Result<Self, strait_tls::TlsError> {
        let config = ClientTls::load(settings)?;
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
        match target {
            UpstreamTarget::Broker { address, .. } => self.connect_io(address).await,
            UpstreamTarget::Bootstrap => {
                let count = self.bootstrap_servers.len();
                let start = self.next_bootstrap.fetch_add(1, Ordering::Relaxed);
                let mut failures = Vec::new();
                for offset in 0..count {
                    let server = &self.bootstrap_servers[(start + offset) % count];
                    match self.connect_io(server).await {
                        Ok(stream) => return Ok(stream),
                        Err(err) => failures.push(err.to_string()),
                    }
                }
                Err(ConnectError::NoBootstrap(failures.join("; ")))
            }
        }
    }
}

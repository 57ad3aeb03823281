//! A live connection to a peer edge, on either transport: streams opened
//! and accepted on it, counted, so that a pair's duplicate connection can
//! be retired once nothing uses it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::Connection;

use crate::mux::MuxHandle;
use crate::stream::{QuicStream, StreamIo};

/// Application close code when a peer is refused after the handshake.
pub(crate) const CLOSE_UNKNOWN_PEER: u32 = 1;
/// Application close code of a shutting-down edge.
pub(crate) const CLOSE_SHUTDOWN: u32 = 2;
/// Application close code of a connection whose peer stopped answering.
pub(crate) const CLOSE_UNRESPONSIVE: u32 = 3;
/// Application close code of the connection a pair does not keep (both
/// edges dialed; see [`crate::links::PeerLink`]).
pub(crate) const CLOSE_DUPLICATE: u32 = 4;

/// Connection numbers, in the order connections came up (newer is higher).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What both transports' connections carry besides the transport.
pub(crate) struct TunnelMeta {
    pub id: u64,
    /// This edge dialed it (the peer accepted it).
    pub dialed_here: bool,
    /// Kafka and service streams open on it (keepalives are not counted).
    streams: AtomicUsize,
    /// Another connection of the same pair is the one in use.
    pub superseded: AtomicBool,
}

#[derive(Clone)]
enum Transport {
    Quic(Connection),
    /// TLS over TCP, multiplexed by yamux.
    Mux {
        handle: MuxHandle,
        remote: SocketAddr,
    },
}

#[derive(Clone)]
pub(crate) struct Tunnel {
    pub meta: Arc<TunnelMeta>,
    transport: Transport,
}

/// Keeps a stream counted on its connection while it is open.
pub(crate) struct OnConnection(Arc<TunnelMeta>);

impl Drop for OnConnection {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Tunnel {
    fn new(transport: Transport, dialed_here: bool) -> Self {
        Tunnel {
            meta: Arc::new(TunnelMeta {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                dialed_here,
                streams: AtomicUsize::new(0),
                superseded: AtomicBool::new(false),
            }),
            transport,
        }
    }

    pub fn quic(conn: Connection, dialed_here: bool) -> Self {
        Tunnel::new(Transport::Quic(conn), dialed_here)
    }

    pub fn mux(handle: MuxHandle, remote: SocketAddr, dialed_here: bool) -> Self {
        Tunnel::new(Transport::Mux { handle, remote }, dialed_here)
    }

    pub fn id(&self) -> u64 {
        self.meta.id
    }

    pub fn is_alive(&self) -> bool {
        match &self.transport {
            Transport::Quic(c) => c.close_reason().is_none(),
            Transport::Mux { handle, .. } => handle.is_alive(),
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match &self.transport {
            Transport::Quic(c) => c.remote_address(),
            Transport::Mux { remote, .. } => *remote,
        }
    }

    /// What has arrived from the peer so far (datagrams over QUIC, bytes
    /// over TCP): unchanged across a stream's open means the peer is silent.
    pub fn heard_from_peer(&self) -> u64 {
        match &self.transport {
            Transport::Quic(c) => c.stats().udp_rx.datagrams,
            Transport::Mux { handle, .. } => handle.bytes_received(),
        }
    }

    pub fn close_unresponsive(&self) {
        match &self.transport {
            Transport::Quic(c) => c.close(CLOSE_UNRESPONSIVE.into(), b"peer unresponsive"),
            Transport::Mux { handle, .. } => handle.abort(),
        }
    }

    /// Closes the connection (a goodbye to the peer; its streams end).
    pub fn close(&self, code: u32, reason: &'static [u8]) {
        match &self.transport {
            Transport::Quic(c) => c.close(code.into(), reason),
            Transport::Mux { handle, .. } => handle.close(),
        }
    }

    pub fn open_streams(&self) -> usize {
        self.meta.streams.load(Ordering::Acquire)
    }

    /// Counts a stream on this connection until the guard is dropped.
    pub fn count_stream(&self) -> OnConnection {
        self.meta.streams.fetch_add(1, Ordering::AcqRel);
        OnConnection(self.meta.clone())
    }

    /// A new stream to the peer.
    pub async fn open(&self) -> std::io::Result<Box<dyn StreamIo>> {
        match &self.transport {
            Transport::Quic(conn) => {
                let (send, recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
                Ok(Box::new(QuicStream { send, recv }))
            }
            Transport::Mux { handle, .. } => handle.open().await,
        }
    }

    /// The next stream the peer opened; none once the connection closed.
    pub async fn accept(&self) -> Option<Box<dyn StreamIo>> {
        match &self.transport {
            Transport::Quic(conn) => match conn.accept_bi().await {
                Ok((send, recv)) => Some(Box::new(QuicStream { send, recv })),
                Err(err) => {
                    tracing::debug!(%err, "no more streams on this tunnel connection");
                    None
                }
            },
            Transport::Mux { handle, .. } => handle.accept().await,
        }
    }
}

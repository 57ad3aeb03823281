//! The TLS-over-TCP transport's multiplexer: yamux over one TLS 1.3
//! connection (ALPN [`crate::tls::ALPN_TCP`]). Either side opens streams, as
//! over QUIC, so one connection carries both directions whichever edge
//! dialed it. yamux's per-stream windows give each stream its own flow
//! control (a slow reader slows only its stream); a keepalive stream
//! ([`crate::header::StreamTarget::Keepalive`]) stands in for QUIC's idle timeout.

use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::header::{Answer, StreamHeader};
use crate::links::{DEAD_AFTER, KEEPALIVE};
use crate::metered::Metered;
use crate::stream::StreamIo;

/// Streams one connection carries at once. yamux gives every stream a
/// 256 KiB window to start with, and grows the windows of streams that
/// read fast (towards twice their bandwidth-delay product) out of what the
/// connection's cap leaves above those: [`WINDOW_GROWTH`]. Without that
/// margin no window grows, and a stream moves 256 KiB per round trip
/// (5 MB/s at 50 ms). Together they bound what a peer can make this edge
/// buffer.
const MAX_STREAMS: usize = 4096;
const WINDOW_GROWTH: usize = 256 << 20;
const MAX_CONNECTION_WINDOW: usize = MAX_STREAMS * yamux::DEFAULT_CREDIT as usize + WINDOW_GROWTH;
/// Inbound streams not yet taken by the ingress; more are reset.
const INBOUND_BACKLOG: usize = 1024;
/// How long a closing connection has to say goodbye (yamux GoAway).
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// A live multiplexed connection: opens and accepts streams; the task that
/// drives it runs until the connection ends.
#[derive(Clone)]
pub(crate) struct MuxHandle {
    opens: mpsc::Sender<OpenReply>,
    inbound: Arc<Mutex<mpsc::Receiver<yamux::Stream>>>,
    /// Bytes read from the socket so far (a silent peer reads as none).
    received: Counter,
    /// Cancel to close (a GoAway, then the socket).
    close: CancellationToken,
    /// Cancel to drop the socket at once (an unresponsive peer).
    abort: CancellationToken,
    /// Cancelled once the connection has ended.
    ended: CancellationToken,
}

impl MuxHandle {
    pub fn is_alive(&self) -> bool {
        !self.ended.is_cancelled()
    }

    pub fn bytes_received(&self) -> u64 {
        self.received.get()
    }

    pub fn close(&self) {
        self.close.cancel();
    }

    pub fn abort(&self) {
        self.abort.cancel();
    }

    pub async fn open(&self) -> std::io::Result<Box<dyn StreamIo>> {
        let (reply, answer) = oneshot::channel();
        let gone = || std::io::Error::new(std::io::ErrorKind::NotConnected, "tunnel closed");
        self.opens.send(reply).await.map_err(|_| gone())?;
        let stream = answer
            .await
            .map_err(|_| gone())?
            .map_err(std::io::Error::other)?;
        Ok(Box::new(stream.compat()))
    }

    /// The next stream the peer opened; none once the connection ended.
    pub async fn accept(&self) -> Option<Box<dyn StreamIo>> {
        let stream = self.inbound.lock().await.recv().await?;
        Some(Box::new(stream.compat()) as Box<dyn StreamIo>)
    }
}

/// Byte counters of one connection (the per-peer `mesh_bytes` series).
pub(crate) struct MuxCounters {
    pub sent: Counter,
    pub received: Counter,
}

/// Starts multiplexing over `io` (the dialer is the yamux client) and runs
/// it until it ends; the returned future resolves with why it ended, and
/// must be polled for the connection to make progress.
pub(crate) fn start<T>(
    io: T,
    dialed: bool,
    counters: MuxCounters,
) -> (
    MuxHandle,
    impl std::future::Future<Output = String> + Send + 'static,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // This connection's own count, besides the peer's series: another
    // connection to the same peer must not make a silent one look alive.
    let received = Counter::default();
    let metered = Metered::new(
        io,
        vec![counters.received, received.clone()],
        Some(counters.sent),
    );
    let mut config = yamux::Config::default();
    config
        .set_max_connection_receive_window(Some(MAX_CONNECTION_WINDOW))
        .set_max_num_streams(MAX_STREAMS);
    let mode = if dialed {
        yamux::Mode::Client
    } else {
        yamux::Mode::Server
    };
    let connection = yamux::Connection::new(metered.compat(), config, mode);
    let (opens, open_requests) = mpsc::channel(64);
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_BACKLOG);
    let handle = MuxHandle {
        opens,
        inbound: Arc::new(Mutex::new(inbound)),
        received,
        close: CancellationToken::new(),
        abort: CancellationToken::new(),
        ended: CancellationToken::new(),
    };
    let driven = {
        let handle = handle.clone();
        async move {
            let reason = tokio::select! {
                reason = drive(connection, open_requests, inbound_tx, handle.close.clone()) => reason,
                reason = keepalive(handle.clone()) => reason,
                _ = handle.abort.cancelled() => "closed: the peer was unresponsive".to_owned(),
            };
            handle.ended.cancel();
            reason
        }
    };
    (handle, driven)
}

enum Event {
    Inbound(yamux::Stream),
    Ended(String),
}

/// Polls the connection (which moves every stream's bytes), serving open
/// requests and queueing inbound streams, until it ends or `close`.
async fn drive<T>(
    mut connection: yamux::Connection<T>,
    mut open_requests: mpsc::Receiver<OpenReply>,
    inbound: mpsc::Sender<yamux::Stream>,
    close: CancellationToken,
) -> String
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut waiting: Option<OpenReply> = None;
    loop {
        let event = std::future::poll_fn(|cx| {
            poll_once(&mut connection, &mut open_requests, &mut waiting, cx)
        });
        let event = tokio::select! {
            event = event => event,
            _ = close.cancelled() => {
                let goodbye = std::future::poll_fn(|cx| connection.poll_close(cx));
                let _ = tokio::time::timeout(CLOSE_GRACE, goodbye).await;
                return "closed here".to_owned();
            }
        };
        match event {
            // A full backlog resets the stream (dropped): the near edge
            // sees a failed open and its client retries.
            Event::Inbound(stream) => {
                if inbound.try_send(stream).is_err() {
                    tracing::warn!("tunnel stream dropped: too many not yet served");
                }
            }
            Event::Ended(reason) => return reason,
        }
    }
}

fn poll_once<T>(
    connection: &mut yamux::Connection<T>,
    open_requests: &mut mpsc::Receiver<OpenReply>,
    waiting: &mut Option<OpenReply>,
    cx: &mut Context<'_>,
) -> Poll<Event>
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    loop {
        if waiting.is_none() {
            if let Poll::Ready(Some(reply)) = open_requests.poll_recv(cx) {
                *waiting = Some(reply);
            }
        }
        let Some(reply) = waiting.take() else { break };
        match connection.poll_new_outbound(cx) {
            Poll::Ready(opened) => {
                let _ = reply.send(opened);
            }
            Poll::Pending => {
                *waiting = Some(reply);
                break;
            }
        }
    }
    match connection.poll_next_inbound(cx) {
        Poll::Ready(Some(Ok(stream))) => Poll::Ready(Event::Inbound(stream)),
        Poll::Ready(Some(Err(err))) => Poll::Ready(Event::Ended(err.to_string())),
        Poll::Ready(None) => Poll::Ready(Event::Ended("closed by the peer".to_owned())),
        Poll::Pending => Poll::Pending,
    }
}

/// One keepalive stream per connection and side: a byte every
/// [`KEEPALIVE`], echoed by the peer ([`echo`]); returns once one is not
/// echoed within [`DEAD_AFTER`] (the peer was killed or cut off), as QUIC's
/// idle timeout does.
async fn keepalive(handle: MuxHandle) -> String {
    let opened = async {
        let mut io = handle.open().await?;
        StreamHeader::keepalive()
            .write_to(&mut io)
            .await
            .map_err(std::io::Error::other)?;
        match Answer::read_from(&mut io)
            .await
            .map_err(std::io::Error::other)?
        {
            Answer::Accept => Ok(io),
            Answer::Refuse { reason, .. } => Err(std::io::Error::other(format!(
                "the peer refused the keepalive stream: {reason}"
            ))),
        }
    };
    let mut io = match tokio::time::timeout(DEAD_AFTER, opened).await {
        Ok(Ok(io)) => io,
        Ok(Err(err)) => return format!("keepalive: {err}"),
        Err(_) => return format!("no keepalive answer within {DEAD_AFTER:?}"),
    };
    let mut beat = 0u8;
    loop {
        tokio::time::sleep(KEEPALIVE).await;
        beat = beat.wrapping_add(1);
        let round = async {
            io.write_all(&[beat]).await?;
            io.flush().await?;
            let echoed = io.read_u8().await?;
            if echoed == beat {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "keepalive echoed {echoed}, sent {beat}"
                )))
            }
        };
        match tokio::time::timeout(DEAD_AFTER, round).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return format!("keepalive: {err}"),
            Err(_) => return format!("no answer to a keepalive within {DEAD_AFTER:?}"),
        }
    }
}

/// The far side of a keepalive stream: accepts, then echoes each byte
/// until the stream ends.
pub(crate) async fn echo(mut io: Box<dyn StreamIo>) {
    if Answer::Accept.write_to(&mut io).await.is_err() {
        return;
    }
    while let Ok(beat) = io.read_u8().await {
        if io.write_all(&[beat]).await.is_err() || io.flush().await.is_err() {
            return;
        }
    }
}

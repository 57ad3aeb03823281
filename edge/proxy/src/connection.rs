//! One client connection relayed to one upstream connection.
//!
//! Two pumps run side by side. The request pump reads only each frame's
//! 12-byte prefix; a frame no filter wants and larger than the read buffer
//! is streamed to the broker as it arrives (a 1 MiB produce is never
//! buffered whole), smaller ones are forwarded once complete, and everything
//! read in one go is written in one go. Before a request's bytes go upstream, the pump
//! queues an [`InFlight`] entry for the response pump, which uses it to learn
//! the API key and version of each response (responses carry only the
//! correlation id) and to keep responses in request order, including the ones
//! a filter produced itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use strait_filter::{
    ApiKeySet, ConnectionInfo, FilterChain, FilterContext, RequestFrame, RequestVerdict,
    ResponseFrame, ResponseInterest, ResponseVerdict,
};
use strait_kafka::codec::CodecError;
use strait_kafka::frame::{produce_acks, FrameError, RequestPrefix, ResponsePrefix};
use strait_kafka::kafka_protocol::messages::{ApiKey, RequestKind};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::deny::DenyCheck;
use crate::limits::BufferBudget;
use crate::metrics::ClusterMetrics;
use crate::quota::{set_throttle_time, PrincipalQuota};
use crate::rewrite::policy::VersionLimits;

const READ_BUFFER: usize = 64 * 1024;
/// How long a draining connection must stay quiet, every request read
/// answered, before it closes. A client that is producing sends its next
/// request within its linger time: read here, it is answered (see
/// crate::drained); lost with the close, it would count as a retry of a
/// batch that may have been written. Once its partitions are answered with
/// errors it sends nothing more until it reconnects.
const DRAIN_QUIET: Duration = Duration::from_millis(50);

/// What ends a connection at a frame boundary, and why.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    /// Cancelled to drain the connection.
    pub token: CancellationToken,
    /// Cancelled before `token` when the drain is a switch of upstream
    /// after which idempotent producers must bump their epoch: to another
    /// cluster, or to a produce fence (see crate::drained).
    pub switched: CancellationToken,
}

/// Why a connection ended other than by an orderly close.
#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("client frame refused: {0}")]
    ClientFrame(FrameError),
    #[error("upstream frame refused: {0}")]
    UpstreamFrame(FrameError),
    #[error("client sent unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("client sent {api_key:?} v{version}, outside what the edge negotiated")]
    UnsupportedVersion { api_key: ApiKey, version: i16 },
    #[error("client closed the connection in the middle of a frame")]
    TruncatedRequest,
    #[error("broker closed the connection")]
    UpstreamClosed,
    #[error("broker answered correlation id {got}, expected {expected:?}")]
    OutOfOrder { got: i32, expected: Option<i32> },
    #[error("cannot decode a message: {0}")]
    Codec(#[from] CodecError),
    #[error("filter closed the connection: {0}")]
    FilterClosed(String),
    #[error("a filter did not finish within {0:?}")]
    FilterTimeout(Duration),
    #[error("identity {0} is on the deny list")]
    IdentityDenied(String),
    #[error(
        "client sent a {size}-byte frame a filter must decode; the buffer budget is {budget} bytes"
    )]
    BufferBudget { size: usize, budget: usize },
    #[error("a request frame did not arrive whole within {0:?}")]
    RequestReadTimeout(Duration),
    #[error("no byte in either direction for {0:?}")]
    IdleTimeout(Duration),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ConnectionError {
    /// The `reason` label of `frames_rejected`, for errors that refuse a frame.
    pub fn rejection_reason(&self) -> Option<&'static str> {
        match self {
            ConnectionError::ClientFrame(FrameError::TooLarge { .. }) => Some("too_large"),
            ConnectionError::ClientFrame(_) => Some("malformed"),
            ConnectionError::UpstreamFrame(_) => Some("upstream_malformed"),
            ConnectionError::UnknownApiKey(_) => Some("unknown_api_key"),
            ConnectionError::UnsupportedVersion { .. } => Some("unsupported_version"),
            ConnectionError::TruncatedRequest => Some("truncated"),
            ConnectionError::Codec(_) => Some("undecodable"),
            ConnectionError::BufferBudget { .. } => Some("buffer_budget"),
            ConnectionError::RequestReadTimeout(_) => Some("read_timeout"),
            _ => None,
        }
    }
}

/// Limits a connection enforces.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub max_frame_bytes: u32,
    pub filter_timeout: Duration,
    /// Largest request a filter may decode on this connection.
    pub max_buffered_bytes_per_connection: u32,
    /// Shared by every connection of the edge.
    pub budget: BufferBudget,
    pub max_in_flight: u32,
    /// Per listener; enforced where connections are accepted.
    pub max_connections: u32,
    pub idle_timeout: Duration,
    pub request_read_timeout: Duration,
}

impl ConnectionSettings {
    /// The largest frame the edge holds whole (to decode or answer it).
    fn frame_budget(&self) -> usize {
        (self.max_buffered_bytes_per_connection as usize).min(self.budget.total())
    }

    /// The settings `limits` describe, with the edge-wide `budget`.
    pub fn new(limits: &strait_edge_config::Limits, budget: BufferBudget) -> Self {
        ConnectionSettings {
            max_frame_bytes: limits.max_frame_bytes,
            filter_timeout: limits.filter_timeout,
            max_buffered_bytes_per_connection: limits.max_buffered_bytes_per_connection,
            budget,
            max_in_flight: limits.max_in_flight_per_connection,
            max_connections: limits.max_connections,
            idle_timeout: limits.idle_timeout,
            request_read_timeout: limits.request_read_timeout,
        }
    }
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        let limits = strait_edge_config::Limits::default();
        ConnectionSettings::new(&limits, BufferBudget::new(limits.max_buffered_bytes))
    }
}

/// What the response pump needs to know about each request sent.
enum InFlight {
    /// Sent to the broker; its response is still to come.
    Upstream {
        correlation_id: i32,
        api_key: i16,
        version: i16,
        decode_response: bool,
        /// Quota throttle to announce in the answer's `throttle_time_ms`.
        throttle_ms: i32,
        sent_at: Instant,
        _slot: OwnedSemaphorePermit,
    },
    /// Answered by a filter: written to the client when its turn comes.
    Local(Bytes, OwnedSemaphorePermit),
}

/// Relays one client connection until either side closes, an error occurs,
/// or `drain` fires and every request read so far has been answered.
#[allow(clippy::too_many_arguments)]
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    info: ConnectionInfo,
    chain: FilterChain,
    quota: Option<Arc<PrincipalQuota>>,
    metrics: Arc<ClusterMetrics>,
    settings: ConnectionSettings,
    drain: CancellationToken,
) -> Result<(), ConnectionError>
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    U: AsyncRead + AsyncWrite + Send + 'static,
{
    let drain = Drain {
        token: drain,
        switched: CancellationToken::new(),
    };
    relay_checked(
        client, upstream, info, chain, quota, metrics, settings, drain, None,
    )
    .await
}

/// Like [`relay`]; with `deny`, the connection ends with
/// [`ConnectionError::IdentityDenied`] at the first request read after its
/// identity was deny-listed.
#[allow(clippy::too_many_arguments)]
pub async fn relay_checked<C, U>(
    client: C,
    upstream: U,
    info: ConnectionInfo,
    chain: FilterChain,
    quota: Option<Arc<PrincipalQuota>>,
    metrics: Arc<ClusterMetrics>,
    settings: ConnectionSettings,
    drain: Drain,
    deny: Option<DenyCheck>,
) -> Result<(), ConnectionError>
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    U: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    // Bounded by `in_flight_slots`: an entry holds a slot until answered.
    let (in_flight_tx, in_flight_rx) = mpsc::unbounded_channel();
    let idle_timeout = settings.idle_timeout;
    // A chain's interest never changes: read it once, outside the lock.
    let shared = Shared {
        info,
        request_keys: chain.request_keys(),
        response_interest: chain.response_interest().clone(),
        // What the chain decodes decides what may be offered (Fetch v16+ only
        // if its responses pass the rewriter); the edge filters' ApiVersions
        // answer was narrowed the same way.
        limits: VersionLimits::for_chain(&chain),
        chain: Mutex::new(chain),
        quota,
        metrics,
        in_flight_slots: Arc::new(Semaphore::new(settings.max_in_flight as usize)),
        settings,
        opened: tokio::time::Instant::now(),
        last_activity_ms: AtomicU64::new(0),
    };
    let requests = RequestPump {
        shared: &shared,
        client: client_read,
        upstream: upstream_write,
        in_flight: in_flight_tx,
        drain,
        deny,
    };
    let responses = ResponsePump {
        shared: &shared,
        upstream: upstream_read,
        client: client_write,
        in_flight: in_flight_rx,
    };
    tokio::select! {
        pumps = async move { tokio::try_join!(requests.run(), responses.run()) } => pumps.map(|_| ()),
        idle = idle_watch(&shared, idle_timeout) => Err(idle),
    }
}

/// Completes when neither side has sent a byte for `timeout`.
async fn idle_watch(shared: &Shared, timeout: Duration) -> ConnectionError {
    loop {
        let last =
            shared.opened + Duration::from_millis(shared.last_activity_ms.load(Ordering::Relaxed));
        let deadline = last + timeout;
        if tokio::time::Instant::now() >= deadline {
            return ConnectionError::IdleTimeout(timeout);
        }
        tokio::time::sleep_until(deadline).await;
    }
}

struct Shared {
    info: ConnectionInfo,
    request_keys: ApiKeySet,
    response_interest: ResponseInterest,
    limits: &'static VersionLimits,
    chain: Mutex<FilterChain>,
    quota: Option<Arc<PrincipalQuota>>,
    metrics: Arc<ClusterMetrics>,
    settings: ConnectionSettings,
    /// One per request awaiting its answer (`max_in_flight`).
    in_flight_slots: Arc<Semaphore>,
    /// Tokio's clock, which tests can pause.
    opened: tokio::time::Instant,
    /// When a byte was last read from either side, in ms after `opened`.
    last_activity_ms: AtomicU64,
}

impl Shared {
    fn active(&self) {
        self.last_activity_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn throttle(&self, api_key: i16, frame_len: usize) -> Duration {
        match &self.quota {
            Some(quota) => quota.on_request(api_key, frame_len),
            None => Duration::ZERO,
        }
    }
}

/// Waits for a free in-flight slot (a free function: a `&self` held across
/// the wait would require the pump's halves to be `Sync`).
async fn in_flight_slot(shared: &Shared) -> Result<OwnedSemaphorePermit, ConnectionError> {
    // The semaphore is never closed.
    shared
        .in_flight_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ConnectionError::Io(std::io::Error::other("in-flight slots closed")))
}

/// Completes once every request read has been answered, and DRAIN_QUIET
/// after. The pump polls it afresh after each read, so the quiet time
/// counts from the last request.
async fn drained(shared: &Shared) {
    all_answered(shared).await;
    tokio::time::sleep(DRAIN_QUIET).await;
}

/// Completes once no request of the connection awaits its answer.
async fn all_answered(shared: &Shared) {
    // The semaphore is never closed; all its permits free means none held.
    let _ = shared
        .in_flight_slots
        .acquire_many(shared.settings.max_in_flight)
        .await;
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn millis(duration: Duration) -> i32 {
    duration.as_millis().min(i32::MAX as u128) as i32
}

struct RequestPump<'a, R, W> {
    shared: &'a Shared,
    client: R,
    upstream: W,
    in_flight: mpsc::UnboundedSender<InFlight>,
    drain: Drain,
    deny: Option<DenyCheck>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> RequestPump<'_, R, W> {
    async fn run(mut self) -> Result<(), ConnectionError> {
        let shared = self.shared;
        let settings = &shared.settings;
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        // Bytes of the current raw frame still to be streamed upstream.
        let mut streaming: usize = 0;
        let mut draining = false;
        // Edge-wide budget taken for the frame being assembled for a filter.
        let mut held: Option<crate::limits::BufferPermit> = None;
        // When the frame being read must be whole (`request_read_timeout`).
        let mut frame_deadline: Option<tokio::time::Instant> = None;
        loop {
            // Bytes at the front of `buf` that are ready to go upstream as they are.
            let mut ready = 0usize;
            // Longest quota throttle earned by the requests of this batch.
            let mut throttle = Duration::ZERO;
            // A frame was completed, or the pump waited on a limit: the
            // read timeout of the frame in progress starts again.
            let mut restart_deadline = false;
            loop {
                if streaming > 0 {
                    let n = streaming.min(buf.len() - ready);
                    ready += n;
                    streaming -= n;
                    if streaming > 0 {
                        break;
                    }
                    restart_deadline = true;
                    continue;
                }
                let prefix = RequestPrefix::parse(&buf[ready..], settings.max_frame_bytes)
                    .map_err(ConnectionError::ClientFrame)?;
                let Some(prefix) = prefix else { break };
                if let Some(deny) = &mut self.deny {
                    if deny.denied() {
                        return Err(ConnectionError::IdentityDenied(
                            deny.principal().to_string(),
                        ));
                    }
                }
                let api_key = self.check_version(&prefix)?;
                let frame_len = prefix.frame_len();
                if draining {
                    // Nothing more goes to this upstream: a produce is
                    // answered here (see crate::drained), anything else, or
                    // a produce too large to hold, ends the connection as
                    // it would have been ended unread.
                    let budget = settings.frame_budget();
                    if api_key != ApiKey::Produce || frame_len > budget {
                        self.flush(&mut buf, ready).await?;
                        return Ok(());
                    }
                    if buf.len() - ready < frame_len {
                        buf.reserve(frame_len - (buf.len() - ready));
                        break;
                    }
                    self.flush(&mut buf, ready).await?;
                    ready = 0;
                    let frame = buf.split_to(frame_len).freeze();
                    let Some(answer) =
                        crate::drained::produce_refused(frame, self.drain.switched.is_cancelled())?
                    else {
                        return Ok(());
                    };
                    self.shared.metrics.request(prefix.api_key).count.inc();
                    let slot = in_flight_slot(self.shared).await?;
                    self.send_in_flight(InFlight::Local(answer, slot));
                    restart_deadline = true;
                    continue;
                }
                if self.wants_request(prefix.api_key) {
                    // Refused from its prefix, before its body is read.
                    let budget = settings.frame_budget();
                    if frame_len > budget {
                        return Err(ConnectionError::BufferBudget {
                            size: frame_len,
                            budget,
                        });
                    }
                    if held.is_none() {
                        held = match settings.budget.try_acquire(frame_len) {
                            Some(permit) => Some(permit),
                            None => {
                                // Back-pressure: nothing more is read from
                                // this client until the bytes are free.
                                self.flush(&mut buf, ready).await?;
                                ready = 0;
                                restart_deadline = true;
                                Some(settings.budget.acquire(frame_len).await)
                            }
                        };
                    }
                    if buf.len() - ready < frame_len {
                        buf.reserve(frame_len - (buf.len() - ready));
                        break;
                    }
                    self.flush(&mut buf, ready).await?;
                    ready = 0;
                    let frame = buf.split_to(frame_len).freeze();
                    let permit = held.take();
                    throttle = throttle.max(self.filter_request(api_key, frame).await?);
                    drop(permit);
                    restart_deadline = true;
                    continue;
                }
                if buf.len() - ready < frame_len && frame_len <= READ_BUFFER {
                    // A frame that fits the buffer goes upstream whole: streaming its
                    // first part gains nothing (the broker acts on whole frames) and,
                    // behind TLS, which hands over one record at a time, would cost a
                    // write here and a read at the broker per record.
                    buf.reserve(frame_len - (buf.len() - ready));
                    break;
                }
                let expects_response = if prefix.api_key == ApiKey::Produce as i16 {
                    // Only this frame's bytes: a short frame must not lend its
                    // acks from the next one.
                    let available = (buf.len() - ready).min(frame_len);
                    match produce_acks(&buf[ready..ready + available], prefix.api_version)
                        .map_err(ConnectionError::ClientFrame)?
                    {
                        Some(acks) => acks != 0,
                        // Whole, and too short to hold acks: not the edge's to
                        // judge here (no filter decodes Produce), so it goes
                        // to the broker, which closes on a malformed body;
                        // waiting for more would blame the client's read time.
                        None if available == frame_len => true,
                        None => break,
                    }
                } else {
                    true
                };
                let slot = if expects_response {
                    let slot = match self.shared.in_flight_slots.clone().try_acquire_owned() {
                        Ok(slot) => slot,
                        Err(_) => {
                            // As many requests as allowed await answers: send
                            // what is ready and read no more until one comes.
                            self.flush(&mut buf, ready).await?;
                            ready = 0;
                            restart_deadline = true;
                            in_flight_slot(self.shared).await?
                        }
                    };
                    Some(slot)
                } else {
                    None
                };
                self.shared.metrics.request(prefix.api_key).count.inc();
                let request_throttle = self.shared.throttle(prefix.api_key, frame_len);
                throttle = throttle.max(request_throttle);
                if let Some(slot) = slot {
                    self.send_in_flight(InFlight::Upstream {
                        correlation_id: prefix.correlation_id,
                        api_key: prefix.api_key,
                        version: prefix.api_version,
                        decode_response: self.wants_response(prefix.api_key, prefix.api_version)
                            || !request_throttle.is_zero(),
                        throttle_ms: millis(request_throttle),
                        sent_at: Instant::now(),
                        _slot: slot,
                    });
                }
                let n = frame_len.min(buf.len() - ready);
                ready += n;
                streaming = frame_len - n;
                if streaming == 0 {
                    restart_deadline = true;
                }
            }
            self.flush(&mut buf, ready).await?;
            if !throttle.is_zero() && !draining {
                // Muted, as a broker mutes a throttled channel: read nothing
                // more from this client until the throttle time has passed.
                tokio::select! {
                    _ = self.drain.token.cancelled() => {}
                    _ = tokio::time::sleep(throttle) => {}
                }
                restart_deadline = true;
            }

            // Slowloris: once a frame has begun, all of it must come in time.
            if streaming == 0 && buf.is_empty() {
                frame_deadline = None;
            } else if restart_deadline || frame_deadline.is_none() {
                frame_deadline = Some(tokio::time::Instant::now() + settings.request_read_timeout);
            }
            let read = tokio::select! {
                biased;
                _ = self.drain.token.cancelled(), if !draining => {
                    draining = true;
                    continue;
                }
                // Before the drain's end: a request already in the socket
                // is read and answered, not lost with the close.
                read = self.client.read_buf(&mut buf) => read?,
                // Draining, between frames, nothing more to read: done once
                // every request read has been answered and the client has
                // been quiet for DRAIN_QUIET; produces that still come are
                // answered (above).
                _ = drained(self.shared), if draining && streaming == 0 && buf.is_empty() => {
                    tracing::debug!("drained: every request read from this client answered");
                    return Ok(());
                }
                _ = sleep_until_some(frame_deadline), if frame_deadline.is_some() => {
                    return Err(ConnectionError::RequestReadTimeout(settings.request_read_timeout));
                }
            };
            if read == 0 {
                if streaming > 0 || !buf.is_empty() {
                    return Err(ConnectionError::TruncatedRequest);
                }
                // Orderly close: answers to what was sent are still delivered
                // if the client is still reading.
                self.upstream.shutdown().await.ok();
                return Ok(());
            }
            self.shared.active();
            self.shared.metrics.bytes_in.inc_by(read as u64);
        }
    }

    fn wants_request(&self, api_key: i16) -> bool {
        self.shared.request_keys.contains(api_key)
    }

    fn wants_response(&self, api_key: i16, version: i16) -> bool {
        self.shared.response_interest.contains(api_key, version)
    }

    /// Unknown API keys and versions outside what the edge offers close the
    /// connection, as a broker would: the edge cannot vouch for a message it
    /// cannot read, nor for a version whose answer could carry a broker
    /// address past the rewriter (a client that ignores the ApiVersions
    /// answer gets no further than one that follows it). ApiVersions is
    /// exempt because clients send their newest version first and expect a
    /// v0 error answer to fall back.
    fn check_version(&self, prefix: &RequestPrefix) -> Result<ApiKey, ConnectionError> {
        let key = ApiKey::try_from(prefix.api_key)
            .map_err(|()| ConnectionError::UnknownApiKey(prefix.api_key))?;
        if key == ApiKey::ApiVersions
            || self
                .shared
                .limits
                .allows(prefix.api_key, prefix.api_version)
        {
            return Ok(key);
        }
        Err(ConnectionError::UnsupportedVersion {
            api_key: key,
            version: prefix.api_version,
        })
    }

    async fn flush(&mut self, buf: &mut BytesMut, ready: usize) -> Result<(), ConnectionError> {
        if ready > 0 {
            let chunk = buf.split_to(ready);
            self.upstream.write_all(&chunk).await?;
        }
        Ok(())
    }

    fn send_in_flight(&self, entry: InFlight) {
        // The response pump only goes away when the connection is ending.
        let _ = self.in_flight.send(entry);
    }

    /// Runs the filters on a request; returns the quota throttle it earned.
    async fn filter_request(
        &mut self,
        api_key: ApiKey,
        frame: Bytes,
    ) -> Result<Duration, ConnectionError> {
        self.shared.metrics.request(api_key as i16).count.inc();
        let throttle = self.shared.throttle(api_key as i16, frame.len());
        let mut request = RequestFrame::decode(frame)?;
        let ctx = FilterContext {
            connection: &self.shared.info,
            now: SystemTime::now(),
        };
        let verdict = {
            let mut chain = self.shared.chain.lock().await;
            tokio::time::timeout(
                self.shared.settings.filter_timeout,
                chain.on_request(&ctx, &mut request),
            )
            .await
            .map_err(|_| ConnectionError::FilterTimeout(self.shared.settings.filter_timeout))?
        };
        // acks=0 produce gets no response; read it after the filters, which may change it.
        let expects_response = match request.body() {
            RequestKind::Produce(produce) => produce.acks != 0,
            _ => true,
        };
        match verdict {
            RequestVerdict::Forward => {
                let (correlation_id, version) = (request.correlation_id(), request.version());
                let decode_response =
                    self.wants_response(api_key as i16, version) || !throttle.is_zero();
                let bytes = request.into_bytes()?;
                if expects_response {
                    let slot = in_flight_slot(self.shared).await?;
                    self.send_in_flight(InFlight::Upstream {
                        correlation_id,
                        api_key: api_key as i16,
                        version,
                        decode_response,
                        throttle_ms: millis(throttle),
                        sent_at: Instant::now(),
                        _slot: slot,
                    });
                }
                self.upstream.write_all(&bytes).await?;
                Ok(throttle)
            }
            RequestVerdict::Respond(body) => {
                if !expects_response {
                    // A broker closes an acks=0 producer's connection on error:
                    // closing is the only way to tell it.
                    return Err(ConnectionError::FilterClosed(
                        "request refused and the producer uses acks=0".into(),
                    ));
                }
                let bytes = ResponseFrame::answering(&request, *body).into_bytes()?;
                let slot = in_flight_slot(self.shared).await?;
                self.send_in_flight(InFlight::Local(bytes, slot));
                Ok(throttle)
            }
            RequestVerdict::Close(reason) => Err(ConnectionError::FilterClosed(reason)),
        }
    }
}

struct ResponsePump<'a, R, W> {
    shared: &'a Shared,
    upstream: R,
    client: W,
    in_flight: mpsc::UnboundedReceiver<InFlight>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ResponsePump<'_, R, W> {
    async fn run(mut self) -> Result<(), ConnectionError> {
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        let mut pending: VecDeque<InFlight> = VecDeque::new();
        let mut requests_open = true;
        let mut streaming: usize = 0;
        loop {
            let mut ready = 0usize;
            loop {
                if streaming > 0 {
                    let n = streaming.min(buf.len() - ready);
                    ready += n;
                    streaming -= n;
                    if streaming > 0 {
                        break;
                    }
                    continue;
                }
                let available = buf.len() - ready;
                let prefix =
                    ResponsePrefix::parse(&buf[ready..], self.shared.settings.max_frame_bytes)
                        .map_err(ConnectionError::UpstreamFrame)?;
                let Some(prefix) = prefix else { break };
                // The matching entry was queued before its request was written.
                while let Ok(entry) = self.in_flight.try_recv() {
                    pending.push_back(entry);
                }
                if matches!(pending.front(), Some(InFlight::Local(..))) {
                    self.flush(&mut buf, ready).await?;
                    ready = 0;
                    self.write_local_answers(&mut pending).await?;
                }
                let Some(InFlight::Upstream {
                    correlation_id,
                    api_key,
                    version,
                    decode_response,
                    throttle_ms,
                    sent_at,
                    ..
                }) = pending.front()
                else {
                    return Err(ConnectionError::OutOfOrder {
                        got: prefix.correlation_id,
                        expected: None,
                    });
                };
                let (api_key, version, decode_response, throttle_ms) =
                    (*api_key, *version, *decode_response, *throttle_ms);
                if *correlation_id != prefix.correlation_id {
                    return Err(ConnectionError::OutOfOrder {
                        got: prefix.correlation_id,
                        expected: Some(*correlation_id),
                    });
                }
                if decode_response && available < prefix.frame_len() {
                    // Keep the entry until the whole frame is here.
                    buf.reserve(prefix.frame_len() - available);
                    break;
                }
                self.shared
                    .metrics
                    .request(api_key)
                    .duration
                    .observe(sent_at.elapsed().as_secs_f64());
                pending.pop_front();
                if api_key == ApiKey::Fetch as i16 {
                    if let Some(quota) = &self.shared.quota {
                        quota.on_fetch_response(prefix.frame_len());
                    }
                }
                if decode_response {
                    self.flush(&mut buf, ready).await?;
                    ready = 0;
                    let frame = buf.split_to(prefix.frame_len()).freeze();
                    self.filter_response(api_key, version, throttle_ms, frame)
                        .await?;
                    continue;
                }
                let n = prefix.frame_len().min(available);
                ready += n;
                streaming = prefix.frame_len() - n;
            }
            self.flush(&mut buf, ready).await?;
            if streaming == 0 && buf.is_empty() {
                while let Ok(entry) = self.in_flight.try_recv() {
                    pending.push_back(entry);
                }
                self.write_local_answers(&mut pending).await?;
                if !requests_open && pending.is_empty() {
                    return Ok(());
                }
            }

            tokio::select! {
                biased;
                entry = self.in_flight.recv(), if requests_open => match entry {
                    Some(entry) => pending.push_back(entry),
                    None => requests_open = false,
                },
                read = self.upstream.read_buf(&mut buf) => {
                    if read? == 0 {
                        return Err(ConnectionError::UpstreamClosed);
                    }
                    self.shared.active();
                }
            }
        }
    }

    async fn flush(&mut self, buf: &mut BytesMut, ready: usize) -> Result<(), ConnectionError> {
        if ready > 0 {
            let chunk = buf.split_to(ready);
            self.client.write_all(&chunk).await?;
            self.shared.metrics.bytes_out.inc_by(ready as u64);
        }
        Ok(())
    }

    /// Writes answers produced by filters that are next in line.
    async fn write_local_answers(
        &mut self,
        pending: &mut VecDeque<InFlight>,
    ) -> Result<(), ConnectionError> {
        while let Some(InFlight::Local(..)) = pending.front() {
            if let Some(InFlight::Local(bytes, _slot)) = pending.pop_front() {
                self.client.write_all(&bytes).await?;
                self.shared.metrics.bytes_out.inc_by(bytes.len() as u64);
            }
        }
        Ok(())
    }

    async fn filter_response(
        &mut self,
        api_key: i16,
        version: i16,
        throttle_ms: i32,
        frame: Bytes,
    ) -> Result<(), ConnectionError> {
        let key =
            ApiKey::try_from(api_key).map_err(|()| ConnectionError::UnknownApiKey(api_key))?;
        let mut response = match ResponseFrame::decode(key, version, frame.clone()) {
            Ok(response) => response,
            // A broker that does not support the client's ApiVersions version
            // answers in v0 (KIP-511); decode it as such.
            Err(_) if key == ApiKey::ApiVersions => ResponseFrame::decode(key, 0, frame)?,
            Err(err) => return Err(err.into()),
        };
        if throttle_ms > 0 {
            set_throttle_time(response.body_mut(), throttle_ms);
        }
        let ctx = FilterContext {
            connection: &self.shared.info,
            now: SystemTime::now(),
        };
        let verdict = {
            let mut chain = self.shared.chain.lock().await;
            tokio::time::timeout(
                self.shared.settings.filter_timeout,
                chain.on_response(&ctx, &mut response),
            )
            .await
            .map_err(|_| ConnectionError::FilterTimeout(self.shared.settings.filter_timeout))?
        };
        match verdict {
            ResponseVerdict::Forward => {
                let bytes = response.into_bytes()?;
                self.client.write_all(&bytes).await?;
                self.shared.metrics.bytes_out.inc_by(bytes.len() as u64);
                Ok(())
            }
            ResponseVerdict::Close(reason) => Err(ConnectionError::FilterClosed(reason)),
        }
    }
}

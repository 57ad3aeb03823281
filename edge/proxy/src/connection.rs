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
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use crate::deny::DenyCheck;
use crate::metrics::ClusterMetrics;
use crate::quota::{set_throttle_time, PrincipalQuota};
use crate::rewrite::policy::VersionLimits;

const READ_BUFFER: usize = 64 * 1024;

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
            _ => None,
        }
    }
}

/// Limits a connection enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    pub max_frame_bytes: u32,
    pub filter_timeout: Duration,
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
    },
    /// Answered by a filter: written to the client when its turn comes.
    Local(Bytes),
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
    drain: CancellationToken,
    deny: Option<DenyCheck>,
) -> Result<(), ConnectionError>
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    U: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let (in_flight_tx, in_flight_rx) = mpsc::unbounded_channel();
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
        settings,
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
    tokio::try_join!(requests.run(), responses.run())?;
    Ok(())
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
}

impl Shared {
    fn throttle(&self, api_key: i16, frame_len: usize) -> Duration {
        match &self.quota {
            Some(quota) => quota.on_request(api_key, frame_len),
            None => Duration::ZERO,
        }
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
    drain: CancellationToken,
    deny: Option<DenyCheck>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> RequestPump<'_, R, W> {
    async fn run(mut self) -> Result<(), ConnectionError> {
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        // Bytes of the current raw frame still to be streamed upstream.
        let mut streaming: usize = 0;
        let mut draining = false;
        loop {
            // Bytes at the front of `buf` that are ready to go upstream as they are.
            let mut ready = 0usize;
            // Longest quota throttle earned by the requests of this batch.
            let mut throttle = Duration::ZERO;
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
                let pending = &buf[ready..];
                let prefix = RequestPrefix::parse(pending, self.shared.settings.max_frame_bytes)
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
                if self.wants_request(prefix.api_key) {
                    if pending.len() < prefix.frame_len() {
                        buf.reserve(prefix.frame_len() - pending.len());
                        break;
                    }
                    self.flush(&mut buf, ready).await?;
                    ready = 0;
                    let frame = buf.split_to(prefix.frame_len()).freeze();
                    throttle = throttle.max(self.filter_request(api_key, frame).await?);
                    continue;
                }
                if pending.len() < prefix.frame_len() && prefix.frame_len() <= READ_BUFFER {
                    // A frame that fits the buffer goes upstream whole: streaming its
                    // first part gains nothing (the broker acts on whole frames) and,
                    // behind TLS, which hands over one record at a time, would cost a
                    // write here and a read at the broker per record.
                    buf.reserve(prefix.frame_len() - pending.len());
                    break;
                }
                let expects_response = if prefix.api_key == ApiKey::Produce as i16 {
                    match produce_acks(pending, prefix.api_version)
                        .map_err(ConnectionError::ClientFrame)?
                    {
                        Some(acks) => acks != 0,
                        None => break,
                    }
                } else {
                    true
                };
                self.shared.metrics.request(prefix.api_key).count.inc();
                let request_throttle = self.shared.throttle(prefix.api_key, prefix.frame_len());
                throttle = throttle.max(request_throttle);
                if expects_response {
                    self.send_in_flight(InFlight::Upstream {
                        correlation_id: prefix.correlation_id,
                        api_key: prefix.api_key,
                        version: prefix.api_version,
                        decode_response: self.wants_response(prefix.api_key, prefix.api_version)
                            || !request_throttle.is_zero(),
                        throttle_ms: millis(request_throttle),
                        sent_at: Instant::now(),
                    });
                }
                let n = prefix.frame_len().min(pending.len());
                ready += n;
                streaming = prefix.frame_len() - n;
            }
            self.flush(&mut buf, ready).await?;
            if !throttle.is_zero() && !draining {
                // Muted, as a broker mutes a throttled channel: read nothing
                // more from this client until the throttle time has passed.
                tokio::select! {
                    _ = self.drain.cancelled() => {}
                    _ = tokio::time::sleep(throttle) => {}
                }
            }

            if draining && streaming == 0 && buf.is_empty() {
                tracing::debug!("drained: no more requests read from this client");
                return Ok(());
            }
            let read = tokio::select! {
                biased;
                _ = self.drain.cancelled(), if !draining => {
                    draining = true;
                    continue;
                }
                read = self.client.read_buf(&mut buf) => read?,
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
                    self.send_in_flight(InFlight::Upstream {
                        correlation_id,
                        api_key: api_key as i16,
                        version,
                        decode_response,
                        throttle_ms: millis(throttle),
                        sent_at: Instant::now(),
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
                self.send_in_flight(InFlight::Local(bytes));
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
                if matches!(pending.front(), Some(InFlight::Local(_))) {
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
        while let Some(InFlight::Local(_)) = pending.front() {
            if let Some(InFlight::Local(bytes)) = pending.pop_front() {
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

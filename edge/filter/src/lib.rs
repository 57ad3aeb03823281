//! The filter seam of the Strait edge.
//!
//! # Contract
//!
//! * **One chain per connection.** A [`FilterFactory`] builds a fresh
//!   [`Filter`] for every client connection, so a filter may keep
//!   per-connection state in `&mut self` without locks.
//! * **Declared interest.** A filter names the API keys whose requests and
//!   responses it wants ([`Filter::request_keys`], [`Filter::response_keys`]).
//!   Frames no filter wants are never decoded: they are streamed as raw bytes.
//!   A filter may narrow its response interest to the versions from
//!   [`Filter::min_response_version`] on, when only newer versions carry what
//!   it needs (KIP-951's broker addresses in Produce v10+): older responses of
//!   that key then stay on the raw path unless another filter wants them, and
//!   the filter is not called for them even when they are decoded for another.
//!   Interest must not change over the filter's life.
//! * **Order.** Requests pass the filters in chain order, responses in reverse
//!   order, like a stack. Responses reach the client in request order, even
//!   when a filter answers a request itself while earlier requests are still
//!   at the broker.
//! * **Pipelining.** Clients pipeline requests. While a filter's future is
//!   pending, the connection reads no further requests from the client
//!   (backpressure), and responses already in flight still flow. A filter
//!   that does not finish within the proxy's filter timeout (20 s by default)
//!   closes the connection.
//! * **Verdicts.** On a request a filter may [`RequestVerdict::Forward`] it
//!   (changed or not) to the next filter and then to the broker, answer it
//!   itself with [`RequestVerdict::Respond`] (the broker never sees it: this
//!   is how a Kafka error reaches the client), or [`RequestVerdict::Close`]
//!   the connection. On a response it may forward it or close.
//! * **Changes.** Reading a frame is free; a frame is re-encoded only if some
//!   filter called `body_mut`/`header_mut`. Otherwise the original bytes go
//!   out unchanged.
//! * **Correlation.** A [`ResponseFrame`] carries the key and version of the
//!   request it answers; correlation ids are never rewritten.
//! * **No sockets.** A filter sees messages and a [`FilterContext`], never a
//!   socket, so it can be tested without a network.

#![forbid(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use strait_kafka::codec::{self, CodecError};
use strait_kafka::kafka_protocol::messages::{
    ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
};
pub use strait_kafka::ApiKeySet;

/// Who is on the other end of a client connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// No client certificate was presented (plain TCP or optional mTLS).
    Anonymous,
    /// An authenticated identity, e.g. `spiffe://example.org/ns/shop/sa/orders`.
    Named(Arc<str>),
}

impl Principal {
    pub fn as_str(&self) -> &str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::Named(name) => name,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which upstream endpoint a client connection is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Bootstrap,
    Broker(i32),
}

/// Facts about a client connection, fixed when it is accepted.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub virtual_cluster: Arc<str>,
    /// The client's address, or for a tunneled connection the peer edge's.
    pub client_addr: SocketAddr,
    pub endpoint: Endpoint,
    pub principal: Principal,
    /// The peer edge that authenticated the client and forwarded its
    /// principal through a tunnel; `None` for a client connected here.
    pub via_peer: Option<Arc<str>>,
}

/// What a filter sees besides the message.
pub struct FilterContext<'a> {
    pub connection: &'a ConnectionInfo,
    /// Wall-clock time of the decision, read once per frame so every filter in
    /// the chain agrees on it (time-bounded grants compare against it).
    pub now: SystemTime,
}

/// A decoded request on its way to the broker.
pub struct RequestFrame {
    api_key: ApiKey,
    header: RequestHeader,
    body: RequestKind,
    original: Option<Bytes>,
}

impl RequestFrame {
    /// Decodes a whole request frame (length field included).
    pub fn decode(frame: Bytes) -> Result<Self, CodecError> {
        let (api_key, header, body) = codec::decode_request(frame.clone())?;
        Ok(RequestFrame {
            api_key,
            header,
            body,
            original: Some(frame),
        })
    }

    pub fn new(header: RequestHeader, body: RequestKind) -> Result<Self, CodecError> {
        let api_key = codec::decodable_api_key(header.request_api_key, header.request_api_version)?;
        Ok(RequestFrame {
            api_key,
            header,
            body,
            original: None,
        })
    }

    pub fn api_key(&self) -> ApiKey {
        self.api_key
    }

    pub fn version(&self) -> i16 {
        self.header.request_api_version
    }

    pub fn correlation_id(&self) -> i32 {
        self.header.correlation_id
    }

    pub fn header(&self) -> &RequestHeader {
        &self.header
    }

    pub fn body(&self) -> &RequestKind {
        &self.body
    }

    /// Mutable access; marks the frame for re-encoding.
    pub fn body_mut(&mut self) -> &mut RequestKind {
        self.original = None;
        &mut self.body
    }

    /// The bytes to send: the original frame if nothing changed.
    pub fn into_bytes(self) -> Result<Bytes, CodecError> {
        match self.original {
            Some(bytes) => Ok(bytes),
            None => codec::encode_request(&self.header, &self.body),
        }
    }
}

/// A decoded response on its way back to the client.
pub struct ResponseFrame {
    api_key: ApiKey,
    version: i16,
    header: ResponseHeader,
    body: ResponseKind,
    original: Option<Bytes>,
}

impl ResponseFrame {
    /// Decodes a whole response frame answering a request of `api_key`/`version`.
    pub fn decode(api_key: ApiKey, version: i16, frame: Bytes) -> Result<Self, CodecError> {
        // An unchanged frame forwards the bytes that were decoded, which
        // differ from `frame` when tagged fields its version does not define
        // had to be dropped: bytes no filter has seen never reach the client.
        let (header, body, decoded) = codec::decode_response_frame(api_key, version, frame)?;
        Ok(ResponseFrame {
            api_key,
            version,
            header,
            body,
            original: Some(decoded),
        })
    }

    /// A response built by the edge itself, answering `request`.
    pub fn answering(request: &RequestFrame, body: ResponseKind) -> Self {
        ResponseFrame {
            api_key: request.api_key,
            version: request.version(),
            header: ResponseHeader::default().with_correlation_id(request.correlation_id()),
            body,
            original: None,
        }
    }

    pub fn api_key(&self) -> ApiKey {
        self.api_key
    }

    pub fn version(&self) -> i16 {
        self.version
    }

    pub fn correlation_id(&self) -> i32 {
        self.header.correlation_id
    }

    pub fn body(&self) -> &ResponseKind {
        &self.body
    }

    /// Mutable access; marks the frame for re-encoding.
    pub fn body_mut(&mut self) -> &mut ResponseKind {
        self.original = None;
        &mut self.body
    }

    pub fn into_bytes(self) -> Result<Bytes, CodecError> {
        match self.original {
            Some(bytes) => Ok(bytes),
            None => codec::encode_response(self.api_key, self.version, &self.header, &self.body),
        }
    }
}

/// A filter's decision on a request.
pub enum RequestVerdict {
    /// Pass the (possibly changed) request on.
    Forward,
    /// Answer the client with this response; the broker never sees the request.
    Respond(Box<ResponseKind>),
    /// Close the client connection (and its upstream connection).
    Close(String),
}

/// A filter's decision on a response.
pub enum ResponseVerdict {
    Forward,
    Close(String),
}

/// A per-connection message filter. See the crate documentation for the contract.
#[async_trait]
pub trait Filter: Send {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// API keys whose requests this filter wants to see decoded.
    fn request_keys(&self) -> ApiKeySet;

    /// API keys whose responses this filter wants to see decoded.
    fn response_keys(&self) -> ApiKeySet;

    /// For a key of [`Filter::response_keys`], the lowest response version
    /// this filter wants; it sees that version and every newer one, never an
    /// older one. The default, 0, is every version. Read once, when the chain
    /// is built, so like the key sets it must not change; it is how the hot
    /// path keeps responses that cannot carry what the filter looks for
    /// (e.g. Produce before v10, which has no `node_endpoints`) undecoded.
    fn min_response_version(&self, _api_key: ApiKey) -> i16 {
        0
    }

    async fn on_request(
        &mut self,
        _ctx: &FilterContext<'_>,
        _frame: &mut RequestFrame,
    ) -> RequestVerdict {
        RequestVerdict::Forward
    }

    async fn on_response(
        &mut self,
        _ctx: &FilterContext<'_>,
        _frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        ResponseVerdict::Forward
    }
}

/// Builds a filter for each new client connection.
pub trait FilterFactory: Send + Sync {
    fn create(&self, connection: &ConnectionInfo) -> Box<dyn Filter>;
}

/// Which responses are wanted decoded: per API key, the lowest version
/// wanted, so the hot path tests a key and version with one array lookup.
#[derive(Clone, PartialEq, Eq)]
pub struct ResponseInterest {
    /// Indexed by API key number; `NONE` where the key is not wanted.
    min_version: [i16; 256],
}

impl ResponseInterest {
    const NONE: i16 = i16::MAX;

    /// Wants nothing.
    pub fn none() -> Self {
        ResponseInterest {
            min_version: [Self::NONE; 256],
        }
    }

    /// What `filter` declared with [`Filter::response_keys`] and
    /// [`Filter::min_response_version`].
    pub fn of(filter: &dyn Filter) -> Self {
        let mut interest = Self::none();
        let keys = filter.response_keys();
        for key in (0i16..256).filter(|key| keys.contains(*key)) {
            // A number the crate does not know cannot be narrowed by version.
            let min = ApiKey::try_from(key).map_or(0, |known| filter.min_response_version(known));
            interest.insert(key, min.max(0));
        }
        interest
    }

    fn insert(&mut self, api_key: i16, min_version: i16) {
        if let Some(slot) = usize::try_from(api_key)
            .ok()
            .and_then(|index| self.min_version.get_mut(index))
        {
            *slot = (*slot).min(min_version);
        }
    }

    /// Wanted by either.
    pub fn union(mut self, other: &ResponseInterest) -> Self {
        for (mine, theirs) in self.min_version.iter_mut().zip(other.min_version) {
            *mine = (*mine).min(theirs);
        }
        self
    }

    #[inline]
    pub fn contains(&self, api_key: i16, version: i16) -> bool {
        usize::try_from(api_key)
            .ok()
            .and_then(|index| self.min_version.get(index))
            .is_some_and(|min| version >= *min)
    }

    /// The keys wanted at some version.
    pub fn keys(&self) -> ApiKeySet {
        let mut keys = ApiKeySet::EMPTY;
        for (key, min) in (0i16..).zip(self.min_version) {
            if min != Self::NONE {
                keys.insert(key);
            }
        }
        keys
    }
}

impl fmt::Debug for ResponseInterest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                (0i16..)
                    .zip(self.min_version)
                    .filter(|(_, min)| *min != Self::NONE)
                    .map(|(key, min)| (key, format!("v{min}+"))),
            )
            .finish()
    }
}

/// The filters of one connection, with the union of their interests
/// precomputed so the hot path can test a key with one bit lookup (and a
/// response's version with one array lookup).
pub struct FilterChain {
    filters: Vec<Box<dyn Filter>>,
    /// Each filter's own response interest, in `filters` order.
    interests: Vec<ResponseInterest>,
    request_keys: ApiKeySet,
    response_interest: ResponseInterest,
}

impl FilterChain {
    pub fn new(filters: Vec<Box<dyn Filter>>) -> Self {
        let request_keys = filters
            .iter()
            .fold(ApiKeySet::EMPTY, |acc, f| acc.union(f.request_keys()));
        let interests: Vec<ResponseInterest> = filters
            .iter()
            .map(|f| ResponseInterest::of(f.as_ref()))
            .collect();
        let response_interest = interests
            .iter()
            .fold(ResponseInterest::none(), |acc, i| acc.union(i));
        FilterChain {
            filters,
            interests,
            request_keys,
            response_interest,
        }
    }

    pub fn request_keys(&self) -> ApiKeySet {
        self.request_keys
    }

    /// Keys whose responses some filter wants, at some version.
    pub fn response_keys(&self) -> ApiKeySet {
        self.response_interest.keys()
    }

    /// Which responses some filter wants, by key and version.
    pub fn response_interest(&self) -> &ResponseInterest {
        &self.response_interest
    }

    #[inline]
    pub fn wants_request(&self, api_key: i16) -> bool {
        self.request_keys.contains(api_key)
    }

    #[inline]
    pub fn wants_response(&self, api_key: i16, version: i16) -> bool {
        self.response_interest.contains(api_key, version)
    }

    /// Runs the request through every interested filter in order, stopping at
    /// the first verdict that is not `Forward`.
    pub async fn on_request(
        &mut self,
        ctx: &FilterContext<'_>,
        frame: &mut RequestFrame,
    ) -> RequestVerdict {
        let key = frame.api_key() as i16;
        for filter in &mut self.filters {
            if !filter.request_keys().contains(key) {
                continue;
            }
            match filter.on_request(ctx, frame).await {
                RequestVerdict::Forward => {}
                other => return other,
            }
        }
        RequestVerdict::Forward
    }

    /// Runs the response through every interested filter in reverse order.
    pub async fn on_response(
        &mut self,
        ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        let (key, version) = (frame.api_key() as i16, frame.version());
        for (filter, interest) in self.filters.iter_mut().zip(&self.interests).rev() {
            if !interest.contains(key, version) {
                continue;
            }
            match filter.on_response(ctx, frame).await {
                ResponseVerdict::Forward => {}
                other => return other,
            }
        }
        ResponseVerdict::Forward
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use strait_kafka::kafka_protocol::messages::{MetadataRequest, MetadataResponse};

    struct Recorder {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        respond: bool,
    }

    #[async_trait]
    impl Filter for Recorder {
        fn name(&self) -> &'static str {
            self.name
        }
        fn request_keys(&self) -> ApiKeySet {
            ApiKeySet::of(&[ApiKey::Metadata])
        }
        fn response_keys(&self) -> ApiKeySet {
            ApiKeySet::of(&[ApiKey::Metadata])
        }
        async fn on_request(
            &mut self,
            _ctx: &FilterContext<'_>,
            _frame: &mut RequestFrame,
        ) -> RequestVerdict {
            self.log.lock().unwrap().push(format!("req:{}", self.name));
            if self.respond {
                RequestVerdict::Respond(Box::new(ResponseKind::Metadata(
                    MetadataResponse::default(),
                )))
            } else {
                RequestVerdict::Forward
            }
        }
        async fn on_response(
            &mut self,
            _ctx: &FilterContext<'_>,
            _frame: &mut ResponseFrame,
        ) -> ResponseVerdict {
            self.log.lock().unwrap().push(format!("resp:{}", self.name));
            ResponseVerdict::Forward
        }
    }

    fn info() -> ConnectionInfo {
        ConnectionInfo {
            via_peer: None,
            virtual_cluster: "vc".into(),
            client_addr: "127.0.0.1:1".parse().unwrap(),
            endpoint: Endpoint::Bootstrap,
            principal: Principal::Anonymous,
        }
    }

    fn metadata_request() -> RequestFrame {
        let header = RequestHeader::default()
            .with_request_api_key(ApiKey::Metadata as i16)
            .with_request_api_version(12)
            .with_correlation_id(5);
        RequestFrame::new(header, RequestKind::Metadata(MetadataRequest::default())).unwrap()
    }

    #[tokio::test]
    async fn order_and_short_circuit() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut chain = FilterChain::new(vec![
            Box::new(Recorder {
                name: "a",
                log: log.clone(),
                respond: false,
            }),
            Box::new(Recorder {
                name: "b",
                log: log.clone(),
                respond: true,
            }),
            Box::new(Recorder {
                name: "c",
                log: log.clone(),
                respond: false,
            }),
        ]);
        assert!(chain.wants_request(ApiKey::Metadata as i16));
        assert!(!chain.wants_request(ApiKey::Produce as i16));
        let connection = info();
        let ctx = FilterContext {
            connection: &connection,
            now: SystemTime::now(),
        };
        let mut request = metadata_request();
        let verdict = chain.on_request(&ctx, &mut request).await;
        assert!(matches!(verdict, RequestVerdict::Respond(_)));
        let mut response = ResponseFrame::answering(
            &request,
            ResponseKind::Metadata(MetadataResponse::default()),
        );
        assert_eq!(response.correlation_id(), 5);
        chain.on_response(&ctx, &mut response).await;
        assert_eq!(
            *log.lock().unwrap(),
            vec!["req:a", "req:b", "resp:c", "resp:b", "resp:a"]
        );
    }

    /// Wants Produce responses from `min` on, and records which versions it saw.
    struct ProduceFrom {
        min: i16,
        seen: Arc<Mutex<Vec<(i16, i16)>>>,
    }

    #[async_trait]
    impl Filter for ProduceFrom {
        fn name(&self) -> &'static str {
            "produce-from"
        }
        fn request_keys(&self) -> ApiKeySet {
            ApiKeySet::EMPTY
        }
        fn response_keys(&self) -> ApiKeySet {
            ApiKeySet::of(&[ApiKey::Produce])
        }
        fn min_response_version(&self, api_key: ApiKey) -> i16 {
            if api_key == ApiKey::Produce {
                self.min
            } else {
                0
            }
        }
        async fn on_response(
            &mut self,
            _ctx: &FilterContext<'_>,
            frame: &mut ResponseFrame,
        ) -> ResponseVerdict {
            self.seen.lock().unwrap().push((self.min, frame.version()));
            ResponseVerdict::Forward
        }
    }

    #[tokio::test]
    async fn version_aware_response_interest() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let narrow = || -> Box<dyn Filter> {
            Box::new(ProduceFrom {
                min: 10,
                seen: seen.clone(),
            })
        };
        let chain = FilterChain::new(vec![narrow()]);
        assert!(!chain.wants_response(ApiKey::Produce as i16, 9));
        assert!(chain.wants_response(ApiKey::Produce as i16, 10));
        assert!(chain.wants_response(ApiKey::Produce as i16, 13));
        assert!(!chain.wants_response(ApiKey::Fetch as i16, 13));
        assert!(chain.response_keys().contains(ApiKey::Produce as i16));

        // With a second filter wanting every version, v9 is decoded, but only
        // for the filter that asked for it.
        let mut chain = FilterChain::new(vec![
            narrow(),
            Box::new(ProduceFrom {
                min: 0,
                seen: seen.clone(),
            }),
        ]);
        assert!(chain.wants_response(ApiKey::Produce as i16, 9));
        let connection = info();
        let ctx = FilterContext {
            connection: &connection,
            now: SystemTime::now(),
        };
        for version in [9, 10] {
            let header = RequestHeader::default()
                .with_request_api_key(ApiKey::Produce as i16)
                .with_request_api_version(version);
            let request = RequestFrame::new(header, RequestKind::Produce(Default::default()));
            let mut response = ResponseFrame::answering(
                &request.unwrap(),
                ResponseKind::Produce(Default::default()),
            );
            chain.on_response(&ctx, &mut response).await;
        }
        assert_eq!(*seen.lock().unwrap(), vec![(0, 9), (0, 10), (10, 10)]);
    }

    #[test]
    fn unchanged_frames_keep_their_bytes() {
        let original = metadata_request().into_bytes().unwrap();
        let frame = RequestFrame::decode(original.clone()).unwrap();
        assert_eq!(frame.correlation_id(), 5);
        assert_eq!(frame.into_bytes().unwrap(), original);
        let mut changed = RequestFrame::decode(original.clone()).unwrap();
        if let RequestKind::Metadata(m) = changed.body_mut() {
            m.allow_auto_topic_creation = false;
        }
        assert_ne!(changed.into_bytes().unwrap(), original);
    }
}

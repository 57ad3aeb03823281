//! KIP-951 broker addresses through the connection pump, with the edge's own
//! filters: Produce v10+ answers are rewritten, older ones and Fetch stay on
//! the raw path, and versions or keys whose answers could carry an address
//! past the rewriter are refused.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use strait_filter::{ApiKeySet, ConnectionInfo, Endpoint, Filter, FilterChain, Principal};
use strait_kafka::codec::{decode_response, encode_request, encode_response};
use strait_kafka::kafka_protocol::messages::produce_response::{
    NodeEndpoint, PartitionProduceResponse, TopicProduceResponse,
};
use strait_kafka::kafka_protocol::messages::{
    fetch_response, ApiKey, BrokerId, FetchRequest, FetchResponse, ProduceRequest, ProduceResponse,
    RequestHeader, RequestKind, ResponseHeader, ResponseKind, TopicName, VoteRequest,
};
use strait_kafka::kafka_protocol::protocol::StrBytes;
use strait_proxy::brokers::BrokerMap;
use strait_proxy::connection::{relay, ConnectionError, ConnectionSettings};
use strait_proxy::metrics::ProxyMetrics;
use strait_proxy::rewrite::edge_filters;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

const PATTERN: &str = "broker-$(node_id).edge.example.com";

/// Decodes every Fetch response, as the encryption filter does.
struct DecodesFetch;

#[async_trait]
impl Filter for DecodesFetch {
    fn name(&self) -> &'static str {
        "decodes-fetch"
    }
    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::EMPTY
    }
    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::Fetch])
    }
}

struct Harness {
    client: DuplexStream,
    broker: DuplexStream,
    map: Arc<BrokerMap>,
    relay: tokio::task::JoinHandle<Result<(), ConnectionError>>,
    drain: CancellationToken,
}

/// An edge connection with the edge's own filters (SNI addressing, so no
/// port is bound) followed by `configured`.
fn start(configured: Vec<Box<dyn Filter>>) -> Harness {
    let (client, edge_client) = tokio::io::duplex(1 << 20);
    let (edge_upstream, broker) = tokio::io::duplex(1 << 20);
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(&mut registry).for_cluster("test");
    let map = BrokerMap::sni(PATTERN, 9093, Gauge::default());
    let mut filters = Vec::from(edge_filters(map.clone(), &configured));
    filters.extend(configured);
    let info = ConnectionInfo {
        via_peer: None,
        virtual_cluster: "test".into(),
        client_addr: "127.0.0.1:5".parse().unwrap(),
        endpoint: Endpoint::Bootstrap,
        principal: Principal::Anonymous,
    };
    let drain = CancellationToken::new();
    let relay = tokio::spawn(relay(
        edge_client,
        edge_upstream,
        info,
        FilterChain::new(filters),
        None,
        metrics,
        ConnectionSettings {
            max_frame_bytes: 1 << 20,
            filter_timeout: Duration::from_secs(5),
            ..ConnectionSettings::default()
        },
        drain.clone(),
    ));
    Harness {
        client,
        broker,
        map,
        relay,
        drain,
    }
}

fn request(key: ApiKey, version: i16, correlation_id: i32, body: RequestKind) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("test")));
    encode_request(&header, &body).unwrap().to_vec()
}

fn produce(version: i16, correlation_id: i32) -> Vec<u8> {
    request(
        ApiKey::Produce,
        version,
        correlation_id,
        RequestKind::Produce(ProduceRequest::default().with_acks(-1)),
    )
}

fn produce_answer(version: i16, correlation_id: i32, endpoints: &[(i32, &str)]) -> Bytes {
    let body = ProduceResponse::default()
        .with_responses(vec![TopicProduceResponse::default()
            .with_name(TopicName(StrBytes::from_static_str("orders")))
            .with_partition_responses(vec![PartitionProduceResponse::default()
                .with_index(0)
                .with_error_code(if endpoints.is_empty() { 0 } else { 6 })])])
        .with_node_endpoints(
            endpoints
                .iter()
                .map(|(id, host)| {
                    NodeEndpoint::default()
                        .with_node_id(BrokerId(*id))
                        .with_host(StrBytes::from_string((*host).to_owned()))
                        .with_port(9092)
                })
                .collect(),
        );
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    encode_response(
        ApiKey::Produce,
        version,
        &header,
        &ResponseKind::Produce(body),
    )
    .unwrap()
}

/// A response of `len` filler bytes: if the pump tried to decode it, the
/// connection would close.
fn raw_response(correlation_id: i32, len: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.extend_from_slice(&((4 + len) as i32).to_be_bytes());
    out.extend_from_slice(&correlation_id.to_be_bytes());
    out.extend_from_slice(&vec![0xab; len]);
    out.to_vec()
}

async fn read_frame(stream: &mut DuplexStream) -> Vec<u8> {
    let size = stream.read_i32().await.unwrap() as usize;
    let mut frame = (size as i32).to_be_bytes().to_vec();
    frame.resize(4 + size, 0);
    stream.read_exact(&mut frame[4..]).await.unwrap();
    frame
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test]
async fn produce_answers_are_rewritten_only_when_they_name_brokers() {
    let mut h = start(Vec::new());
    let mut pipeline = produce(11, 1);
    pipeline.extend(produce(9, 2));
    pipeline.extend(produce(12, 3));
    pipeline.extend(request(
        ApiKey::Fetch,
        15,
        4,
        RequestKind::Fetch(FetchRequest::default()),
    ));
    h.client.write_all(&pipeline).await.unwrap();
    for expected in 1..=4 {
        let frame = read_frame(&mut h.broker).await;
        assert_eq!((&frame[8..12]).get_i32(), expected);
    }

    let clean = produce_answer(12, 3, &[]);
    let mut answers =
        produce_answer(11, 1, &[(2, "kafka-2.internal"), (3, "kafka-3.internal")]).to_vec();
    answers.extend(raw_response(2, 40)); // v9: streamed, never decoded
    answers.extend_from_slice(&clean); // no endpoints: its own bytes
    answers.extend(raw_response(4, 70_000)); // Fetch v15: streamed
    h.broker.write_all(&answers).await.unwrap();

    let rewritten = read_frame(&mut h.client).await;
    assert!(!contains(&rewritten, b"internal"));
    let (_, body) = decode_response(ApiKey::Produce, 11, rewritten.into()).unwrap();
    let ResponseKind::Produce(body) = body else {
        panic!()
    };
    let endpoints: Vec<_> = body
        .node_endpoints
        .iter()
        .map(|e| (e.node_id.0, e.host.as_str().to_owned(), e.port))
        .collect();
    assert_eq!(
        endpoints,
        vec![
            (2, "broker-2.edge.example.com".to_owned(), 9093),
            (3, "broker-3.edge.example.com".to_owned(), 9093),
        ]
    );
    assert_eq!(read_frame(&mut h.client).await, raw_response(2, 40));
    assert_eq!(read_frame(&mut h.client).await, clean.to_vec());
    assert_eq!(read_frame(&mut h.client).await, raw_response(4, 70_000));
    // The edge now routes broker-3.edge.example.com to where broker 3 is.
    assert_eq!(h.map.upstream_of(3).unwrap().host, "kafka-3.internal");
    assert_eq!(h.map.node_for_host("broker-3.edge.example.com"), Some(3));

    h.drain.cancel();
    h.relay.await.unwrap().unwrap();
}

#[tokio::test]
async fn fetch_v16_is_refused_where_fetch_answers_stream() {
    let mut h = start(Vec::new());
    h.client
        .write_all(&request(
            ApiKey::Fetch,
            16,
            1,
            RequestKind::Fetch(FetchRequest::default()),
        ))
        .await
        .unwrap();
    let err = h.relay.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ConnectionError::UnsupportedVersion {
                api_key: ApiKey::Fetch,
                version: 16
            }
        ),
        "{err}"
    );
    assert_eq!(err.rejection_reason(), Some("unsupported_version"));
    let mut rest = Vec::new();
    h.broker.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "the broker saw the refused request");
}

#[tokio::test]
async fn dropped_keys_are_refused() {
    let mut h = start(Vec::new());
    h.client
        .write_all(&request(
            ApiKey::Vote,
            1,
            1,
            RequestKind::Vote(VoteRequest::default()),
        ))
        .await
        .unwrap();
    let err = h.relay.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ConnectionError::UnsupportedVersion {
                api_key: ApiKey::Vote,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn fetch_v16_answers_are_rewritten_where_fetch_is_decoded_anyway() {
    let mut h = start(vec![Box::new(DecodesFetch)]);
    h.client
        .write_all(&request(
            ApiKey::Fetch,
            17,
            1,
            RequestKind::Fetch(FetchRequest::default()),
        ))
        .await
        .unwrap();
    read_frame(&mut h.broker).await;
    let body =
        FetchResponse::default().with_node_endpoints(vec![fetch_response::NodeEndpoint::default()
            .with_node_id(BrokerId(5))
            .with_host(StrBytes::from_static_str("kafka-5.internal"))
            .with_port(9092)]);
    let header = ResponseHeader::default().with_correlation_id(1);
    let answer = encode_response(ApiKey::Fetch, 17, &header, &ResponseKind::Fetch(body)).unwrap();
    h.broker.write_all(&answer).await.unwrap();
    let frame = read_frame(&mut h.client).await;
    assert!(!contains(&frame, b"internal"));
    assert!(contains(&frame, b"broker-5.edge.example.com"));
    h.drain.cancel();
    h.relay.await.unwrap().unwrap();
}

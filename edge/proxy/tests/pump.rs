//! The connection pump against an in-memory broker: pipelining, response
//! order with filter-made answers, acks=0 produce, and broker misbehaviour.
//! The real broker and clients are exercised by `integration/`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use prometheus_client::registry::Registry;
use strait_filter::{
    ApiKeySet, ConnectionInfo, Endpoint, Filter, FilterChain, FilterContext, Principal,
    RequestFrame, RequestVerdict,
};
use strait_kafka::codec::encode_request;
use strait_kafka::kafka_protocol::messages::{
    ApiKey, HeartbeatRequest, ListGroupsRequest, ListGroupsResponse, MetadataRequest,
    ProduceRequest, RequestHeader, RequestKind, ResponseKind,
};
use strait_proxy::connection::{relay, ConnectionError, ConnectionSettings};
use strait_proxy::metrics::ProxyMetrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

/// Answers ListGroups itself; everything else goes to the broker.
struct AnswerListGroups;

#[async_trait]
impl Filter for AnswerListGroups {
    fn name(&self) -> &'static str {
        "answer-list-groups"
    }
    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::ListGroups])
    }
    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::EMPTY
    }
    async fn on_request(&mut self, _: &FilterContext<'_>, _: &mut RequestFrame) -> RequestVerdict {
        RequestVerdict::Respond(Box::new(ResponseKind::ListGroups(
            ListGroupsResponse::default().with_error_code(29),
        )))
    }
}

fn request(key: ApiKey, version: i16, correlation_id: i32, body: RequestKind) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id);
    encode_request(&header, &body).unwrap().to_vec()
}

async fn read_frame(stream: &mut DuplexStream) -> Vec<u8> {
    let size = stream.read_i32().await.unwrap() as usize;
    let mut frame = vec![0; size];
    stream.read_exact(&mut frame).await.unwrap();
    frame
}

fn correlation_of_request(frame: &[u8]) -> i32 {
    (&frame[4..8]).get_i32()
}

/// A response frame with a body of `len` filler bytes: raw responses are
/// never decoded, so their content does not matter to the pump.
fn raw_response(correlation_id: i32, len: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.extend_from_slice(&((4 + len) as i32).to_be_bytes());
    out.extend_from_slice(&correlation_id.to_be_bytes());
    out.extend_from_slice(&vec![0xab; len]);
    out.to_vec()
}

struct Harness {
    client: DuplexStream,
    broker: DuplexStream,
    relay: tokio::task::JoinHandle<Result<(), ConnectionError>>,
    drain: CancellationToken,
}

fn start(max_frame_bytes: u32) -> Harness {
    let (client, edge_client) = tokio::io::duplex(1 << 20);
    let (edge_upstream, broker) = tokio::io::duplex(1 << 20);
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(&mut registry).for_cluster("test");
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
        FilterChain::new(vec![Box::new(AnswerListGroups)]),
        None,
        metrics,
        ConnectionSettings {
            max_frame_bytes,
            filter_timeout: Duration::from_secs(5),
            ..ConnectionSettings::default()
        },
        drain.clone(),
    ));
    Harness {
        client,
        broker,
        relay,
        drain,
    }
}

#[tokio::test]
async fn pipelined_responses_keep_request_order_with_local_answers() {
    let mut h = start(1 << 20);
    let mut pipeline = Vec::new();
    pipeline.extend(request(
        ApiKey::Metadata,
        12,
        1,
        RequestKind::Metadata(MetadataRequest::default()),
    ));
    pipeline.extend(request(
        ApiKey::ListGroups,
        4,
        2,
        RequestKind::ListGroups(ListGroupsRequest::default()),
    ));
    pipeline.extend(request(
        ApiKey::Heartbeat,
        4,
        3,
        RequestKind::Heartbeat(HeartbeatRequest::default()),
    ));
    // acks=0: no response will come, and none must be waited for.
    pipeline.extend(request(
        ApiKey::Produce,
        9,
        4,
        RequestKind::Produce(ProduceRequest::default().with_acks(0)),
    ));
    pipeline.extend(request(
        ApiKey::Heartbeat,
        4,
        5,
        RequestKind::Heartbeat(HeartbeatRequest::default()),
    ));
    h.client.write_all(&pipeline).await.unwrap();

    // The broker sees every request but the one the filter answered, in order.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(correlation_of_request(&read_frame(&mut h.broker).await));
    }
    assert_eq!(seen, vec![1, 3, 4, 5]);

    // Answer 1, 3 and 5 in one write (a large one for 3, to cross buffer boundaries).
    let mut answers = raw_response(1, 10);
    answers.extend(raw_response(3, 200_000));
    answers.extend(raw_response(5, 7));
    h.broker.write_all(&answers).await.unwrap();

    let mut order = Vec::new();
    for _ in 0..4 {
        let frame = read_frame(&mut h.client).await;
        order.push((&frame[0..4]).get_i32());
    }
    assert_eq!(
        order,
        vec![1, 2, 3, 5],
        "local answer 2 must wait for 1 and precede 3"
    );

    h.drain.cancel();
    h.relay.await.unwrap().unwrap();
}

#[tokio::test]
async fn oversized_broker_frame_closes_the_connection() {
    let mut h = start(1024);
    h.client
        .write_all(&request(
            ApiKey::Heartbeat,
            4,
            1,
            RequestKind::Heartbeat(HeartbeatRequest::default()),
        ))
        .await
        .unwrap();
    read_frame(&mut h.broker).await;
    h.broker
        .write_all(&raw_response(1, 4096)[..64])
        .await
        .unwrap();
    let err = h.relay.await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectionError::UpstreamFrame(_)), "{err}");
}

#[tokio::test]
async fn unsolicited_or_out_of_order_responses_close_the_connection() {
    let mut h = start(1 << 20);
    h.client
        .write_all(&request(
            ApiKey::Heartbeat,
            4,
            7,
            RequestKind::Heartbeat(HeartbeatRequest::default()),
        ))
        .await
        .unwrap();
    read_frame(&mut h.broker).await;
    h.broker.write_all(&raw_response(8, 4)).await.unwrap();
    let err = h.relay.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ConnectionError::OutOfOrder {
                got: 8,
                expected: Some(7)
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn drain_waits_for_in_flight_responses() {
    let mut h = start(1 << 20);
    h.client
        .write_all(&request(
            ApiKey::Heartbeat,
            4,
            1,
            RequestKind::Heartbeat(HeartbeatRequest::default()),
        ))
        .await
        .unwrap();
    read_frame(&mut h.broker).await;
    h.drain.cancel();
    // The relay must still deliver the answer to the request it already sent.
    h.broker.write_all(&raw_response(1, 3)).await.unwrap();
    let frame = read_frame(&mut h.client).await;
    assert_eq!((&frame[0..4]).get_i32(), 1);
    h.relay.await.unwrap().unwrap();
}

#[tokio::test]
async fn broker_close_ends_the_client_connection() {
    let mut h = start(1 << 20);
    drop(h.broker);
    let err = h.relay.await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectionError::UpstreamClosed), "{err}");
    let mut rest = Vec::new();
    assert_eq!(h.client.read_to_end(&mut rest).await.unwrap(), 0);
}

//! The connection limits against an in-memory broker: the per-connection
//! and edge-wide buffer budgets, the in-flight cap, the request read timeout
//! (slowloris) and the idle timeout. Time is paused, so "nothing arrived
//! within N seconds" means the pump was waiting, not that a machine was slow.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::registry::Registry;
use strait_filter::{
    ApiKeySet, ConnectionInfo, Endpoint, Filter, FilterChain, FilterContext, Principal,
    RequestFrame, RequestVerdict,
};
use strait_kafka::codec::encode_request;
use strait_kafka::kafka_protocol::messages::{
    ApiKey, HeartbeatRequest, RequestHeader, RequestKind, SaslAuthenticateRequest,
};
use strait_proxy::connection::{relay, ConnectionError, ConnectionSettings};
use strait_proxy::limits::BufferBudget;
use strait_proxy::metrics::ProxyMetrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

/// Decodes SaslAuthenticate requests (whose body can be any size) and forwards them.
struct DecodeSasl;

#[async_trait]
impl Filter for DecodeSasl {
    fn name(&self) -> &'static str {
        "decode-sasl"
    }
    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::SaslAuthenticate])
    }
    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::EMPTY
    }
    async fn on_request(&mut self, _: &FilterContext<'_>, _: &mut RequestFrame) -> RequestVerdict {
        RequestVerdict::Forward
    }
}

fn sasl(correlation_id: i32, body_len: usize) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::SaslAuthenticate as i16)
        .with_request_api_version(2)
        .with_correlation_id(correlation_id);
    let body = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(vec![7; body_len]));
    encode_request(&header, &RequestKind::SaslAuthenticate(body))
        .unwrap()
        .to_vec()
}

fn heartbeat(correlation_id: i32) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Heartbeat as i16)
        .with_request_api_version(4)
        .with_correlation_id(correlation_id);
    encode_request(
        &header,
        &RequestKind::Heartbeat(HeartbeatRequest::default()),
    )
    .unwrap()
    .to_vec()
}

/// A length prefix and request header announcing `size` bytes, without the body.
fn prefix_only(api_key: ApiKey, version: i16, size: i32) -> Vec<u8> {
    let mut out = size.to_be_bytes().to_vec();
    out.extend_from_slice(&(api_key as i16).to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes());
    out
}

async fn read_frame(stream: &mut DuplexStream) -> Vec<u8> {
    let size = stream.read_i32().await.unwrap() as usize;
    let mut frame = vec![0; size];
    stream.read_exact(&mut frame).await.unwrap();
    frame
}

fn response(correlation_id: i32) -> Vec<u8> {
    let mut out = 8i32.to_be_bytes().to_vec();
    out.extend_from_slice(&correlation_id.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

struct Harness {
    client: DuplexStream,
    broker: DuplexStream,
    relay: tokio::task::JoinHandle<Result<(), ConnectionError>>,
}

fn start(settings: ConnectionSettings) -> Harness {
    let (client, edge_client) = tokio::io::duplex(4 << 20);
    let (edge_upstream, broker) = tokio::io::duplex(4 << 20);
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(&mut registry).for_cluster("test");
    let info = ConnectionInfo {
        via_peer: None,
        virtual_cluster: "test".into(),
        client_addr: "127.0.0.1:5".parse().unwrap(),
        endpoint: Endpoint::Bootstrap,
        principal: Principal::Anonymous,
    };
    let relay = tokio::spawn(relay(
        edge_client,
        edge_upstream,
        info,
        FilterChain::new(vec![Box::new(DecodeSasl)]),
        None,
        metrics,
        settings,
        CancellationToken::new(),
    ));
    Harness {
        client,
        broker,
        relay,
    }
}

fn settings(per_connection: u32, total: u64) -> ConnectionSettings {
    ConnectionSettings {
        max_buffered_bytes_per_connection: per_connection,
        budget: BufferBudget::new(total),
        ..ConnectionSettings::default()
    }
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test(start_paused = true)]
async fn decoded_frame_over_the_connection_budget_is_refused_from_its_prefix() {
    let mut h = start(settings(1 << 20, 64 << 20));
    // 100 MiB announced; only the 12-byte prefix is ever sent.
    h.client
        .write_all(&prefix_only(ApiKey::SaslAuthenticate, 2, 100 << 20))
        .await
        .unwrap();
    let result = tokio::time::timeout(WAIT, h.relay).await.unwrap().unwrap();
    match result {
        Err(err @ ConnectionError::BufferBudget { size, budget }) => {
            assert_eq!((size, budget), ((100 << 20) + 4, 1 << 20));
            assert_eq!(err.rejection_reason(), Some("buffer_budget"));
        }
        other => panic!("expected BufferBudget, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn frames_no_filter_decodes_stream_past_the_budget() {
    let mut h = start(settings(64 << 10, 64 << 10));
    // A 2 MiB Heartbeat-keyed frame: never decoded, so streamed.
    let size = 2 << 20;
    let mut frame = prefix_only(ApiKey::Heartbeat, 4, size);
    frame.resize(size as usize + 4, 0xab);
    let client = async {
        h.client.write_all(&frame).await.unwrap();
    };
    let (_, got) = tokio::join!(client, read_frame(&mut h.broker));
    assert_eq!(got.len(), size as usize);
}

#[tokio::test(start_paused = true)]
async fn edge_wide_budget_applies_back_pressure() {
    let shared = settings(1 << 20, 1 << 20);
    let mut a = start(shared.clone());
    let mut b = start(shared.clone());
    let frame_a = sasl(1, 600 << 10);
    let frame_b = sasl(2, 600 << 10);
    // A holds 600 KiB of the 1 MiB budget while its frame is incomplete.
    a.client.write_all(&frame_a[..1000]).await.unwrap();
    until("A's reservation", || {
        shared.budget.in_use() == frame_a.len()
    })
    .await;
    // B's frame does not fit beside it: B is not read, nothing reaches its broker.
    b.client.write_all(&frame_b).await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, read_frame(&mut b.broker))
            .await
            .is_err(),
        "B must wait for the budget"
    );
    // A completes and is forwarded; its bytes are freed and B goes through.
    a.client.write_all(&frame_a[1000..]).await.unwrap();
    assert_eq!(read_frame(&mut a.broker).await.len() + 4, frame_a.len());
    assert_eq!(read_frame(&mut b.broker).await.len() + 4, frame_b.len());
    until("every byte released", || shared.budget.in_use() == 0).await;
}

/// Polls `condition` (the pumps run between polls) until it holds, failing
/// after `WAIT` of (paused) time.
async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn frame_over_the_whole_budget_is_refused() {
    let mut h = start(settings(1 << 20, 1 << 20));
    h.client
        .write_all(&prefix_only(ApiKey::SaslAuthenticate, 2, 2 << 20))
        .await
        .unwrap();
    let result = tokio::time::timeout(WAIT, h.relay).await.unwrap().unwrap();
    assert!(
        matches!(result, Err(ConnectionError::BufferBudget { .. })),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn in_flight_cap_stops_reading_until_an_answer_comes() {
    let mut h = start(ConnectionSettings {
        max_in_flight: 2,
        ..ConnectionSettings::default()
    });
    for id in 1..=3 {
        h.client.write_all(&heartbeat(id)).await.unwrap();
    }
    read_frame(&mut h.broker).await;
    read_frame(&mut h.broker).await;
    assert!(
        tokio::time::timeout(WAIT, read_frame(&mut h.broker))
            .await
            .is_err(),
        "the third request waits for a free slot"
    );
    h.broker.write_all(&response(1)).await.unwrap();
    let third = read_frame(&mut h.broker).await;
    assert_eq!(i32::from_be_bytes(third[4..8].try_into().unwrap()), 3);
}

#[tokio::test(start_paused = true)]
async fn a_frame_that_does_not_arrive_in_time_closes_the_connection() {
    let mut h = start(ConnectionSettings {
        request_read_timeout: Duration::from_secs(10),
        ..ConnectionSettings::default()
    });
    // Whole frames with long pauses between them are fine.
    for id in 1..=2 {
        h.client.write_all(&heartbeat(id)).await.unwrap();
        read_frame(&mut h.broker).await;
        h.broker.write_all(&response(id)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    // A frame dribbled a byte at a time is not.
    let frame = heartbeat(3);
    let started = tokio::time::Instant::now();
    let dribble = async {
        for byte in &frame[..frame.len() - 1] {
            if h.client.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let relay = async { h.relay.await.unwrap() };
    let (_, result) = tokio::join!(dribble, relay);
    assert!(
        matches!(result, Err(ConnectionError::RequestReadTimeout(_))),
        "{result:?}"
    );
    assert_eq!(result.unwrap_err().rejection_reason(), Some("read_timeout"));
    assert!(started.elapsed() >= Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(12));
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed() {
    let mut h = start(ConnectionSettings {
        idle_timeout: Duration::from_secs(60),
        ..ConnectionSettings::default()
    });
    // Traffic keeps it open; then silence closes it.
    for id in 1..=3 {
        tokio::time::sleep(Duration::from_secs(40)).await;
        h.client.write_all(&heartbeat(id)).await.unwrap();
        read_frame(&mut h.broker).await;
        h.broker.write_all(&response(id)).await.unwrap();
    }
    assert!(!h.relay.is_finished());
    let result = tokio::time::timeout(Duration::from_secs(120), h.relay)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(result, Err(ConnectionError::IdleTimeout(_))),
        "{result:?}"
    );
}

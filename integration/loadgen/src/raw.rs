//! `raw-produce`: many pipelined Produce connections from one small process, speaking the Kafka
//! protocol directly (kafka-protocol + tokio-rustls).
//!
//! Why a second client: librdkafka hands OpenSSL one `SSL_write` per buffer slice, so with TLS a
//! 1 KB record leaves as two TLS records (a ~40-byte header and the value) and two `write`
//! syscalls, against one `sendmsg` per ~12 KB request in plaintext (strace of the librdkafka
//! producer). That multiplies the client's CPU and the edge's per-TLS-record work, and on a
//! 2-core machine it, not the edge, sets the mTLS/plaintext ratio. The Java client (and this one)
//! write a whole request per TLS record of up to 16 KB. This client is also cheap enough that the
//! edge and the broker, not the clients, hold the CPU.
//!
//! Each connection sends pre-encoded batches of `--batch-bytes` of records to one partition
//! (round-robin over the topic's partitions), keeps `--inflight` requests pipelined and checks
//! every response's error codes; Kafka answers in order on a connection, so send times are
//! matched to responses by a FIFO.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Args;
use hdrhistogram::Histogram;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, RequestHeader,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

const PRODUCE_VERSION: i16 = 7;
const METADATA_VERSION: i16 = 12;
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

#[derive(Args, Debug)]
pub struct RawProduceArgs {
    /// Bootstrap address (host:port); the host is also the TLS server name.
    #[arg(long)]
    bootstrap: String,
    #[arg(long)]
    topic: String,
    /// Records in total, spread evenly over the connections.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1000)]
    size: usize,
    /// Concurrent broker connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Records per Produce request: as many values as fit in this many bytes (at least one).
    #[arg(long, default_value_t = 16 * 1024)]
    batch_bytes: usize,
    /// Produce requests in flight per connection.
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// 1 (leader) or -1 (all).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    acks: i16,
    /// CA bundle (PEM) to verify the server: enables TLS.
    #[arg(long)]
    ca: Option<String>,
    /// Client certificate (PEM) for mTLS.
    #[arg(long, requires = "key")]
    cert: Option<String>,
    /// Client private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<String>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Dialer {
    tls: Option<TlsConnector>,
}

impl Dialer {
    fn new(args: &RawProduceArgs) -> Result<Self> {
        let Some(ca) = &args.ca else {
            return Ok(Self { tls: None });
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca)? {
            roots.add(cert).context("adding CA certificate")?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots);
        let config = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                .context("client certificate")?,
            _ => builder.with_no_client_auth(),
        };
        Ok(Self {
            tls: Some(TlsConnector::from(Arc::new(config))),
        })
    }

    async fn dial(&self, host: &str, port: u16) -> Result<Box<dyn Stream>> {
        let tcp = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => {
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| anyhow!("server name {host}: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {host}:{port}"))?;
                Ok(Box::new(stream))
            }
        }
    }
}

fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {path}"))
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing {path}"))?
        .ok_or_else(|| anyhow!("no private key in {path}"))
}

fn split_host_port(addr: &str) -> Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("expected host:port, got {addr:?}"))?;
    Ok((host.to_owned(), port.parse().context("port")?))
}

/// A whole request frame: size prefix, header, body.
fn frame<T: Encodable + HeaderVersion>(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &T,
) -> Result<Bytes> {
    let header = RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("strait-loadgen-raw")));
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    header.encode(&mut buf, T::header_version(version))?;
    body.encode(&mut buf, version)?;
    let len = i32::try_from(buf.len() - 4).context("request too large")?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Bytes> {
    let len = r.read_i32().await.context("reading a response size")?;
    let len = usize::try_from(len).map_err(|_| anyhow!("negative response size {len}"))?;
    if len > MAX_RESPONSE {
        bail!("response of {len} bytes");
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.context("reading a response")?;
    Ok(Bytes::from(buf))
}

struct Leader {
    partition: i32,
    host: String,
    port: u16,
}

async fn leaders(dialer: &Dialer, bootstrap: &str, topic: &str) -> Result<Vec<Leader>> {
    let (host, port) = split_host_port(bootstrap)?;
    let mut s = dialer.dial(&host, port).await?;
    let req = MetadataRequest::default().with_topics(Some(vec![MetadataRequestTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(topic.to_owned()))))]));
    s.write_all(&frame(ApiKey::Metadata, METADATA_VERSION, 1, &req)?)
        .await?;
    let mut body = read_frame(&mut s).await?;
    ResponseHeader::decode(
        &mut body,
        MetadataResponse::header_version(METADATA_VERSION),
    )?;
    let md = MetadataResponse::decode(&mut body, METADATA_VERSION)?;
    let t = md
        .topics
        .iter()
        .find(|t| t.name.as_ref().is_some_and(|n| n.as_str() == topic))
        .ok_or_else(|| anyhow!("topic {topic} not in metadata"))?;
    if t.error_code != 0 {
        bail!("metadata for {topic}: error {}", t.error_code);
    }
    let mut out = Vec::new();
    for p in &t.partitions {
        let b = md
            .brokers
            .iter()
            .find(|b| b.node_id == p.leader_id)
            .ok_or_else(|| anyhow!("partition {} has no known leader", p.partition_index))?;
        out.push(Leader {
            partition: p.partition_index,
            host: b.host.to_string(),
            port: u16::try_from(b.port).context("broker port")?,
        });
    }
    out.sort_by_key(|l| l.partition);
    if out.is_empty() {
        bail!("topic {topic} has no partitions");
    }
    Ok(out)
}

fn batch(records: usize, size: usize) -> Result<Bytes> {
    let value: Bytes = (0..size).map(|i| (i % 251) as u8).collect();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let recs: Vec<Record> = (0..records)
        .map(|i| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // Not idempotent: the batch's base sequence is -1. kafka-protocol keeps records in one
            // batch only while offset - sequence stays constant, so the (unencoded) per-record
            // sequences must count up with the offsets: -1, 0, 1, ... (one batch per request, as
            // Produce v3+ requires; Kafka refuses several batches for one partition with error 87).
            sequence: i as i32 - 1,
            timestamp: now,
            key: Some(Bytes::copy_from_slice(&(i as u64).to_be_bytes())),
            value: Some(value.clone()),
            headers: Default::default(),
            delete_horizon: false,
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &recs,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )?;
    Ok(buf.freeze())
}

/// Partition errors a producer retries: leadership not (yet) where the client looked, as right
/// after a topic is created or a leader moves. Anything else ends the run.
const RETRIABLE: [i16; 3] = [
    3, // UNKNOWN_TOPIC_OR_PARTITION
    5, // LEADER_NOT_AVAILABLE
    6, // NOT_LEADER_OR_FOLLOWER
];
/// Retries per connection before the run gives up: a leader that never arrives is an error.
const MAX_RETRIES: u32 = 200;
const RETRY_BACKOFF: Duration = Duration::from_millis(50);

enum Produced {
    Ok,
    Retry(i16),
}

fn check_produce(mut body: Bytes) -> Result<Produced> {
    ResponseHeader::decode(&mut body, ProduceResponse::header_version(PRODUCE_VERSION))?;
    let resp = ProduceResponse::decode(&mut body, PRODUCE_VERSION)?;
    if body.has_remaining() {
        bail!("{} unread bytes after a Produce response", body.remaining());
    }
    let mut retry = None;
    for t in &resp.responses {
        for p in &t.partition_responses {
            match p.error_code {
                0 => {}
                code if RETRIABLE.contains(&code) => retry = Some(code),
                code => bail!("produce to {}-{}: error {code}", t.name.as_str(), p.index),
            }
        }
    }
    Ok(retry.map_or(Produced::Ok, Produced::Retry))
}

struct ConnResult {
    records: u64,
    latency_us: Histogram<u64>,
}

async fn run_connection(
    dialer: Arc<Dialer>,
    all_connected: Arc<tokio::sync::Barrier>,
    leader: (String, u16, i32),
    topic: String,
    requests: u64,
    records_per_request: usize,
    args: (usize, i16, usize),
) -> Result<ConnResult> {
    let (inflight, acks, size) = args;
    let (host, port, partition) = leader;
    let stream = dialer.dial(&host, port).await?;
    all_connected.wait().await;
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let topic = TopicName(StrBytes::from_string(topic));
    // A fresh batch (current timestamp, new CRC) per request, as a real producer sends: a
    // broker may index or cache by timestamp, and identical batches would flatter or punish it.
    let request = |records: Bytes| {
        ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic.clone())
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(records))])])
    };
    let sent_at: Arc<Mutex<VecDeque<Instant>>> = Arc::new(Mutex::new(VecDeque::new()));
    let window = Arc::new(tokio::sync::Semaphore::new(inflight.max(1)));

    // A request refused with a retriable error is sent again (as a fresh batch) after a backoff:
    // the reader asks the writer for it on this channel, and drops its end when every request has
    // been acknowledged, which ends the writer.
    let (retry_tx, mut retry_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let reader_task = {
        let sent_at = sent_at.clone();
        let window = window.clone();
        tokio::spawn(async move {
            let read_all = async {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let (mut acknowledged, mut retries) = (0u64, 0u32);
                while acknowledged < requests {
                    let body = read_frame(&mut reader).await?;
                    let started = sent_at
                        .lock()
                        .await
                        .pop_front()
                        .ok_or_else(|| anyhow!("a response nobody asked for"))?;
                    match check_produce(body)? {
                        Produced::Ok => {
                            acknowledged += 1;
                            h.saturating_record((started.elapsed().as_micros() as u64).max(1));
                        }
                        Produced::Retry(code) => {
                            retries += 1;
                            if retries > MAX_RETRIES {
                                bail!("error {code} after {MAX_RETRIES} retries");
                            }
                            let tx = retry_tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(RETRY_BACKOFF).await;
                                let _ = tx.send(());
                            });
                        }
                    }
                    window.add_permits(1);
                }
                drop(retry_tx);
                anyhow::Ok(h)
            };
            let result = read_all.await;
            // A failed reader returns no more permits: close the window so the writer stops
            // waiting for one and the reader's error surfaces now, not as the run's timeout.
            window.close();
            result
        })
    };
    let mut fresh_left = requests;
    for correlation_id in 0u64.. {
        // A retry first, then a fresh request; with none left, wait for retries until the reader
        // has every acknowledgement (it then drops the channel's last sender).
        if retry_rx.try_recv().is_err() {
            if fresh_left > 0 {
                fresh_left -= 1;
            } else if retry_rx.recv().await.is_none() {
                break;
            }
        }
        if window.acquire().await.map(|p| p.forget()).is_err() {
            break;
        }
        let f = frame(
            ApiKey::Produce,
            PRODUCE_VERSION,
            i32::try_from(correlation_id % i32::MAX as u64)?,
            &request(batch(records_per_request, size)?),
        )?;
        sent_at.lock().await.push_back(Instant::now());
        if let Err(e) = writer.write_all(&f).await {
            // The reader usually knows why the peer closed (an error response before it): prefer
            // its error, waiting for it only briefly.
            let why = match tokio::time::timeout(Duration::from_secs(5), reader_task).await {
                Ok(Ok(Err(reader_error))) => reader_error,
                _ => anyhow::Error::new(e).context(format!("sending request {correlation_id}")),
            };
            return Err(why.context(format!(
                "connection to {host}:{port} (partition {partition})"
            )));
        }
    }
    let latency_us = reader_task
        .await
        .context("response reader")?
        .with_context(|| format!("connection to {host}:{port} (partition {partition})"))?;
    Ok(ConnResult {
        records: requests * records_per_request as u64,
        latency_us,
    })
}

pub fn raw_produce(args: &RawProduceArgs) -> Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(args.timeout_secs), run(args))
            .await
            .map_err(|_| anyhow!("timed out after {} s", args.timeout_secs))?
    })
}

async fn run(args: &RawProduceArgs) -> Result<serde_json::Value> {
    let dialer = Arc::new(Dialer::new(args)?);
    let leaders = leaders(&dialer, &args.bootstrap, &args.topic).await?;
    let per_request = (args.batch_bytes / args.size.max(1)).max(1);
    let connections = args.connections.max(1) as u64;
    let requests_per_conn = (args.count / connections)
        .div_ceil(per_request as u64)
        .max(1);

    let started_at = SystemTime::now();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // Every connection is established before any sends, so N connections are really open at once
    // (a dial error still ends the run: the first failed task is joined first).
    let all_connected = Arc::new(tokio::sync::Barrier::new(args.connections.max(1)));
    for i in 0..args.connections.max(1) {
        let l = &leaders[i % leaders.len()];
        tasks.spawn(run_connection(
            dialer.clone(),
            all_connected.clone(),
            (l.host.clone(), l.port, l.partition),
            args.topic.clone(),
            requests_per_conn,
            per_request,
            (args.inflight, args.acks, args.size),
        ));
    }
    let mut records = 0u64;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    // In completion order: the first connection to fail ends the run with its error.
    while let Some(t) = tasks.join_next().await {
        let r = t.context("connection task")??;
        records += r.records;
        latency.add(&r.latency_us)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let start_unix = started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Ok(json!({
        "mode": "raw-produce",
        "bootstrap": args.bootstrap,
        "topic": args.topic,
        "tls": args.ca.is_some(),
        "connections": args.connections,
        "records": records,
        "records_per_request": per_request,
        "size": args.size,
        "seconds": elapsed,
        "started_at": start_unix,
        "finished_at": start_unix + elapsed,
        "records_per_s": records as f64 / elapsed,
        "mb_per_s": records as f64 * args.size as f64 / 1e6 / elapsed,
        "p50_us": latency.value_at_quantile(0.50),
        "p99_us": latency.value_at_quantile(0.99),
        "max_us": latency.max(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    fn produce_response(error_code: i16) -> Bytes {
        use kafka_protocol::messages::produce_response::{
            PartitionProduceResponse, TopicProduceResponse,
        };
        let resp = ProduceResponse::default().with_responses(vec![TopicProduceResponse::default()
            .with_name(TopicName(StrBytes::from_static_str("t")))
            .with_partition_responses(vec![
                PartitionProduceResponse::default().with_error_code(error_code)
            ])]);
        let mut buf = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(1)
            .encode(&mut buf, ProduceResponse::header_version(PRODUCE_VERSION))
            .unwrap();
        resp.encode(&mut buf, PRODUCE_VERSION).unwrap();
        buf.freeze()
    }

    #[test]
    fn leadership_errors_are_retried_and_others_end_the_run() {
        assert!(matches!(
            check_produce(produce_response(0)),
            Ok(Produced::Ok)
        ));
        assert!(matches!(
            check_produce(produce_response(6)),
            Ok(Produced::Retry(6))
        ));
        let err = check_produce(produce_response(87))
            .err()
            .expect("error 87 is fatal");
        assert_eq!(err.to_string(), "produce to t-0: error 87");
    }

    #[test]
    fn a_request_carries_one_batch_with_every_record() {
        let mut bytes = batch(10, 100).unwrap();
        let decoded = RecordBatchDecoder::decode_all(&mut bytes).unwrap();
        assert_eq!(decoded.len(), 1, "one batch");
        assert_eq!(decoded[0].records.len(), 10);
        assert!(decoded[0].records.iter().all(|r| r.producer_id == -1));
    }
}

//! `strait-loadgen`: drives a Kafka endpoint (a broker, or a proxy in front of one) with librdkafka and
//! prints one JSON line with throughput and latency, so the benchmark can compare endpoints
//! with the same client, the same settings and the same measurement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

mod raw;

#[derive(Parser, Debug)]
#[command(name = "strait-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Produce COUNT records of SIZE bytes with at most INFLIGHT unacknowledged records.
    Produce(ProduceArgs),
    /// Consume COUNT records from the beginning of every partition of the topic.
    Consume(ConsumeArgs),
    /// Produce over many pipelined connections with a minimal Kafka client (no librdkafka).
    RawProduce(raw::RawProduceArgs),
}

#[derive(Args, Debug)]
struct Common {
    /// Bootstrap address (host:port).
    #[arg(long)]
    bootstrap: String,
    #[arg(long)]
    topic: String,
    /// Number of records.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Extra librdkafka properties, `key=value`, repeatable.
    #[arg(long = "set", value_parser = parse_kv)]
    set: Vec<(String, String)>,
}

#[derive(Args, Debug)]
struct ProduceArgs {
    #[command(flatten)]
    common: Common,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Maximum number of records sent but not yet acknowledged.
    #[arg(long, default_value_t = 1000)]
    inflight: usize,
    /// Create the topic with this many partitions first (0 = do not create).
    #[arg(long, default_value_t = 0)]
    create_partitions: i32,
    #[arg(long, default_value = "none")]
    compression: String,
    #[arg(long, default_value = "1")]
    linger_ms: String,
    #[arg(long, default_value = "all")]
    acks: String,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    #[command(flatten)]
    common: Common,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Collects delivery reports. `delivery` runs on the producer's polling thread and wakes the
/// sending thread through `slot_freed`: waiting on a condition, not polling with a timeout, keeps
/// 64 producer processes from spinning and starving the broker of CPU. The sender is woken only
/// once half the window is free, so it refills in bursts and librdkafka still builds full batches.
struct Stats {
    latency_us: Mutex<Histogram<u64>>,
    inflight: Mutex<usize>,
    slot_freed: Condvar,
    wake_at: usize,
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Stats {
    fn lock_inflight(&self) -> Result<MutexGuard<'_, usize>> {
        self.inflight
            .lock()
            .map_err(|_| anyhow::anyhow!("in-flight counter poisoned"))
    }
}

impl ClientContext for Stats {}

impl ProducerContext for Stats {
    type DeliveryOpaque = Box<Instant>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_at: Box<Instant>) {
        if let Ok(mut inflight) = self.inflight.lock() {
            *inflight = inflight.saturating_sub(1);
            if *inflight <= self.wake_at {
                self.slot_freed.notify_all();
            }
        }
        match result {
            Ok(_) => {
                let us = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut h) = self.latency_us.lock() {
                    h.saturating_record(us.max(1));
                }
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

fn base_config(common: &Common) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &common.bootstrap);
    for (k, v) in &common.set {
        cfg.set(k, v);
    }
    cfg
}

fn create_topic(common: &Common, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = base_config(common)
        .create()
        .context("creating admin client")?;
    let topic = NewTopic::new(&common.topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics([&topic], &opts))
        .context("create_topics")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("creating topic {t}: {code}"),
        }
    }
    Ok(())
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Waits until `busy(inflight)` is false, or fails at `deadline`.
fn wait_while(
    ctx: &Stats,
    deadline: Instant,
    busy: impl Fn(usize) -> bool,
) -> Result<MutexGuard<'_, usize>> {
    let mut inflight = ctx.lock_inflight()?;
    while busy(*inflight) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out with {} records unacknowledged", *inflight);
        }
        inflight = ctx
            .slot_freed
            .wait_timeout(inflight, left)
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .0;
    }
    Ok(inflight)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

fn produce(args: &ProduceArgs) -> Result<serde_json::Value> {
    let c = &args.common;
    if args.create_partitions > 0 {
        create_topic(c, args.create_partitions)?;
    }
    let stats = Stats {
        latency_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        inflight: Mutex::new(0),
        slot_freed: Condvar::new(),
        wake_at: args.inflight / 2,
        delivered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error: Mutex::new(None),
    };
    let mut cfg = base_config(c);
    cfg.set("acks", &args.acks)
        .set("linger.ms", &args.linger_ms)
        .set("compression.type", &args.compression)
        .set(
            "queue.buffering.max.messages",
            (args.inflight + 1000).to_string(),
        )
        .set("message.timeout.ms", (c.timeout_secs * 1000).to_string());
    let producer: ThreadedProducer<Stats> = cfg
        .create_with_context(stats)
        .context("creating producer")?;

    // Not all bytes equal, so a compressing path would not flatter itself; still cheap to build.
    let payload: Vec<u8> = (0..args.size).map(|i| (i % 251) as u8).collect();
    let deadline = Instant::now() + Duration::from_secs(c.timeout_secs);
    let start = Instant::now();
    // Wall-clock too, so runs of many producer processes can be aggregated.
    let started_at = SystemTime::now();
    let mut sent = 0u64;
    while sent < c.count {
        if Instant::now() > deadline {
            bail!("timed out after sending {sent} records");
        }
        {
            let ctx = producer.context();
            let mut inflight = ctx.lock_inflight()?;
            if *inflight >= args.inflight {
                drop(inflight);
                inflight = wait_while(ctx, deadline, |n| n > ctx.wake_at)?;
            }
            *inflight += 1;
        }
        let key = (sent % 1024).to_be_bytes();
        let record = BaseRecord::with_opaque_to(&c.topic, Box::new(Instant::now()))
            .key(&key[..])
            .payload(&payload[..]);
        match producer.send(record) {
            Ok(()) => sent += 1,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                // librdkafka's queue is sized above INFLIGHT, so this is rare: give the slot
                // back and wait for the next delivery report before trying again.
                let ctx = producer.context();
                let mut inflight = ctx.lock_inflight()?;
                *inflight -= 1;
                let _ = ctx
                    .slot_freed
                    .wait_timeout(inflight, Duration::from_millis(10));
            }
            Err((e, _)) => bail!("send failed: {e}"),
        }
    }
    drop(
        wait_while(producer.context(), deadline, |n| n > 0)
            .context("waiting for the last delivery reports")?,
    );
    let elapsed = start.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(5))?;
    let ctx = producer.context();
    let failed = ctx.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = ctx.first_error.lock().ok().and_then(|f| f.clone());
        bail!("{failed} records failed, first error: {first:?}");
    }
    let delivered = ctx.delivered.load(Ordering::Relaxed);
    let bytes = delivered * args.size as u64;
    let h = ctx
        .latency_us
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?;
    Ok(json!({
        "mode": "produce",
        "bootstrap": c.bootstrap,
        "topic": c.topic,
        "records": delivered,
        "size": args.size,
        "inflight": args.inflight,
        "seconds": elapsed,
        "started_at": unix_seconds(started_at),
        "finished_at": unix_seconds(started_at) + elapsed,
        "records_per_s": delivered as f64 / elapsed,
        "mb_per_s": mb(bytes) / elapsed,
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "max_us": h.max(),
    }))
}

fn consume(args: &ConsumeArgs) -> Result<serde_json::Value> {
    let c = &args.common;
    let mut cfg = base_config(c);
    // Assign partitions explicitly: no group coordination, so the run measures fetch only.
    cfg.set("group.id", "strait-loadgen")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760")
        .set("queued.min.messages", "100000");
    let consumer: BaseConsumer = cfg.create().context("creating consumer")?;
    let deadline = Instant::now() + Duration::from_secs(c.timeout_secs);
    let md = loop {
        match consumer.fetch_metadata(Some(&c.topic), Duration::from_secs(10)) {
            Ok(md)
                if md
                    .topics()
                    .first()
                    .is_some_and(|t| !t.partitions().is_empty()) =>
            {
                break md
            }
            Ok(_) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(_) => bail!("topic {} has no partitions", c.topic),
            Err(e) => return Err(e).context("fetching metadata"),
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(&c.topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut start: Option<Instant> = None;
    while records < c.count {
        if Instant::now() > deadline {
            bail!("timed out after {records} of {} records", c.count);
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                start.get_or_insert_with(Instant::now);
                records += 1;
                bytes += m.payload_len() as u64;
            }
            Some(Err(e)) => bail!("consume error: {e}"),
            None => {}
        }
    }
    // Timed from the first record so metadata and connection setup are not counted.
    let elapsed = start.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-9);
    Ok(json!({
        "mode": "consume",
        "bootstrap": c.bootstrap,
        "topic": c.topic,
        "records": records,
        "bytes": bytes,
        "seconds": elapsed,
        "records_per_s": records as f64 / elapsed,
        "mb_per_s": mb(bytes) / elapsed,
    }))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let report = match &cli.mode {
        Mode::Produce(a) => produce(a)?,
        Mode::Consume(a) => consume(a)?,
        Mode::RawProduce(a) => raw::raw_produce(a)?,
    };
    println!("{report}");
    Ok(())
}

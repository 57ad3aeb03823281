//! Encrypt/decrypt throughput of the record-encryption core on real
//! (uncompressed) batches of 100 B / 1 KiB / 16 KiB values, next to raw
//! AES-256-GCM over the same values. Prints records/s, MB/s and the ratio
//! to raw after the criterion runs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{FetchResponse, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use prometheus_client::registry::Registry;
use strait_encryption::{EncryptionConfig, RecordEncryption, TopicRule};
use strait_kms_core::local::LocalKeyring;
use strait_kms_core::KmsSet;
use tokio::runtime::Runtime;

const SIZES: [(usize, usize); 3] = [(100, 2000), (1024, 500), (16 * 1024, 32)];

fn values(size: usize, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            let mut v = vec![0u8; size];
            for (j, b) in v.iter_mut().enumerate() {
                *b = (i * 31 + j * 7) as u8;
            }
            Bytes::from(v)
        })
        .collect()
}

fn batch(vals: &[Bytes]) -> Bytes {
    let recs: Vec<Record> = vals
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: 1,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: i as i32,
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(v.clone()),
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
    )
    .unwrap();
    buf.freeze()
}

fn topic() -> TopicName {
    TopicName(StrBytes::from_static_str("secret-bench"))
}

fn produce(b: &Bytes) -> ProduceRequest {
    ProduceRequest::default().with_topic_data(vec![TopicProduceData::default()
        .with_name(topic())
        .with_partition_data(vec![PartitionProduceData::default()
            .with_index(0)
            .with_records(Some(b.clone()))])])
}

fn fetch(b: &Bytes) -> FetchResponse {
    FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
        .with_topic(topic())
        .with_partitions(vec![PartitionData::default().with_records(Some(b.clone()))])])
}

fn engine() -> RecordEncryption {
    let ring = LocalKeyring::in_memory();
    ring.rotate_key("kek-bench").unwrap();
    let cfg = EncryptionConfig {
        rules: vec![TopicRule {
            topic: "secret-*".into(),
            kms: "dev".into(),
            kek: "kek-bench".into(),
            also_wrap_for: Vec::new(),
        }],
        on_missing_key: Default::default(),
        on_plaintext_fetch: Default::default(),
        encrypt_headers: false,
        dek: Default::default(),
        keys_topic: Default::default(),
        shredded_keks: Vec::new(),
    };
    RecordEncryption::new(
        cfg,
        KmsSet::new().with("dev", Arc::new(ring)),
        &mut Registry::default(),
    )
    .unwrap()
}

struct Raw {
    cipher: Aes256Gcm,
}

impl Raw {
    fn new() -> Self {
        Self {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&[7u8; 32])),
        }
    }
    fn seal_all(&self, vals: &[Bytes]) -> Vec<Vec<u8>> {
        vals.iter()
            .enumerate()
            .map(|(i, v)| {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let mut buf = Vec::with_capacity(v.len() + 16);
                buf.extend_from_slice(v);
                let tag = self
                    .cipher
                    .encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", &mut buf)
                    .unwrap();
                buf.extend_from_slice(&tag);
                buf
            })
            .collect()
    }
    fn open_all(&self, sealed: &[Vec<u8>]) -> usize {
        sealed
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let (ct, tag) = s.split_at(s.len() - 16);
                let mut buf = ct.to_vec();
                self.cipher
                    .decrypt_in_place_detached(
                        Nonce::from_slice(&nonce),
                        b"",
                        &mut buf,
                        aes_gcm::Tag::from_slice(tag),
                    )
                    .unwrap();
                buf.len()
            })
            .sum()
    }
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let enc = engine();
    let raw = Raw::new();
    for (size, n) in SIZES {
        let vals = values(size, n);
        let plain = batch(&vals);
        let mut req = produce(&plain);
        rt.block_on(enc.encrypt_produce(&mut req, 9)).unwrap();
        let cipher = req.topic_data[0].partition_data[0].records.clone().unwrap();
        let sealed = raw.seal_all(&vals);

        let mut g = c.benchmark_group(format!("{size}B"));
        g.throughput(Throughput::Bytes((size * n) as u64));
        g.bench_function(BenchmarkId::new("encrypt", "strait"), |b| {
            b.iter(|| {
                let mut req = produce(&plain);
                rt.block_on(enc.encrypt_produce(&mut req, 9)).unwrap();
                black_box(req);
            })
        });
        g.bench_function(BenchmarkId::new("encrypt", "raw-aes-gcm"), |b| {
            b.iter(|| black_box(raw.seal_all(&vals)))
        });
        g.bench_function(BenchmarkId::new("decrypt", "strait"), |b| {
            b.iter(|| {
                let mut resp = fetch(&cipher);
                let r = rt.block_on(enc.decrypt_fetch(&mut resp, 12));
                assert!(r.failed_partitions.is_empty());
                black_box(resp);
            })
        });
        g.bench_function(BenchmarkId::new("decrypt", "raw-aes-gcm"), |b| {
            b.iter(|| black_box(raw.open_all(&sealed)))
        });
        g.finish();
    }
}

/// CPU time of this thread: on a shared 2-core machine the wall clock also
/// counts time the scheduler gave to other processes, which skews whichever
/// side of the comparison happened to run then.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time per call of `f`, over about `budget` of CPU time.
fn cpu_per_iter(budget: Duration, f: &mut dyn FnMut()) -> Duration {
    f();
    let mut iters = 0u32;
    let start = thread_cpu();
    while thread_cpu() - start < budget {
        f();
        iters += 1;
    }
    (thread_cpu() - start) / iters
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const ROUNDS: usize = 9;

type Workload<'a> = dyn FnMut() + 'a;

/// The table reported in the README: records per CPU-second (one core),
/// Strait and raw AES-GCM measured alternately in each of `ROUNDS` rounds;
/// medians of the rates and of the per-round ratios.
fn summary(_: &mut Criterion) {
    if std::env::args().any(|a| a == "--profile-time") {
        return; // profiling one benchmark: keep the profile clean
    }
    let rt = Runtime::new().unwrap();
    let enc = engine();
    let raw = Raw::new();
    println!(
        "\nsummary (records per CPU-second of one core, medians of {ROUNDS} interleaved rounds):"
    );
    println!(
        "{:>7} {:>8} {:>14} {:>10} {:>14} {:>10} {:>7}",
        "size", "op", "strait rec/s", "MB/s", "raw rec/s", "raw MB/s", "ratio"
    );
    for (size, n) in SIZES {
        let vals = values(size, n);
        let plain = batch(&vals);
        let mut req = produce(&plain);
        rt.block_on(enc.encrypt_produce(&mut req, 9)).unwrap();
        let cipher = req.topic_data[0].partition_data[0].records.clone().unwrap();
        let sealed = raw.seal_all(&vals);
        let mut encrypt = || {
            let mut req = produce(&plain);
            rt.block_on(enc.encrypt_produce(&mut req, 9)).unwrap();
            black_box(req);
        };
        let mut raw_encrypt = || {
            black_box(raw.seal_all(&vals));
        };
        let mut decrypt = || {
            let mut resp = fetch(&cipher);
            let r = rt.block_on(enc.decrypt_fetch(&mut resp, 12));
            assert!(r.failed_partitions.is_empty());
            black_box(resp);
        };
        let mut raw_decrypt = || {
            black_box(raw.open_all(&sealed));
        };
        let pairs: [(&str, &mut Workload, &mut Workload); 2] = [
            ("encrypt", &mut encrypt, &mut raw_encrypt),
            ("decrypt", &mut decrypt, &mut raw_decrypt),
        ];
        for (op, ours, theirs) in pairs {
            let (mut rates, mut raw_rates, mut ratios) = (vec![], vec![], vec![]);
            for _ in 0..ROUNDS {
                let t = cpu_per_iter(Duration::from_millis(150), ours);
                let r = cpu_per_iter(Duration::from_millis(150), theirs);
                let rate = n as f64 / t.as_secs_f64();
                let raw_rate = n as f64 / r.as_secs_f64();
                rates.push(rate);
                raw_rates.push(raw_rate);
                ratios.push(rate / raw_rate);
            }
            let (rec, rrec) = (median(rates), median(raw_rates));
            println!(
                "{:>7} {:>8} {:>14.0} {:>10.1} {:>14.0} {:>10.1} {:>6.0}%",
                size,
                op,
                rec,
                rec * size as f64 / 1e6,
                rrec,
                rrec * size as f64 / 1e6,
                100.0 * median(ratios)
            );
        }
    }
    let values = enc.metrics().encrypted_records() + enc.metrics().decrypted_records();
    println!(
        "KMS calls during the summary: {} for {:.1} million values encrypted or decrypted \
         ({:.2} per million; alias resolution and DEK generation only, none per record)",
        enc.metrics().kms_calls_total(),
        values as f64 / 1e6,
        enc.metrics().kms_calls_total() as f64 * 1e6 / values as f64,
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = bench, summary
}
criterion_main!(benches);

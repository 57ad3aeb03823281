//! Unit tests of the encryption core over real record batches, with the
//! local keyring as KMS.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{FetchResponse, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use kafka_protocol::ResponseError;
use prometheus_client::registry::Registry;
use strait_encryption::format::{self, MARKER_HEADER};
use strait_encryption::testing::split_batches;
use strait_encryption::{
    DekConfig, EncryptionConfig, EncryptionError, OnMissingKey, OnPlaintextFetch, RecordEncryption,
    TopicRule,
};
use strait_kms_core::local::LocalKeyring;
use strait_kms_core::{DekPair, KekRef, Kms, KmsError, KmsSet};
use zeroize::Zeroizing;

/// Wraps the local keyring so tests can take the "KMS" down and count calls.
struct Switchable {
    inner: LocalKeyring,
    up: AtomicBool,
    calls: AtomicU64,
}

impl Switchable {
    fn new(inner: LocalKeyring) -> Arc<Self> {
        Arc::new(Self {
            inner,
            up: AtomicBool::new(true),
            calls: AtomicU64::new(0),
        })
    }
    fn check(&self) -> strait_kms_core::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(KmsError::Unavailable("switched off".into()))
        }
    }
}

#[async_trait]
impl Kms for Switchable {
    async fn generate_dek(&self, kek: &KekRef) -> strait_kms_core::Result<DekPair> {
        self.check()?;
        self.inner.generate_dek(kek).await
    }
    async fn unwrap_dek(
        &self,
        kek: &KekRef,
        wrapped: &[u8],
    ) -> strait_kms_core::Result<Zeroizing<[u8; 32]>> {
        self.check()?;
        self.inner.unwrap_dek(kek, wrapped).await
    }
    async fn resolve_alias(&self, alias: &str) -> strait_kms_core::Result<KekRef> {
        self.check()?;
        self.inner.resolve_alias(alias).await
    }
}

fn config(dek: DekConfig) -> EncryptionConfig {
    EncryptionConfig {
        rules: vec![TopicRule {
            topic: "secret-*".into(),
            kms: "dev".into(),
            kek: "kek-$(topic)".into(),
            also_wrap_for: Vec::new(),
        }],
        on_missing_key: OnMissingKey::Reject,
        on_plaintext_fetch: OnPlaintextFetch::Pass,
        encrypt_headers: false,
        dek,
        keys_topic: Default::default(),
        shredded_keks: Vec::new(),
    }
}

fn keyring(names: &[&str]) -> LocalKeyring {
    let ring = LocalKeyring::in_memory();
    for n in names {
        ring.rotate_key(n).unwrap();
    }
    ring
}

fn engine(cfg: EncryptionConfig, kms: Arc<dyn Kms>) -> RecordEncryption {
    RecordEncryption::new(
        cfg,
        KmsSet::new().with("dev", kms),
        &mut Registry::default(),
    )
    .unwrap()
}

fn records(n: usize, value_len: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let mut headers = IndexMap::new();
            headers.insert(
                StrBytes::from_static_str("trace"),
                Some(Bytes::from(format!("t{i}"))),
            );
            Record {
                transactional: false,
                control: false,
                partition_leader_epoch: 5,
                producer_id: 4242,
                producer_epoch: 3,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: 1000 + i as i32,
                timestamp: 1_700_000_000_000 + (i as i64) * 7,
                key: Some(Bytes::from(format!("key-{i}"))),
                value: if i % 5 == 4 {
                    None
                } else {
                    let mut v = format!("plaintext-value-{i}-").into_bytes();
                    v.resize(value_len.max(v.len()), b'x');
                    Some(Bytes::from(v))
                },
                headers,
                delete_horizon: false,
            }
        })
        .collect()
}

fn encode(recs: &[Record], c: Compression) -> Bytes {
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        recs,
        &RecordEncodeOptions {
            version: 2,
            compression: c,
        },
    )
    .unwrap();
    buf.freeze()
}

fn name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_string()))
}

fn produce(topic: &str, batches: Vec<Bytes>) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(-1)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(
                batches
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| {
                        PartitionProduceData::default()
                            .with_index(i as i32)
                            .with_records(Some(b))
                    })
                    .collect(),
            )])
}

fn records_of(req: &ProduceRequest, partition: usize) -> Bytes {
    req.topic_data[0].partition_data[partition]
        .records
        .clone()
        .unwrap()
}

fn fetch(topic: &str, batches: Vec<Bytes>) -> FetchResponse {
    FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
        .with_topic(name(topic))
        .with_partitions(
            batches
                .into_iter()
                .enumerate()
                .map(|(i, b)| {
                    PartitionData::default()
                        .with_partition_index(i as i32)
                        .with_high_watermark(100)
                        .with_records(Some(b))
                })
                .collect(),
        )])
}

fn fetched(resp: &FetchResponse, partition: usize) -> &PartitionData {
    &resp.responses[0].partitions[partition]
}

fn decode(b: &Bytes) -> Vec<kafka_protocol::records::RecordSet> {
    let mut b = b.clone();
    RecordBatchDecoder::decode_all(&mut b).unwrap()
}

const CODECS: [Compression; 5] = [
    Compression::None,
    Compression::Gzip,
    Compression::Snappy,
    Compression::Lz4,
    Compression::Zstd,
];

#[tokio::test]
async fn round_trip_all_codecs_preserves_batch_fields() {
    let kms = Arc::new(keyring(&["kek-secret-a"]));
    let enc = engine(config(DekConfig::default()), kms);
    for codec in CODECS {
        let original = records(20, 64);
        let plain = encode(&original, codec);
        let mut req = produce("secret-a", vec![plain.clone()]);
        enc.encrypt_produce(&mut req, 9).await.unwrap();
        let cipher = records_of(&req, 0);
        assert_ne!(cipher, plain);

        // Batch header: everything but length/CRC identical.
        assert_eq!(cipher[..8], plain[..8], "base offset {codec:?}");
        assert_eq!(cipher[12..17], plain[12..17], "leader epoch + magic");
        assert_eq!(
            cipher[21..61],
            plain[21..61],
            "attributes, deltas, timestamps, producer id/epoch, base sequence, count"
        );

        let sets = decode(&cipher);
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].compression, codec);
        for (o, c) in original.iter().zip(&sets[0].records) {
            assert_eq!(c.key, o.key);
            assert_eq!(c.timestamp, o.timestamp);
            assert_eq!(c.offset, o.offset);
            assert_eq!(c.sequence, o.sequence);
            assert_eq!(c.producer_id, 4242);
            assert_eq!(c.producer_epoch, 3);
            assert_eq!(
                c.headers.get(&StrBytes::from_static_str("trace")),
                o.headers.get(&StrBytes::from_static_str("trace"))
            );
            match &o.value {
                None => {
                    assert_eq!(c.value, None, "tombstones stay null");
                    assert!(!c
                        .headers
                        .contains_key(&StrBytes::from_static_str(MARKER_HEADER)));
                }
                Some(v) => {
                    let cv = c.value.as_ref().unwrap();
                    assert!(
                        !cv.windows(v.len()).any(|w| w == &v[..]),
                        "plaintext leaked"
                    );
                    assert!(format::parse(cv).is_ok());
                    assert_eq!(
                        c.headers
                            .get(&StrBytes::from_static_str(MARKER_HEADER))
                            .unwrap()
                            .as_deref(),
                        Some(&[format::FORMAT_CURRENT, 1][..])
                    );
                }
            }
        }

        let mut resp = fetch("secret-a", vec![cipher]);
        let report = enc.decrypt_fetch(&mut resp, 12).await;
        assert!(report.failed_partitions.is_empty());
        assert_eq!(report.decrypted_records, 16);
        let p = fetched(&resp, 0);
        assert_eq!(p.error_code, 0);
        let back = decode(p.records.as_ref().unwrap());
        assert_eq!(
            back[0].records, original,
            "exact plaintext back for {codec:?}"
        );
        assert_eq!(back[0].compression, codec);
    }
}

#[tokio::test]
async fn untouched_topics_control_batches_and_zero_cost_check() {
    let kms = Arc::new(keyring(&["kek-secret-a"]));
    let enc = engine(config(DekConfig::default()), kms);
    assert!(!enc.needs_produce(["public", "other"]));
    assert!(enc.needs_produce(["public", "secret-x"]));
    assert!(
        enc.needs_produce([""]),
        "id-named (v13+) topics must be examined"
    );

    let plain = encode(&records(5, 10), Compression::Lz4);
    let mut req = produce("public", vec![plain.clone()]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    assert_eq!(records_of(&req, 0), plain);

    // A control (transaction marker) batch passes unchanged inside an encrypted topic.
    let mut ctl = records(1, 0);
    ctl[0].control = true;
    ctl[0].transactional = true;
    ctl[0].key = Some(Bytes::from_static(&[0, 0, 0, 1]));
    ctl[0].value = Some(Bytes::from_static(&[0, 0, 0, 0, 0, 0]));
    ctl[0].headers.clear();
    let ctl = encode(&ctl, Compression::None);
    let mut req = produce("secret-a", vec![ctl.clone()]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    assert_eq!(records_of(&req, 0), ctl);
    assert_eq!(
        enc.metrics().kms_calls_total(),
        0,
        "no KMS call for nothing to encrypt"
    );
}

#[tokio::test]
async fn one_mib_values() {
    let kms = Arc::new(keyring(&["kek-secret-big"]));
    let enc = engine(config(DekConfig::default()), kms);
    let original = records(3, 1 << 20);
    let plain = encode(&original, Compression::Zstd);
    let mut req = produce("secret-big", vec![plain]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let mut resp = fetch("secret-big", vec![records_of(&req, 0)]);
    enc.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(
        decode(fetched(&resp, 0).records.as_ref().unwrap())[0].records,
        original
    );
}

#[tokio::test]
async fn tampering_fails_only_that_partition() {
    let kms = Arc::new(keyring(&["kek-secret-a"]));
    let enc = engine(config(DekConfig::default()), kms);
    let original = records(4, 32);
    let mut req = produce(
        "secret-a",
        vec![
            encode(&original, Compression::None),
            encode(&original, Compression::None),
        ],
    );
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let good = records_of(&req, 0);
    let mut sets = decode(&records_of(&req, 1));
    let v = sets[0].records[1].value.as_mut().unwrap();
    let mut t = v.to_vec();
    let last = t.len() - 20;
    t[last] ^= 0x01;
    *v = Bytes::from(t);
    let tampered = encode(&sets[0].records, Compression::None);

    let mut resp = fetch("secret-a", vec![good, tampered]);
    let report = enc.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(fetched(&resp, 0).error_code, 0);
    assert_eq!(
        decode(fetched(&resp, 0).records.as_ref().unwrap())[0].records,
        original
    );
    assert_eq!(
        fetched(&resp, 1).error_code,
        ResponseError::CorruptMessage.code()
    );
    assert_eq!(fetched(&resp, 1).records.as_deref(), Some(&[][..]));
    assert_eq!(report.failed_partitions.len(), 1);
    assert_eq!(report.failed_partitions[0].error, EncryptionError::Tampered);

    // Tampering with the AAD-bound KEK reference is detected too.
    let mut sets = decode(&records_of(&req, 0));
    let v = sets[0].records[0].value.as_mut().unwrap();
    let mut t = v.to_vec();
    t[8] ^= 0x20; // inside the KEK reference
    *v = Bytes::from(t);
    let mut resp = fetch(
        "secret-a",
        vec![encode(&sets[0].records, Compression::None)],
    );
    enc.decrypt_fetch(&mut resp, 12).await;
    assert_ne!(fetched(&resp, 0).error_code, 0);
    assert_eq!(fetched(&resp, 0).records.as_deref(), Some(&[][..]));
}

#[tokio::test]
async fn unknown_kek_on_fetch_is_resource_not_found() {
    let ring = Arc::new(keyring(&["kek-secret-a"]));
    let enc = engine(config(DekConfig::default()), ring.clone());
    let mut req = produce("secret-a", vec![encode(&records(3, 8), Compression::None)]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    ring.delete_key("kek-secret-a").unwrap();
    // A cold edge (no cached DEK) must ask the KMS, which no longer knows the key.
    let cold = engine(config(DekConfig::default()), ring.clone());
    let mut resp = fetch("secret-a", vec![records_of(&req, 0)]);
    let report = cold.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(
        fetched(&resp, 0).error_code,
        ResponseError::ResourceNotFound.code()
    );
    assert_eq!(fetched(&resp, 0).records.as_deref(), Some(&[][..]));
    assert!(matches!(
        report.failed_partitions[0].error,
        EncryptionError::UnknownKek(_)
    ));
}

#[tokio::test]
async fn missing_key_reject_and_passthrough() {
    let kms = Arc::new(keyring(&[]));
    let enc = engine(config(DekConfig::default()), kms.clone());
    let plain = encode(&records(3, 8), Compression::None);
    let other = encode(&records(2, 8), Compression::None);
    let mut req = produce("secret-nokey", vec![plain.clone()]);
    req.topic_data.push(
        TopicProduceData::default()
            .with_name(name("public"))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(other.clone()))]),
    );
    let rej = enc.encrypt_produce(&mut req, 9).await.unwrap_err();
    assert_eq!(rej.partitions.len(), 1);
    assert_eq!(
        rej.partitions[0].error.error_code(),
        ResponseError::PolicyViolation.code()
    );
    // The failed partition is gone from the request; the unencrypted topic stays.
    assert_eq!(req.topic_data.len(), 1);
    assert_eq!(req.topic_data[0].name, name("public"));
    let resp = rej.to_response();
    assert_eq!(resp.responses[0].partition_responses[0].error_code, 44);
    assert!(resp.responses[0].partition_responses[0]
        .error_message
        .as_ref()
        .unwrap()
        .contains("kek-secret-nokey"));

    let mut cfg = config(DekConfig::default());
    cfg.on_missing_key = OnMissingKey::Passthrough;
    let pass = engine(cfg, kms);
    let mut req = produce("secret-nokey", vec![plain.clone()]);
    pass.encrypt_produce(&mut req, 9).await.unwrap();
    assert_eq!(records_of(&req, 0), plain);
}

#[tokio::test]
async fn injected_marker_rejected_and_plaintext_fetch_policy() {
    let kms = Arc::new(keyring(&["kek-secret-a"]));
    let mut recs = records(2, 8);
    recs[0].headers.insert(
        StrBytes::from_static_str(MARKER_HEADER),
        Some(Bytes::from_static(&[1, 1])),
    );
    let enc = engine(config(DekConfig::default()), kms.clone());
    let mut req = produce("secret-a", vec![encode(&recs, Compression::None)]);
    let rej = enc.encrypt_produce(&mut req, 9).await.unwrap_err();
    assert_eq!(rej.partitions[0].error, EncryptionError::MarkerInjected);

    let plain = encode(&records(2, 8), Compression::None);
    let mut resp = fetch("secret-a", vec![plain.clone()]);
    enc.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(
        fetched(&resp, 0).records.as_ref(),
        Some(&plain),
        "pass policy"
    );

    let mut cfg = config(DekConfig::default());
    cfg.on_plaintext_fetch = OnPlaintextFetch::Reject;
    let strict = engine(cfg, kms);
    let mut resp = fetch("secret-a", vec![plain.clone()]);
    strict.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(
        fetched(&resp, 0).error_code,
        ResponseError::PolicyViolation.code()
    );
    let mut resp = fetch("public", vec![plain.clone()]);
    strict.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(
        fetched(&resp, 0).records.as_ref(),
        Some(&plain),
        "no rule, no check"
    );
}

#[tokio::test]
async fn header_encryption_round_trip() {
    let kms = Arc::new(keyring(&["kek-secret-h"]));
    let mut cfg = config(DekConfig::default());
    cfg.encrypt_headers = true;
    let enc = engine(cfg, kms);
    let original = records(5, 16);
    let mut req = produce("secret-h", vec![encode(&original, Compression::Snappy)]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let sets = decode(&records_of(&req, 0));
    for (o, c) in original.iter().zip(&sets[0].records) {
        let ov = o
            .headers
            .get(&StrBytes::from_static_str("trace"))
            .unwrap()
            .as_ref()
            .unwrap();
        let cv = c
            .headers
            .get(&StrBytes::from_static_str("trace"))
            .unwrap()
            .as_ref()
            .unwrap();
        assert_ne!(ov, cv, "header value encrypted");
    }
    // A tombstone with headers keeps a null value but gets its headers encrypted.
    assert_eq!(sets[0].records[4].value, None);
    assert_eq!(
        sets[0].records[4]
            .headers
            .get(&StrBytes::from_static_str(MARKER_HEADER))
            .unwrap()
            .as_deref(),
        Some(&[format::FORMAT_CURRENT, 2][..])
    );
    let mut resp = fetch("secret-h", vec![records_of(&req, 0)]);
    enc.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(
        decode(fetched(&resp, 0).records.as_ref().unwrap())[0].records,
        original
    );

    // An encrypted header value moved under another header key fails (AAD binds the key).
    let mut moved = sets[0].records.clone();
    let v = moved[0]
        .headers
        .shift_remove(&StrBytes::from_static_str("trace"))
        .unwrap();
    moved[0]
        .headers
        .insert(StrBytes::from_static_str("other"), v);
    let mut resp = fetch("secret-h", vec![encode(&moved, Compression::None)]);
    enc.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(
        fetched(&resp, 0).error_code,
        ResponseError::CorruptMessage.code()
    );
}

#[tokio::test]
async fn steady_state_makes_no_kms_calls_per_record() {
    let kms = Switchable::new(keyring(&["kek-secret-a"]));
    let enc = engine(config(DekConfig::default()), kms.clone());
    let mut encrypted = Vec::new();
    for _ in 0..200 {
        let mut req = produce(
            "secret-a",
            vec![encode(&records(50, 100), Compression::Lz4)],
        );
        enc.encrypt_produce(&mut req, 9).await.unwrap();
        encrypted.push(records_of(&req, 0));
    }
    assert_eq!(enc.metrics().encrypted_records(), 200 * 40);
    // One alias resolution and one DEK for 8,000 records.
    assert_eq!(enc.metrics().kms_calls("resolve_alias"), 1);
    assert_eq!(enc.metrics().kms_calls("generate_dek"), 1);
    assert_eq!(kms.calls.load(Ordering::SeqCst), 2);

    // A cold edge unwraps that DEK once for all records.
    let cold = engine(config(DekConfig::default()), kms.clone());
    for b in &encrypted {
        let mut resp = fetch("secret-a", vec![b.clone()]);
        let r = cold.decrypt_fetch(&mut resp, 12).await;
        assert!(r.failed_partitions.is_empty());
    }
    assert_eq!(cold.metrics().kms_calls("unwrap_dek"), 1);
    assert_eq!(cold.metrics().kms_calls_total(), 1);
}

#[tokio::test]
async fn nonces_unique_and_dek_retired_at_max_encryptions() {
    let kms = Arc::new(keyring(&["kek-secret-a"]));
    let dek = DekConfig {
        max_encryptions: 1000,
        ..DekConfig::default()
    };
    let enc = engine(config(dek), kms);
    let mut seen: HashSet<(Vec<u8>, Vec<u8>)> = HashSet::new();
    let mut deks = HashSet::new();
    let mut total = 0;
    for _ in 0..30 {
        let mut req = produce(
            "secret-a",
            vec![encode(&records(125, 8), Compression::None)],
        );
        enc.encrypt_produce(&mut req, 9).await.unwrap();
        for set in decode(&records_of(&req, 0)) {
            for r in set.records {
                if let Some(v) = r.value {
                    let p = format::parse(&v).unwrap();
                    deks.insert(p.wrapped.to_vec());
                    assert!(
                        seen.insert((p.wrapped.to_vec(), p.nonce.to_vec())),
                        "nonce reused under one DEK"
                    );
                    total += 1;
                }
            }
        }
    }
    assert_eq!(total, 3000);
    // 3000 encryptions with a budget of 1000 per DEK: at least 3 DEKs, and
    // no DEK used beyond its budget.
    assert!(deks.len() >= 3, "{}", deks.len());
    let mut per_dek = std::collections::HashMap::new();
    for (w, _) in &seen {
        *per_dek.entry(w.clone()).or_insert(0) += 1;
    }
    assert!(per_dek.values().all(|&n| n <= 1000), "{per_dek:?}");
}

#[tokio::test]
async fn kek_rotation_new_deks_use_new_version_old_records_decrypt() {
    let ring = Arc::new(keyring(&["kek-secret-r"]));
    let dek = DekConfig {
        max_age: Duration::from_millis(200),
        ..DekConfig::default()
    };
    let enc = engine(config(dek), ring.clone());
    let original = records(5, 8);
    let mut req = produce("secret-r", vec![encode(&original, Compression::Gzip)]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let before = records_of(&req, 0);
    ring.rotate_key("kek-secret-r").unwrap();

    // Within the DEK age limit, new records are wrapped under version 2.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let mut req = produce("secret-r", vec![encode(&original, Compression::Gzip)]);
        enc.encrypt_produce(&mut req, 9).await.unwrap();
        let b = records_of(&req, 0);
        let v = decode(&b)[0].records[0].value.clone().unwrap();
        let loc = format::parse_locator(format::parse(&v).unwrap().prefix).unwrap();
        if loc.kek.version.as_deref() == Some("2") {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "no DEK under the new KEK version"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cold = engine(config(DekConfig::default()), ring);
    for b in [before, after] {
        let mut resp = fetch("secret-r", vec![b]);
        cold.decrypt_fetch(&mut resp, 12).await;
        assert_eq!(fetched(&resp, 0).error_code, 0);
        assert_eq!(
            decode(fetched(&resp, 0).records.as_ref().unwrap())[0].records,
            original
        );
    }
}

#[tokio::test]
async fn kms_outage_uses_cached_deks_then_fails_retriably_then_recovers() {
    let kms = Switchable::new(keyring(&["kek-secret-o"]));
    let dek = DekConfig {
        max_encryptions: 100,
        ..DekConfig::default()
    };
    let enc = engine(config(dek), kms.clone());
    let batch = || encode(&records(10, 8), Compression::None); // 8 values per batch
    let mut req = produce("secret-o", vec![batch()]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let stored = records_of(&req, 0);

    kms.up.store(false, Ordering::SeqCst);
    // The cached DEK keeps working (refresh-ahead fails quietly in the background).
    let mut ok = 1;
    let err = loop {
        let mut req = produce("secret-o", vec![batch()]);
        match enc.encrypt_produce(&mut req, 9).await {
            Ok(()) => ok += 1,
            Err(rej) => break rej,
        }
        assert!(ok < 100);
    };
    assert!(
        ok >= 10,
        "only {ok} batches while the DEK budget allowed 12"
    );
    let e = &err.partitions[0].error;
    assert!(e.is_retriable(), "{e:?}");
    assert_eq!(e.error_code(), ResponseError::KafkaStorageError.code());
    // Fail fast: an immediate retry does not hit the dead KMS again.
    let calls = kms.calls.load(Ordering::SeqCst);
    let mut req = produce("secret-o", vec![batch()]);
    assert!(enc.encrypt_produce(&mut req, 9).await.is_err());
    assert_eq!(kms.calls.load(Ordering::SeqCst), calls);
    assert!(
        req.topic_data.is_empty(),
        "failed partitions removed: nothing to forward"
    );
    // Decrypting with the cached DEK still works during the outage.
    let mut resp = fetch("secret-o", vec![stored.clone()]);
    enc.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(fetched(&resp, 0).error_code, 0);
    // A cold edge cannot unwrap: retriable error, no ciphertext handed out.
    let cold = engine(config(DekConfig::default()), kms.clone());
    let mut resp = fetch("secret-o", vec![stored.clone()]);
    cold.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(
        fetched(&resp, 0).error_code,
        ResponseError::KafkaStorageError.code()
    );
    assert_eq!(fetched(&resp, 0).records.as_deref(), Some(&[][..]));

    kms.up.store(true, Ordering::SeqCst);
    // Recovery: failures are remembered for about a second (fail fast), then
    // the next produce generates a fresh DEK.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut req = produce("secret-o", vec![batch()]);
        match enc.encrypt_produce(&mut req, 9).await {
            Ok(()) => break,
            Err(rej) => assert!(rej.partitions[0].error.is_retriable()),
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after the KMS returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cold edge recovers too (its failure is remembered for about a second).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut resp = fetch("secret-o", vec![stored.clone()]);
        cold.decrypt_fetch(&mut resp, 12).await;
        match fetched(&resp, 0).error_code {
            0 => break,
            code => assert_eq!(code, ResponseError::KafkaStorageError.code()),
        }
        assert!(Instant::now() < deadline, "cold edge did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn refresh_ahead_generates_next_dek_in_background() {
    let kms = Switchable::new(keyring(&["kek-secret-f"]));
    let dek = DekConfig {
        max_encryptions: 100,
        refresh_ahead_percent: 50,
        ..DekConfig::default()
    };
    let enc = engine(config(dek), kms.clone());
    // 60 encryptions: past 50 % of the budget, not exhausted.
    for _ in 0..6 {
        let mut recs = records(10, 8);
        for r in &mut recs {
            r.value.get_or_insert_with(|| Bytes::from_static(b"v"));
        }
        let mut req = produce("secret-f", vec![encode(&recs, Compression::None)]);
        enc.encrypt_produce(&mut req, 9).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while enc.metrics().deks_generated() < 2 {
        assert!(Instant::now() < deadline, "no background refresh");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(enc.metrics().deks_generated(), 2);
}

#[tokio::test]
async fn batch_splitting_respects_multiple_batches_and_partial_tail() {
    let kms = Arc::new(keyring(&["kek-secret-a"]));
    let enc = engine(config(DekConfig::default()), kms);
    let a = records(3, 8);
    let mut b = records(3, 8);
    for (i, r) in b.iter_mut().enumerate() {
        r.offset = 10 + i as i64;
    }
    let mut two = BytesMut::new();
    two.extend_from_slice(&encode(&a, Compression::None));
    two.extend_from_slice(&encode(&b, Compression::Gzip));
    let mut req = produce("secret-a", vec![two.freeze()]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let mut enc_bytes = BytesMut::from(&records_of(&req, 0)[..]);
    let full = enc_bytes.len();
    enc_bytes.extend_from_slice(&records_of(&req, 0)[..30]); // partial trailing batch
    assert_eq!(split_batches(&enc_bytes.clone().freeze()).unwrap().len(), 2);
    let mut resp = fetch("secret-a", vec![enc_bytes.freeze()]);
    enc.decrypt_fetch(&mut resp, 12).await;
    let out = fetched(&resp, 0).records.clone().unwrap();
    assert!(out.len() < full + 30);
    let sets = decode(&out);
    assert_eq!(sets[0].records, a);
    assert_eq!(sets[1].records, b);
}

#[tokio::test]
async fn topic_ids_for_v13_fail_closed_until_learnt() {
    let kms = Arc::new(keyring(&["kek-secret-id"]));
    let enc = engine(config(DekConfig::default()), kms);
    let id = strait_encryption::Uuid::from_u128(0x1234);
    let plain = encode(&records(3, 8), Compression::None);
    let by_id = |b: Bytes| {
        let mut req = produce("", vec![b]);
        req.topic_data[0].topic_id = id;
        req
    };
    let mut req = by_id(plain.clone());
    let rej = enc.encrypt_produce(&mut req, 13).await.unwrap_err();
    assert_eq!(rej.partitions[0].error, EncryptionError::UnknownTopicId(id));
    assert!(rej.partitions[0].error.is_retriable());
    assert!(req.topic_data.is_empty());

    enc.learn_topic_ids([(id, "secret-id")]);
    let mut req = by_id(plain.clone());
    enc.encrypt_produce(&mut req, 13).await.unwrap();
    let cipher = records_of(&req, 0);
    assert_ne!(cipher, plain);

    let mut resp = fetch("", vec![cipher]);
    resp.responses[0].topic_id = id;
    let report = enc.decrypt_fetch(&mut resp, 13).await;
    assert_eq!(report.decrypted_records, 3);
    assert_eq!(
        decode(fetched(&resp, 0).records.as_ref().unwrap())[0].records,
        records(3, 8)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_decrypts_unwrap_each_dek_once() {
    let kms = Switchable::new(keyring(&["kek-secret-c"]));
    let enc = engine(config(DekConfig::default()), kms.clone());
    let mut req = produce("secret-c", vec![encode(&records(20, 32), Compression::Lz4)]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let cipher = records_of(&req, 0);
    let cold = Arc::new(engine(config(DekConfig::default()), kms.clone()));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let cold = cold.clone();
            let cipher = cipher.clone();
            tokio::spawn(async move {
                let mut resp = fetch("secret-c", vec![cipher]);
                cold.decrypt_fetch(&mut resp, 12).await;
                fetched(&resp, 0).error_code
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 0);
    }
    assert_eq!(cold.metrics().kms_calls("unwrap_dek"), 1);
}

/// The filter runs these futures on a multi-threaded runtime.
#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let enc = engine(config(DekConfig::default()), Arc::new(keyring(&[])));
    let mut req = ProduceRequest::default();
    let mut resp = FetchResponse::default();
    assert_send(&enc.encrypt_produce(&mut req, 9));
    assert_send(&enc.decrypt_fetch(&mut resp, 12));
}

/// After compaction a batch may lack its first/last records while its header
/// still spans them; the header (base offset, last offset delta, timestamps)
/// must come back unchanged or consumers would re-fetch forever.
#[tokio::test]
async fn compacted_batch_header_survives_decrypt() {
    let kms = Arc::new(keyring(&["kek-secret-k"]));
    let enc = engine(config(DekConfig::default()), kms);
    let mut req = produce("secret-k", vec![encode(&records(6, 8), Compression::Gzip)]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let full = records_of(&req, 0);
    // Simulate compaction: drop the first and the last record, keep the header.
    let batches = split_batches(&full).unwrap();
    let mut recs = batches[0].records().unwrap();
    recs.remove(5);
    recs.remove(0);
    let compacted = batches[0].with_records(&recs).unwrap();
    assert_eq!(compacted[..8], full[..8]);
    let mut resp = fetch("secret-k", vec![compacted.clone()]);
    let report = enc.decrypt_fetch(&mut resp, 12).await;
    assert!(report.failed_partitions.is_empty());
    let out = fetched(&resp, 0).records.clone().unwrap();
    assert_eq!(out[..8], compacted[..8], "base offset");
    assert_eq!(
        out[21..57],
        compacted[21..57],
        "attributes, last offset delta, timestamps, producer fields"
    );
    assert_eq!(i32::from_be_bytes([out[57], out[58], out[59], out[60]]), 4);
    let sets = decode(&out);
    let offsets: Vec<i64> = sets[0].records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![1, 2, 3, 4]);
    assert_eq!(sets[0].records[0].value, records(6, 8)[1].value);
}

/// Records written in format v1 (whole 32-byte prefix digest in the AAD)
/// still decrypt after the upgrade to v2, and the version byte selects the
/// AAD: a v1 value relabelled v2 (or the reverse) fails authentication.
#[tokio::test]
async fn format_v1_records_still_decrypt() {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    use sha2::Digest;

    let ring = keyring(&["kek-secret-v1"]);
    let kek = ring.resolve_alias("kek-secret-v1").await.unwrap();
    let pair = ring.generate_dek(&kek).await.unwrap();
    let kms = Arc::new(ring);
    let enc = engine(config(DekConfig::default()), kms);

    // A value as the v1 writer produced it, built here from FORMAT.md.
    let seal_v1 = |plaintext: &[u8], nonce: [u8; 12], label: u8| {
        let loc = format::KekLocator {
            kms: "dev".into(),
            kek: pair.kek.clone(),
        };
        let mut prefix = format::encode_prefix(&loc, &pair.wrapped).unwrap().to_vec();
        prefix[0] = label;
        let mut aad = vec![format::FORMAT_V1, 0x00];
        aad.extend_from_slice(&sha2::Sha256::digest(&prefix));
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(&pair.plaintext[..]).unwrap();
        let mut ct = plaintext.to_vec();
        let tag = cipher
            .encrypt_in_place_detached(aes_gcm::Nonce::from_slice(&nonce), &aad, &mut ct)
            .unwrap();
        let mut v = prefix;
        v.extend_from_slice(&nonce);
        v.extend_from_slice(&ct);
        v.extend_from_slice(&tag);
        Bytes::from(v)
    };
    let batch_of = |values: Vec<Bytes>, marker: u8| {
        let mut recs = records(values.len(), 8);
        for (r, v) in recs.iter_mut().zip(values) {
            r.value = Some(v);
            r.headers.insert(
                StrBytes::from_static_str(MARKER_HEADER),
                Some(Bytes::copy_from_slice(&[marker, 0x01])),
            );
        }
        encode(&recs, Compression::Lz4)
    };

    let plain: Vec<Bytes> = (0..4)
        .map(|i| Bytes::from(format!("written by a v1 edge {i}")))
        .collect();
    let v1: Vec<Bytes> = plain
        .iter()
        .enumerate()
        .map(|(i, p)| seal_v1(p, [i as u8; 12], format::FORMAT_V1))
        .collect();
    let mut resp = fetch("secret-v1", vec![batch_of(v1, format::FORMAT_V1)]);
    let report = enc.decrypt_fetch(&mut resp, 12).await;
    assert!(report.failed_partitions.is_empty(), "{report:?}");
    assert_eq!(report.decrypted_records, 4);
    let got = decode(fetched(&resp, 0).records.as_ref().unwrap());
    let values: Vec<Bytes> = got[0]
        .records
        .iter()
        .map(|r| r.value.clone().unwrap())
        .collect();
    assert_eq!(values, plain);
    assert!(
        got[0].records.iter().all(|r| r.headers.len() == 1),
        "marker removed, user header kept"
    );

    // The same v1 ciphertext labelled v2 must not authenticate.
    let relabelled = vec![seal_v1(&plain[0], [9; 12], format::FORMAT_V2)];
    let mut resp = fetch("secret-v1", vec![batch_of(relabelled, format::FORMAT_V2)]);
    let report = enc.decrypt_fetch(&mut resp, 12).await;
    assert_eq!(report.failed_partitions[0].error, EncryptionError::Tampered);
    assert_eq!(fetched(&resp, 0).records.as_ref().map(Bytes::len), Some(0));

    // And what this edge writes now is v2 and round-trips.
    let mut req = produce(
        "secret-v1",
        vec![encode(&records(5, 40), Compression::None)],
    );
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let stored = decode(&records_of(&req, 0));
    let first = stored[0].records[0].value.clone().unwrap();
    assert_eq!(first[0], format::FORMAT_V2);
    let mut resp = fetch("secret-v1", vec![records_of(&req, 0)]);
    let report = enc.decrypt_fetch(&mut resp, 12).await;
    assert!(report.failed_partitions.is_empty(), "{report:?}");
    assert_eq!(report.decrypted_records, 4);
}

/// Overwrite a batch's declared record count (the CRC is not checked by the
/// edge, so no need to fix it).
fn with_declared_count(batch: &Bytes, count: i32) -> Bytes {
    let mut b = batch.to_vec();
    b[57..61].copy_from_slice(&count.to_be_bytes());
    Bytes::from(b)
}

/// The record count in a batch header comes from the client. Leases are
/// sized from it, so a client claiming two billion records must not be able
/// to reserve (and burn) a DEK's whole encryption budget.
#[tokio::test]
async fn lying_record_count_cannot_burn_the_dek_budget() {
    let kms = Arc::new(keyring(&["kek-secret-lie"]));
    let dek = DekConfig {
        max_encryptions: 6000,
        ..DekConfig::default()
    };
    let enc = engine(config(dek), kms);
    let liar = with_declared_count(&encode(&records(3, 8), Compression::None), i32::MAX);
    let mut req = produce("secret-lie", vec![liar]);
    let rej = enc.encrypt_produce(&mut req, 9).await.unwrap_err();
    assert!(
        matches!(rej.partitions[0].error, EncryptionError::CorruptBatch(_)),
        "{rej:?}"
    );
    assert!(
        req.topic_data.is_empty(),
        "the lying batch is not forwarded"
    );
    for _ in 0..3 {
        let mut req = produce(
            "secret-lie",
            vec![encode(&records(10, 8), Compression::None)],
        );
        enc.encrypt_produce(&mut req, 9).await.unwrap();
    }
    assert_eq!(
        enc.metrics().deks_generated(),
        1,
        "the lie wasted at most one lease, the DEK kept its budget"
    );
}

/// Records beyond the declared count must not slip through unencrypted
/// (a batch declaring 0 records used to be copied as it was).
#[tokio::test]
async fn records_beyond_the_declared_count_are_rejected() {
    let kms = Arc::new(keyring(&["kek-secret-under"]));
    let enc = engine(config(DekConfig::default()), kms);
    for (declared, codec) in [
        (0, Compression::None),
        (2, Compression::None),
        (2, Compression::Zstd),
    ] {
        let batch = with_declared_count(&encode(&records(3, 8), codec), declared);
        let mut req = produce("secret-under", vec![batch]);
        let rej = enc.encrypt_produce(&mut req, 9).await.unwrap_err();
        assert!(
            matches!(rej.partitions[0].error, EncryptionError::CorruptBatch(_)),
            "declared {declared}: {rej:?}"
        );
        assert!(req.topic_data.is_empty(), "declared {declared}: forwarded");
    }
    assert_eq!(enc.metrics().encrypted_records(), 0);
}

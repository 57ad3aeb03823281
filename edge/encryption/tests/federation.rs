//! Federation through the keys topic, with in-memory realms and an in-memory
//! key log (the real Vault, AWS KMS and Kafka runs are in the integration
//! tests): a DEK made at one site gets a wrap in another realm in the
//! background, and the other site decrypts through its own realm.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{FetchResponse, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use prometheus_client::registry::Registry;
use rand::RngCore;
use strait_encryption::format;
use strait_encryption::keys::{self, KeyEntry};
use strait_encryption::{
    EncryptionConfig, KeyLog, KeysTopicConfig, RealmKek, RecordEncryption, TopicRule,
};
use strait_kms_core::{DekPair, KekRef, Kms, KmsError, KmsSet, WrappedDek, DEK_LEN};
use zeroize::Zeroizing;

/// A realm with one KEK per name, derived from the realm's secret, that can
/// be switched off.
struct Realm {
    secret: [u8; 32],
    up: AtomicBool,
    calls: AtomicU64,
}

impl Realm {
    fn new() -> Arc<Self> {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Arc::new(Self {
            secret,
            up: AtomicBool::new(true),
            calls: AtomicU64::new(0),
        })
    }
    fn cipher(&self, kek: &str) -> Aes256Gcm {
        use sha2::Digest;
        let key = sha2::Sha256::new()
            .chain_update(self.secret)
            .chain_update(kek.as_bytes())
            .finalize();
        Aes256Gcm::new_from_slice(&key).unwrap()
    }
    fn check(&self) -> strait_kms_core::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(KmsError::Unavailable("realm switched off".into()))
        }
    }
    fn seal(&self, kek: &str, dek: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        out.extend(
            self.cipher(kek)
                .encrypt(Nonce::from_slice(&nonce), dek)
                .unwrap(),
        );
        out
    }
}

#[async_trait]
impl Kms for Realm {
    async fn generate_dek(&self, kek: &KekRef) -> strait_kms_core::Result<DekPair> {
        self.check()?;
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        rand::rng().fill_bytes(&mut dek[..]);
        Ok(DekPair {
            wrapped: self.seal(&kek.key_id, &dek[..]),
            plaintext: dek,
            kek: kek.clone(),
        })
    }
    async fn unwrap_dek(
        &self,
        kek: &KekRef,
        wrapped: &[u8],
    ) -> strait_kms_core::Result<Zeroizing<[u8; DEK_LEN]>> {
        self.check()?;
        if wrapped.len() < 12 {
            return Err(KmsError::Invalid("short".into()));
        }
        let pt = self
            .cipher(&kek.key_id)
            .decrypt(Nonce::from_slice(&wrapped[..12]), &wrapped[12..])
            .map_err(|_| KmsError::Invalid("not ours".into()))?;
        strait_kms_core::dek_from_slice(&pt)
    }
    async fn resolve_alias(&self, alias: &str) -> strait_kms_core::Result<KekRef> {
        self.check()?;
        Ok(KekRef::new(alias))
    }
    async fn wrap_dek(
        &self,
        kek: &KekRef,
        plaintext: &[u8; DEK_LEN],
    ) -> strait_kms_core::Result<WrappedDek> {
        self.check()?;
        Ok(WrappedDek {
            wrapped: self.seal(&kek.key_id, plaintext),
            kek: kek.clone(),
        })
    }
}

/// The keys topic as a list of records.
#[derive(Default)]
struct MemoryLog {
    records: Mutex<Vec<(Bytes, Option<Bytes>)>>,
}

#[async_trait]
impl KeyLog for MemoryLog {
    async fn publish(&self, records: Vec<(Bytes, Option<Bytes>)>) -> Result<(), String> {
        self.records.lock().unwrap().extend(records);
        Ok(())
    }
}

impl MemoryLog {
    fn entries(&self) -> Vec<(Bytes, KeyEntry)> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), keys::decode_value(v.as_ref()?).ok()?)))
            .collect()
    }
    /// Replay into another site's index, as a replication tool would.
    fn replay_into(&self, index: &strait_encryption::KeyIndex, topic: &str) {
        for (k, v) in self.records.lock().unwrap().iter() {
            index.apply(false, k, v.as_deref());
        }
        index.mark_caught_up(topic);
    }
}

fn rule(topic: &str, kms: &str, also: &[(&str, &str)]) -> TopicRule {
    TopicRule {
        topic: topic.into(),
        kms: kms.into(),
        kek: "kek-$(topic)".into(),
        also_wrap_for: also
            .iter()
            .map(|(k, e)| RealmKek {
                kms: k.to_string(),
                kek: e.to_string(),
            })
            .collect(),
    }
}

fn config(rules: Vec<TopicRule>, keys_topic: Option<KeysTopicConfig>) -> EncryptionConfig {
    EncryptionConfig {
        rules,
        on_missing_key: Default::default(),
        on_plaintext_fetch: Default::default(),
        encrypt_headers: false,
        dek: Default::default(),
        keys_topic,
        shredded_keks: Vec::new(),
    }
}

fn keys_topic(name: &str, also_read: &[&str]) -> Option<KeysTopicConfig> {
    Some(KeysTopicConfig {
        name: name.into(),
        also_read: also_read.iter().map(|s| s.to_string()).collect(),
        catch_up_timeout: Duration::from_millis(200),
    })
}

fn batch(n: usize) -> Bytes {
    let recs: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: -1,
            timestamp: 1_700_000_000_000,
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::from(format!("plaintext-{i}"))),
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

fn name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_string()))
}

async fn encrypt(enc: &RecordEncryption, topic: &str, n: usize) -> Bytes {
    let mut req = ProduceRequest::default()
        .with_acks(-1)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(batch(n)))])]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    req.topic_data[0].partition_data[0].records.clone().unwrap()
}

/// Decrypt `records` as fetched from `topic`; the plaintext values, or the
/// partition's error code.
async fn decrypt(enc: &RecordEncryption, topic: &str, records: Bytes) -> Result<Vec<String>, i16> {
    let mut resp = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
        .with_topic(name(topic))
        .with_partitions(vec![PartitionData::default()
            .with_partition_index(0)
            .with_high_watermark(100)
            .with_records(Some(records))])]);
    enc.decrypt_fetch(&mut resp, 12).await;
    let p = &resp.responses[0].partitions[0];
    if p.error_code != 0 {
        return Err(p.error_code);
    }
    let mut b = p.records.clone().unwrap();
    Ok(RecordBatchDecoder::decode_all(&mut b)
        .unwrap()
        .into_iter()
        .flat_map(|s| s.records)
        .map(|r| String::from_utf8(r.value.unwrap().to_vec()).unwrap())
        .collect())
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(registry: &Registry, name: &str) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out.lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

struct Sites {
    east_realm: Arc<Realm>,
    west_realm: Arc<Realm>,
    east_log: Arc<MemoryLog>,
    east: RecordEncryption,
    east_registry: Registry,
}

fn east_site() -> Sites {
    let east_realm = Realm::new();
    let west_realm = Realm::new();
    let east_log = Arc::new(MemoryLog::default());
    let mut east_registry = Registry::default();
    let east = RecordEncryption::with_key_log(
        config(
            vec![rule(
                "secret-*",
                "vault-east",
                &[("aws-west", "alias/kek-$(topic)")],
            )],
            keys_topic("strait.keys", &[]),
        ),
        KmsSet::new()
            .with("vault-east", east_realm.clone())
            .with("aws-west", west_realm.clone()),
        &mut east_registry,
        Some(east_log.clone()),
    )
    .unwrap();
    east.keys_index().unwrap().mark_caught_up("strait.keys");
    Sites {
        east_realm,
        west_realm,
        east_log,
        east,
        east_registry,
    }
}

/// West knows only its own realm: no way back to east's KMS.
fn west_site(west_realm: Arc<Realm>, rules: Vec<TopicRule>) -> RecordEncryption {
    RecordEncryption::with_key_log(
        config(rules, keys_topic("strait.keys", &["east.strait.keys"])),
        KmsSet::new().with("aws-west", west_realm),
        &mut Registry::default(),
        Some(Arc::new(MemoryLog::default())),
    )
    .unwrap()
}

#[tokio::test]
async fn a_record_encrypted_at_east_decrypts_at_west_through_wests_realm_only() {
    let s = east_site();
    let records = encrypt(&s.east, "secret-orders", 5).await;
    // One DEK: v3 values name the other realm, nothing else grows.
    let batches = strait_encryption::testing::split_batches(&records).unwrap();
    let first = batches[0].records().unwrap()[0].value.clone().unwrap();
    assert_eq!(first[0], format::FORMAT_V3);
    let parsed = format::parse(&first).unwrap();
    assert_eq!(format::parse_realms(parsed.prefix).unwrap(), ["aws-west"]);
    eventually("east's wrap for aws-west in the keys topic", || {
        s.east_log
            .entries()
            .iter()
            .any(|(_, e)| matches!(e, KeyEntry::Wrapped(w) if w.locator.kms == "aws-west"))
    })
    .await;
    let entries = s.east_log.entries();
    assert_eq!(entries.len(), 2, "one origin entry and one wrap per DEK");
    let origin = entries
        .iter()
        .find(|(_, e)| matches!(e, KeyEntry::Origin { .. }))
        .unwrap();
    assert!(
        matches!(&origin.1, KeyEntry::Origin { wanted, .. } if wanted[0].kek == "alias/kek-secret-orders")
    );
    assert_eq!(
        metric(
            &s.east_registry,
            "strait_encryption_federation_pending_wraps"
        ),
        "strait_encryption_federation_pending_wraps{realm=\"aws-west\"} 0"
    );

    // West, renamed topic, cold caches, east's realm unreachable (not even configured).
    s.east_realm.up.store(false, Ordering::SeqCst);
    let west = west_site(
        s.west_realm.clone(),
        vec![rule("east.secret-*", "aws-west", &[])],
    );
    s.east_log
        .replay_into(west.keys_index().unwrap(), "east.strait.keys");
    west.keys_index().unwrap().mark_caught_up("strait.keys");
    let got = decrypt(&west, "east.secret-orders", records.clone())
        .await
        .unwrap();
    assert_eq!(
        got,
        (0..5).map(|i| format!("plaintext-{i}")).collect::<Vec<_>>()
    );
    // East still decrypts its own records through its own realm's wrap.
    s.east_realm.up.store(true, Ordering::SeqCst);
    let east_calls = s.west_realm.calls.load(Ordering::SeqCst);
    let fresh_east = RecordEncryption::new(
        config(
            vec![rule("secret-*", "vault-east", &[])],
            Default::default(),
        ),
        KmsSet::new().with("vault-east", s.east_realm.clone()),
        &mut Registry::default(),
    )
    .unwrap();
    assert_eq!(
        decrypt(&fresh_east, "secret-orders", records)
            .await
            .unwrap()
            .len(),
        5
    );
    assert_eq!(s.west_realm.calls.load(Ordering::SeqCst), east_calls);
}

#[tokio::test]
async fn produce_goes_on_while_the_other_realm_is_down_and_the_wrap_follows() {
    let s = east_site();
    s.west_realm.up.store(false, Ordering::SeqCst);
    let records = encrypt(&s.east, "secret-pay", 3).await;
    eventually("the origin entry", || !s.east_log.entries().is_empty()).await;
    eventually("a pending wrap counted", || {
        metric(
            &s.east_registry,
            "strait_encryption_federation_pending_wraps",
        ) == "strait_encryption_federation_pending_wraps{realm=\"aws-west\"} 1"
    })
    .await;
    eventually("pending records counted", || {
        metric(
            &s.east_registry,
            "strait_encryption_federation_pending_records",
        ) == "strait_encryption_federation_pending_records{realm=\"aws-west\"} 3"
    })
    .await;
    // Meanwhile west cannot decrypt: the wrap is owed, so the error is retriable.
    let west = west_site(
        s.west_realm.clone(),
        vec![rule("secret-*", "aws-west", &[])],
    );
    s.east_log
        .replay_into(west.keys_index().unwrap(), "east.strait.keys");
    west.keys_index().unwrap().mark_caught_up("strait.keys");
    s.west_realm.up.store(true, Ordering::SeqCst);
    assert_eq!(
        decrypt(&west, "secret-pay", records.clone()).await,
        Err(56),
        "KAFKA_STORAGE_ERROR (retriable) while the wrap is owed"
    );
    eventually("the wrap made once the realm answers", || {
        metric(
            &s.east_registry,
            "strait_encryption_federation_pending_wraps",
        ) == "strait_encryption_federation_pending_wraps{realm=\"aws-west\"} 0"
    })
    .await;
    eventually("no pending records", || {
        metric(
            &s.east_registry,
            "strait_encryption_federation_pending_records",
        ) == "strait_encryption_federation_pending_records{realm=\"aws-west\"} 0"
    })
    .await;
    let west = west_site(
        s.west_realm.clone(),
        vec![rule("secret-*", "aws-west", &[])],
    );
    s.east_log
        .replay_into(west.keys_index().unwrap(), "east.strait.keys");
    west.keys_index().unwrap().mark_caught_up("strait.keys");
    assert_eq!(
        decrypt(&west, "secret-pay", records).await.unwrap().len(),
        3
    );
}

#[tokio::test]
async fn a_restarted_edge_completes_owed_wraps_from_the_keys_topic() {
    let s = east_site();
    s.west_realm.up.store(false, Ordering::SeqCst);
    let records = encrypt(&s.east, "secret-x", 2).await;
    eventually("the origin entry", || !s.east_log.entries().is_empty()).await;
    drop(s.east);
    // A new edge of the same cluster reads the keys topic and finds the owed wrap.
    s.west_realm.up.store(true, Ordering::SeqCst);
    let log2 = Arc::new(MemoryLog::default());
    let restarted = RecordEncryption::with_key_log(
        config(
            vec![rule(
                "secret-*",
                "vault-east",
                &[("aws-west", "alias/kek-$(topic)")],
            )],
            keys_topic("strait.keys", &[]),
        ),
        KmsSet::new()
            .with("vault-east", s.east_realm.clone())
            .with("aws-west", s.west_realm.clone()),
        &mut Registry::default(),
        Some(log2.clone()),
    )
    .unwrap();
    for (k, v) in s.east_log.records.lock().unwrap().iter() {
        restarted.keys_index().unwrap().apply(true, k, v.as_deref());
    }
    restarted
        .keys_index()
        .unwrap()
        .mark_caught_up("strait.keys");
    eventually("the owed wrap written by the restarted edge", || {
        log2.entries()
            .iter()
            .any(|(_, e)| matches!(e, KeyEntry::Wrapped(w) if w.locator.kms == "aws-west"))
    })
    .await;
    s.east_realm.up.store(false, Ordering::SeqCst);
    let west = west_site(
        s.west_realm.clone(),
        vec![rule("secret-*", "aws-west", &[])],
    );
    log2.replay_into(west.keys_index().unwrap(), "east.strait.keys");
    s.east_log
        .replay_into(west.keys_index().unwrap(), "strait.keys");
    assert_eq!(decrypt(&west, "secret-x", records).await.unwrap().len(), 2);
}

#[tokio::test]
async fn without_a_wrap_for_its_realm_west_unwraps_remotely_or_fails_closed() {
    // Written before federation: a v2 record, no keys-topic entry.
    let east_realm = Realm::new();
    let west_realm = Realm::new();
    let east = RecordEncryption::new(
        config(
            vec![rule("secret-*", "vault-east", &[])],
            Default::default(),
        ),
        KmsSet::new().with("vault-east", east_realm.clone()),
        &mut Registry::default(),
    )
    .unwrap();
    let records = encrypt(&east, "secret-old", 2).await;
    // West without a way to east's realm: not found, no plaintext.
    let west = west_site(west_realm.clone(), vec![rule("secret-*", "aws-west", &[])]);
    west.keys_index().unwrap().mark_caught_up("strait.keys");
    west.keys_index()
        .unwrap()
        .mark_caught_up("east.strait.keys");
    assert_eq!(decrypt(&west, "secret-old", records.clone()).await, Err(91));
    // West with east's realm reachable (a broker KMS of that name): remote unwrap.
    let west = RecordEncryption::with_key_log(
        config(
            vec![rule("secret-*", "aws-west", &[])],
            keys_topic("strait.keys", &[]),
        ),
        KmsSet::new()
            .with("aws-west", west_realm)
            .with("vault-east", east_realm.clone()),
        &mut Registry::default(),
        Some(Arc::new(MemoryLog::default())),
    )
    .unwrap();
    west.keys_index().unwrap().mark_caught_up("strait.keys");
    let before = east_realm.calls.load(Ordering::SeqCst);
    assert_eq!(
        decrypt(&west, "secret-old", records.clone())
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        decrypt(&west, "secret-old", records).await.unwrap().len(),
        2
    );
    assert_eq!(
        east_realm.calls.load(Ordering::SeqCst) - before,
        1,
        "one remote unwrap, then the cache"
    );
}

#[tokio::test]
async fn shredded_keks_are_refused_both_ways() {
    let realm = Realm::new();
    let mut cfg = config(
        vec![rule("secret-*", "vault-east", &[])],
        Default::default(),
    );
    let enc = RecordEncryption::new(
        cfg.clone(),
        KmsSet::new().with("vault-east", realm.clone()),
        &mut Registry::default(),
    )
    .unwrap();
    let records = encrypt(&enc, "secret-a", 1).await;
    cfg.shredded_keks = vec!["kek-secret-a".into()];
    let shredded = RecordEncryption::new(
        cfg,
        KmsSet::new().with("vault-east", realm),
        &mut Registry::default(),
    )
    .unwrap();
    assert_eq!(decrypt(&shredded, "secret-a", records).await, Err(29));
    let mut req = ProduceRequest::default()
        .with_acks(-1)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name("secret-a"))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(batch(1)))])]);
    let rejection = shredded.encrypt_produce(&mut req, 9).await.unwrap_err();
    assert_eq!(
        rejection.to_response().responses[0].partition_responses[0].error_code,
        29
    );
    assert!(req.topic_data.is_empty() || req.topic_data[0].partition_data.is_empty());
}

#[tokio::test]
async fn a_realm_added_later_gets_wraps_of_existing_deks_without_touching_data() {
    let east_realm = Realm::new();
    let west_realm = Realm::new();
    let log = Arc::new(MemoryLog::default());
    let kms = KmsSet::new()
        .with("vault-east", east_realm.clone())
        .with("aws-west", west_realm.clone());
    // Before: a keys topic, no other realm.
    let before = RecordEncryption::with_key_log(
        config(
            vec![rule("secret-*", "vault-east", &[])],
            keys_topic("strait.keys", &[]),
        ),
        kms.clone(),
        &mut Registry::default(),
        Some(log.clone()),
    )
    .unwrap();
    before.keys_index().unwrap().mark_caught_up("strait.keys");
    let records = encrypt(&before, "secret-old", 4).await;
    eventually("the origin entry of the DEK", || log.entries().len() == 1).await;
    drop(before);
    // After: the rule names aws-west too; the edge restarts and reads its keys topic.
    let after = RecordEncryption::with_key_log(
        config(
            vec![rule(
                "secret-*",
                "vault-east",
                &[("aws-west", "alias/kek-$(topic)")],
            )],
            keys_topic("strait.keys", &[]),
        ),
        kms,
        &mut Registry::default(),
        Some(log.clone()),
    )
    .unwrap();
    for (k, v) in log.records.lock().unwrap().clone() {
        after.keys_index().unwrap().apply(true, &k, v.as_deref());
    }
    after.keys_index().unwrap().mark_caught_up("strait.keys");
    eventually("the old DEK wrapped for the new realm", || {
        log.entries().iter().any(|(_, e)| {
            matches!(e, KeyEntry::Wrapped(w) if w.locator.kms == "aws-west"
                && w.locator.kek.key_id == "alias/kek-secret-old")
        })
    })
    .await;
    east_realm.up.store(false, Ordering::SeqCst);
    let west = west_site(west_realm, vec![rule("secret-*", "aws-west", &[])]);
    log.replay_into(west.keys_index().unwrap(), "east.strait.keys");
    west.keys_index().unwrap().mark_caught_up("strait.keys");
    assert_eq!(
        decrypt(&west, "secret-old", records).await.unwrap(),
        (0..4).map(|i| format!("plaintext-{i}")).collect::<Vec<_>>()
    );
}

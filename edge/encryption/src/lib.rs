//! Record encryption for the Strait edge: envelope AES-256-GCM over Kafka
//! record batches, no sockets. The edge filter calls
//! [`RecordEncryption::encrypt_produce`] on Produce requests and
//! [`RecordEncryption::decrypt_fetch`] on Fetch responses; topics without a
//! rule are skipped before any decoding ([`RecordEncryption::needs_produce`]).
//!
//! The cipher record format is documented in `FORMAT.md`.

mod batch;
pub mod config;
mod dek;
mod federation;
pub mod format;
pub mod keys;
mod metrics;
pub mod rules;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{FetchResponse, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use prometheus_client::registry::Registry;
use strait_kms_core::{KmsError, KmsSet};
pub use uuid::Uuid;

use crate::batch::{split_batches, BatchWriter, Header, RawBatch, RecordIter, RecordRef};
pub use crate::config::{
    ConfigError, ConfigErrors, DekConfig, EncryptionConfig, KeysTopicConfig, OnMissingKey,
    OnPlaintextFetch, RealmKek, TopicRule,
};
use crate::dek::{Aad, DekError, DekManager, Federation, Lease, MAX_LEASE};
use crate::federation::Federator;
use crate::format::{
    is_known_version, FLAG_HEADERS, FLAG_VALUE, FORMAT_CURRENT, FORMAT_V3, MARKER_HEADER, TAG_LEN,
};
pub use crate::keys::{KeyIndex, KeyLog};
pub use crate::metrics::EncryptionMetrics;
use crate::rules::{KekSelection, Rules};

/// Why a partition was failed. Each maps to the Kafka error code the client
/// sees ([`EncryptionError::error_code`]).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EncryptionError {
    /// A rule matches but the KEK does not exist (on_missing_key = reject).
    /// POLICY_VIOLATION (44), not retriable.
    #[error("no KEK {kek:?} in KMS {kms:?} for topic {topic:?}; refusing to store plaintext")]
    MissingKey {
        topic: String,
        kms: String,
        kek: String,
    },
    /// The KMS could not be reached and no usable cached DEK exists.
    /// KAFKA_STORAGE_ERROR (56), retriable by every client.
    #[error("KMS unavailable: {0}")]
    KmsUnavailable(String),
    /// The KMS refused this edge. TOPIC_AUTHORIZATION_FAILED (29).
    #[error("KMS denied access: {0}")]
    KmsDenied(String),
    /// Fetch: the record names a KEK/KMS that does not exist (here).
    /// RESOURCE_NOT_FOUND (91), as Kroxylicious.
    #[error("unknown KEK: {0}")]
    UnknownKek(String),
    /// Fetch: authentication failed or the encrypted value is malformed.
    /// CORRUPT_MESSAGE (2).
    #[error("encrypted record failed authentication (tampered or corrupt)")]
    Tampered,
    /// The record batch could not be decoded. CORRUPT_MESSAGE (2).
    #[error("malformed record batch: {0}")]
    CorruptBatch(String),
    /// Fetch: plaintext record in a topic with a rule and on_plaintext_fetch = reject.
    /// POLICY_VIOLATION (44).
    #[error("plaintext record found in encrypted topic {0:?}")]
    PlaintextInEncryptedTopic(String),
    /// Produce: a record already carries the marker header (injected
    /// "ciphertext"). INVALID_RECORD (87).
    #[error("record already carries the {MARKER_HEADER} header")]
    MarkerInjected,
    /// A v13+ request names a topic by id the filter has not learnt yet.
    /// UNKNOWN_TOPIC_ID (100), retriable.
    #[error("topic id {0} is unknown to the encryption filter")]
    UnknownTopicId(Uuid),
}

impl EncryptionError {
    pub fn error_code(&self) -> i16 {
        match self {
            EncryptionError::MissingKey { .. } => ResponseError::PolicyViolation.code(),
            EncryptionError::KmsUnavailable(_) => ResponseError::KafkaStorageError.code(),
            EncryptionError::KmsDenied(_) => ResponseError::TopicAuthorizationFailed.code(),
            EncryptionError::UnknownKek(_) => ResponseError::ResourceNotFound.code(),
            EncryptionError::Tampered | EncryptionError::CorruptBatch(_) => {
                ResponseError::CorruptMessage.code()
            }
            EncryptionError::PlaintextInEncryptedTopic(_) => ResponseError::PolicyViolation.code(),
            EncryptionError::MarkerInjected => ResponseError::InvalidRecord.code(),
            EncryptionError::UnknownTopicId(_) => ResponseError::UnknownTopicId.code(),
        }
    }

    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            EncryptionError::KmsUnavailable(_) | EncryptionError::UnknownTopicId(_)
        )
    }

    fn label(&self) -> &'static str {
        match self {
            EncryptionError::MissingKey { .. } => "missing_key",
            EncryptionError::KmsUnavailable(_) => "kms_unavailable",
            EncryptionError::KmsDenied(_) => "kms_denied",
            EncryptionError::UnknownKek(_) => "unknown_kek",
            EncryptionError::Tampered => "tampered",
            EncryptionError::CorruptBatch(_) => "corrupt_batch",
            EncryptionError::PlaintextInEncryptedTopic(_) => "plaintext",
            EncryptionError::MarkerInjected => "marker_injected",
            EncryptionError::UnknownTopicId(_) => "unknown_topic_id",
        }
    }

    fn from_dek(e: DekError) -> Self {
        match e {
            DekError::Kms(KmsError::Unavailable(m)) => EncryptionError::KmsUnavailable(m),
            DekError::Kms(KmsError::Denied(m)) => EncryptionError::KmsDenied(m),
            DekError::Kms(KmsError::NotFound(m)) => EncryptionError::UnknownKek(m),
            DekError::UnknownKms(k) => EncryptionError::UnknownKek(format!("KMS {k:?}")),
            // A wrapped DEK the KMS refuses to unwrap was altered.
            DekError::Kms(KmsError::Invalid(_)) | DekError::Format(_) => EncryptionError::Tampered,
        }
    }
}

impl From<batch::BatchError> for EncryptionError {
    fn from(e: batch::BatchError) -> Self {
        EncryptionError::CorruptBatch(e.0)
    }
}

/// One failed partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFailure {
    /// Topic name as in the request (empty for v13+ requests that use ids).
    pub topic: TopicName,
    pub topic_id: Uuid,
    pub partition: i32,
    pub error: EncryptionError,
}

/// Partitions of a Produce request that could not be encrypted. They have
/// already been removed from the request, so forwarding what is left can
/// never store plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceRejection {
    pub partitions: Vec<PartitionFailure>,
}

impl ProduceRejection {
    /// Add the failed partitions to the broker's response for the rest of
    /// the request.
    pub fn merge_into(&self, resp: &mut ProduceResponse) {
        for f in &self.partitions {
            let part = failed_partition_response(f);
            match resp
                .responses
                .iter_mut()
                .find(|t| t.name == f.topic && t.topic_id == f.topic_id)
            {
                Some(t) => t.partition_responses.push(part),
                None => resp.responses.push(
                    TopicProduceResponse::default()
                        .with_name(f.topic.clone())
                        .with_topic_id(f.topic_id)
                        .with_partition_responses(vec![part]),
                ),
            }
        }
    }

    /// A complete response made of the failed partitions only, for when no
    /// partition is left to forward.
    pub fn to_response(&self) -> ProduceResponse {
        let mut resp = ProduceResponse::default();
        self.merge_into(&mut resp);
        resp
    }
}

fn failed_partition_response(f: &PartitionFailure) -> PartitionProduceResponse {
    PartitionProduceResponse::default()
        .with_index(f.partition)
        .with_error_code(f.error.error_code())
        .with_base_offset(-1)
        .with_log_append_time_ms(-1)
        .with_log_start_offset(-1)
        .with_error_message(Some(StrBytes::from_string(f.error.to_string())))
}

/// What [`RecordEncryption::decrypt_fetch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    pub decrypted_records: u64,
    /// Partitions whose records were replaced by an error code (and emptied).
    pub failed_partitions: Vec<PartitionFailure>,
}

/// The encryption core of one virtual cluster. Cheap to share (`Arc`); all
/// methods take `&self` and may be called concurrently from many connections.
pub struct RecordEncryption {
    rules: Rules,
    on_missing_key: OnMissingKey,
    on_plaintext_fetch: OnPlaintextFetch,
    encrypt_headers: bool,
    deks: DekManager,
    metrics: EncryptionMetrics,
    topic_ids: RwLock<HashMap<Uuid, String>>,
    keys: Option<Arc<KeyIndex>>,
    keys_topic: KeysTopicConfig,
}

impl RecordEncryption {
    /// Build from a config and the configured KMSs. Validates the config
    /// (every error, with paths relative to `encryption`). Metrics go into
    /// `registry`.
    pub fn new(
        config: EncryptionConfig,
        kms: KmsSet,
        registry: &mut Registry,
    ) -> Result<Self, ConfigErrors> {
        Self::with_key_log(config, kms, registry, None)
    }

    /// Like [`RecordEncryption::new`], with this virtual cluster's keys
    /// topic behind `key_log` (federation, see FORMAT.md): DEKs of rules with
    /// `also_wrap_for` get their other realms' wraps in the background, and
    /// records of other sites' DEKs are unwrapped through this site's realms.
    /// Feed what is read from the keys topics into [`Self::keys_index`].
    /// Must be called on a Tokio runtime when `key_log` is given.
    pub fn with_key_log(
        config: EncryptionConfig,
        kms: KmsSet,
        registry: &mut Registry,
        key_log: Option<Arc<dyn KeyLog>>,
    ) -> Result<Self, ConfigErrors> {
        let names: Vec<&str> = kms.names().collect();
        config.validate("encryption", &names)?;
        let rules = Rules::new(&config.rules).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: "encryption.rules".into(),
                message: e.to_string(),
            }])
        })?;
        let metrics = EncryptionMetrics::new(registry);
        let prefixed = registry.sub_registry_with_prefix("strait_encryption");
        let keys_topic = config.keys_topic.clone().unwrap_or_default();
        let federation = key_log.filter(|_| config.federated()).map(|log| {
            let topics = std::iter::once(keys_topic.name.clone())
                .chain(keys_topic.also_read.iter().cloned());
            let index = Arc::new(KeyIndex::new(topics, prefixed));
            let desired_rules = Rules::new(&config.rules).ok();
            let desired: crate::federation::Desired = Arc::new(move |topic, origin| {
                desired_rules
                    .as_ref()
                    .and_then(|r| r.select(topic))
                    .filter(|sel| sel.kms == origin)
                    .map(|sel| sel.also)
                    .unwrap_or_default()
            });
            Federation {
                federator: Federator::start(kms.clone(), index.clone(), log, desired, prefixed),
                index,
                catch_up_timeout: keys_topic.catch_up_timeout,
            }
        });
        let keys = federation.as_ref().map(|f| f.index.clone());
        Ok(Self {
            rules,
            on_missing_key: config.on_missing_key,
            on_plaintext_fetch: config.on_plaintext_fetch,
            encrypt_headers: config.encrypt_headers,
            deks: DekManager::new(
                kms,
                config.dek,
                metrics.clone(),
                federation,
                &config.shredded_keks,
            ),
            metrics,
            topic_ids: RwLock::new(HashMap::new()),
            keys,
            keys_topic,
        })
    }

    pub fn metrics(&self) -> &EncryptionMetrics {
        &self.metrics
    }

    /// The index of the keys topics, when built [`Self::with_key_log`] and
    /// the configuration uses a keys topic ([`EncryptionConfig::federated`]).
    pub fn keys_index(&self) -> Option<&Arc<KeyIndex>> {
        self.keys.as_ref()
    }

    /// This virtual cluster's keys topic settings.
    pub fn keys_topic(&self) -> &KeysTopicConfig {
        &self.keys_topic
    }

    /// True if any of `topics` has a rule: only then does a Produce request
    /// need [`RecordEncryption::encrypt_produce`]. Costs a few string/glob
    /// comparisons. An empty name (v13+ requests name topics by id) counts
    /// as "maybe", so id-named topics are never forwarded unexamined.
    pub fn needs_produce<'a>(&self, topics: impl IntoIterator<Item = &'a str>) -> bool {
        !self.rules.is_empty()
            && topics
                .into_iter()
                .any(|t| t.is_empty() || self.rules.matches(t))
    }

    /// True if Fetch responses for `topic` must be inspected.
    pub fn needs_fetch(&self, topic: &str) -> bool {
        self.rules.matches(topic)
    }

    /// True if this instance has any rule at all (a filter with none can
    /// skip Fetch responses entirely).
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Teach the topic id -> name mapping (from Metadata responses) needed
    /// for Produce v13+ and Fetch v13+, which name topics by id.
    pub fn learn_topic_ids<I, S>(&self, pairs: I)
    where
        I: IntoIterator<Item = (Uuid, S)>,
        S: Into<String>,
    {
        let mut map = self.topic_ids.write().unwrap_or_else(|p| p.into_inner());
        for (id, name) in pairs {
            if !id.is_nil() {
                map.insert(id, name.into());
            }
        }
    }

    fn topic_name(&self, name: &TopicName, id: Uuid) -> Option<String> {
        if !name.0.is_empty() {
            return Some(name.0.to_string());
        }
        self.topic_ids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Encrypt, in place, every non-null record value (and header values if
    /// `encrypt_headers`) of every topic with a rule. Topics without a rule
    /// are not decoded. Batch headers (base offset, timestamps, producer
    /// id/epoch, base sequence, transactional flag, codec) are preserved;
    /// control batches and null values are untouched.
    ///
    /// On `Err`, the failed partitions have been removed from `req`; forward
    /// what is left (if anything) and [`ProduceRejection::merge_into`] the
    /// response, or answer with [`ProduceRejection::to_response`] when
    /// `req.topic_data` is empty.
    pub async fn encrypt_produce(
        &self,
        req: &mut ProduceRequest,
        _version: i16,
    ) -> Result<(), ProduceRejection> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let mut failures = Vec::new();
        let mut emptied = false;
        for topic in req.topic_data.iter_mut() {
            let name = self.topic_name(&topic.name, topic.topic_id);
            let (name, sel) = match name {
                Some(n) => match self.rules.select(&n) {
                    Some(sel) => (n, sel),
                    None => continue,
                },
                None => {
                    // Cannot tell whether this topic must be encrypted: fail closed.
                    for p in topic.partition_data.drain(..) {
                        failures.push(PartitionFailure {
                            topic: topic.name.clone(),
                            topic_id: topic.topic_id,
                            partition: p.index,
                            error: EncryptionError::UnknownTopicId(topic.topic_id),
                        });
                    }
                    emptied = true;
                    continue;
                }
            };
            let mut kept = Vec::with_capacity(topic.partition_data.len());
            for mut p in std::mem::take(&mut topic.partition_data) {
                let Some(records) = p.records.as_ref() else {
                    kept.push(p);
                    continue;
                };
                match self.encrypt_records(&name, &sel, records).await {
                    Ok(Some(new)) => {
                        p.records = Some(new);
                        kept.push(p);
                    }
                    Ok(None) => kept.push(p),
                    Err(error) => {
                        self.count_error("produce", &error);
                        tracing::warn!(topic = %name, partition = p.index, %error, "produce partition rejected by encryption");
                        failures.push(PartitionFailure {
                            topic: topic.name.clone(),
                            topic_id: topic.topic_id,
                            partition: p.index,
                            error,
                        });
                    }
                }
            }
            if kept.is_empty() {
                emptied = true;
            }
            topic.partition_data = kept;
        }
        if emptied {
            req.topic_data.retain(|t| !t.partition_data.is_empty());
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ProduceRejection {
                partitions: failures,
            })
        }
    }

    fn count_error(&self, direction: &'static str, e: &EncryptionError) {
        self.metrics
            .partition_errors
            .get_or_create(&metrics::ErrLabel {
                direction,
                error: e.label(),
            })
            .inc();
    }

    /// `Ok(None)`: leave the records as they are.
    async fn encrypt_records(
        &self,
        topic: &str,
        sel: &KekSelection,
        records: &Bytes,
    ) -> Result<Option<Bytes>, EncryptionError> {
        let batches = split_batches(records)?;
        let mut out = BytesMut::with_capacity(records.len() + records.len() / 4 + 256);
        // Nonces left over from one batch serve the next.
        let mut lease: Option<Lease> = None;
        for b in &batches {
            if b.magic() != 2 {
                return Err(EncryptionError::CorruptBatch(format!(
                    "record batch magic {} cannot be encrypted",
                    b.magic()
                )));
            }
            if b.is_control() {
                out.extend_from_slice(&b.bytes);
                continue;
            }
            if self.encrypt_headers {
                if !self
                    .encrypt_batch_owned(topic, sel, b, &batches, &mut out)
                    .await?
                {
                    return Ok(None);
                }
                continue;
            }
            let plain = b.plain_records()?;
            let declared = b.declared_count()?;
            let mut recs = RecordIter::new(&plain, declared).watching(MARKER_HEADER.as_bytes());
            let mut w = b.writer(&mut out, declared, plain.len());
            let mut sealed = Sealed::default();
            loop {
                let before = sealed.records;
                let step = seal_values(&mut recs, &mut w, &mut lease, &mut sealed);
                // Once per call, not per record: what federation reports as pending.
                if let Some(l) = &lease {
                    l.count_values(sealed.records - before);
                }
                if let Step::Done = step? {
                    break;
                }
                let Some(l) = self
                    .acquire_lease(topic, sel, recs.remaining() as u64, &batches)
                    .await?
                else {
                    return Ok(None);
                };
                // Every value grows by the prefix, nonce, tag and marker: make
                // room once instead of growing the buffer record by record.
                let growth = l.sealed_len(0) + MARKER_V2.len() + 4;
                w.buf().reserve(
                    recs.remaining_bytes() + recs.remaining().min(MAX_LEASE as usize) * growth,
                );
                lease = Some(l);
            }
            if sealed.records == 0 {
                // Nothing to encrypt (tombstones only): keep the batch byte for byte.
                w.abandon();
                out.extend_from_slice(&b.bytes);
                continue;
            }
            w.finish()?;
            self.metrics.encrypted_records.inc_by(sealed.records);
            self.metrics.encrypted_bytes.inc_by(sealed.bytes);
        }
        Ok(Some(out.freeze()))
    }

    /// A lease for up to `want` encryptions (capped by the DEK manager:
    /// `want` comes from record counts the client declares). `Ok(None)`: the
    /// KEK does not exist and `on_missing_key` is passthrough.
    async fn acquire_lease(
        &self,
        topic: &str,
        sel: &KekSelection,
        want: u64,
        batches: &[RawBatch],
    ) -> Result<Option<Lease>, EncryptionError> {
        match self.deks.lease(sel, want).await {
            Ok(l) => Ok(Some(l)),
            Err(DekError::Kms(KmsError::NotFound(_))) => match self.on_missing_key {
                OnMissingKey::Reject => Err(EncryptionError::MissingKey {
                    topic: topic.to_string(),
                    kms: sel.kms.clone(),
                    kek: sel.kek.clone(),
                }),
                OnMissingKey::Passthrough => {
                    tracing::warn!(topic, kms = %sel.kms, kek = %sel.kek, "KEK not found; forwarding plaintext (on_missing_key = passthrough)");
                    let n: u64 = batches.iter().map(|b| b.record_count().max(0) as u64).sum();
                    self.metrics.passthrough_records.inc_by(n);
                    Ok(None)
                }
            },
            Err(e) => Err(EncryptionError::from_dek(e)),
        }
    }

    /// The general path (header values encrypted too): owned records.
    /// `Ok(false)`: passthrough, leave the partition as it is.
    async fn encrypt_batch_owned(
        &self,
        topic: &str,
        sel: &KekSelection,
        b: &RawBatch,
        batches: &[RawBatch],
        out: &mut BytesMut,
    ) -> Result<bool, EncryptionError> {
        let mut recs = b.records()?;
        let mut needed = 0u64;
        for r in &recs {
            if r.headers.iter().any(|h| h.key == MARKER_HEADER.as_bytes()) {
                return Err(EncryptionError::MarkerInjected);
            }
            needed += u64::from(r.value.is_some());
            needed += r.headers.iter().filter(|h| h.value.is_some()).count() as u64;
        }
        if needed == 0 {
            out.extend_from_slice(&b.bytes);
            return Ok(true);
        }
        let Some(mut lease) = self.acquire_lease(topic, sel, needed, batches).await? else {
            return Ok(false);
        };
        let mut encrypted = 0u64;
        let mut bytes_in = 0u64;
        for r in recs.iter_mut() {
            let mut flags = 0u8;
            if let Some(v) = r.value.take() {
                needed -= 1;
                let sealed = loop {
                    if let Some(s) = lease.seal_value(&v) {
                        lease.count_values(1);
                        break s;
                    }
                    lease = self
                        .deks
                        .lease(sel, needed + 1)
                        .await
                        .map_err(EncryptionError::from_dek)?;
                };
                bytes_in += v.len() as u64;
                encrypted += 1;
                r.value = Some(sealed);
                flags |= FLAG_VALUE;
            }
            for h in r.headers.iter_mut() {
                let Some(v) = h.value.take() else { continue };
                needed -= 1;
                let sealed = loop {
                    if let Some(s) = lease.seal_header(&h.key, &v) {
                        break s;
                    }
                    lease = self
                        .deks
                        .lease(sel, needed + 1)
                        .await
                        .map_err(EncryptionError::from_dek)?;
                };
                h.value = Some(sealed);
                flags |= FLAG_HEADERS;
            }
            if flags != 0 {
                r.headers.push(Header {
                    key: Bytes::from_static(MARKER_HEADER.as_bytes()),
                    value: Some(Bytes::copy_from_slice(&[lease.version(), flags])),
                });
            }
        }
        self.metrics.encrypted_records.inc_by(encrypted);
        self.metrics.encrypted_bytes.inc_by(bytes_in);
        out.extend_from_slice(&b.with_records(&recs)?);
        Ok(true)
    }

    /// Decrypt, in place, every record carrying the marker header in the
    /// partitions of topics with a rule (and of topics named by an id not
    /// yet learnt, to fail safe), removing the marker. A partition that
    /// cannot be decrypted gets an error code and no records: ciphertext is
    /// never handed out as if it were plaintext. Batches without encrypted
    /// records are passed on byte for byte.
    pub async fn decrypt_fetch(&self, resp: &mut FetchResponse, _version: i16) -> FetchReport {
        let mut report = FetchReport::default();
        if self.rules.is_empty() {
            return report;
        }
        for topic in resp.responses.iter_mut() {
            let name = self.topic_name(&topic.topic, topic.topic_id);
            let has_rule = match &name {
                Some(n) => {
                    if !self.rules.matches(n) {
                        continue;
                    }
                    true
                }
                None => false,
            };
            let reject_plain = has_rule && self.on_plaintext_fetch == OnPlaintextFetch::Reject;
            let topic_label = name.as_deref().unwrap_or("<unknown topic id>");
            let realms = name
                .as_deref()
                .map(|n| self.rules.realms_for(n))
                .unwrap_or_default();
            for p in topic.partitions.iter_mut() {
                let Some(records) = p.records.as_ref() else {
                    continue;
                };
                if records.is_empty() {
                    continue;
                }
                match self
                    .decrypt_records(topic_label, &realms, records, reject_plain)
                    .await
                {
                    Ok((n, Some(new))) => {
                        report.decrypted_records += n;
                        p.records = Some(new);
                    }
                    Ok((_, None)) => {}
                    Err(error) => {
                        self.count_error("fetch", &error);
                        tracing::warn!(topic = %topic_label, partition = p.partition_index, %error, "fetch partition failed decryption; records withheld");
                        p.error_code = error.error_code();
                        p.records = Some(Bytes::new());
                        report.failed_partitions.push(PartitionFailure {
                            topic: topic.topic.clone(),
                            topic_id: topic.topic_id,
                            partition: p.partition_index,
                            error,
                        });
                    }
                }
            }
        }
        self.metrics
            .decrypted_records
            .inc_by(report.decrypted_records);
        report
    }

    async fn decrypt_records(
        &self,
        topic: &str,
        realms: &[String],
        records: &Bytes,
        reject_plain: bool,
    ) -> Result<(u64, Option<Bytes>), EncryptionError> {
        let batches = split_batches(records)?;
        let mut out = BytesMut::with_capacity(records.len());
        let mut changed = false;
        let mut decrypted = 0u64;
        let mut key: Option<OpenKey> = None;
        for b in &batches {
            if b.magic() != 2 || b.is_control() {
                if reject_plain && b.magic() != 2 {
                    return Err(EncryptionError::PlaintextInEncryptedTopic(
                        topic.to_string(),
                    ));
                }
                out.extend_from_slice(&b.bytes);
                continue;
            }
            let plain = b.plain_records()?;
            let declared = b.declared_count()?;
            let mut recs = RecordIter::new(&plain, declared).watching(MARKER_HEADER.as_bytes());
            // Decrypted records are smaller than the encrypted ones.
            let mut w = b.writer(&mut out, declared, plain.len());
            let mut opened = Opened::default();
            loop {
                match open_values(
                    &mut recs,
                    &mut w,
                    key.as_ref(),
                    reject_plain,
                    topic,
                    &mut opened,
                )? {
                    OpenStep::Done => break,
                    OpenStep::NeedKey { prefix, wrapped } => {
                        let (cipher, aad) =
                            self.cipher_for(prefix, wrapped, realms, &mut key).await?;
                        key = Some(OpenKey {
                            prefix: prefix.to_vec(),
                            cipher,
                            aad,
                        });
                    }
                    OpenStep::General => {
                        let r = recs.next_record()?.ok_or(EncryptionError::Tampered)?;
                        opened.values += self
                            .open_record_owned(&r, realms, &mut key, w.buf())
                            .await?;
                        opened.records += 1;
                    }
                }
            }
            if opened.records == 0 {
                // No encrypted record: keep the batch byte for byte.
                w.abandon();
                out.extend_from_slice(&b.bytes);
                continue;
            }
            w.finish()?;
            changed = true;
            decrypted += opened.values;
        }
        Ok((decrypted, changed.then(|| out.freeze())))
    }

    /// The cipher and value AAD of the DEK a prefix names, reusing `key`
    /// when it is the same DEK (the common case: one DEK per batch).
    async fn cipher_for(
        &self,
        prefix: &[u8],
        wrapped: &[u8],
        realms: &[String],
        key: &mut Option<OpenKey>,
    ) -> Result<(Arc<Aes256Gcm>, Aad), EncryptionError> {
        if let Some(k) = key.as_ref().filter(|k| k.prefix == prefix) {
            return Ok((k.cipher.clone(), k.aad));
        }
        let cipher = self
            .deks
            .decryptor(prefix, wrapped, realms)
            .await
            .map_err(EncryptionError::from_dek)?;
        Ok((cipher, Aad::for_prefix(prefix)))
    }

    /// The general path (encrypted header values, or a marker with unusual
    /// flags): decode the record into owned values. Returns how many record
    /// values were decrypted (0 or 1).
    async fn open_record_owned(
        &self,
        r: &RecordRef<'_>,
        realms: &[String],
        key: &mut Option<OpenKey>,
        out: &mut BytesMut,
    ) -> Result<u64, EncryptionError> {
        let mut rec = r.to_record();
        let pos = rec
            .headers
            .iter()
            .position(|h| h.key == MARKER_HEADER.as_bytes())
            .ok_or(EncryptionError::Tampered)?;
        let flags = match rec.headers[pos].value.as_deref() {
            Some(&[v, flags]) if is_known_version(v) => flags,
            _ => return Err(EncryptionError::Tampered),
        };
        rec.headers.remove(pos);
        let mut values = 0;
        if flags & FLAG_VALUE != 0 {
            let v = rec.value.take().ok_or(EncryptionError::Tampered)?;
            rec.value = Some(self.open(&v, None, realms, key).await?);
            values = 1;
        }
        if flags & FLAG_HEADERS != 0 {
            for h in rec.headers.iter_mut() {
                if let Some(v) = h.value.take() {
                    h.value = Some(self.open(&v, Some(&h.key), realms, key).await?);
                }
            }
        }
        batch::encode_record(out, &rec);
        Ok(values)
    }

    async fn open(
        &self,
        value: &[u8],
        header_key: Option<&[u8]>,
        realms: &[String],
        key: &mut Option<OpenKey>,
    ) -> Result<Bytes, EncryptionError> {
        let parsed = format::parse(value).map_err(|_| EncryptionError::Tampered)?;
        let (cipher, value_aad) = self
            .cipher_for(parsed.prefix, parsed.wrapped, realms, key)
            .await?;
        let aad = match header_key {
            None => value_aad.as_slice().to_vec(),
            Some(k) => value_aad.for_header(k),
        };
        let split = parsed.sealed.len() - TAG_LEN;
        let mut buf = BytesMut::from(&parsed.sealed[..split]);
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(parsed.nonce),
                &aad,
                &mut buf,
                Tag::from_slice(&parsed.sealed[split..]),
            )
            .map_err(|_| EncryptionError::Tampered)?;
        *key = Some(OpenKey {
            prefix: parsed.prefix.to_vec(),
            cipher,
            aad: value_aad,
        });
        Ok(buf.freeze())
    }
}

/// The DEK of the previous record, kept while records share it.
struct OpenKey {
    prefix: Vec<u8>,
    cipher: Arc<Aes256Gcm>,
    aad: Aad,
}

/// The marker header of a record whose value (only) is encrypted, encoded
/// as in a record (key length 10 zigzag, key, value length 2 zigzag, value).
const fn marker_encoded(version: u8) -> [u8; 14] {
    let key = MARKER_HEADER.as_bytes();
    assert!(key.len() == 10);
    let mut m = [0u8; 14];
    m[0] = 20;
    let mut i = 0;
    while i < 10 {
        m[1 + i] = key[i];
        i += 1;
    }
    m[11] = 4;
    m[12] = version;
    m[13] = FLAG_VALUE;
    m
}
const MARKER_V2: [u8; 14] = marker_encoded(FORMAT_CURRENT);
const MARKER_V3: [u8; 14] = marker_encoded(FORMAT_V3);

enum Step {
    Done,
    NeedNonces,
}

#[derive(Default)]
struct Sealed {
    records: u64,
    bytes: u64,
}

/// Encrypt record values straight into the new batch until the batch ends
/// or the lease runs dry (then the record is left unread for the caller to
/// retry after leasing more). Synchronous on purpose: the per-record loop
/// then compiles to an ordinary loop over borrowed slices instead of
/// touching the async state machine for every record.
fn seal_values(
    recs: &mut RecordIter<'_>,
    w: &mut BatchWriter<'_>,
    lease: &mut Option<Lease>,
    sealed: &mut Sealed,
) -> Result<Step, EncryptionError> {
    loop {
        let before = recs.clone();
        let Some(r) = recs.next_record()? else {
            return Ok(Step::Done);
        };
        if r.watched.is_some() {
            return Err(EncryptionError::MarkerInjected);
        }
        let Some(v) = r.value else {
            w.buf().extend_from_slice(r.raw);
            continue;
        };
        let Some((nonce, dek)) = lease.as_mut().and_then(Lease::next) else {
            *recs = before;
            return Ok(Step::NeedNonces);
        };
        let marker = if dek.version() == FORMAT_V3 {
            &MARKER_V3
        } else {
            &MARKER_V2
        };
        batch::encode_record_ref(
            w.buf(),
            &r,
            Some(dek.sealed_len(v.len())),
            |buf| {
                dek.seal_value_into(buf, &nonce, v);
                Ok::<(), EncryptionError>(())
            },
            r.header_count + 1,
            r.headers_raw.len() + marker.len(),
            |buf| {
                buf.extend_from_slice(r.headers_raw);
                buf.extend_from_slice(marker);
            },
        )?;
        sealed.records += 1;
        sealed.bytes += v.len() as u64;
    }
}

enum OpenStep<'a> {
    Done,
    /// The next record is under a DEK other than the current one.
    NeedKey {
        prefix: &'a [u8],
        wrapped: &'a [u8],
    },
    /// The next record needs the general (owned, async) path.
    General,
}

#[derive(Default)]
struct Opened {
    /// Records re-encoded because they carried the marker.
    records: u64,
    /// Record values decrypted.
    values: u64,
}

/// Decrypt marked record values straight into the new batch while they are
/// under `key`'s DEK (see [`seal_values`] for why this is synchronous).
fn open_values<'a>(
    recs: &mut RecordIter<'a>,
    w: &mut BatchWriter<'_>,
    key: Option<&OpenKey>,
    reject_plain: bool,
    topic: &str,
    opened: &mut Opened,
) -> Result<OpenStep<'a>, EncryptionError> {
    loop {
        let before = recs.clone();
        let Some(r) = recs.next_record()? else {
            return Ok(OpenStep::Done);
        };
        let Some(marker) = r.watched else {
            if reject_plain && r.value.is_some() {
                return Err(EncryptionError::PlaintextInEncryptedTopic(
                    topic.to_string(),
                ));
            }
            w.buf().extend_from_slice(r.raw);
            continue;
        };
        match marker.value {
            Some(&[v, FLAG_VALUE]) if is_known_version(v) => {}
            Some(&[v, _]) if is_known_version(v) => {
                *recs = before;
                return Ok(OpenStep::General);
            }
            _ => return Err(EncryptionError::Tampered),
        }
        let value = r.value.ok_or(EncryptionError::Tampered)?;
        let parsed = format::parse(value).map_err(|_| EncryptionError::Tampered)?;
        let Some(k) = key.filter(|k| batch::same_bytes(&k.prefix, parsed.prefix)) else {
            *recs = before;
            return Ok(OpenStep::NeedKey {
                prefix: parsed.prefix,
                wrapped: parsed.wrapped,
            });
        };
        let ct_len = parsed.sealed.len() - TAG_LEN;
        let (ct, tag) = parsed.sealed.split_at(ct_len);
        batch::encode_record_ref(
            w.buf(),
            &r,
            Some(ct_len),
            |buf| {
                let start = buf.len();
                buf.extend_from_slice(ct);
                k.cipher
                    .decrypt_in_place_detached(
                        Nonce::from_slice(parsed.nonce),
                        k.aad.as_slice(),
                        &mut buf[start..],
                        Tag::from_slice(tag),
                    )
                    .map_err(|_| EncryptionError::Tampered)
            },
            r.header_count - 1,
            r.headers_raw.len() - (marker.end - marker.start),
            |buf| {
                // Usually the marker is the only header: skip empty copies.
                if marker.start > 0 {
                    buf.extend_from_slice(&r.headers_raw[..marker.start]);
                }
                if marker.end < r.headers_raw.len() {
                    buf.extend_from_slice(&r.headers_raw[marker.end..]);
                }
            },
        )?;
        opened.records += 1;
        opened.values += 1;
    }
}

/// Re-exported for tests and benches of the filter built on top.
pub mod testing {
    pub use crate::batch::{split_batches, Header, RawBatch, Record};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_is_slice_equality() {
        let a: Vec<u8> = (0..70u8).collect();
        for len in 0..a.len() {
            assert!(batch::same_bytes(&a[..len], &a[..len]));
            assert!(!batch::same_bytes(&a[..len], &a[..len + 1]));
            for i in 0..len {
                let mut b = a[..len].to_vec();
                b[i] ^= 0x80;
                assert!(!batch::same_bytes(&a[..len], &b), "len {len}, byte {i}");
            }
        }
    }

    #[test]
    fn marker_encoding_matches_the_record_codec() {
        let mut buf = BytesMut::new();
        batch::encode_header(
            &mut buf,
            MARKER_HEADER.as_bytes(),
            Some(&[FORMAT_CURRENT, FLAG_VALUE]),
        );
        assert_eq!(&buf[..], &MARKER_V2[..]);
        let mut buf = BytesMut::new();
        batch::encode_header(
            &mut buf,
            MARKER_HEADER.as_bytes(),
            Some(&[FORMAT_V3, FLAG_VALUE]),
        );
        assert_eq!(&buf[..], &MARKER_V3[..]);
    }
}

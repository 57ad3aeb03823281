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
pub mod format;
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

use crate::batch::{split_batches, Header, Record};
pub use crate::config::{
    ConfigError, ConfigErrors, DekConfig, EncryptionConfig, OnMissingKey, OnPlaintextFetch,
    TopicRule,
};
use crate::dek::{header_aad_from_value_aad, value_aad, DekError, DekManager};
use crate::format::{FLAG_HEADERS, FLAG_VALUE, FORMAT_V1, MARKER_HEADER, NONCE_LEN, TAG_LEN};

/// Marker header value of a record whose value (only) is encrypted.
const MARKER_VALUE_ONLY: [u8; 2] = [FORMAT_V1, FLAG_VALUE];
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
        let names: Vec<&str> = kms.names().collect();
        config.validate("encryption", &names)?;
        let rules = Rules::new(&config.rules).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: "encryption.rules".into(),
                message: e.to_string(),
            }])
        })?;
        let metrics = EncryptionMetrics::new(registry);
        Ok(Self {
            rules,
            on_missing_key: config.on_missing_key,
            on_plaintext_fetch: config.on_plaintext_fetch,
            encrypt_headers: config.encrypt_headers,
            deks: DekManager::new(kms, config.dek, metrics.clone()),
            metrics,
            topic_ids: RwLock::new(HashMap::new()),
        })
    }

    pub fn metrics(&self) -> &EncryptionMetrics {
        &self.metrics
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
            let mut recs = b.records()?;
            let mut needed = 0u64;
            for r in &recs {
                if r.headers.iter().any(|h| h.key == MARKER_HEADER.as_bytes()) {
                    return Err(EncryptionError::MarkerInjected);
                }
                needed += u64::from(r.value.is_some());
                if self.encrypt_headers {
                    needed += r.headers.iter().filter(|h| h.value.is_some()).count() as u64;
                }
            }
            if needed == 0 {
                out.extend_from_slice(&b.bytes);
                continue;
            }
            let mut lease = match self.deks.lease(&sel.kms, &sel.kek, needed).await {
                Ok(l) => l,
                Err(DekError::Kms(KmsError::NotFound(_))) => {
                    return match self.on_missing_key {
                        OnMissingKey::Reject => Err(EncryptionError::MissingKey {
                            topic: topic.to_string(),
                            kms: sel.kms.clone(),
                            kek: sel.kek.clone(),
                        }),
                        OnMissingKey::Passthrough => {
                            tracing::warn!(topic, kms = %sel.kms, kek = %sel.kek, "KEK not found; forwarding plaintext (on_missing_key = passthrough)");
                            let n: u64 =
                                batches.iter().map(|b| b.record_count().max(0) as u64).sum();
                            self.metrics.passthrough_records.inc_by(n);
                            Ok(None)
                        }
                    };
                }
                Err(e) => return Err(EncryptionError::from_dek(e)),
            };
            let mut encrypted = 0u64;
            let mut bytes_in = 0u64;
            if !self.encrypt_headers {
                // Fast path: encrypt each value straight into the new batch.
                let mut w = b.writer(&mut out);
                for r in &recs {
                    let Some(v) = &r.value else {
                        batch::encode_record(w.buf(), r);
                        continue;
                    };
                    needed -= 1;
                    let nonce = loop {
                        if let Some(n) = lease.next_nonce() {
                            break n;
                        }
                        lease = self
                            .deks
                            .lease(&sel.kms, &sel.kek, needed + 1)
                            .await
                            .map_err(EncryptionError::from_dek)?;
                    };
                    let dek = &lease.dek;
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| (&h.key[..], h.value.as_deref()))
                        .chain(std::iter::once((
                            MARKER_HEADER.as_bytes(),
                            Some(&MARKER_VALUE_ONLY[..]),
                        )));
                    batch::encode_record_parts(
                        w.buf(),
                        r,
                        Some(dek.sealed_len(v.len())),
                        headers,
                        |buf| {
                            dek.seal_value_into(buf, &nonce, v);
                            Ok::<(), EncryptionError>(())
                        },
                    )?;
                    bytes_in += v.len() as u64;
                    encrypted += 1;
                }
                w.finish(recs.len())?;
                self.metrics.encrypted_records.inc_by(encrypted);
                self.metrics.encrypted_bytes.inc_by(bytes_in);
                continue;
            }
            for r in recs.iter_mut() {
                let mut flags = 0u8;
                if let Some(v) = r.value.take() {
                    needed -= 1;
                    let sealed = loop {
                        if let Some(s) = lease.seal_value(&v) {
                            break s;
                        }
                        lease = self
                            .deks
                            .lease(&sel.kms, &sel.kek, needed + 1)
                            .await
                            .map_err(EncryptionError::from_dek)?;
                    };
                    bytes_in += v.len() as u64;
                    encrypted += 1;
                    r.value = Some(sealed);
                    flags |= FLAG_VALUE;
                }
                if self.encrypt_headers {
                    for h in r.headers.iter_mut() {
                        let Some(v) = h.value.take() else { continue };
                        needed -= 1;
                        let sealed = loop {
                            if let Some(s) = lease.seal_header(&h.key, &v) {
                                break s;
                            }
                            lease = self
                                .deks
                                .lease(&sel.kms, &sel.kek, needed + 1)
                                .await
                                .map_err(EncryptionError::from_dek)?;
                        };
                        h.value = Some(sealed);
                        flags |= FLAG_HEADERS;
                    }
                }
                if flags != 0 {
                    r.headers.push(Header {
                        key: Bytes::from_static(MARKER_HEADER.as_bytes()),
                        value: Some(Bytes::copy_from_slice(&[FORMAT_V1, flags])),
                    });
                }
            }
            self.metrics.encrypted_records.inc_by(encrypted);
            self.metrics.encrypted_bytes.inc_by(bytes_in);
            out.extend_from_slice(&b.with_records(&recs)?);
        }
        Ok(Some(out.freeze()))
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
            for p in topic.partitions.iter_mut() {
                let Some(records) = p.records.as_ref() else {
                    continue;
                };
                if records.is_empty() {
                    continue;
                }
                match self
                    .decrypt_records(topic_label, records, reject_plain)
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
        records: &Bytes,
        reject_plain: bool,
    ) -> Result<(u64, Option<Bytes>), EncryptionError> {
        let batches = split_batches(records)?;
        let mut out = BytesMut::with_capacity(records.len());
        let mut changed = false;
        let mut decrypted = 0u64;
        let mut last: Option<LastDek> = None;
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
            let mut recs = b.records()?;
            let marker_of = |r: &Record| {
                r.headers
                    .iter()
                    .position(|h| h.key == MARKER_HEADER.as_bytes())
            };
            if !recs.iter().any(|r| marker_of(r).is_some()) {
                if reject_plain && recs.iter().any(|r| r.value.is_some()) {
                    return Err(EncryptionError::PlaintextInEncryptedTopic(
                        topic.to_string(),
                    ));
                }
                out.extend_from_slice(&b.bytes);
                continue;
            }
            changed = true;
            let mut w = b.writer(&mut out);
            for r in recs.iter_mut() {
                let Some(pos) = marker_of(r) else {
                    if reject_plain && r.value.is_some() {
                        return Err(EncryptionError::PlaintextInEncryptedTopic(
                            topic.to_string(),
                        ));
                    }
                    batch::encode_record(w.buf(), r);
                    continue;
                };
                let flags = match r.headers[pos].value.as_deref() {
                    Some([FORMAT_V1, flags]) => *flags,
                    _ => return Err(EncryptionError::Tampered),
                };
                if flags == FLAG_VALUE {
                    // Fast path: decrypt straight into the new batch.
                    let v = r.value.as_ref().ok_or(EncryptionError::Tampered)?;
                    let parsed = format::parse(v).map_err(|_| EncryptionError::Tampered)?;
                    let (cipher, aad) = self.cipher_for(&parsed, &mut last).await?;
                    let ct_len = parsed.sealed.len() - TAG_LEN;
                    let headers = r
                        .headers
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != pos)
                        .map(|(_, h)| (&h.key[..], h.value.as_deref()));
                    batch::encode_record_parts(w.buf(), r, Some(ct_len), headers, |buf| {
                        let start = buf.len();
                        buf.extend_from_slice(&parsed.sealed[..ct_len]);
                        cipher
                            .decrypt_in_place_detached(
                                Nonce::from_slice(&parsed.nonce[..NONCE_LEN]),
                                &aad,
                                &mut buf[start..],
                                Tag::from_slice(&parsed.sealed[ct_len..]),
                            )
                            .map_err(|_| EncryptionError::Tampered)
                    })?;
                    decrypted += 1;
                    continue;
                }
                r.headers.remove(pos);
                if flags & FLAG_VALUE != 0 {
                    let v = r.value.take().ok_or(EncryptionError::Tampered)?;
                    r.value = Some(self.open(&v, None, &mut last).await?);
                    decrypted += 1;
                }
                if flags & FLAG_HEADERS != 0 {
                    for h in r.headers.iter_mut() {
                        if let Some(v) = h.value.take() {
                            h.value = Some(self.open(&v, Some(&h.key), &mut last).await?);
                        }
                    }
                }
                batch::encode_record(w.buf(), r);
            }
            w.finish(recs.len())?;
        }
        Ok((decrypted, changed.then(|| out.freeze())))
    }

    /// The cipher and value AAD for a parsed value, reusing the previous
    /// record's when it was encrypted under the same DEK (the common case).
    async fn cipher_for(
        &self,
        parsed: &format::Parsed<'_>,
        last: &mut Option<LastDek>,
    ) -> Result<(Arc<Aes256Gcm>, Arc<Vec<u8>>), EncryptionError> {
        if let Some(l) = last {
            if l.prefix.as_slice() == parsed.prefix {
                return Ok((l.cipher.clone(), l.value_aad.clone()));
            }
        }
        let c = self
            .deks
            .decryptor(parsed.prefix, parsed.wrapped)
            .await
            .map_err(EncryptionError::from_dek)?;
        let aad = Arc::new(value_aad(parsed.prefix));
        *last = Some(LastDek {
            prefix: parsed.prefix.to_vec(),
            cipher: c.clone(),
            value_aad: aad.clone(),
        });
        Ok((c, aad))
    }

    async fn open(
        &self,
        value: &[u8],
        header_key: Option<&[u8]>,
        last: &mut Option<LastDek>,
    ) -> Result<Bytes, EncryptionError> {
        let parsed = format::parse(value).map_err(|_| EncryptionError::Tampered)?;
        let (cipher, vaad) = self.cipher_for(&parsed, last).await?;
        let aad = match header_key {
            None => vaad.as_slice().to_vec(),
            Some(k) => header_aad_from_value_aad(&vaad, k),
        };
        let split = parsed.sealed.len() - TAG_LEN;
        let mut buf = BytesMut::from(&parsed.sealed[..split]);
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&parsed.nonce[..NONCE_LEN]),
                &aad,
                &mut buf,
                Tag::from_slice(&parsed.sealed[split..]),
            )
            .map_err(|_| EncryptionError::Tampered)?;
        Ok(buf.freeze())
    }
}

struct LastDek {
    prefix: Vec<u8>,
    cipher: Arc<Aes256Gcm>,
    value_aad: Arc<Vec<u8>>,
}

/// Re-exported for tests and benches of the filter built on top.
pub mod testing {
    pub use crate::batch::{split_batches, Header, RawBatch, Record};
}

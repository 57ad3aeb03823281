use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpLabel {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrLabel {
    pub direction: &'static str,
    pub error: &'static str,
}

/// Record-encryption metrics, registered into the registry passed to
/// [`crate::RecordEncryption::new`].
#[derive(Clone)]
pub struct EncryptionMetrics {
    pub(crate) encrypted_records: Counter,
    pub(crate) decrypted_records: Counter,
    pub(crate) encrypted_bytes: Counter,
    pub(crate) kms_calls: Family<OpLabel, Counter>,
    pub(crate) deks_generated: Counter,
    pub(crate) dek_cache_hits: Counter,
    pub(crate) dek_cache_misses: Counter,
    pub(crate) partition_errors: Family<ErrLabel, Counter>,
    pub(crate) passthrough_records: Counter,
}

impl EncryptionMetrics {
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let m = Self {
            encrypted_records: Counter::default(),
            decrypted_records: Counter::default(),
            encrypted_bytes: Counter::default(),
            kms_calls: Family::default(),
            deks_generated: Counter::default(),
            dek_cache_hits: Counter::default(),
            dek_cache_misses: Counter::default(),
            partition_errors: Family::default(),
            passthrough_records: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("strait_encryption");
        r.register(
            "encrypted_records",
            "Record values encrypted",
            m.encrypted_records.clone(),
        );
        r.register(
            "decrypted_records",
            "Record values decrypted",
            m.decrypted_records.clone(),
        );
        r.register(
            "encrypted_bytes",
            "Plaintext bytes encrypted",
            m.encrypted_bytes.clone(),
        );
        r.register(
            "kms_calls",
            "Calls made to the KMS by the encryption filter, by operation",
            m.kms_calls.clone(),
        );
        r.register(
            "deks_generated",
            "DEKs generated for encryption",
            m.deks_generated.clone(),
        );
        r.register(
            "dek_cache_hits",
            "Decryption DEK cache hits",
            m.dek_cache_hits.clone(),
        );
        r.register(
            "dek_cache_misses",
            "Decryption DEK cache misses",
            m.dek_cache_misses.clone(),
        );
        r.register(
            "partition_errors",
            "Partitions failed by the encryption filter, by direction and error",
            m.partition_errors.clone(),
        );
        r.register(
            "passthrough_records",
            "Records forwarded unencrypted because their KEK was missing and on_missing_key = passthrough",
            m.passthrough_records.clone(),
        );
        m
    }

    /// Total KMS calls (all operations) made by this filter instance.
    pub fn kms_calls_total(&self) -> u64 {
        ["generate_dek", "unwrap_dek", "resolve_alias"]
            .iter()
            .map(|op| {
                self.kms_calls
                    .get_or_create(&OpLabel { operation: op })
                    .get()
            })
            .sum()
    }

    pub fn kms_calls(&self, operation: &'static str) -> u64 {
        self.kms_calls.get_or_create(&OpLabel { operation }).get()
    }

    pub fn encrypted_records(&self) -> u64 {
        self.encrypted_records.get()
    }

    pub fn decrypted_records(&self) -> u64 {
        self.decrypted_records.get()
    }

    pub fn deks_generated(&self) -> u64 {
        self.deks_generated.get()
    }
}

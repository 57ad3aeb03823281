//! The KMS seam of Strait.
//!
//! [`Kms`] is what the encryption filter and the KMS broker talk to: generate a
//! data-encryption key (DEK) under a key-encryption key (KEK), unwrap a DEK, and
//! resolve a KEK alias. Providers that pull heavy SDKs (Vault, AWS, the broker
//! client) live in `strait-kms-broker`; this crate keeps the trait, the error
//! model, the config contract, the retry/failover/metrics wrappers and the
//! development-only [`local::LocalKeyring`], so the edge's encryption core
//! depends on nothing heavier than `aes-gcm`.

pub mod alias_cache;
pub mod config;
pub mod failover;
pub mod local;
pub mod retry;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use zeroize::Zeroizing;

pub use alias_cache::AliasCache;
pub use failover::FailoverKms;
pub use retry::{KmsMetrics, RetryPolicy, RetryingKms};

/// Length of every DEK handed out by a [`Kms`]: AES-256.
pub const DEK_LEN: usize = 32;

/// A KEK as the backend KMS names it.
///
/// `version` is the exact key version a DEK was wrapped under when the provider
/// exposes one (Vault transit: `"3"`; local keyring: `"2"`). AWS KMS embeds the
/// key version inside the ciphertext blob, so its version is `None`. A `KekRef`
/// returned by [`Kms::resolve_alias`] has `version: None`, meaning "latest".
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KekRef {
    pub key_id: String,
    pub version: Option<String>,
}

impl KekRef {
    pub fn new(key_id: impl Into<String>) -> Self {
        Self {
            key_id: key_id.into(),
            version: None,
        }
    }

    pub fn with_version(key_id: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            key_id: key_id.into(),
            version: Some(version.into()),
        }
    }
}

impl fmt::Display for KekRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}@v{}", self.key_id, v),
            None => f.write_str(&self.key_id),
        }
    }
}

/// A freshly generated DEK: the plaintext (wiped on drop), its wrapped form,
/// and the exact KEK (with version when known) that wrapped it.
pub struct DekPair {
    pub plaintext: Zeroizing<[u8; DEK_LEN]>,
    pub wrapped: Vec<u8>,
    pub kek: KekRef,
}

impl fmt::Debug for DekPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DekPair")
            .field("plaintext", &"<redacted>")
            .field("wrapped_len", &self.wrapped.len())
            .field("kek", &self.kek)
            .finish()
    }
}

/// An existing DEK wrapped under one more KEK (federation: the same DEK for
/// another realm), with the exact KEK version that wrapped it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedDek {
    pub wrapped: Vec<u8>,
    pub kek: KekRef,
}

/// What can go wrong talking to a KMS. Only [`KmsError::Unavailable`] is
/// retried by [`RetryingKms`] and failed over by [`FailoverKms`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KmsError {
    /// The key (or alias, or KMS name) does not exist.
    #[error("key not found: {0}")]
    NotFound(String),
    /// Transient: connection refused, timeout, 5xx, throttling. Retriable.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    /// The KMS refused the caller (bad token, missing permission).
    #[error("KMS denied access: {0}")]
    Denied(String),
    /// Malformed input or output (bad wrapped DEK, wrong DEK length, bad config).
    #[error("invalid KMS request or response: {0}")]
    Invalid(String),
}

impl KmsError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, KmsError::Unavailable(_))
    }

    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            KmsError::NotFound(_) => "not_found",
            KmsError::Unavailable(_) => "unavailable",
            KmsError::Denied(_) => "denied",
            KmsError::Invalid(_) => "invalid",
        }
    }
}

pub type Result<T, E = KmsError> = std::result::Result<T, E>;

/// Copy a provider's plaintext DEK into a fixed, zeroizing buffer.
pub fn dek_from_slice(bytes: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
    if bytes.len() != DEK_LEN {
        return Err(KmsError::Invalid(format!(
            "DEK must be {DEK_LEN} bytes, got {}",
            bytes.len()
        )));
    }
    let mut out = Zeroizing::new([0u8; DEK_LEN]);
    out.copy_from_slice(bytes);
    Ok(out)
}

/// A key management service able to wrap and unwrap DEKs under KEKs.
#[async_trait]
pub trait Kms: Send + Sync {
    /// Generate a new 32-byte DEK wrapped under `kek` (its latest version
    /// when `kek.version` is `None`).
    async fn generate_dek(&self, kek: &KekRef) -> Result<DekPair>;
    /// Unwrap a DEK previously produced by [`Kms::generate_dek`].
    async fn unwrap_dek(&self, kek: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>>;
    /// Resolve an alias / key name to the provider's key id. Unknown => NotFound.
    async fn resolve_alias(&self, alias: &str) -> Result<KekRef>;
    /// Wrap an existing DEK under `kek` (its latest version when
    /// `kek.version` is `None`): Vault `transit/encrypt`, AWS `Encrypt`.
    /// What federation uses to give one DEK a wrap in another realm.
    async fn wrap_dek(&self, kek: &KekRef, plaintext: &[u8; DEK_LEN]) -> Result<WrappedDek> {
        let _ = (kek, plaintext);
        Err(KmsError::Invalid(
            "this KMS cannot wrap an existing DEK".into(),
        ))
    }
    /// Crypto-shred `kek`: after this no DEK wrapped under it unwraps again
    /// (Vault: the key is deleted; AWS: disabled and scheduled for deletion).
    async fn shred_kek(&self, kek: &KekRef) -> Result<()> {
        let _ = kek;
        Err(KmsError::Invalid("this KMS cannot shred a key".into()))
    }
}

#[async_trait]
impl<T: Kms + ?Sized> Kms for Arc<T> {
    async fn generate_dek(&self, kek: &KekRef) -> Result<DekPair> {
        (**self).generate_dek(kek).await
    }
    async fn unwrap_dek(&self, kek: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
        (**self).unwrap_dek(kek, wrapped).await
    }
    async fn resolve_alias(&self, alias: &str) -> Result<KekRef> {
        (**self).resolve_alias(alias).await
    }
    async fn wrap_dek(&self, kek: &KekRef, plaintext: &[u8; DEK_LEN]) -> Result<WrappedDek> {
        (**self).wrap_dek(kek, plaintext).await
    }
    async fn shred_kek(&self, kek: &KekRef) -> Result<()> {
        (**self).shred_kek(kek).await
    }
}

/// The configured KMSs by name (`kms[].name`), as rules refer to them.
#[derive(Clone, Default)]
pub struct KmsSet {
    by_name: BTreeMap<String, Arc<dyn Kms>>,
}

impl KmsSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, kms: Arc<dyn Kms>) {
        self.by_name.insert(name.into(), kms);
    }

    pub fn with(mut self, name: impl Into<String>, kms: Arc<dyn Kms>) -> Self {
        self.insert(name, kms);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Kms>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

impl fmt::Debug for KmsSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

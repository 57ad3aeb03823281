//! DEK lifecycle: one active DEK per (KMS, KEK name) for encryption, reused
//! until its encryption budget or age runs out and replaced ahead of time in
//! the background; an LRU of unwrapped DEKs for decryption.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use bytes::{BufMut, Bytes, BytesMut};
use lru::LruCache;
use rand::RngCore;
use strait_kms_core::{AliasCache, KekRef, KmsError, KmsSet};

use crate::config::DekConfig;
use crate::format::{self, KekLocator, NONCE_LEN, PURPOSE_HEADER, PURPOSE_VALUE, TAG_LEN};
use crate::metrics::{EncryptionMetrics, OpLabel};

const MASK96: u128 = (1u128 << 96) - 1;

/// A DEK in use for encryption.
pub(crate) struct ActiveDek {
    cipher: Aes256Gcm,
    prefix: Bytes,
    value_aad: Vec<u8>,
    /// Random 96-bit start of the nonce counter; nonce i = start + i mod 2^96.
    nonce_start: u128,
    used: AtomicU64,
    max: u64,
    created: Instant,
}

impl ActiveDek {
    fn usable(&self, max_age: Duration) -> bool {
        self.created.elapsed() < max_age && self.used.load(Ordering::Relaxed) < self.max
    }

    fn wants_refresh(&self, cfg: &DekConfig) -> bool {
        let pct = u64::from(cfg.refresh_ahead_percent);
        self.used.load(Ordering::Relaxed) >= self.max / 100 * pct + (self.max % 100) * pct / 100
            || self.created.elapsed() >= cfg.max_age.mul_f64(pct as f64 / 100.0)
    }

    /// Reserve up to `want` nonce indices; never beyond the budget, so a
    /// nonce is never used twice under this DEK.
    fn reserve(&self, want: u64) -> Option<(u64, u64)> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur >= self.max {
                return None;
            }
            let n = want.min(self.max - cur);
            match self
                .used
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some((cur, n)),
                Err(actual) => cur = actual,
            }
        }
    }

    fn nonce(&self, index: u64) -> [u8; NONCE_LEN] {
        let v = (self.nonce_start + u128::from(index)) & MASK96;
        let b = v.to_be_bytes();
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&b[4..16]);
        n
    }
}

/// A range of nonce indices reserved under one DEK.
pub(crate) struct Lease {
    pub dek: Arc<ActiveDek>,
    next: u64,
    end: u64,
}

impl Lease {
    /// The next nonce of this lease; `None` when the lease is used up.
    pub fn next_nonce(&mut self) -> Option<[u8; NONCE_LEN]> {
        self.take_nonce()
    }

    fn take_nonce(&mut self) -> Option<[u8; NONCE_LEN]> {
        (self.next < self.end).then(|| {
            let n = self.dek.nonce(self.next);
            self.next += 1;
            n
        })
    }

    /// Encrypt a record value. `None` when the lease is used up.
    pub fn seal_value(&mut self, plaintext: &[u8]) -> Option<Bytes> {
        let nonce = self.take_nonce()?;
        Some(seal(&self.dek, &nonce, &self.dek.value_aad, plaintext))
    }

    /// Encrypt a header value, bound to its header key.
    pub fn seal_header(&mut self, key: &[u8], plaintext: &[u8]) -> Option<Bytes> {
        let nonce = self.take_nonce()?;
        let aad = header_aad_from_value_aad(&self.dek.value_aad, key);
        Some(seal(&self.dek, &nonce, &aad, plaintext))
    }
}

/// AAD of a record value: `version | 0x00 | SHA-256(prefix)`. The prefix
/// (KEK reference and wrapped DEK) is bound through its digest, computed
/// once per DEK, so per-record authentication costs 34 bytes of GHASH
/// instead of the whole prefix (~90 bytes with Vault, ~200 with AWS KMS).
pub(crate) fn value_aad(prefix: &[u8]) -> Vec<u8> {
    aad_base(prefix, PURPOSE_VALUE)
}

/// AAD of a header value: `version | 0x01 | SHA-256(prefix) | header key`,
/// derived from the value AAD without rehashing.
pub(crate) fn header_aad_from_value_aad(value_aad: &[u8], key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(value_aad.len() + key.len());
    aad.extend_from_slice(value_aad);
    aad[1] = PURPOSE_HEADER;
    aad.extend_from_slice(key);
    aad
}

fn aad_base(prefix: &[u8], purpose: u8) -> Vec<u8> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(prefix);
    let mut aad = Vec::with_capacity(2 + digest.len() + 64);
    aad.push(prefix.first().copied().unwrap_or(format::FORMAT_V1));
    aad.push(purpose);
    aad.extend_from_slice(&digest);
    aad
}

impl ActiveDek {
    /// Length of an encrypted value for `n` plaintext bytes.
    pub fn sealed_len(&self, n: usize) -> usize {
        self.prefix.len() + NONCE_LEN + n + TAG_LEN
    }

    /// Append the encrypted record value for `plaintext` to `buf`
    /// (exactly [`ActiveDek::sealed_len`] bytes), encrypting in place.
    pub fn seal_value_into(&self, buf: &mut BytesMut, nonce: &[u8; NONCE_LEN], plaintext: &[u8]) {
        buf.put_slice(&self.prefix);
        buf.put_slice(nonce);
        let start = buf.len();
        buf.put_slice(plaintext);
        // Fails only beyond AES-GCM's 64 GiB message limit, far above Kafka's.
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(nonce), &self.value_aad, &mut buf[start..])
            .unwrap_or_default();
        buf.put_slice(&tag);
    }
}

fn seal(dek: &ActiveDek, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(dek.prefix.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.put_slice(&dek.prefix);
    out.put_slice(nonce);
    let start = out.len();
    out.put_slice(plaintext);
    // Fails only beyond AES-GCM's 64 GiB message limit, far above Kafka's.
    let tag = dek
        .cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut out[start..])
        .unwrap_or_default();
    out.put_slice(&tag);
    out.freeze()
}

/// Why a DEK could not be obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DekError {
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("KMS {0:?} is not configured")]
    UnknownKms(String),
    #[error("{0}")]
    Format(#[from] format::FormatError),
}

#[derive(Default)]
struct Slot {
    current: Option<Arc<ActiveDek>>,
    refreshing: bool,
    last_failure: Option<Instant>,
    /// Error of the last failed generation, returned without calling the KMS
    /// again for [`FAIL_FAST`] when no usable DEK remains.
    last_error: Option<(Instant, DekError)>,
    gen_lock: Arc<tokio::sync::Mutex<()>>,
}

struct CachedDek {
    cipher: Arc<Aes256Gcm>,
    last_used: Instant,
}

struct Inner {
    kms: KmsSet,
    cfg: DekConfig,
    aliases: HashMap<String, AliasCache>,
    active: Mutex<HashMap<(String, String), Slot>>,
    cache: Mutex<LruCache<Vec<u8>, CachedDek>>,
    /// One unwrap per DEK at a time: concurrent misses wait for the first.
    inflight: Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
    /// Recent unwrap failures, answered without calling the KMS for FAIL_FAST.
    failures: Mutex<HashMap<Vec<u8>, (Instant, DekError)>>,
    metrics: EncryptionMetrics,
}

#[derive(Clone)]
pub(crate) struct DekManager {
    inner: Arc<Inner>,
}

/// After a failed background refresh, wait this long before trying again
/// so that a dead KMS is not hammered on every produce.
const REFRESH_RETRY: Duration = Duration::from_secs(5);
/// After a failed synchronous generation, fail further requests for the same
/// KEK fast for this long instead of queueing each behind a full retry cycle.
const FAIL_FAST: Duration = Duration::from_secs(1);

impl DekManager {
    pub fn new(kms: KmsSet, cfg: DekConfig, metrics: EncryptionMetrics) -> Self {
        let aliases = kms
            .names()
            .map(|n| {
                (
                    n.to_string(),
                    AliasCache::new(cfg.alias_ttl, Duration::from_secs(30).min(cfg.alias_ttl)),
                )
            })
            .collect();
        let size = NonZeroUsize::new(cfg.cache_size.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            inner: Arc::new(Inner {
                kms,
                aliases,
                active: Mutex::new(HashMap::new()),
                cache: Mutex::new(LruCache::new(size)),
                inflight: Mutex::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
                cfg,
                metrics,
            }),
        }
    }

    /// Reserve up to `want` encryptions under the active DEK for
    /// (`kms`, `kek_name`), generating one if there is none usable.
    pub async fn lease(&self, kms: &str, kek_name: &str, want: u64) -> Result<Lease, DekError> {
        let key = (kms.to_string(), kek_name.to_string());
        loop {
            let gen_lock = {
                let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                let slot = active.entry(key.clone()).or_default();
                if let Some(d) = slot.current.clone() {
                    if d.usable(self.inner.cfg.max_age) {
                        if let Some((start, n)) = d.reserve(want.max(1)) {
                            if d.wants_refresh(&self.inner.cfg)
                                && !slot.refreshing
                                && slot
                                    .last_failure
                                    .is_none_or(|t| t.elapsed() >= REFRESH_RETRY)
                            {
                                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                                    slot.refreshing = true;
                                    let this = self.clone();
                                    let key = key.clone();
                                    let lock = slot.gen_lock.clone();
                                    handle.spawn(async move { this.refresh(key, lock).await });
                                }
                            }
                            return Ok(Lease {
                                dek: d,
                                next: start,
                                end: start + n,
                            });
                        }
                    }
                }
                if let Some((at, e)) = &slot.last_error {
                    if at.elapsed() < FAIL_FAST {
                        return Err(e.clone());
                    }
                }
                slot.gen_lock.clone()
            };
            let _g = gen_lock.lock().await;
            {
                let active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(slot) = active.get(&key) {
                    if slot
                        .current
                        .as_ref()
                        .is_some_and(|d| d.usable(self.inner.cfg.max_age))
                    {
                        continue;
                    }
                    if let Some((at, e)) = &slot.last_error {
                        if at.elapsed() < FAIL_FAST {
                            return Err(e.clone());
                        }
                    }
                }
            }
            match self.generate(&key.0, &key.1).await {
                Ok(dek) => self.install(&key, dek, None),
                Err(e) => {
                    let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                    active.entry(key.clone()).or_default().last_error =
                        Some((Instant::now(), e.clone()));
                    return Err(e);
                }
            }
        }
    }

    async fn refresh(&self, key: (String, String), lock: Arc<tokio::sync::Mutex<()>>) {
        let _g = lock.lock().await;
        match self.generate(&key.0, &key.1).await {
            Ok(dek) => self.install(&key, dek, None),
            Err(e) => {
                tracing::warn!(kms = %key.0, kek = %key.1, error = %e, "background DEK refresh failed; the current DEK stays in use while its limits allow");
                let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                let slot = active.entry(key).or_default();
                slot.refreshing = false;
                slot.last_failure = Some(Instant::now());
            }
        }
    }

    fn install(&self, key: &(String, String), dek: Arc<ActiveDek>, _: Option<()>) {
        self.cache_insert(dek.prefix.to_vec(), Arc::new(dek.cipher.clone()));
        let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
        let slot = active.entry(key.clone()).or_default();
        slot.current = Some(dek);
        slot.refreshing = false;
        slot.last_failure = None;
        slot.last_error = None;
    }

    fn count(&self, operation: &'static str) {
        self.inner
            .metrics
            .kms_calls
            .get_or_create(&OpLabel { operation })
            .inc();
    }

    /// Resolve `kek_name` in `kms` (cached).
    pub async fn resolve(&self, kms_name: &str, kek_name: &str) -> Result<KekRef, DekError> {
        let kms = self
            .inner
            .kms
            .get(kms_name)
            .ok_or_else(|| DekError::UnknownKms(kms_name.to_string()))?;
        let cache = self
            .inner
            .aliases
            .get(kms_name)
            .ok_or_else(|| DekError::UnknownKms(kms_name.to_string()))?;
        let counting = CountingKms {
            inner: kms.as_ref(),
            mgr: self,
        };
        Ok(cache.resolve(&counting, kek_name).await?)
    }

    async fn generate(&self, kms_name: &str, kek_name: &str) -> Result<Arc<ActiveDek>, DekError> {
        let kek = self.resolve(kms_name, kek_name).await?;
        let kms = self
            .inner
            .kms
            .get(kms_name)
            .ok_or_else(|| DekError::UnknownKms(kms_name.to_string()))?;
        self.count("generate_dek");
        let pair = kms.generate_dek(&kek).await?;
        let prefix = format::encode_prefix(
            &KekLocator {
                kms: kms_name.to_string(),
                kek: pair.kek.clone(),
            },
            &pair.wrapped,
        )?;
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&pair.plaintext[..]));
        let mut start = [0u8; 16];
        rand::rng().fill_bytes(&mut start[4..]);
        self.inner.metrics.deks_generated.inc();
        tracing::debug!(kms = kms_name, kek = %pair.kek, "generated a new DEK");
        Ok(Arc::new(ActiveDek {
            cipher,
            value_aad: value_aad(&prefix),
            prefix,
            nonce_start: u128::from_be_bytes(start) & MASK96,
            used: AtomicU64::new(0),
            max: self.inner.cfg.max_encryptions,
            created: Instant::now(),
        }))
    }

    fn cache_insert(&self, prefix: Vec<u8>, cipher: Arc<Aes256Gcm>) {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(
                prefix,
                CachedDek {
                    cipher,
                    last_used: Instant::now(),
                },
            );
    }

    fn cache_get(&self, prefix: &[u8]) -> Option<Arc<Aes256Gcm>> {
        let mut cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        let idle = self.inner.cfg.cache_idle;
        let hit = cache.get_mut(prefix)?;
        if hit.last_used.elapsed() <= idle {
            hit.last_used = Instant::now();
            return Some(hit.cipher.clone());
        }
        cache.pop(prefix);
        None
    }

    /// The cipher for a DEK identified by its value prefix; unwraps through
    /// the KMS named in the prefix on a cache miss (once, however many
    /// callers miss at the same time).
    pub async fn decryptor(
        &self,
        prefix: &[u8],
        wrapped: &[u8],
    ) -> Result<Arc<Aes256Gcm>, DekError> {
        if let Some(c) = self.cache_get(prefix) {
            self.inner.metrics.dek_cache_hits.inc();
            return Ok(c);
        }
        let lock = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(prefix.to_vec())
            .or_default()
            .clone();
        let _g = lock.lock().await;
        if let Some(c) = self.cache_get(prefix) {
            self.inner.metrics.dek_cache_hits.inc();
            return Ok(c);
        }
        if let Some((at, e)) = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(prefix)
        {
            if at.elapsed() < FAIL_FAST {
                return Err(e.clone());
            }
        }
        self.inner.metrics.dek_cache_misses.inc();
        let res = self.unwrap(prefix, wrapped).await;
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(prefix);
        let mut failures = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match &res {
            Ok(c) => {
                failures.remove(prefix);
                drop(failures);
                self.cache_insert(prefix.to_vec(), c.clone());
            }
            Err(e) => {
                if failures.len() >= 1024 {
                    failures.retain(|_, (at, _)| at.elapsed() < FAIL_FAST);
                }
                failures.insert(prefix.to_vec(), (Instant::now(), e.clone()));
            }
        }
        res
    }

    async fn unwrap(&self, prefix: &[u8], wrapped: &[u8]) -> Result<Arc<Aes256Gcm>, DekError> {
        let loc = format::parse_locator(prefix)?;
        let kms = self
            .inner
            .kms
            .get(&loc.kms)
            .ok_or_else(|| DekError::UnknownKms(loc.kms.clone()))?;
        self.count("unwrap_dek");
        let dek = kms.unwrap_dek(&loc.kek, wrapped).await?;
        Ok(Arc::new(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(
            &dek[..],
        ))))
    }
}

/// Counts alias resolutions that reach the KMS (cache misses).
struct CountingKms<'a> {
    inner: &'a dyn strait_kms_core::Kms,
    mgr: &'a DekManager,
}

#[async_trait::async_trait]
impl strait_kms_core::Kms for CountingKms<'_> {
    async fn generate_dek(
        &self,
        kek: &KekRef,
    ) -> strait_kms_core::Result<strait_kms_core::DekPair> {
        self.inner.generate_dek(kek).await
    }
    async fn unwrap_dek(
        &self,
        kek: &KekRef,
        wrapped: &[u8],
    ) -> strait_kms_core::Result<zeroize::Zeroizing<[u8; 32]>> {
        self.inner.unwrap_dek(kek, wrapped).await
    }
    async fn resolve_alias(&self, alias: &str) -> strait_kms_core::Result<KekRef> {
        self.mgr.count("resolve_alias");
        self.inner.resolve_alias(alias).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_counter_wraps_at_96_bits_without_repeating_within_budget() {
        let dek = ActiveDek {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&[1u8; 32])),
            prefix: Bytes::new(),
            value_aad: vec![],
            nonce_start: MASK96 - 1,
            used: AtomicU64::new(0),
            max: 4,
            created: Instant::now(),
        };
        let n: Vec<_> = (0..4).map(|i| dek.nonce(i)).collect();
        let mut first = [0xffu8; 12];
        first[11] = 0xfe;
        assert_eq!(n[0], first);
        assert_eq!(n[1], [0xff; 12]);
        assert_eq!(n[2], [0u8; 12]);
        let set: std::collections::HashSet<_> = n.iter().collect();
        assert_eq!(set.len(), 4);
        assert_eq!(dek.reserve(3), Some((0, 3)));
        assert_eq!(dek.reserve(3), Some((3, 1)));
        assert_eq!(dek.reserve(1), None);
    }
}

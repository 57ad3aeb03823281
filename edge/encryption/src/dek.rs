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
use crate::federation::{Federator, Job};
use crate::format::{self, KekLocator, NONCE_LEN, PURPOSE_HEADER, PURPOSE_VALUE, TAG_LEN};
use crate::keys::{KeyIndex, Wanted, Wrap};
use crate::metrics::{EncryptionMetrics, OpLabel};
use crate::rules::KekSelection;

const MASK96: u128 = (1u128 << 96) - 1;

/// A DEK in use for encryption.
pub(crate) struct ActiveDek {
    cipher: Aes256Gcm,
    prefix: Bytes,
    value_aad: Aad,
    /// Random 96-bit start of the nonce counter; nonce i = start + i mod 2^96.
    nonce_start: u128,
    /// Nonce indices handed out.
    used: AtomicU64,
    /// Record values encrypted (nonces are reserved ahead, so `used` runs
    /// ahead of it); shared with the federator for its pending-records gauge.
    values: Arc<AtomicU64>,
    max: u64,
    created: Instant,
}

impl ActiveDek {
    /// The format version of values encrypted under this DEK.
    pub(crate) fn version(&self) -> u8 {
        self.prefix[0]
    }

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
    dek: Arc<ActiveDek>,
    next: u64,
    end: u64,
}

impl Lease {
    /// Length of an encrypted value for `n` plaintext bytes.
    pub fn sealed_len(&self, n: usize) -> usize {
        self.dek.sealed_len(n)
    }

    /// The format version of the values this lease encrypts.
    pub fn version(&self) -> u8 {
        self.dek.version()
    }

    /// Record that `n` record values were encrypted under this lease's DEK.
    pub fn count_values(&self, n: u64) {
        if n > 0 {
            self.dek.values.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The next nonce of this lease; `None` when the lease is used up.
    /// The next nonce of this lease and the DEK to use it with; `None`
    /// when the lease is used up.
    #[inline]
    pub fn next(&mut self) -> Option<([u8; NONCE_LEN], &ActiveDek)> {
        let n = self.take_nonce()?;
        Some((n, &self.dek))
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
        Some(seal(
            &self.dek,
            &nonce,
            self.dek.value_aad.as_slice(),
            plaintext,
        ))
    }

    /// Encrypt a header value, bound to its header key.
    pub fn seal_header(&mut self, key: &[u8], plaintext: &[u8]) -> Option<Bytes> {
        let nonce = self.take_nonce()?;
        let aad = self.dek.value_aad.for_header(key);
        Some(seal(&self.dek, &nonce, &aad, plaintext))
    }
}

/// The AES-256-GCM key for the values under one prefix (FORMAT.md).
///
/// v2: `HKDF-SHA256(salt = "strait.enc/v2", ikm = DEK, info = prefix)`. The
/// prefix (version, KEK reference, wrapped DEK) is bound through the key, so
/// record values need no associated data at all and cost exactly the GHASH
/// blocks of raw AES-GCM; changing any prefix byte derives another key and
/// fails the tag check. v1 (read only): the DEK itself, the prefix bound
/// through the AAD ([`Aad`]).
pub(crate) fn prefix_cipher(dek: &[u8; 32], prefix: &[u8]) -> Aes256Gcm {
    if prefix.first() == Some(&format::FORMAT_V1) {
        return Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(dek));
    }
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<sha2::Sha256>::new(Some(V2_SALT), dek)
        .expand(prefix, &mut key[..])
        .expect("HKDF-SHA256 yields up to 8160 bytes; 32 are asked for");
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key[..]))
}

const V2_SALT: &[u8] = b"strait.enc/v2";

/// The associated data under one prefix, per format version (FORMAT.md):
/// v2 record value: none; v2 header value: `0x01 | header key`;
/// v1 record value: `0x01 | 0x00 | SHA-256(prefix)`; v1 header value:
/// `0x01 | 0x01 | SHA-256(prefix) | header key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Aad {
    buf: [u8; 34],
    len: u8,
    version: u8,
}

impl Aad {
    /// The value AAD for a prefix; its first byte selects the version.
    pub fn for_prefix(prefix: &[u8]) -> Self {
        let version = prefix.first().copied().unwrap_or(format::FORMAT_CURRENT);
        let mut buf = [0u8; 34];
        let mut len = 0;
        if version == format::FORMAT_V1 {
            use sha2::Digest;
            buf[0] = version;
            buf[1] = PURPOSE_VALUE;
            buf[2..34].copy_from_slice(&sha2::Sha256::digest(prefix));
            len = 34;
        }
        Self { buf, len, version }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// AAD of a header value, bound to the header key so that it cannot be
    /// moved under another key or into the record value.
    pub fn for_header(&self, key: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(usize::from(self.len) + 1 + key.len());
        if self.version == format::FORMAT_V1 {
            aad.extend_from_slice(self.as_slice());
            aad[1] = PURPOSE_HEADER;
        } else {
            aad.push(PURPOSE_HEADER);
        }
        aad.extend_from_slice(key);
        aad
    }
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
            .encrypt_in_place_detached(
                Nonce::from_slice(nonce),
                self.value_aad.as_slice(),
                &mut buf[start..],
            )
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
    unwrapped: Instant,
}

/// Where federated DEKs are written and other realms' wraps are found.
#[derive(Clone)]
pub(crate) struct Federation {
    pub index: Arc<KeyIndex>,
    pub federator: Federator,
    /// How long a cold decryption waits for the keys topics to be read.
    pub catch_up_timeout: Duration,
}

/// One active DEK per KEK and set of other realms.
type SlotKey = (String, String, Vec<Wanted>);

struct Inner {
    kms: KmsSet,
    cfg: DekConfig,
    aliases: HashMap<String, AliasCache>,
    federation: Option<Federation>,
    /// KEK names (and key ids) crypto-shredded: refused both ways.
    shredded: std::collections::HashSet<String>,
    active: Mutex<HashMap<SlotKey, Slot>>,
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

/// The most nonces one lease reserves. Callers size leases from record
/// counts a client declares; the cap keeps a lying count from burning a
/// DEK's budget (it then only wastes up to this many nonces).
pub(crate) const MAX_LEASE: u64 = 4096;

/// After a failed background refresh, wait this long before trying again
/// so that a dead KMS is not hammered on every produce.
const REFRESH_RETRY: Duration = Duration::from_secs(5);
/// After a failed synchronous generation, fail further requests for the same
/// KEK fast for this long instead of queueing each behind a full retry cycle.
const FAIL_FAST: Duration = Duration::from_secs(1);

impl DekManager {
    pub fn new(
        kms: KmsSet,
        cfg: DekConfig,
        metrics: EncryptionMetrics,
        federation: Option<Federation>,
        shredded: &[String],
    ) -> Self {
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
                federation,
                shredded: shredded.iter().cloned().collect(),
                active: Mutex::new(HashMap::new()),
                cache: Mutex::new(LruCache::new(size)),
                inflight: Mutex::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
                cfg,
                metrics,
            }),
        }
    }

    /// Reserve up to `want` (at most [`MAX_LEASE`]) encryptions under the
    /// active DEK for (`kms`, `kek_name`), generating one if there is none
    /// usable.
    pub async fn lease(&self, sel: &KekSelection, want: u64) -> Result<Lease, DekError> {
        let key: SlotKey = (sel.kms.clone(), sel.kek.clone(), sel.also.clone());
        let topic = sel.topic.as_str();
        loop {
            let gen_lock = {
                let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                let slot = active.entry(key.clone()).or_default();
                if let Some(d) = slot.current.clone() {
                    if d.usable(self.inner.cfg.max_age) {
                        if let Some((start, n)) = d.reserve(want.clamp(1, MAX_LEASE)) {
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
                                    let topic = topic.to_string();
                                    handle
                                        .spawn(async move { this.refresh(key, topic, lock).await });
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
            match self.generate(&key, topic).await {
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

    async fn refresh(&self, key: SlotKey, topic: String, lock: Arc<tokio::sync::Mutex<()>>) {
        let _g = lock.lock().await;
        match self.generate(&key, &topic).await {
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

    fn install(&self, key: &SlotKey, dek: Arc<ActiveDek>, _: Option<()>) {
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

    fn refuse_shredded(&self, names: &[&str]) -> Result<(), DekError> {
        match names.iter().find(|n| self.inner.shredded.contains(**n)) {
            Some(n) => Err(DekError::Kms(KmsError::Denied(format!(
                "KEK {n:?} was crypto-shredded"
            )))),
            None => Ok(()),
        }
    }

    async fn generate(&self, key: &SlotKey, topic: &str) -> Result<Arc<ActiveDek>, DekError> {
        let (kms_name, kek_name, also) = (key.0.as_str(), key.1.as_str(), &key.2);
        self.refuse_shredded(&[kek_name])?;
        let kek = self.resolve(kms_name, kek_name).await?;
        self.refuse_shredded(&[kek.key_id.as_str()])?;
        let kms = self
            .inner
            .kms
            .get(kms_name)
            .ok_or_else(|| DekError::UnknownKms(kms_name.to_string()))?;
        self.count("generate_dek");
        let pair = kms.generate_dek(&kek).await?;
        let locator = KekLocator {
            kms: kms_name.to_string(),
            kek: pair.kek.clone(),
        };
        let realms: Vec<String> = also.iter().map(|w| w.realm.clone()).collect();
        let prefix = format::encode_prefix_for(&locator, &pair.wrapped, &realms)?;
        let cipher = prefix_cipher(&pair.plaintext, &prefix);
        let mut start = [0u8; 16];
        rand::rng().fill_bytes(&mut start[4..]);
        self.inner.metrics.deks_generated.inc();
        tracing::debug!(kms = kms_name, kek = %pair.kek, "generated a new DEK");
        let values = Arc::new(AtomicU64::new(0));
        match &self.inner.federation {
            // Every DEK gets its origin entry, so a realm added later can be
            // given a wrap of it without touching the data.
            Some(f) => f.federator.submit(Job {
                dek: format::dek_ref(&prefix),
                origin: Wrap {
                    locator,
                    wrapped: pair.wrapped.clone(),
                },
                topic: topic.to_string(),
                wanted: also.clone(),
                plaintext: (!also.is_empty()).then(|| pair.plaintext.clone()),
                encrypted: Some(values.clone()),
            }),
            None if !also.is_empty() => tracing::warn!(
                kms = kms_name,
                "a rule wraps DEKs for other realms but this virtual cluster has no keys topic; other realms decrypt its records only by remote unwrap"
            ),
            None => {}
        }
        Ok(Arc::new(ActiveDek {
            cipher,
            value_aad: Aad::for_prefix(&prefix),
            prefix,
            nonce_start: u128::from_be_bytes(start) & MASK96,
            used: AtomicU64::new(0),
            values,
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
                    unwrapped: Instant::now(),
                },
            );
    }

    fn cache_get(&self, prefix: &[u8]) -> Option<Arc<Aes256Gcm>> {
        let mut cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        let idle = self.inner.cfg.cache_idle;
        let hit = cache.get_mut(prefix)?;
        if hit.last_used.elapsed() <= idle && hit.unwrapped.elapsed() <= self.inner.cfg.cache_ttl {
            hit.last_used = Instant::now();
            return Some(hit.cipher.clone());
        }
        cache.pop(prefix);
        None
    }

    /// The cipher for a DEK identified by its value prefix; unwraps through
    /// the KMS named in the prefix on a cache miss (once, however many
    /// callers miss at the same time).
    /// `realms`: the realms this edge unwraps the topic's DEKs with (its
    /// rule's realm and `also_wrap_for`), preferred over the record's own
    /// realm when that is another site's.
    pub async fn decryptor(
        &self,
        prefix: &[u8],
        wrapped: &[u8],
        realms: &[String],
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
        // Every way out removes the entry: one left behind per prefix that
        // was answered from the cache or the failure list kept a map entry
        // per distinct forged prefix a topic holds, forever.
        let done = || {
            self.inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(prefix);
        };
        if let Some(c) = self.cache_get(prefix) {
            done();
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
                done();
                return Err(e.clone());
            }
        }
        self.inner.metrics.dek_cache_misses.inc();
        let res = self.unwrap(prefix, wrapped, realms).await;
        done();
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

    /// Unwrap in this order: the record's own wrap when its realm is one of
    /// `realms` (or nothing else is known); the DEK's wraps for `realms` from
    /// the keys topics; the record's own realm again as a remote unwrap (a
    /// `broker:` KMS of that name reaching the owning site).
    async fn unwrap(
        &self,
        prefix: &[u8],
        wrapped: &[u8],
        realms: &[String],
    ) -> Result<Arc<Aes256Gcm>, DekError> {
        let loc = format::parse_locator(prefix)?;
        self.refuse_shredded(&[loc.kek.key_id.as_str()])?;
        let federation = match &self.inner.federation {
            Some(f) if !realms.is_empty() && !realms.contains(&loc.kms) => f,
            _ => return self.unwrap_with(&loc, wrapped, prefix).await,
        };
        let dek_ref = format::dek_ref(prefix);
        if !federation.index.is_caught_up()
            && !federation
                .index
                .wait_caught_up(federation.catch_up_timeout)
                .await
        {
            tracing::warn!(
                "the keys topics were not read to their end within {:?}; trying without them",
                federation.catch_up_timeout
            );
        }
        let mut last: Option<DekError> = None;
        for realm in realms {
            let Some(w) = federation.index.wrap_for(&dek_ref, realm) else {
                continue;
            };
            if let Err(e) = self.refuse_shredded(&[w.locator.kek.key_id.as_str()]) {
                last = Some(e);
                continue;
            }
            match self.unwrap_with(&w.locator, &w.wrapped, prefix).await {
                Ok(c) => {
                    tracing::debug!(%realm, "DEK unwrapped through its wrap from the keys topic");
                    return Ok(c);
                }
                Err(e) => {
                    tracing::warn!(%realm, error = %e, "cannot unwrap a DEK through its wrap for this realm");
                    last = Some(e);
                }
            }
        }
        if self.inner.kms.get(&loc.kms).is_some() {
            tracing::debug!(kms = %loc.kms, "no wrap for this site's realms: unwrapping through the record's own realm");
            return self.unwrap_with(&loc, wrapped, prefix).await;
        }
        if let Some(e) = last {
            return Err(e);
        }
        let owed: Vec<String> = format::parse_realms(prefix)?
            .into_iter()
            .filter(|r| realms.contains(r))
            .collect();
        if !owed.is_empty() {
            // The origin wraps this DEK for us: its wrap is not here yet (the
            // realm was down, or the keys topic lags behind the data).
            return Err(DekError::Kms(KmsError::Unavailable(format!(
                "the wrap of this DEK for {} has not reached the keys topics yet, and KMS {:?} (the record's own realm) is not configured here",
                owed.join(", "),
                loc.kms
            ))));
        }
        Err(DekError::Kms(KmsError::NotFound(format!(
            "this DEK has no wrap for {} and KMS {:?} (the record's own realm) is not configured here",
            realms.join(", "),
            loc.kms
        ))))
    }

    async fn unwrap_with(
        &self,
        loc: &KekLocator,
        wrapped: &[u8],
        prefix: &[u8],
    ) -> Result<Arc<Aes256Gcm>, DekError> {
        let kms = self
            .inner
            .kms
            .get(&loc.kms)
            .ok_or_else(|| DekError::UnknownKms(loc.kms.clone()))?;
        self.count("unwrap_dek");
        let dek = kms.unwrap_dek(&loc.kek, wrapped).await?;
        Ok(Arc::new(prefix_cipher(&dek, prefix)))
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

    /// Found by fuzzing (edge/fuzz `encryption_records`, RSS growing without
    /// bound): a lookup answered from the failure list (or the cache) left
    /// its in-flight entry behind, one per distinct forged prefix a topic
    /// holds and a consumer fetched twice within a second.
    #[tokio::test]
    async fn answered_lookups_leave_no_in_flight_entry() {
        let keyring = std::sync::Arc::new(strait_kms_core::local::LocalKeyring::in_memory());
        let deks = DekManager::new(
            KmsSet::new().with("vault", keyring),
            DekConfig::default(),
            EncryptionMetrics::new(&mut prometheus_client::registry::Registry::default()),
            None,
            &[],
        );
        for n in 0..50u8 {
            let mut prefix = golden_prefix(format::FORMAT_V2).to_vec();
            prefix.push(n);
            for _ in 0..3 {
                assert!(deks.decryptor(&prefix, b"forged", &[]).await.is_err());
            }
        }
        assert!(deks.inner.inflight.lock().unwrap().is_empty());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn golden_prefix(version: u8) -> Bytes {
        let loc = KekLocator {
            kms: "vault".into(),
            kek: KekRef::with_version("orders", "3"),
        };
        let mut p = format::encode_prefix(&loc, b"vault:v3:wrapped")
            .unwrap()
            .to_vec();
        p[0] = version;
        Bytes::from(p)
    }

    /// Known answers computed outside Rust (Python `cryptography`: HKDF and
    /// AESGCM, with keys and AAD built as FORMAT.md describes), so a change to
    /// the key derivation, the AAD or the value layout cannot go unnoticed.
    #[test]
    fn golden_vectors_v1_and_v2() {
        let dek = [0x42u8; 32];
        let nonce: [u8; NONCE_LEN] = core::array::from_fn(|i| i as u8);
        let cases = [
            (
                format::FORMAT_V1,
                "76aae3bcd858d26cf26a2076bffd2d5e51e9a118a164be53c8ea74a5627612453dab41e4",
                "71ef8739bd92c527afe02a6760b7446b8efa",
            ),
            (
                format::FORMAT_V2,
                "89616d567ca0e01b1add0c4932d6cc32a5216a96c80f46eb7c3bd82620f960a7e2ff974a",
                "8e243e89cac574b6ab18c2b4e6ea648a86eb",
            ),
        ];
        for (version, value_ct, header_ct) in cases {
            let prefix = golden_prefix(version);
            assert_eq!(
                hex(&prefix),
                format!("{version:02x}0010057661756c7400066f7264657273013300107661756c743a76333a77726170706564")
            );
            let cipher = prefix_cipher(&dek, &prefix);
            let aad = Aad::for_prefix(&prefix);
            assert_eq!(aad.as_slice().len(), if version == 1 { 34 } else { 0 });
            let seal = |aad: &[u8], pt: &[u8]| {
                let mut buf = pt.to_vec();
                let tag = cipher
                    .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf)
                    .unwrap();
                buf.extend_from_slice(&tag);
                hex(&buf)
            };
            assert_eq!(
                seal(aad.as_slice(), b"strait golden vector"),
                value_ct,
                "v{version} value"
            );
            assert_eq!(
                seal(&aad.for_header(b"trace"), b"t1"),
                header_ct,
                "v{version} header"
            );
        }
        // What the encrypting path writes is the v2 vector.
        let prefix = golden_prefix(format::FORMAT_CURRENT);
        let active = ActiveDek {
            cipher: prefix_cipher(&dek, &prefix),
            value_aad: Aad::for_prefix(&prefix),
            prefix,
            nonce_start: 0,
            used: AtomicU64::new(0),
            values: Arc::new(AtomicU64::new(0)),
            max: 1,
            created: Instant::now(),
        };
        let mut out = BytesMut::new();
        active.seal_value_into(&mut out, &nonce, b"strait golden vector");
        assert_eq!(out.len(), active.sealed_len(20));
        let tail = &out[active.prefix.len()..];
        assert_eq!(&tail[..NONCE_LEN], &nonce);
        assert_eq!(hex(&tail[NONCE_LEN..]), cases[1].1);

        // Every prefix byte is bound: flip any one and the value no longer opens.
        let sealed = tail[NONCE_LEN..].to_vec();
        let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        for i in 1..active.prefix.len() {
            let mut altered = active.prefix.to_vec();
            altered[i] ^= 0x01;
            let mut buf = ct.to_vec();
            let opened = prefix_cipher(&dek, &altered).decrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                Aad::for_prefix(&altered).as_slice(),
                &mut buf,
                aes_gcm::Tag::from_slice(tag),
            );
            assert!(opened.is_err(), "prefix byte {i} is not authenticated");
        }
    }

    #[test]
    fn nonce_counter_wraps_at_96_bits_without_repeating_within_budget() {
        let dek = ActiveDek {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&[1u8; 32])),
            prefix: Bytes::new(),
            value_aad: Aad::for_prefix(&[format::FORMAT_CURRENT]),
            nonce_start: MASK96 - 1,
            used: AtomicU64::new(0),
            values: Arc::new(AtomicU64::new(0)),
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

//! Federation: giving each DEK a wrap in every realm of its rule, in the
//! background, so produce never waits on a remote realm.
//!
//! When the DEK manager makes a DEK whose rule has `also_wrap_for`, it hands
//! the DEK to the [`Federator`]. The federator writes the DEK's origin entry
//! (its own realm's wrap and the realms it is owed to) to the keys topic,
//! then asks each other realm's KMS to wrap the same DEK and writes each wrap.
//! A realm that is down is retried with backoff until it answers; the count
//! of DEKs still owed a wrap is the `federation_pending_wraps{realm}` gauge.
//! Owed wraps survive a restart of the edge: they are found again in the
//! keys topic (origin entries without the wrap) and made from the origin
//! wrap, unwrapped through the origin realm.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use strait_kms_core::{KekRef, KmsSet, DEK_LEN};
use tokio::sync::mpsc;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::keys::{self, DekRef, KeyEntry, KeyIndex, KeyLog, Wanted, Wrap};

/// Backoff between attempts at a realm that did not answer.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the keys topic is searched for wraps owed by DEKs this edge
/// does not hold (made before a restart, or by another edge of the cluster).
const RECOVERY_INTERVAL: Duration = Duration::from_secs(15);
/// DEKs queued for federation at once; beyond that a DEK is completed by
/// the recovery scan instead (from the keys topic), never dropped.
const QUEUE: usize = 1024;

/// A DEK to federate.
pub(crate) struct Job {
    pub dek: DekRef,
    pub origin: Wrap,
    pub topic: String,
    pub wanted: Vec<Wanted>,
    /// The plaintext DEK when the edge just made it; `None`: unwrap the
    /// origin wrap first.
    pub plaintext: Option<Zeroizing<[u8; DEK_LEN]>>,
    /// Values encrypted under the DEK so far (for the pending-records gauge).
    pub encrypted: Option<Arc<AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WrapLabel {
    realm: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RealmLabel {
    realm: String,
}

#[derive(Clone)]
struct Metrics {
    wraps: Family<WrapLabel, Counter>,
    pending_records: Family<RealmLabel, Gauge>,
}

/// Hands DEKs to the background federation task.
#[derive(Clone)]
pub(crate) struct Federator {
    tx: mpsc::Sender<Job>,
}

impl Federator {
    /// Start the federation task on the current runtime.
    pub fn start(
        kms: KmsSet,
        index: Arc<KeyIndex>,
        log: Arc<dyn KeyLog>,
        desired: Desired,
        registry: &mut Registry,
    ) -> Self {
        let metrics = Metrics {
            wraps: Family::default(),
            pending_records: Family::default(),
        };
        registry.register(
            "federation_wraps",
            "Wraps of DEKs for other realms, by realm and outcome",
            metrics.wraps.clone(),
        );
        registry.register(
            "federation_pending_records",
            "Values encrypted by this edge under DEKs still missing their wrap for a realm",
            metrics.pending_records.clone(),
        );
        let (tx, rx) = mpsc::channel(QUEUE);
        let worker = Worker {
            kms,
            index,
            log,
            metrics,
            jobs: HashMap::new(),
            reported: HashSet::new(),
            desired,
        };
        tokio::spawn(worker.run(rx));
        Self { tx }
    }

    /// Queue a DEK; never waits (a full queue leaves it to the recovery scan).
    pub fn submit(&self, job: Job) {
        if let Err(e) = self.tx.try_send(job) {
            tracing::warn!(error = %e, "federation queue full; the DEK is completed from the keys topic later");
        }
    }
}

struct Pending {
    job: Job,
    origin_written: bool,
    attempts: u32,
    next_try: Instant,
}

struct Worker {
    kms: KmsSet,
    index: Arc<KeyIndex>,
    log: Arc<dyn KeyLog>,
    metrics: Metrics,
    jobs: HashMap<DekRef, Pending>,
    reported: HashSet<String>,
    desired: Desired,
}

/// The realms a DEK of (topic, origin realm) is owed a wrap in under the
/// current rules: the rule's `also_wrap_for` when the rule makes its DEKs
/// in that realm, else none (another site's DEKs are not this edge's).
pub(crate) type Desired = Arc<dyn Fn(&str, &str) -> Vec<Wanted> + Send + Sync>;

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_recovery: Option<Instant> = None;
        loop {
            tokio::select! {
                job = rx.recv() => {
                    let Some(job) = job else { return };
                    self.jobs.insert(job.dek, Pending {
                        job,
                        origin_written: false,
                        attempts: 0,
                        next_try: Instant::now(),
                    });
                }
                _ = tick.tick() => {}
            }
            if self.index.is_caught_up()
                && last_recovery.is_none_or(|t| t.elapsed() >= RECOVERY_INTERVAL)
            {
                last_recovery = Some(Instant::now());
                self.recover();
            }
            self.work().await;
            self.report();
        }
    }

    /// Wraps owed by DEKs of the own keys topic that are not held here: made
    /// before a restart, by another edge of the cluster, or owed to a realm
    /// added to the rule of their topic since.
    fn recover(&mut self) {
        for d in self.index.own_deks() {
            if self.jobs.contains_key(&d.dek) {
                continue;
            }
            let mut missing = d.missing;
            for w in (self.desired)(&d.topic, &d.origin.locator.kms) {
                if !d.present.contains(&w.realm) && !missing.iter().any(|m| m.realm == w.realm) {
                    missing.push(w);
                }
            }
            if missing.is_empty() {
                continue;
            }
            self.jobs.entry(d.dek).or_insert_with(|| Pending {
                job: Job {
                    dek: d.dek,
                    origin: d.origin,
                    topic: d.topic,
                    wanted: missing,
                    plaintext: None,
                    encrypted: None,
                },
                origin_written: true,
                attempts: 0,
                next_try: Instant::now(),
            });
        }
    }

    async fn work(&mut self) {
        let now = Instant::now();
        let due: Vec<DekRef> = self
            .jobs
            .iter()
            .filter(|(_, p)| p.next_try <= now)
            .map(|(d, _)| *d)
            .collect();
        for dek in due {
            let Some(mut p) = self.jobs.remove(&dek) else {
                continue;
            };
            if self.attempt(&mut p).await {
                continue; // done: the plaintext DEK is wiped as `p` drops
            }
            p.attempts += 1;
            let backoff = MIN_BACKOFF
                .saturating_mul(1 << p.attempts.min(5))
                .min(MAX_BACKOFF);
            p.next_try = Instant::now() + backoff;
            self.jobs.insert(dek, p);
        }
    }

    /// One pass over a DEK; true when nothing is owed any more.
    async fn attempt(&mut self, p: &mut Pending) -> bool {
        let dek = p.job.dek;
        if !p.origin_written {
            let entry = KeyEntry::Origin {
                wrap: p.job.origin.clone(),
                wanted: p.job.wanted.clone(),
                topic: p.job.topic.clone(),
            };
            if !self.write(&dek, &p.job.origin.locator.kms, &entry).await {
                return false;
            }
            p.origin_written = true;
        }
        p.job
            .wanted
            .retain(|w| self.index.wrap_for(&dek, &w.realm).is_none());
        if p.job.wanted.is_empty() {
            return true;
        }
        if p.job.plaintext.is_none() {
            match self.unwrap_origin(&p.job.origin).await {
                Ok(pt) => p.job.plaintext = Some(pt),
                Err(e) => {
                    tracing::warn!(dek = %keys::hex(&dek), realm = %p.job.origin.locator.kms, error = %e, "cannot unwrap a DEK through its own realm to federate it; retrying");
                    return false;
                }
            }
        }
        let Some(plaintext) = p.job.plaintext.clone() else {
            return false;
        };
        let mut still = Vec::new();
        for w in std::mem::take(&mut p.job.wanted) {
            match self.wrap_for(&w, &plaintext).await {
                Ok(wrap) => {
                    if !self.write(&dek, &w.realm, &KeyEntry::Wrapped(wrap)).await {
                        still.push(w);
                        continue;
                    }
                    self.count(&w.realm, "success");
                    tracing::info!(dek = %keys::hex(&dek), realm = %w.realm, "DEK wrapped for another realm");
                }
                Err(e) => {
                    self.count(&w.realm, e.kind());
                    if p.attempts == 0 || p.attempts.is_power_of_two() {
                        tracing::warn!(dek = %keys::hex(&dek), realm = %w.realm, error = %e, attempts = p.attempts + 1, "cannot wrap a DEK for another realm yet; produce goes on, that realm decrypts these records once it answers");
                    }
                    still.push(w);
                }
            }
        }
        p.job.wanted = still;
        p.job.wanted.is_empty()
    }

    async fn unwrap_origin(
        &self,
        origin: &Wrap,
    ) -> Result<Zeroizing<[u8; DEK_LEN]>, strait_kms_core::KmsError> {
        let kms = self.kms.get(&origin.locator.kms).ok_or_else(|| {
            strait_kms_core::KmsError::NotFound(format!(
                "KMS {:?} is not configured",
                origin.locator.kms
            ))
        })?;
        kms.unwrap_dek(&origin.locator.kek, &origin.wrapped).await
    }

    async fn wrap_for(
        &self,
        w: &Wanted,
        plaintext: &[u8; DEK_LEN],
    ) -> Result<Wrap, strait_kms_core::KmsError> {
        let kms = self.kms.get(&w.realm).ok_or_else(|| {
            strait_kms_core::KmsError::NotFound(format!("KMS {:?} is not configured", w.realm))
        })?;
        let wrapped = kms.wrap_dek(&KekRef::new(w.kek.clone()), plaintext).await?;
        Ok(Wrap {
            locator: crate::format::KekLocator {
                kms: w.realm.clone(),
                kek: wrapped.kek,
            },
            wrapped: wrapped.wrapped,
        })
    }

    /// Write one entry; applied to the index at once so the gauges move
    /// without waiting for the entry to be read back.
    async fn write(&self, dek: &DekRef, realm: &str, entry: &KeyEntry) -> bool {
        let value = match keys::encode_value(entry) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(dek = %keys::hex(dek), %realm, error = %e, "cannot encode a keys-topic entry");
                return false;
            }
        };
        let key = keys::record_key(dek, realm);
        match self
            .log
            .publish(vec![(key.clone(), Some(value.clone()))])
            .await
        {
            Ok(()) => {
                self.index.apply(true, &key, Some(&value));
                true
            }
            Err(e) => {
                tracing::warn!(dek = %keys::hex(dek), %realm, error = %e, "cannot write to the keys topic yet; retrying");
                false
            }
        }
    }

    fn count(&self, realm: &str, outcome: &'static str) {
        self.metrics
            .wraps
            .get_or_create(&WrapLabel {
                realm: realm.to_string(),
                outcome,
            })
            .inc();
    }

    fn report(&mut self) {
        let mut by_realm: HashMap<&str, u64> = HashMap::new();
        for p in self.jobs.values() {
            let n = p
                .job
                .encrypted
                .as_ref()
                .map_or(0, |c| c.load(Ordering::Relaxed));
            for w in &p.job.wanted {
                *by_realm.entry(&w.realm).or_default() += n;
            }
        }
        // Realms with nothing pending any more report zero.
        for realm in &self.reported {
            if !by_realm.contains_key(realm.as_str()) {
                self.metrics
                    .pending_records
                    .get_or_create(&RealmLabel {
                        realm: realm.clone(),
                    })
                    .set(0);
            }
        }
        for (realm, n) in &by_realm {
            self.metrics
                .pending_records
                .get_or_create(&RealmLabel {
                    realm: realm.to_string(),
                })
                .set(*n as i64);
        }
        let new: Vec<String> = by_realm.keys().map(|r| r.to_string()).collect();
        self.reported.extend(new);
    }
}

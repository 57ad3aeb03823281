//! Retries with exponential backoff and jitter, per-call timeouts, and
//! per-operation metrics around any [`Kms`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rand::Rng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{DekPair, KekRef, Kms, KmsError, Result, WrappedDek, DEK_LEN};

/// How [`RetryingKms`] retries. Defaults follow Kroxylicious: 3 attempts,
/// backoff from 0.5 s to 5 s; each attempt bounded by `timeout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub attempts: u32,
    #[serde(with = "humantime_serde")]
    pub min_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `retry` (1-based): exponential, capped,
    /// with jitter in [d/2, d] so that many edges do not retry in lockstep.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .min_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
        let d = exp.min(self.max_backoff);
        let nanos = d.as_nanos() as u64;
        if nanos < 2 {
            return d;
        }
        Duration::from_nanos(rand::rng().random_range(nanos / 2..=nanos))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    kms: String,
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpKindLabels {
    kms: String,
    operation: &'static str,
}

/// KMS metrics, registered into the registry the caller passes in.
#[derive(Clone)]
pub struct KmsMetrics {
    attempts: Family<OpLabels, Counter>,
    outcomes: Family<OpLabels, Counter>,
    duration: Family<OpKindLabels, Histogram>,
}

impl KmsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let attempts = Family::<OpLabels, Counter>::default();
        let outcomes = Family::<OpLabels, Counter>::default();
        let duration = Family::<OpKindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        registry.register(
            "strait_kms_operation_attempts",
            "KMS call attempts (each retry counts) by operation and outcome",
            attempts.clone(),
        );
        registry.register(
            "strait_kms_operations",
            "KMS operations after retries and failover, by operation and final outcome",
            outcomes.clone(),
        );
        registry.register(
            "strait_kms_operation_duration_seconds",
            "Duration of KMS operations including retries",
            duration.clone(),
        );
        Self {
            attempts,
            outcomes,
            duration,
        }
    }

    fn labels(kms: &str, operation: &'static str, res: &Result<(), &KmsError>) -> OpLabels {
        OpLabels {
            kms: kms.to_string(),
            operation,
            outcome: match res {
                Ok(()) => "success",
                Err(e) => e.kind(),
            },
        }
    }

    /// Final outcomes recorded for one KMS/operation/outcome (tests, dashboards).
    pub fn outcome_count(&self, kms: &str, operation: &'static str, outcome: &'static str) -> u64 {
        self.outcomes
            .get_or_create(&OpLabels {
                kms: kms.to_string(),
                operation,
                outcome,
            })
            .get()
    }

    /// Attempts recorded for one KMS/operation/outcome.
    pub fn attempt_count(&self, kms: &str, operation: &'static str, outcome: &'static str) -> u64 {
        self.attempts
            .get_or_create(&OpLabels {
                kms: kms.to_string(),
                operation,
                outcome,
            })
            .get()
    }
}

/// Wraps a [`Kms`]: bounded attempts on [`KmsError::Unavailable`] with
/// exponential backoff and jitter, a timeout per attempt (a timeout counts as
/// Unavailable), and metrics per operation and outcome.
pub struct RetryingKms {
    name: String,
    inner: Arc<dyn Kms>,
    policy: RetryPolicy,
    metrics: Option<KmsMetrics>,
}

impl RetryingKms {
    pub fn new(
        name: impl Into<String>,
        inner: Arc<dyn Kms>,
        policy: RetryPolicy,
        metrics: Option<KmsMetrics>,
    ) -> Self {
        Self {
            name: name.into(),
            inner,
            policy,
            metrics,
        }
    }

    async fn run<'a, T, F, Fut>(&'a self, operation: &'static str, f: F) -> Result<T>
    where
        F: Fn(&'a dyn Kms) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + 'a,
    {
        let started = Instant::now();
        let attempts = self.policy.attempts.max(1);
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let res = match tokio::time::timeout(self.policy.timeout, f(self.inner.as_ref())).await
            {
                Ok(r) => r,
                Err(_) => Err(KmsError::Unavailable(format!(
                    "{operation} timed out after {:?}",
                    self.policy.timeout
                ))),
            };
            if let Some(m) = &self.metrics {
                m.attempts
                    .get_or_create(&KmsMetrics::labels(
                        &self.name,
                        operation,
                        &res.as_ref().map(|_| ()),
                    ))
                    .inc();
            }
            match res {
                Err(e) if e.is_retriable() && attempt < attempts => {
                    let delay = self.policy.backoff(attempt);
                    tracing::debug!(kms = %self.name, operation, attempt, ?delay, error = %e, "KMS call failed, retrying");
                    tokio::time::sleep(delay).await;
                }
                other => break other,
            }
        };
        if let Some(m) = &self.metrics {
            m.outcomes
                .get_or_create(&KmsMetrics::labels(
                    &self.name,
                    operation,
                    &result.as_ref().map(|_| ()),
                ))
                .inc();
            m.duration
                .get_or_create(&OpKindLabels {
                    kms: self.name.clone(),
                    operation,
                })
                .observe(started.elapsed().as_secs_f64());
        }
        if let Err(e) = &result {
            tracing::warn!(kms = %self.name, operation, attempts = attempt, error = %e, "KMS operation failed");
        }
        result
    }
}

#[async_trait]
impl Kms for RetryingKms {
    async fn generate_dek(&self, kek: &KekRef) -> Result<DekPair> {
        self.run("generate_dek", |k| k.generate_dek(kek)).await
    }

    async fn unwrap_dek(&self, kek: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
        self.run("unwrap_dek", |k| k.unwrap_dek(kek, wrapped)).await
    }

    async fn resolve_alias(&self, alias: &str) -> Result<KekRef> {
        self.run("resolve_alias", |k| k.resolve_alias(alias)).await
    }

    async fn wrap_dek(&self, kek: &KekRef, plaintext: &[u8; DEK_LEN]) -> Result<WrappedDek> {
        self.run("wrap_dek", |k| k.wrap_dek(kek, plaintext)).await
    }

    // Retried like the others: repeating a shred never brings a key back.
    // An attempt that timed out after the KMS acted makes the retry find
    // the key gone (Vault, local: NotFound) or already pending deletion
    // (AWS: success).
    async fn shred_kek(&self, kek: &KekRef) -> Result<()> {
        self.run("shred_kek", |k| k.shred_kek(kek)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails with Unavailable `fail` times, then answers.
    struct Flaky {
        fail: u32,
        calls: AtomicU32,
    }

    #[async_trait]
    impl Kms for Flaky {
        async fn generate_dek(&self, _: &KekRef) -> Result<DekPair> {
            Err(KmsError::Invalid("unused".into()))
        }
        async fn unwrap_dek(&self, _: &KekRef, _: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
            Err(KmsError::NotFound("k".into()))
        }
        async fn resolve_alias(&self, alias: &str) -> Result<KekRef> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.fail {
                Err(KmsError::Unavailable("down".into()))
            } else {
                Ok(KekRef::new(alias))
            }
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn retries_unavailable_then_succeeds_and_counts() {
        let mut reg = Registry::default();
        let metrics = KmsMetrics::new(&mut reg);
        let inner = Arc::new(Flaky {
            fail: 2,
            calls: AtomicU32::new(0),
        });
        let k = RetryingKms::new("t", inner.clone(), fast(), Some(metrics.clone()));
        assert_eq!(k.resolve_alias("a").await.unwrap(), KekRef::new("a"));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
        assert_eq!(
            metrics.attempt_count("t", "resolve_alias", "unavailable"),
            2
        );
        assert_eq!(metrics.outcome_count("t", "resolve_alias", "success"), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("strait_kms_operations_total"), "{text}");
    }

    #[tokio::test]
    async fn gives_up_after_attempts_and_does_not_retry_not_found() {
        let inner = Arc::new(Flaky {
            fail: 10,
            calls: AtomicU32::new(0),
        });
        let k = RetryingKms::new("t", inner.clone(), fast(), None);
        assert!(matches!(
            k.resolve_alias("a").await,
            Err(KmsError::Unavailable(_))
        ));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
        let before = inner.calls.load(Ordering::SeqCst);
        assert!(matches!(
            k.unwrap_dek(&KekRef::new("a"), b"x").await,
            Err(KmsError::NotFound(_))
        ));
        assert_eq!(inner.calls.load(Ordering::SeqCst), before);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy::default();
        for retry in 1..10 {
            let d = p.backoff(retry);
            assert!(d <= p.max_backoff, "{d:?}");
            assert!(d >= Duration::from_millis(250), "{d:?}");
        }
    }
}

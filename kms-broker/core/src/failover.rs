//! Failover across several endpoints of one KMS (HA): calls go to the last
//! endpoint that answered; on [`KmsError::Unavailable`] the next endpoint is
//! tried, so one dead endpoint costs one failed attempt, not a retry cycle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::{DekPair, KekRef, Kms, KmsError, Result, WrappedDek, DEK_LEN};

pub struct FailoverKms {
    endpoints: Vec<(String, Arc<dyn Kms>)>,
    preferred: AtomicUsize,
}

impl FailoverKms {
    /// `endpoints` pairs a label (the address, for logs) with a provider
    /// bound to that endpoint. Must not be empty.
    pub fn new(endpoints: Vec<(String, Arc<dyn Kms>)>) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(KmsError::Invalid("no KMS endpoints configured".into()));
        }
        Ok(Self {
            endpoints,
            preferred: AtomicUsize::new(0),
        })
    }

    /// Index of the endpoint calls currently start with.
    pub fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed)
    }

    async fn run<'a, T, F, Fut>(&'a self, f: F) -> Result<T>
    where
        F: Fn(&'a dyn Kms) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + 'a,
    {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let (label, kms) = &self.endpoints[idx];
            match f(kms.as_ref()).await {
                Err(e) if e.is_retriable() => {
                    tracing::warn!(endpoint = %label, error = %e, "KMS endpoint unavailable, failing over");
                    last = Some(e);
                }
                other => {
                    if idx != start {
                        self.preferred.store(idx, Ordering::Relaxed);
                        tracing::info!(endpoint = %label, "KMS failover: now preferring this endpoint");
                    }
                    return other;
                }
            }
        }
        Err(last.unwrap_or_else(|| KmsError::Unavailable("no endpoint answered".into())))
    }
}

#[async_trait]
impl Kms for FailoverKms {
    async fn generate_dek(&self, kek: &KekRef) -> Result<DekPair> {
        self.run(|k| k.generate_dek(kek)).await
    }
    async fn unwrap_dek(&self, kek: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
        self.run(|k| k.unwrap_dek(kek, wrapped)).await
    }
    async fn resolve_alias(&self, alias: &str) -> Result<KekRef> {
        self.run(|k| k.resolve_alias(alias)).await
    }
    async fn wrap_dek(&self, kek: &KekRef, plaintext: &[u8; DEK_LEN]) -> Result<WrappedDek> {
        self.run(|k| k.wrap_dek(kek, plaintext)).await
    }
    // Endpoints of one KMS share its keys, so a shred that one endpoint
    // could not be reached for is done through the next one.
    async fn shred_kek(&self, kek: &KekRef) -> Result<()> {
        self.run(|k| k.shred_kek(kek)).await
    }
}

//! KMS providers and their assembly from config.
//!
//! The [`Kms`] trait, errors, retry/failover wrappers and the
//! development-only local keyring live in `strait-kms-core` (re-exported
//! here); this module adds the providers with heavy dependencies.

pub mod aws;
pub mod vault;

use std::sync::Arc;

use prometheus_client::registry::Registry;
use strait_kms_core::config::KmsConfig;
pub use strait_kms_core::local::LocalKeyring;
pub use strait_kms_core::{
    DekPair, FailoverKms, KekRef, Kms, KmsError, KmsMetrics, KmsSet, Result, RetryPolicy,
    RetryingKms,
};

use crate::client::{BrokerClient, OwnIdentity};

/// The AWS SDK pulls rustls with aws-lc-rs while tonic/Strait use ring, so
/// rustls cannot pick a process-wide provider by itself and would panic on
/// the first TLS config built without one. Install ring unless the process
/// already chose a provider.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Build one configured KMS: a provider per endpoint, failover between
/// endpoints when there are several, wrapped in retries/timeouts/metrics.
/// A broker entry with `identity: svid` is refused (this process has no SVID).
pub async fn build_kms(cfg: &KmsConfig, metrics: Option<KmsMetrics>) -> Result<Arc<dyn Kms>> {
    build_kms_with(cfg, metrics, None).await
}

/// [`build_kms`] for a process with its own SVID (`identity`), which
/// broker entries with `identity: svid` present.
pub async fn build_kms_with(
    cfg: &KmsConfig,
    metrics: Option<KmsMetrics>,
    identity: Option<&OwnIdentity>,
) -> Result<Arc<dyn Kms>> {
    ensure_crypto_provider();
    let timeout = cfg.retry.timeout;
    let mut endpoints: Vec<(String, Arc<dyn Kms>)> = Vec::new();
    if let Some(v) = &cfg.vault {
        let token = std::env::var(&v.token_env).map_err(|_| {
            KmsError::Invalid(format!(
                "kms {}: environment variable {} (vault token) is not set",
                cfg.name, v.token_env
            ))
        })?;
        for addr in v.all_addresses() {
            let p = vault::VaultTransit::new(&addr, &token, &v.mount, timeout)?;
            endpoints.push((addr, Arc::new(p)));
        }
    } else if let Some(a) = &cfg.aws_kms {
        let eps = a.all_endpoints();
        if eps.is_empty() {
            endpoints.push((
                "aws-default".into(),
                Arc::new(aws::AwsKms::new(None, &a.region, timeout).await),
            ));
        }
        for ep in eps {
            let p = aws::AwsKms::new(Some(&ep), &a.region, timeout).await;
            endpoints.push((ep, Arc::new(p)));
        }
    } else if let Some(l) = &cfg.local {
        endpoints.push((
            l.path.display().to_string(),
            Arc::new(LocalKeyring::open(&l.path)?),
        ));
    } else if let Some(b) = &cfg.broker {
        let clients = BrokerClient::connect_all(b, timeout, identity).map_err(|e| match e {
            KmsError::Invalid(m) => KmsError::Invalid(format!("kms {}: {m}", cfg.name)),
            other => other,
        })?;
        for (label, client) in clients {
            endpoints.push((label, Arc::new(client)));
        }
    } else {
        return Err(KmsError::Invalid(format!(
            "kms {}: no provider configured",
            cfg.name
        )));
    }
    let inner: Arc<dyn Kms> = if endpoints.len() == 1 {
        endpoints.remove(0).1
    } else {
        Arc::new(FailoverKms::new(endpoints)?)
    };
    Ok(Arc::new(RetryingKms::new(
        cfg.name.clone(),
        inner,
        cfg.retry.clone(),
        metrics,
    )))
}

/// Build every configured KMS, registering one shared set of KMS metrics.
/// Validate the list first ([`strait_kms_core::config::validate_kms_list`]).
pub async fn build_kms_set(list: &[KmsConfig], registry: &mut Registry) -> Result<KmsSet> {
    build_kms_set_with(list, registry, None).await
}

/// [`build_kms_set`] with the process's own SVID (see [`build_kms_with`]).
pub async fn build_kms_set_with(
    list: &[KmsConfig],
    registry: &mut Registry,
    identity: Option<&OwnIdentity>,
) -> Result<KmsSet> {
    let metrics = KmsMetrics::new(registry);
    let mut set = KmsSet::new();
    for cfg in list {
        set.insert(
            cfg.name.clone(),
            build_kms_with(cfg, Some(metrics.clone()), identity).await?,
        );
    }
    Ok(set)
}

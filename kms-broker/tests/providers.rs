//! Vault Transit (OpenBao dev server) and AWS KMS (moto) providers, real servers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use prometheus_client::registry::Registry;
use strait_kms_broker::kms::aws::AwsKms;
use strait_kms_broker::kms::vault::VaultTransit;
use strait_kms_broker::kms::{build_kms, KekRef, Kms, KmsError, KmsMetrics, RetryPolicy};
use strait_kms_core::config::{AwsKmsConfig, KmsConfig, VaultConfig};

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        timeout: Duration::from_secs(5),
    }
}

fn vault_cfg(addresses: Vec<String>) -> KmsConfig {
    KmsConfig {
        name: "vault".into(),
        vault: Some(VaultConfig {
            address: None,
            addresses,
            token_env: "STRAIT_TEST_VAULT_TOKEN".into(),
            mount: "transit".into(),
        }),
        aws_kms: None,
        local: None,
        broker: None,
        retry: fast_retry(),
    }
}

fn aws_cfg(endpoints: Vec<String>) -> KmsConfig {
    KmsConfig {
        name: "aws".into(),
        vault: None,
        aws_kms: Some(AwsKmsConfig {
            endpoint: None,
            endpoints,
            region: "us-east-1".into(),
        }),
        local: None,
        broker: None,
        retry: fast_retry(),
    }
}

#[tokio::test]
async fn vault_round_trip_rotation_and_not_found() {
    let bao = start_bao().await;
    bao.create_key("kek-orders").await;
    let v = VaultTransit::new(&bao.url(), "root", "transit", Duration::from_secs(5)).unwrap();

    let kek = v.resolve_alias("kek-orders").await.unwrap();
    assert_eq!(kek, KekRef::new("kek-orders"));
    let d1 = v.generate_dek(&kek).await.unwrap();
    assert_eq!(d1.kek.version.as_deref(), Some("1"));
    assert!(d1.wrapped.starts_with(b"vault:v1:"));
    assert_eq!(
        *v.unwrap_dek(&d1.kek, &d1.wrapped).await.unwrap(),
        *d1.plaintext
    );

    // Rotation: new DEKs under v2, old wrapped DEKs still unwrap.
    bao.rotate_key("kek-orders").await;
    let d2 = v.generate_dek(&kek).await.unwrap();
    assert_eq!(d2.kek.version.as_deref(), Some("2"));
    assert_ne!(*d2.plaintext, *d1.plaintext);
    assert_eq!(
        *v.unwrap_dek(&d1.kek, &d1.wrapped).await.unwrap(),
        *d1.plaintext
    );
    assert_eq!(
        *v.unwrap_dek(&d2.kek, &d2.wrapped).await.unwrap(),
        *d2.plaintext
    );

    // Unknown keys.
    assert!(matches!(
        v.resolve_alias("nope").await,
        Err(KmsError::NotFound(_))
    ));
    assert!(matches!(
        v.generate_dek(&KekRef::new("nope")).await,
        Err(KmsError::NotFound(_))
    ));
    // Tampered wrapped DEK is refused, not "unwrapped" to garbage.
    let mut bad = d1.wrapped.clone();
    let n = bad.len();
    bad[n - 3] = if bad[n - 3] == b'A' { b'B' } else { b'A' };
    assert!(matches!(
        v.unwrap_dek(&d1.kek, &bad).await,
        Err(KmsError::Invalid(_))
    ));
    // A bad token is Denied.
    let denied = VaultTransit::new(&bao.url(), "wrong", "transit", Duration::from_secs(5)).unwrap();
    assert!(matches!(
        denied.resolve_alias("kek-orders").await,
        Err(KmsError::Denied(_))
    ));
}

#[tokio::test]
async fn vault_stopped_is_unavailable_after_retries() {
    let mut bao = start_bao().await;
    bao.create_key("k").await;
    let mut reg = Registry::default();
    let metrics = KmsMetrics::new(&mut reg);
    let kms = build_kms(&vault_cfg(vec![bao.url()]), Some(metrics.clone()))
        .await
        .unwrap();
    kms.resolve_alias("k").await.unwrap();
    bao.proc.stop();
    let err = kms.generate_dek(&KekRef::new("k")).await.unwrap_err();
    assert!(matches!(err, KmsError::Unavailable(_)), "{err:?}");
    assert_eq!(
        metrics.attempt_count("vault", "generate_dek", "unavailable"),
        3
    );
    assert_eq!(
        metrics.outcome_count("vault", "generate_dek", "unavailable"),
        1
    );
    assert_eq!(
        metrics.outcome_count("vault", "resolve_alias", "success"),
        1
    );
}

#[tokio::test]
async fn vault_failover_first_endpoint_dead() {
    let bao = start_bao().await;
    bao.create_key("k").await;
    let mut reg = Registry::default();
    let metrics = KmsMetrics::new(&mut reg);
    let kms = build_kms(
        &vault_cfg(vec![dead_url(), bao.url()]),
        Some(metrics.clone()),
    )
    .await
    .unwrap();
    let kek = kms.resolve_alias("k").await.unwrap();
    let d = kms.generate_dek(&kek).await.unwrap();
    assert_eq!(
        *kms.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
    // Failover happens inside one attempt: no retry was needed.
    assert_eq!(
        metrics.attempt_count("vault", "resolve_alias", "unavailable"),
        0
    );
    assert_eq!(metrics.outcome_count("vault", "generate_dek", "success"), 1);
}

#[tokio::test]
async fn aws_round_trip_not_found_unavailable_and_failover() {
    let mut moto = start_moto().await;
    let admin = aws_admin(&moto.url()).await;
    let key_id = aws_create_key(&admin, "kek-payments").await;

    let aws = AwsKms::new(Some(&moto.url()), "us-east-1", Duration::from_secs(5)).await;
    let kek = aws.resolve_alias("kek-payments").await.unwrap();
    assert_eq!(kek.key_id, key_id);
    let d = aws.generate_dek(&kek).await.unwrap();
    assert_eq!(d.plaintext.len(), 32);
    assert_eq!(
        *aws.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
    // A second DEK differs; both unwrap.
    let d2 = aws.generate_dek(&kek).await.unwrap();
    assert_ne!(*d2.plaintext, *d.plaintext);
    assert_eq!(
        *aws.unwrap_dek(&d2.kek, &d2.wrapped).await.unwrap(),
        *d2.plaintext
    );

    assert!(matches!(
        aws.resolve_alias("no-such-key").await,
        Err(KmsError::NotFound(_))
    ));
    assert!(matches!(
        aws.generate_dek(&KekRef::new("alias/no-such-key")).await,
        Err(KmsError::NotFound(_))
    ));

    // Failover: first endpoint refuses connections.
    let mut reg = Registry::default();
    let metrics = KmsMetrics::new(&mut reg);
    let ha = build_kms(
        &aws_cfg(vec![dead_url(), moto.url()]),
        Some(metrics.clone()),
    )
    .await
    .unwrap();
    let kek2 = ha.resolve_alias("kek-payments").await.unwrap();
    let d3 = ha.generate_dek(&kek2).await.unwrap();
    assert_eq!(
        *ha.unwrap_dek(&d3.kek, &d3.wrapped).await.unwrap(),
        *d3.plaintext
    );

    // Stopped: Unavailable after the configured attempts.
    moto.proc.stop();
    let single = build_kms(&aws_cfg(vec![moto.url()]), Some(metrics.clone()))
        .await
        .unwrap();
    let err = single.generate_dek(&kek2).await.unwrap_err();
    assert!(matches!(err, KmsError::Unavailable(_)), "{err:?}");
    assert_eq!(
        metrics.attempt_count("aws", "generate_dek", "unavailable"),
        3
    );
}

#[tokio::test]
async fn encryption_core_over_vault_end_to_end() {
    // The DEK lifecycle against a real KMS: a KmsSet built from config.
    let bao = start_bao().await;
    bao.create_key("kek-secret-x").await;
    let kms: Arc<dyn Kms> = build_kms(&vault_cfg(vec![bao.url()]), None).await.unwrap();
    let kek = kms.resolve_alias("kek-secret-x").await.unwrap();
    let d = kms.generate_dek(&kek).await.unwrap();
    bao.rotate_key("kek-secret-x").await;
    let d2 = kms.generate_dek(&kek).await.unwrap();
    assert_eq!(d2.kek.version.as_deref(), Some("2"));
    assert_eq!(
        *kms.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
}

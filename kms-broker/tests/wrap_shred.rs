//! `wrap_dek` (one DEK wrapped under a second KEK: federation) and
//! `shred_kek` against a real OpenBao and a real moto, through the same
//! `build_kms` assembly (retries, metrics) the broker and the edge use.

mod common;

use std::time::Duration;

use common::*;
use prometheus_client::registry::Registry;
use strait_kms_broker::kms::aws::AwsKms;
use strait_kms_broker::kms::{build_kms, KekRef, Kms, KmsError, KmsMetrics, RetryPolicy};
use strait_kms_core::config::{KmsConfig, VaultConfig};

fn vault_cfg(address: String) -> KmsConfig {
    KmsConfig {
        name: "vault".into(),
        vault: Some(VaultConfig {
            address: Some(address),
            addresses: Vec::new(),
            token_env: "STRAIT_TEST_VAULT_TOKEN".into(),
            mount: "transit".into(),
        }),
        aws_kms: None,
        local: None,
        broker: None,
        retry: RetryPolicy {
            attempts: 2,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        },
    }
}

#[tokio::test]
async fn vault_wraps_a_dek_under_another_kek_and_shreds_a_kek() {
    let bao = start_bao().await;
    bao.create_key("kek-east").await;
    bao.create_key("kek-other").await;
    bao.rotate_key("kek-other").await;
    let mut reg = Registry::default();
    let metrics = KmsMetrics::new(&mut reg);
    let kms = build_kms(&vault_cfg(bao.url()), Some(metrics.clone()))
        .await
        .unwrap();

    let d = kms.generate_dek(&KekRef::new("kek-east")).await.unwrap();
    let w = kms
        .wrap_dek(&KekRef::new("kek-other"), &d.plaintext)
        .await
        .unwrap();
    // The latest version, parsed from vault:v2:, as generate does.
    assert_eq!(w.kek, KekRef::with_version("kek-other", "2"));
    assert!(w.wrapped.starts_with(b"vault:v2:"), "{:?}", w.wrapped);
    let v1 = kms
        .wrap_dek(&KekRef::with_version("kek-other", "1"), &d.plaintext)
        .await
        .unwrap();
    assert_eq!(v1.kek, KekRef::with_version("kek-other", "1"));
    for (kek, wrapped) in [
        (&d.kek, &d.wrapped),
        (&w.kek, &w.wrapped),
        (&v1.kek, &v1.wrapped),
    ] {
        assert_eq!(*kms.unwrap_dek(kek, wrapped).await.unwrap(), *d.plaintext);
    }
    assert_eq!(metrics.outcome_count("vault", "wrap_dek", "success"), 2);

    // transit/encrypt would create a missing key (upsert): a wrap under a
    // key that is not there is NotFound and creates nothing.
    let err = kms
        .wrap_dek(&KekRef::new("kek-typo"), &d.plaintext)
        .await
        .unwrap_err();
    assert!(matches!(err, KmsError::NotFound(_)), "{err:?}");
    let (status, _) = bao.api("GET", "/v1/transit/keys/kek-typo", "").await;
    assert_eq!(status, 404, "the wrap created kek-typo");

    // Shred: deletion allowed, key deleted, nothing under it unwraps.
    kms.shred_kek(&KekRef::new("kek-other")).await.unwrap();
    assert_eq!(metrics.outcome_count("vault", "shred_kek", "success"), 1);
    let (status, _) = bao.api("GET", "/v1/transit/keys/kek-other", "").await;
    assert_eq!(status, 404);
    for (kek, wrapped) in [(&w.kek, &w.wrapped), (&v1.kek, &v1.wrapped)] {
        let err = kms.unwrap_dek(kek, wrapped).await.unwrap_err();
        assert!(matches!(err, KmsError::NotFound(_)), "{err:?}");
    }
    // Neither a wrap nor a second shred brings it back.
    let err = kms
        .wrap_dek(&KekRef::new("kek-other"), &d.plaintext)
        .await
        .unwrap_err();
    assert!(matches!(err, KmsError::NotFound(_)), "{err:?}");
    let (status, _) = bao.api("GET", "/v1/transit/keys/kek-other", "").await;
    assert_eq!(status, 404, "the wrap re-created the shredded key");
    let err = kms.shred_kek(&KekRef::new("kek-other")).await.unwrap_err();
    assert!(matches!(err, KmsError::NotFound(_)), "{err:?}");
    // The other KEK's DEKs are untouched.
    assert_eq!(
        *kms.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
}

#[tokio::test]
async fn aws_wraps_a_dek_under_another_kek_and_shreds_a_kek() {
    let moto = start_moto().await;
    let admin = aws_admin(&moto.url()).await;
    let east = aws_create_key(&admin, "kek-east").await;
    let west = aws_create_key(&admin, "kek-west").await;
    let aws = AwsKms::new(Some(&moto.url()), "us-east-1", Duration::from_secs(5)).await;

    let d = aws.generate_dek(&KekRef::new(&east)).await.unwrap();
    // By alias, by bare name (taken as alias/<name>) and by key id.
    for kek in ["alias/kek-west", "kek-west", west.as_str()] {
        let w = aws.wrap_dek(&KekRef::new(kek), &d.plaintext).await.unwrap();
        assert_eq!(w.kek, KekRef::new(kek));
        assert_ne!(w.wrapped, d.wrapped);
        assert_eq!(
            *aws.unwrap_dek(&w.kek, &w.wrapped).await.unwrap(),
            *d.plaintext
        );
    }
    assert_eq!(
        *aws.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
    let err = aws
        .wrap_dek(&KekRef::new("alias/nope"), &d.plaintext)
        .await
        .unwrap_err();
    assert!(matches!(err, KmsError::NotFound(_)), "{err:?}");

    // Shred by bare name: the alias is resolved to its key, which is
    // disabled and scheduled for deletion after the minimum 7 days.
    let before = std::time::SystemTime::now();
    aws.shred_kek(&KekRef::new("kek-west")).await.unwrap();
    let meta = admin.describe_key().key_id(&west).send().await.unwrap();
    let meta = meta.key_metadata().unwrap();
    assert!(!meta.enabled());
    assert_eq!(
        meta.key_state(),
        Some(&aws_sdk_kms::types::KeyState::PendingDeletion)
    );
    let deletion = meta.deletion_date().unwrap().secs();
    let from_now = deletion
        - before
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!((6 * 86_400..=8 * 86_400).contains(&from_now), "{from_now}");
    let err = aws.resolve_alias("kek-west").await.unwrap_err();
    assert!(matches!(err, KmsError::Denied(_)), "{err:?}");
    // A repeat (a retry of an attempt that had acted) is not an error.
    aws.shred_kek(&KekRef::new("alias/kek-west")).await.unwrap();
    // The other key is untouched.
    assert_eq!(
        *aws.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
    let err = aws.shred_kek(&KekRef::new("kek-nope")).await.unwrap_err();
    assert!(matches!(err, KmsError::NotFound(_)), "{err:?}");
    // Real AWS answers Decrypt under a disabled key with DisabledException
    // and under one pending deletion with KMSInvalidStateException, both
    // Denied (see map_err); moto 5.2.5 does not model key state on
    // Decrypt/Encrypt, so that half is not observable here. The broker
    // refuses a KEK shredded through the control plane itself
    // (tests/kek_shred.rs).
}

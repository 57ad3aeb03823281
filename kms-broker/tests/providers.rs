//! Vault Transit (OpenBao dev server) and AWS KMS (moto) providers, real servers.

mod common;

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

fn enc_config(kms: &str, max_age: Duration) -> strait_encryption::EncryptionConfig {
    strait_encryption::EncryptionConfig {
        rules: vec![strait_encryption::TopicRule {
            topic: "secret-*".into(),
            kms: kms.into(),
            kek: "kek-$(topic)".into(),
            also_wrap_for: Vec::new(),
        }],
        on_missing_key: Default::default(),
        on_plaintext_fetch: Default::default(),
        encrypt_headers: false,
        dek: strait_encryption::DekConfig {
            max_age,
            ..Default::default()
        },
        keys_topic: Default::default(),
        shredded_keks: Vec::new(),
    }
}

fn batch(n: usize) -> bytes::Bytes {
    use kafka_protocol::records::*;
    let recs: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: 9,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: i as i32,
            timestamp: 1_700_000_000_000,
            key: Some(bytes::Bytes::from(format!("k{i}"))),
            value: Some(bytes::Bytes::from(format!("secret value {i}"))),
            headers: Default::default(),
            delete_horizon: false,
        })
        .collect();
    let mut buf = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &recs,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::Gzip,
        },
    )
    .unwrap();
    buf.freeze()
}

fn topic(name: &str) -> kafka_protocol::messages::TopicName {
    kafka_protocol::messages::TopicName(kafka_protocol::protocol::StrBytes::from_string(
        name.to_string(),
    ))
}

async fn encrypt(
    enc: &strait_encryption::RecordEncryption,
    t: &str,
    b: bytes::Bytes,
) -> bytes::Bytes {
    use kafka_protocol::messages::produce_request::*;
    let mut req = kafka_protocol::messages::ProduceRequest::default().with_topic_data(vec![
        TopicProduceData::default()
            .with_name(topic(t))
            .with_partition_data(vec![PartitionProduceData::default().with_records(Some(b))]),
    ]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    req.topic_data[0].partition_data[0].records.clone().unwrap()
}

async fn decrypt(
    enc: &strait_encryption::RecordEncryption,
    t: &str,
    b: bytes::Bytes,
) -> (i16, Option<bytes::Bytes>) {
    use kafka_protocol::messages::fetch_response::*;
    let mut resp = kafka_protocol::messages::FetchResponse::default().with_responses(vec![
        FetchableTopicResponse::default()
            .with_topic(topic(t))
            .with_partitions(vec![PartitionData::default().with_records(Some(b))]),
    ]);
    enc.decrypt_fetch(&mut resp, 12).await;
    let p = &resp.responses[0].partitions[0];
    (p.error_code, p.records.clone())
}

fn kek_version(b: &bytes::Bytes) -> Option<String> {
    let mut b = b.clone();
    let sets = kafka_protocol::records::RecordBatchDecoder::decode_all(&mut b).unwrap();
    let v = sets[0].records[0].value.clone().unwrap();
    let parsed = strait_encryption::format::parse(&v).unwrap();
    strait_encryption::format::parse_locator(parsed.prefix)
        .unwrap()
        .kek
        .version
}

#[tokio::test]
async fn record_encryption_over_vault_with_kek_rotation() {
    let bao = start_bao().await;
    bao.create_key("kek-secret-v").await;
    let kms = build_kms(&vault_cfg(vec![bao.url()]), None).await.unwrap();
    let set = strait_kms_core::KmsSet::new().with("vault", kms);
    let enc = strait_encryption::RecordEncryption::new(
        enc_config("vault", Duration::from_millis(300)),
        set.clone(),
        &mut Registry::default(),
    )
    .unwrap();
    let plain = batch(5);
    let before = encrypt(&enc, "secret-v", plain.clone()).await;
    assert_eq!(kek_version(&before).as_deref(), Some("1"));
    bao.rotate_key("kek-secret-v").await;
    // Within the DEK age limit, new records are wrapped under the new KEK version.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let b = encrypt(&enc, "secret-v", plain.clone()).await;
        if kek_version(&b).as_deref() == Some("2") {
            break b;
        }
        assert!(std::time::Instant::now() < deadline, "no DEK under KEK v2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A cold engine (second edge) decrypts both generations exactly.
    let cold = strait_encryption::RecordEncryption::new(
        enc_config("vault", Duration::from_secs(3600)),
        set,
        &mut Registry::default(),
    )
    .unwrap();
    for b in [before, after] {
        let (code, out) = decrypt(&cold, "secret-v", b).await;
        assert_eq!(code, 0);
        let (mut x, mut y) = (out.unwrap(), plain.clone());
        assert_eq!(
            kafka_protocol::records::RecordBatchDecoder::decode_all(&mut x).unwrap()[0].records,
            kafka_protocol::records::RecordBatchDecoder::decode_all(&mut y).unwrap()[0].records
        );
    }
}

#[tokio::test]
async fn record_encryption_over_aws_kms() {
    let moto = start_moto().await;
    let admin = aws_admin(&moto.url()).await;
    aws_create_key(&admin, "kek-secret-a").await;
    let kms = build_kms(&aws_cfg(vec![moto.url()]), None).await.unwrap();
    let set = strait_kms_core::KmsSet::new().with("aws", kms);
    let enc = strait_encryption::RecordEncryption::new(
        enc_config("aws", Duration::from_secs(3600)),
        set.clone(),
        &mut Registry::default(),
    )
    .unwrap();
    let plain = batch(5);
    let cipher = encrypt(&enc, "secret-a", plain.clone()).await;
    assert_ne!(cipher, plain);
    let cold = strait_encryption::RecordEncryption::new(
        enc_config("aws", Duration::from_secs(3600)),
        set,
        &mut Registry::default(),
    )
    .unwrap();
    let (code, out) = decrypt(&cold, "secret-a", cipher).await;
    assert_eq!(code, 0);
    let (mut x, mut y) = (out.unwrap(), plain);
    assert_eq!(
        kafka_protocol::records::RecordBatchDecoder::decode_all(&mut x).unwrap()[0].records,
        kafka_protocol::records::RecordBatchDecoder::decode_all(&mut y).unwrap()[0].records
    );
    // A topic whose KEK alias does not exist is rejected, never forwarded.
    use kafka_protocol::messages::produce_request::*;
    let mut req = kafka_protocol::messages::ProduceRequest::default().with_topic_data(vec![
        TopicProduceData::default()
            .with_name(topic("secret-nokey"))
            .with_partition_data(vec![
                PartitionProduceData::default().with_records(Some(batch(1)))
            ]),
    ]);
    let rej = enc.encrypt_produce(&mut req, 9).await.unwrap_err();
    assert_eq!(rej.partitions[0].error.error_code(), 44);
    assert!(req.topic_data.is_empty());
}

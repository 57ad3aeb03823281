//! The strait-kms-broker binary end to end: mTLS gRPC in front of a real
//! OpenBao, clients with and without valid certificates, failover across
//! broker endpoints, alias cache, backend outage.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{FetchResponse, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use prometheus_client::registry::Registry;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use strait_encryption::{EncryptionConfig, RecordEncryption, TopicRule};
use strait_kms_broker::kms::{build_kms, KekRef, KmsError, KmsSet};
use strait_kms_core::config::{BrokerClientConfig, KmsConfig};
use strait_proto::kms as pb;
use strait_proto::kms::kms_broker_client::KmsBrokerClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    rogue_client: (String, String),
}

fn pki() -> Pki {
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    };
    // Callers are SPIFFE identities; the broker's default callers are the
    // edges of its trust domain.
    let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>, sans: &[&str], id: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.subject_alt_names
            .push(rcgen::SanType::URI(id.try_into().unwrap()));
        let cert = p.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let good = ca("strait test CA");
    let rogue = ca("rogue CA");
    Pki {
        ca_pem: good.pem(),
        server: leaf(
            &good,
            &["localhost", "127.0.0.1"],
            "spiffe://strait.test/kms-broker/b1",
        ),
        client: leaf(&good, &[], "spiffe://strait.test/edge/edge-1"),
        rogue_client: leaf(&rogue, &[], "spiffe://strait.test/edge/intruder"),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

struct Broker {
    _proc: Proc,
    url: String,
    metrics: String,
}

async fn start_broker(dir: &Path, bao_url: &str) -> Broker {
    let port = free_port();
    let metrics_port = free_port();
    let cfg = format!(
        r#"
listen: "127.0.0.1:{port}"
trust_domain: strait.test
tls: {{ cert: server.pem, key: server.key, client_ca: ca.pem }}
alias_cache_ttl: 10m
metrics_listen: "127.0.0.1:{metrics_port}"
kms:
  - name: vault
    vault: {{ address: "{bao_url}", token_env: STRAIT_TEST_VAULT_TOKEN, mount: transit }}
    retry: {{ attempts: 2, min_backoff: 10ms, max_backoff: 20ms, timeout: 2s }}
"#
    );
    let path = write(dir, "broker.yaml", &cfg);
    let child = Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
        .args(["--config", path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_until("the broker to listen", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(&addr).await.is_ok() }
    })
    .await;
    Broker {
        _proc: Proc(child),
        url: format!("https://127.0.0.1:{port}"),
        metrics: format!("127.0.0.1:{metrics_port}"),
    }
}

fn client_cfg(dir: &Path, endpoints: Vec<String>) -> KmsConfig {
    KmsConfig {
        name: "vault".into(),
        vault: None,
        aws_kms: None,
        local: None,
        broker: Some(BrokerClientConfig {
            endpoints,
            ca: Some(dir.join("ca.pem")),
            identity: None,
            cert: Some(dir.join("client.pem")),
            key: Some(dir.join("client.key")),
            backend: None,
            server_name: None,
        }),
        retry: strait_kms_core::RetryPolicy {
            attempts: 2,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        },
    }
}

async fn raw_call(
    url: &str,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<(), tonic::Status> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    let ch = Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    KmsBrokerClient::new(ch)
        .resolve_alias(pb::ResolveAliasRequest {
            kms: String::new(),
            alias: "kek-a".into(),
        })
        .await
        .map(|_| ())
}

fn batch(n: usize) -> Bytes {
    let recs: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: 1,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: i as i32,
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(Bytes::from(format!("secret {i}"))),
            headers: Default::default(),
            delete_horizon: false,
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &recs,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::Zstd,
        },
    )
    .unwrap();
    buf.freeze()
}

#[tokio::test]
async fn broker_end_to_end_over_mtls() {
    let bao = start_bao().await;
    bao.create_key("kek-a").await;
    bao.create_key("kek-secret-t").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    write(dir.path(), "ca.pem", &pki.ca_pem);
    write(dir.path(), "server.pem", &pki.server.0);
    write(dir.path(), "server.key", &pki.server.1);
    write(dir.path(), "client.pem", &pki.client.0);
    write(dir.path(), "client.key", &pki.client.1);
    let broker = start_broker(dir.path(), &bao.url()).await;

    // Failover across broker endpoints: the first one is dead.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let kms = build_kms(
        &client_cfg(dir.path(), vec![dead, broker.url.clone()]),
        None,
    )
    .await
    .unwrap();
    let kek = kms.resolve_alias("kek-a").await.unwrap();
    assert_eq!(kek, KekRef::new("kek-a"));
    let d1 = kms.generate_dek(&kek).await.unwrap();
    assert_eq!(d1.kek.version.as_deref(), Some("1"));
    assert_eq!(
        *kms.unwrap_dek(&d1.kek, &d1.wrapped).await.unwrap(),
        *d1.plaintext
    );
    bao.rotate_key("kek-a").await;
    let d2 = kms.generate_dek(&kek).await.unwrap();
    assert_eq!(d2.kek.version.as_deref(), Some("2"));
    assert_eq!(
        *kms.unwrap_dek(&d1.kek, &d1.wrapped).await.unwrap(),
        *d1.plaintext
    );
    assert!(matches!(
        kms.resolve_alias("nope").await,
        Err(KmsError::NotFound(_))
    ));

    // The record-encryption core using the broker as its KMS; a cold
    // engine decrypts through the broker too.
    let cfg = EncryptionConfig {
        rules: vec![TopicRule {
            topic: "secret-*".into(),
            kms: "vault".into(),
            kek: "kek-$(topic)".into(),
            also_wrap_for: Vec::new(),
        }],
        on_missing_key: Default::default(),
        on_plaintext_fetch: Default::default(),
        encrypt_headers: false,
        dek: Default::default(),
        keys_topic: Default::default(),
        shredded_keks: Vec::new(),
    };
    let set = KmsSet::new().with("vault", kms.clone());
    let enc = RecordEncryption::new(cfg.clone(), set.clone(), &mut Registry::default()).unwrap();
    let plain = batch(10);
    let topic = TopicName(StrBytes::from_static_str("secret-t"));
    let mut req = ProduceRequest::default().with_topic_data(vec![TopicProduceData::default()
        .with_name(topic.clone())
        .with_partition_data(vec![PartitionProduceData::default()
            .with_index(0)
            .with_records(Some(plain.clone()))])]);
    enc.encrypt_produce(&mut req, 9).await.unwrap();
    let cipher = req.topic_data[0].partition_data[0].records.clone().unwrap();
    assert_ne!(cipher, plain);
    let cold = RecordEncryption::new(cfg, set, &mut Registry::default()).unwrap();
    let mut resp = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
        .with_topic(topic)
        .with_partitions(vec![PartitionData::default().with_records(Some(cipher))])]);
    let report = cold.decrypt_fetch(&mut resp, 12).await;
    assert!(report.failed_partitions.is_empty(), "{report:?}");
    let out = resp.responses[0].partitions[0].records.clone().unwrap();
    let mut a = out.clone();
    let mut b = plain.clone();
    assert_eq!(
        RecordBatchDecoder::decode_all(&mut a).unwrap()[0].records,
        RecordBatchDecoder::decode_all(&mut b).unwrap()[0].records
    );

    // mTLS: a valid client certificate is accepted...
    raw_call(&broker.url, &pki.ca_pem, Some(&pki.client))
        .await
        .unwrap();
    // ...no client certificate is rejected...
    let err = raw_call(&broker.url, &pki.ca_pem, None).await.unwrap_err();
    // The handshake is refused, so the call dies at the transport level.
    let transport_failure = [
        tonic::Code::Cancelled,
        tonic::Code::Unavailable,
        tonic::Code::Unknown,
    ];
    assert!(transport_failure.contains(&err.code()), "{err:?}");
    // ...and so is a certificate from another CA.
    let err = raw_call(&broker.url, &pki.ca_pem, Some(&pki.rogue_client))
        .await
        .unwrap_err();
    assert!(transport_failure.contains(&err.code()), "{err:?}");

    // The broker exports its KMS metrics.
    let (status, text) = http(&broker.metrics, "GET", "/metrics", "", "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        text.contains("strait_kms_operations_total{kms=\"vault\",operation=\"generate_dek\",outcome=\"success\"}"),
        "{text}"
    );

    // Backend outage: cached alias still resolves; DEK operations fail
    // with a retriable Unavailable.
    let mut bao = bao;
    bao.proc.stop();
    assert_eq!(kms.resolve_alias("kek-a").await.unwrap(), kek);
    let err = kms.generate_dek(&kek).await.unwrap_err();
    assert!(matches!(err, KmsError::Unavailable(_)), "{err:?}");
}

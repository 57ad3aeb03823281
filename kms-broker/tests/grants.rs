//! The strait-kms-broker binary with `grants:` in front of a real OpenBao:
//! WrapDek and ShredKek over mTLS (rcgen certificates), which caller may do
//! what on which backend and KEK, refusals answered PERMISSION_DENIED by
//! name, audited and counted; and without grants, everything but shred.

mod common;

use std::path::Path;
use std::time::Duration;

use common::control::*;
use common::{free_port, http, start_bao};
use strait_kms_broker::kms::{build_kms, KekRef, Kms, KmsError};
use strait_kms_core::config::{BrokerClientConfig, KmsConfig};
use strait_kms_core::RetryPolicy;
use strait_proto::kms as pb;
use tonic::Code;

const DOMAIN: &str = "east.example";

fn sid(path: &str) -> String {
    format!("spiffe://{DOMAIN}/{path}")
}

/// A `Kms` reaching the broker at `url` as the identity in `<who>.pem/.key`.
async fn as_caller(dir: &Path, url: &str, who: &str, backend: &str) -> std::sync::Arc<dyn Kms> {
    let cfg = KmsConfig {
        name: backend.into(),
        vault: None,
        aws_kms: None,
        local: None,
        broker: Some(BrokerClientConfig {
            endpoints: vec![url.to_string()],
            ca: Some(dir.join("ca.pem")),
            identity: None,
            cert: Some(dir.join(format!("{who}.pem"))),
            key: Some(dir.join(format!("{who}.key"))),
            backend: Some(backend.into()),
            server_name: None,
        }),
        retry: RetryPolicy {
            attempts: 1,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(5),
        },
    };
    build_kms(&cfg, None).await.unwrap()
}

/// The broker's PKI in `dir`: its CA, its serving certificate, and one
/// client pair per `(file name, SPIFFE path)`.
fn pki(dir: &Path, callers: &[(&str, &str)]) -> Ca {
    let ca = Ca::new("east.example CA");
    write(dir, "ca.pem", &ca.pem());
    write_pair(
        dir,
        "server",
        &ca.leaf(&["127.0.0.1"], Some(&sid("kms-broker/east")), "east"),
    );
    for (file, path) in callers {
        write_pair(dir, file, &ca.leaf(&[], Some(&sid(path)), file));
    }
    ca
}

fn denied(err: KmsError, want: &str) {
    match err {
        KmsError::Denied(m) => assert!(m.contains(want), "{m:?} does not say {want:?}"),
        other => panic!("expected Denied ({want}), got {other:?}"),
    }
}

#[tokio::test]
async fn grants_decide_who_may_generate_wrap_unwrap_and_shred_which_kek() {
    let bao = start_bao().await;
    for k in ["kek-a", "kek-b", "kek-doomed"] {
        bao.create_key(k).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    pki(
        dir,
        &[
            ("edge", "edge/e1"),
            ("reader", "ns/app/sa/reader"),
            ("ops", "admin/ops"),
        ],
    );
    let (port, metrics_port) = (free_port(), free_port());
    let bao_url = bao.url();
    write(
        dir,
        "broker.yaml",
        &format!(
            r#"
listen: "127.0.0.1:{port}"
trust_domain: {DOMAIN}
metrics_listen: "127.0.0.1:{metrics_port}"
callers: ["spiffe://{DOMAIN}/edge/*", "spiffe://{DOMAIN}/ns/app/sa/*", "spiffe://{DOMAIN}/admin/*"]
grants:
  - {{ callers: ["spiffe://{DOMAIN}/edge/*"], kms: ["*"], operations: [generate, unwrap, wrap, resolve] }}
  - {{ callers: ["spiffe://{DOMAIN}/ns/app/sa/reader"], kms: [vault], keks: ["kek-a"], operations: [unwrap] }}
  - {{ callers: ["spiffe://{DOMAIN}/admin/*"], kms: [vault], keks: ["kek-doomed"], operations: [shred] }}
tls: {{ cert: server.pem, key: server.key, client_ca: ca.pem }}
kms:
  - name: vault
    vault: {{ address: "{bao_url}", token_env: STRAIT_TEST_VAULT_TOKEN }}
    retry: {{ attempts: 1, timeout: 5s }}
  - name: dev
    local: {{ path: keys.json }}
"#
        ),
    );
    write(dir, "keys.json", r#"{"keys":{}}"#);
    let broker = start_broker(dir, port, &[], "broker.log").await;

    // The edge: a DEK under kek-a, wrapped under kek-b too; both unwrap to it.
    let edge = as_caller(dir, &broker.url, "edge", "vault").await;
    let d = edge.generate_dek(&KekRef::new("kek-a")).await.unwrap();
    let w = edge
        .wrap_dek(&KekRef::new("kek-b"), &d.plaintext)
        .await
        .unwrap();
    assert_eq!(w.kek, KekRef::with_version("kek-b", "1"));
    assert!(w.wrapped.starts_with(b"vault:v1:"));
    assert_eq!(
        *edge.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
    assert_eq!(
        *edge.unwrap_dek(&w.kek, &w.wrapped).await.unwrap(),
        *d.plaintext
    );

    // The reader may unwrap under kek-a, nothing else.
    let reader = as_caller(dir, &broker.url, "reader", "vault").await;
    assert_eq!(
        *reader.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
    let refused = format!(
        "{} may not KmsBroker/UnwrapDek on kms \"vault\" for kek \"kek-b\" (no grant allows it)",
        sid("ns/app/sa/reader")
    );
    denied(
        reader.unwrap_dek(&w.kek, &w.wrapped).await.unwrap_err(),
        &refused,
    );
    denied(
        reader
            .wrap_dek(&KekRef::new("kek-a"), &d.plaintext)
            .await
            .unwrap_err(),
        "may not KmsBroker/WrapDek on kms \"vault\" for kek \"kek-a\" (no grant allows it)",
    );
    denied(
        reader
            .generate_dek(&KekRef::new("kek-a"))
            .await
            .unwrap_err(),
        "may not KmsBroker/GenerateDek",
    );
    // The wire status is PERMISSION_DENIED with the same words.
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let pair = |n: &str| {
        (
            std::fs::read_to_string(dir.join(format!("{n}.pem"))).unwrap(),
            std::fs::read_to_string(dir.join(format!("{n}.key"))).unwrap(),
        )
    };
    let err = client(&broker.url, &ca, &pair("reader"))
        .unwrap_dek(pb::UnwrapDekRequest {
            kms: "vault".into(),
            kek: Some(pb::KekRef {
                key_id: "kek-b".into(),
                version: String::new(),
            }),
            wrapped: w.wrapped.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::PermissionDenied, refused.as_str())
    );

    // Shred: not for the edge (no grant names shred for it)...
    denied(
        edge.shred_kek(&KekRef::new("kek-doomed"))
            .await
            .unwrap_err(),
        "may not KmsBroker/ShredKek on kms \"vault\" for kek \"kek-doomed\" (no grant allows it)",
    );
    // ...nor for ops on another KEK or backend...
    let ops = as_caller(dir, &broker.url, "ops", "vault").await;
    denied(
        ops.shred_kek(&KekRef::new("kek-a")).await.unwrap_err(),
        "for kek \"kek-a\" (no grant allows it)",
    );
    let ops_dev = as_caller(dir, &broker.url, "ops", "dev").await;
    denied(
        ops_dev
            .shred_kek(&KekRef::new("kek-doomed"))
            .await
            .unwrap_err(),
        "on kms \"dev\"",
    );
    // ...but ops may shred kek-doomed on vault: its DEKs never unwrap again.
    let doomed = edge.generate_dek(&KekRef::new("kek-doomed")).await.unwrap();
    ops.shred_kek(&KekRef::new("kek-doomed")).await.unwrap();
    let err = edge
        .unwrap_dek(&doomed.kek, &doomed.wrapped)
        .await
        .unwrap_err();
    assert!(matches!(err, KmsError::NotFound(_)), "{err:?}");
    let (status, _) = bao.api("GET", "/v1/transit/keys/kek-doomed", "").await;
    assert_eq!(status, 404);
    assert_eq!(
        *edge.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );

    // Audited: refusals with every field, the allowed shred too.
    log_contains(
        &broker.log,
        &format!("WARN strait::audit: kms-broker call refused caller={} operation=\"unwrap\" kms=\"vault\" kek=\"kek-b\" decision=\"refused\"", sid("ns/app/sa/reader")),
    )
    .await;
    log_contains(
        &broker.log,
        &format!("WARN strait::audit: kms-broker call allowed caller={} operation=\"shred\" kms=\"vault\" kek=\"kek-doomed\" decision=\"allowed\"", sid("admin/ops")),
    )
    .await;
    log_contains(&broker.log, "KEK shred requested over the API operation=\"shred\" kms=vault kek=kek-doomed outcome=shredded").await;
    // Counted by operation and reason.
    let (_, text) = http(
        &format!("127.0.0.1:{metrics_port}"),
        "GET",
        "/metrics",
        "",
        "",
    )
    .await
    .unwrap();
    for (op, n) in [("unwrap", 2), ("wrap", 1), ("generate", 1), ("shred", 3)] {
        let line = format!(
            "strait_kms_broker_refusals_total{{operation=\"{op}\",reason=\"no_grant\"}} {n}"
        );
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains("strait_kms_operations_total{kms=\"vault\",operation=\"wrap_dek\",outcome=\"success\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn without_grants_every_caller_may_do_everything_but_shred() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    pki(dir, &[("edge", "edge/e1")]);
    let port = free_port();
    write(
        dir,
        "keys.json",
        r#"{"keys":{"kek-a":["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="],"kek-b":["HyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4="]}}"#,
    );
    write(
        dir,
        "broker.yaml",
        &format!(
            r#"
listen: "127.0.0.1:{port}"
trust_domain: {DOMAIN}
tls: {{ cert: server.pem, key: server.key, client_ca: ca.pem }}
kms:
  - name: dev
    local: {{ path: keys.json }}
"#
        ),
    );
    let broker = start_broker(dir, port, &[], "broker.log").await;
    let edge = as_caller(dir, &broker.url, "edge", "dev").await;
    let d = edge.generate_dek(&KekRef::new("kek-a")).await.unwrap();
    let w = edge
        .wrap_dek(&KekRef::new("kek-b"), &d.plaintext)
        .await
        .unwrap();
    assert_eq!(w.kek, KekRef::with_version("kek-b", "1"));
    assert_eq!(
        *edge.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
    assert_eq!(
        *edge.unwrap_dek(&w.kek, &w.wrapped).await.unwrap(),
        *d.plaintext
    );
    denied(
        edge.shred_kek(&KekRef::new("kek-b")).await.unwrap_err(),
        &format!(
            "{} may not KmsBroker/ShredKek on kms \"dev\" for kek \"kek-b\" (shred needs a grant that names it)",
            sid("edge/e1")
        ),
    );
    // Still there: the refused shred did nothing.
    assert_eq!(
        *edge.unwrap_dek(&w.kek, &w.wrapped).await.unwrap(),
        *d.plaintext
    );
    let keys = std::fs::read_to_string(dir.join("keys.json")).unwrap();
    assert!(keys.contains("kek-b"), "{keys}");
    log_contains(&broker.log, "decision=\"refused\"").await;
}

//! KmsGrant and KekShred from the control plane ([`Shredder`]): a KekShred
//! naming a direct backend shreds the key there once (real OpenBao, real
//! local keyring), is audited, refused from then on on every backend, kept
//! across restarts by the ledger, and listed in the KmsBroker heartbeat.
//!
//! The control plane on this branch does not serve the KmsGrant/KekShred
//! kinds yet (another branch adds them), so the end-to-end test seeds the
//! broker's federation cache (what a restarted broker reads first) and runs
//! the real broker against a real strait-control, which answers the
//! federation watch with "unknown kind": the broker keeps the cached
//! snapshot, shreds, refuses and reports the shred in its heartbeat.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::control::*;
use common::{free_port, start_bao, wait_until};
use prometheus_client::registry::Registry;
use serde_json::json;
use strait_kms_broker::callers::{Callers, Operation};
use strait_kms_broker::follow::{federation_cache_path, shred_ledger_path};
use strait_kms_broker::kms::{build_kms, KekRef, Kms, KmsSet, LocalKeyring};
use strait_kms_broker::policy::Policy;
use strait_kms_broker::shred::{FederationSnapshot, ShredStatus, Shredder};
use strait_kms_core::config::{KmsConfig, VaultConfig};
use strait_kms_core::RetryPolicy;
use strait_proto::kms as pb;
use tonic::Code;

const EDGE: &str = "spiffe://example.org/edge/e1";
const KEK: &str = "kek-secret-orders";

fn vault(address: String) -> KmsConfig {
    KmsConfig {
        name: "vault-east".into(),
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
            attempts: 1,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(5),
        },
    }
}

fn snapshot(shreds: serde_json::Value, grants: serde_json::Value) -> FederationSnapshot {
    serde_json::from_value(json!({"revision": 7, "grants": grants, "shreds": shreds})).unwrap()
}

fn status(kek: &str, kms: &str, outcome: &str) -> ShredStatus {
    ShredStatus {
        kek: kek.into(),
        kms: kms.into(),
        outcome: outcome.into(),
    }
}

#[tokio::test]
async fn a_kek_shred_shreds_once_refuses_everywhere_and_survives_a_restart() {
    let bao = start_bao().await;
    bao.create_key(KEK).await;
    bao.create_key("kek-other").await;
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("keys.json");
    LocalKeyring::create_file(&ring, &[KEK, "kek-dev"]).unwrap();
    let vault = build_kms(&vault(bao.url()), None).await.unwrap();
    let dev: Arc<dyn Kms> = Arc::new(LocalKeyring::open(&ring).unwrap());
    let set = KmsSet::new()
        .with("vault-east", vault.clone())
        .with("dev", dev.clone());
    let ledger = dir.path().join("ledger.json");
    let callers = Callers::new(vec!["spiffe://example.org/edge/*".into()]);
    let policy = Policy::new(
        callers.clone(),
        "example.org",
        None,
        &mut Registry::default(),
    );
    let shredder = Shredder::new(
        set.clone(),
        ["vault-east".to_string(), "dev".to_string()],
        policy.clone(),
        Some(ledger.clone()),
    )
    .unwrap();
    let d = vault.generate_dek(&KekRef::new(KEK)).await.unwrap();
    for op in [Operation::GenerateDek, Operation::UnwrapDek] {
        assert_eq!(policy.decide(EDGE, op, "vault-east", KEK), Ok(()));
    }

    // A KekShred for another realm only: nothing happens here.
    shredder
        .apply(&snapshot(
            json!({"west-only": {"kek": KEK, "kms": ["aws-west"]}}),
            json!({}),
        ))
        .await;
    assert!(shredder.status().is_empty());
    assert_eq!(
        policy.decide(EDGE, Operation::UnwrapDek, "vault-east", KEK),
        Ok(())
    );

    // For vault-east: shredded there (deleted in OpenBao), and refused on
    // every backend, dev included, whose key of that name is untouched.
    let breach = snapshot(
        json!({"orders": {"kek": KEK, "kms": ["vault-east"], "reason": "breach 42"}}),
        json!({}),
    );
    shredder.apply(&breach).await;
    assert_eq!(shredder.status(), [status(KEK, "vault-east", "shredded")]);
    let (code, _) = bao.api("GET", &format!("/v1/transit/keys/{KEK}"), "").await;
    assert_eq!(code, 404);
    assert!(vault.unwrap_dek(&d.kek, &d.wrapped).await.is_err());
    for backend in ["vault-east", "dev", "west"] {
        for op in [
            Operation::GenerateDek,
            Operation::UnwrapDek,
            Operation::WrapDek,
        ] {
            let r = policy.decide(EDGE, op, backend, KEK).unwrap_err();
            assert_eq!(r.reason, "shredded");
            assert!(
                r.message
                    .ends_with("(the KEK is shredded: KekShred/orders: breach 42)"),
                "{}",
                r.message
            );
        }
    }
    assert_eq!(
        policy.decide(EDGE, Operation::UnwrapDek, "vault-east", "kek-other"),
        Ok(())
    );
    assert!(ring.exists() && std::fs::read_to_string(&ring).unwrap().contains(KEK));

    // The key comes back from a backup: the same snapshot again does not
    // shred twice, and the broker still refuses it.
    bao.create_key(KEK).await;
    shredder.apply(&breach).await;
    let (code, _) = bao.api("GET", &format!("/v1/transit/keys/{KEK}"), "").await;
    assert_eq!(code, 200, "shredded a second time");
    assert_eq!(shredder.status().len(), 1);
    assert!(policy
        .decide(EDGE, Operation::GenerateDek, "vault-east", KEK)
        .is_err());

    // Restarted, and the KekShred deleted meanwhile: the ledger keeps the
    // refusal.
    let after = Policy::new(
        callers.clone(),
        "example.org",
        None,
        &mut Registry::default(),
    );
    let restarted = Shredder::new(
        set.clone(),
        ["vault-east".to_string(), "dev".to_string()],
        after.clone(),
        Some(ledger.clone()),
    )
    .unwrap();
    assert_eq!(
        after
            .decide(EDGE, Operation::UnwrapDek, "dev", KEK)
            .unwrap_err()
            .reason,
        "shredded"
    );
    restarted.apply(&snapshot(json!({}), json!({}))).await;
    assert!(after
        .decide(EDGE, Operation::WrapDek, "vault-east", KEK)
        .is_err());
    assert_eq!(restarted.status(), [status(KEK, "vault-east", "shredded")]);

    // An empty kms: every direct backend (dev's key is removed from its
    // file; vault has no kek-dev, which the status says).
    restarted
        .apply(&snapshot(
            json!({"dev-too": {"kek": "kek-dev", "kms": []}}),
            json!({"ops": {"callers": ["spiffe://example.org/admin/*"], "kms": ["*"], "operations": ["shred"]},
                   "broken": {"callers": ["spiffe://example.org/admin/*"], "kms": ["*"], "operations": ["fly"]}}),
        ))
        .await;
    let mut got = restarted.status();
    got.sort_by(|a, b| (&a.kek, &a.kms).cmp(&(&b.kek, &b.kms)));
    assert_eq!(got[0], status("kek-dev", "dev", "shredded"));
    assert_eq!(
        (got[1].kek.as_str(), got[1].kms.as_str()),
        ("kek-dev", "vault-east")
    );
    assert!(got[1].outcome.starts_with("not_found: "), "{:?}", got[1]);
    assert!(!std::fs::read_to_string(&ring).unwrap().contains("kek-dev"));
    // The valid KmsGrant is in force (grants are on now), the broken one
    // grants nothing.
    assert_eq!(after.grant_count(), 1);
    assert_eq!(
        after.decide("spiffe://example.org/admin/ops", Operation::ShredKek, "dev", "x"),
        Err(strait_kms_broker::callers::Refusal {
            reason: "not_a_caller",
            message: "spiffe://example.org/admin/ops may not KmsBroker/ShredKek (not in the broker's callers)".into()
        })
    );
    assert_eq!(
        after
            .decide(EDGE, Operation::UnwrapDek, "dev", "kek-a")
            .unwrap_err()
            .reason,
        "no_grant"
    );

    // An unreadable ledger stops the broker rather than forgetting a shred.
    std::fs::write(&ledger, "{").unwrap();
    let err = Shredder::new(set, Vec::<String>::new(), after, Some(ledger))
        .err()
        .unwrap();
    assert!(err.contains("is unreadable"), "{err}");
}

fn kek(key_id: &str) -> Option<pb::KekRef> {
    Some(pb::KekRef {
        key_id: key_id.into(),
        version: String::new(),
    })
}

#[tokio::test]
async fn the_broker_shreds_from_its_federation_snapshot_refuses_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let home = Ca::new("example.org CA");
    write(dir, "ca.pem", &home.pem());
    write_pair(
        dir,
        "server",
        &home.leaf(&["127.0.0.1"], Some(&id("kms-broker/k1")), "k1"),
    );
    let e1 = home.leaf(&[], Some(&id("edge/e1")), "e1");
    let (_control, addr) = start_control(dir, false);
    let admin = admin_client(dir, &addr, false);
    // The order in the control plane, and the same order in the broker's
    // cache (what it would have from an earlier run): one shred, not two.
    apply(
        &admin,
        "KekShred",
        "orders",
        json!({"kek": KEK, "kms": ["dev"], "reason": "breach 42"}),
    )
    .await;
    let port = free_port();
    broker_config(dir, port, true);
    LocalKeyring::create_file(dir.join("keys.json"), &["kek-a", KEK]).unwrap();
    // What the broker would have cached from the control plane.
    std::fs::create_dir_all(dir.join("cache")).unwrap();
    let snap = snapshot(
        json!({"orders": {"kek": KEK, "kms": ["dev"], "reason": "breach 42"}}),
        json!({}),
    );
    write(
        dir,
        "cache/kms-broker-k1-federation.json",
        &serde_json::to_string(&snap).unwrap(),
    );
    assert_eq!(
        federation_cache_path(&dir.join("cache"), "k1"),
        dir.join("cache/kms-broker-k1-federation.json")
    );
    let args: Vec<String> = [
        "--control",
        &addr,
        "--name",
        "k1",
        "--insecure-plaintext",
        "--heartbeat-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let broker = start_broker(dir, port, &args, "broker.log").await;
    let ca = home.pem();
    log_contains(
        &broker.log,
        "KEK shred from the control plane kek=\"kek-secret-orders\" kms=\"dev\" outcome=shredded shred=\"KekShred/orders: breach 42\"",
    )
    .await;
    assert!(!std::fs::read_to_string(dir.join("keys.json"))
        .unwrap()
        .contains(KEK));
    // Refused by the broker itself, on the wire.
    let mut c = client(&broker.url, &ca, &e1);
    let err = c
        .generate_dek(pb::GenerateDekRequest {
            kms: String::new(),
            kek: kek(KEK),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "spiffe://example.org/edge/e1 may not KmsBroker/GenerateDek on kms \"dev\" for kek \"kek-secret-orders\" (the KEK is shredded: KekShred/orders: breach 42)"
    );
    assert!(c
        .generate_dek(pb::GenerateDekRequest {
            kms: String::new(),
            kek: kek("kek-a"),
        })
        .await
        .is_ok());
    // The heartbeat lists the shred.
    wait_until("the shred in the heartbeat", DEADLINE, || {
        let admin = admin.clone();
        async move {
            let Ok(r) = admin.get("KmsBroker", "k1").await else {
                return false;
            };
            let st: serde_json::Value = serde_json::from_str(&r.status_json).unwrap_or_default();
            st["shredded"] == json!([{"kek": KEK, "kms": "dev", "outcome": "shredded"}])
        }
    })
    .await;
    // The control plane's order (the same one) adds no second shred.
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert_eq!(
        log.matches("KEK shred from the control plane").count(),
        1,
        "{log}"
    );
    assert!(dir.join("cache/kms-broker-k1-federation.json").exists());
    assert!(shred_ledger_path(&dir.join("cache"), "k1").exists());

    // Restarted: no second shred (the key is back from a backup), still refused.
    drop(broker);
    LocalKeyring::open(dir.join("keys.json"))
        .unwrap()
        .rotate_key(KEK)
        .unwrap();
    let broker = start_broker(dir, port, &args, "broker2.log").await;
    let mut c = client(&broker.url, &ca, &e1);
    let err = c
        .unwrap_dek(pb::UnwrapDekRequest {
            kms: "dev".into(),
            kek: kek(KEK),
            wrapped: vec![0; 64],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    log_contains(&broker.log, "KEK shreds of the snapshot done").await;
    log_contains(&broker.log, "attempted=0 pending=false").await;
    assert!(std::fs::read_to_string(dir.join("keys.json"))
        .unwrap()
        .contains(KEK));
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert!(!log.contains("KEK shred from the control plane"), "{log}");
}

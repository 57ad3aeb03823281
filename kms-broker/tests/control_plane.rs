//! A real strait-kms-broker following a real strait-control: trust bundles
//! and deny lists from the control plane, trust domains bound to bundles,
//! serving on with the control plane stopped (and after a restart, from the
//! cache), the serving certificate swapped live.
//!
//! Needs the strait-control binary next to strait-kms-broker (`cargo build
//! -p strait-control --bins`) or at `$STRAIT_CONTROL_BIN`.

mod common;

use std::process::Command;

use common::control::*;
use common::{free_port, wait_until};
use tonic::Code;

#[tokio::test]
async fn follows_a_plaintext_control_plane_and_keeps_serving_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let home = Ca::new("example.org CA");
    let other = Ca::new("other.org CA");
    write(dir, "ca.pem", &home.pem());
    write_pair(
        dir,
        "server",
        &home.leaf(
            &["127.0.0.1", "localhost"],
            Some(&id("kms-broker/k1")),
            "k1",
        ),
    );
    let e1 = home.leaf(&[], Some(&id("edge/e1")), "e1");
    let e2 = home.leaf(&[], Some(&id("edge/e2")), "e2");
    let workload = home.leaf(&[], Some(&id("ns/shop/sa/orders")), "orders");
    // CA X claiming an ID of domain Y.
    let impostor = other.leaf(&[], Some(&id("edge/e1")), "impostor");
    let foreign = other.leaf(&[], Some("spiffe://other.org/edge/x"), "x");
    let no_spiffe = home.leaf(&["edge-1.test"], None, "plain");

    let (mut control, addr) = start_control(dir, false);
    let admin = admin_client(dir, &addr, false);
    let port = free_port();
    broker_config(dir, port, false);
    let args: Vec<String> = ["--control", &addr, "--name", "k1", "--insecure-plaintext"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let broker = start_broker(dir, port, &args, "broker.log").await;
    log_contains(&broker.log, "following the control plane WITHOUT TLS").await;
    let ca = home.pem();

    // No bundle yet: nobody chains to anything, fail closed.
    assert!(call(&broker.url, &ca, &e1).await.is_err());
    log_contains(
        &broker.log,
        "trust domain 'example.org' has no client trust bundle",
    )
    .await;

    apply(
        &admin,
        "TrustBundle",
        "home",
        serde_json::json!({"trust_domain": "example.org", "pem": home.pem()}),
    )
    .await;
    apply(
        &admin,
        "TrustBundle",
        "partner",
        serde_json::json!({"trust_domain": "other.org", "pem": other.pem()}),
    )
    .await;
    wait_until("e1 to be served", DEADLINE, || {
        let (url, ca, e1) = (broker.url.clone(), ca.clone(), e1.clone());
        async move { call(&url, &ca, &e1).await.is_ok() }
    })
    .await;
    assert_eq!(call(&broker.url, &ca, &e1).await.unwrap(), "kek-a");
    // The two TrustBundles may arrive in separate watch events: wait until
    // other.org's is in force too (its callers pass the handshake).
    wait_until("the other.org bundle", DEADLINE, || {
        let (url, ca, foreign) = (broker.url.clone(), ca.clone(), foreign.clone());
        async move { call(&url, &ca, &foreign).await.err().map(|e| e.code()) != Some(Code::Unknown) }
    })
    .await;

    // other.org's CA vouches for other.org only.
    let err = call(&broker.url, &ca, &impostor).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    log_contains(
        &broker.log,
        "client certificate names spiffe://example.org/edge/e1, but does not chain to the trust bundle of 'example.org'",
    )
    .await;
    // A verified identity outside the callers: PERMISSION_DENIED, named.
    let err = call(&broker.url, &ca, &foreign).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "spiffe://other.org/edge/x may not KmsBroker/ResolveAlias (not in the broker's callers)"
    );
    let err = call(&broker.url, &ca, &workload).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "spiffe://example.org/ns/shop/sa/orders may not KmsBroker/ResolveAlias (not in the broker's callers)"
    );
    assert!(call(&broker.url, &ca, &no_spiffe).await.is_err());
    log_contains(&broker.log, "client certificate has no SPIFFE ID").await;
    log_contains(&broker.log, "kms-broker call refused").await;

    // Deny list: applies to an open connection on its next request.
    let mut open_e1 = client(&broker.url, &ca, &e1);
    assert_eq!(resolve(&mut open_e1).await.unwrap(), "kek-a");
    apply(
        &admin,
        "DenyList",
        "leak",
        serde_json::json!({"spiffe_ids": [id("edge/e1")], "reason": "key leaked"}),
    )
    .await;
    let want = "spiffe://example.org/edge/e1 may not KmsBroker/ResolveAlias (deny-listed by DenyList/leak: key leaked)";
    wait_until("e1 to be refused", DEADLINE, || {
        let mut c = open_e1.clone();
        async move {
            matches!(resolve(&mut c).await, Err(s) if s.code() == Code::PermissionDenied && s.message() == want)
        }
    })
    .await;
    assert_eq!(call(&broker.url, &ca, &e2).await.unwrap(), "kek-a");

    // Control plane gone: the broker serves on with what it knows.
    control.stop();
    let mut open_e2 = client(&broker.url, &ca, &e2);
    for _ in 0..3 {
        assert_eq!(resolve(&mut open_e2).await.unwrap(), "kek-a");
        assert_eq!(call(&broker.url, &ca, &e2).await.unwrap(), "kek-a");
        assert_eq!(
            call(&broker.url, &ca, &e1).await.unwrap_err().message(),
            want
        );
    }
    // Restarted with the control plane still down: trust and deny list from the cache.
    drop(broker);
    let broker = start_broker(dir, port, &args, "broker2.log").await;
    log_contains(&broker.log, "source=Cache").await;
    assert_eq!(call(&broker.url, &ca, &e2).await.unwrap(), "kek-a");
    assert_eq!(
        call(&broker.url, &ca, &e1).await.unwrap_err().message(),
        want
    );
    drop(broker.proc);
}

#[tokio::test]
async fn follows_an_mtls_control_plane_and_swaps_its_serving_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let home = Ca::new("example.org CA");
    write(dir, "ca.pem", &home.pem());
    write_pair(
        dir,
        "node",
        &home.leaf(&["127.0.0.1", "localhost"], Some(&id("control/1")), "node"),
    );
    write_pair(dir, "admin", &home.leaf(&[], Some(&id("admin/ops")), "ops"));
    write_pair(dir, "k1", &home.leaf(&[], Some(&id("kms-broker/k1")), "k1"));
    write_pair(dir, "k2", &home.leaf(&[], Some(&id("kms-broker/k2")), "k2"));
    let first = home.leaf(
        &["127.0.0.1", "localhost"],
        Some(&id("kms-broker/k1")),
        "first",
    );
    write_pair(dir, "server", &first);
    let e1 = home.leaf(&[], Some(&id("edge/e1")), "e1");
    let e2 = home.leaf(&[], Some(&id("edge/e2")), "e2");

    let (_control, addr) = start_control(dir, true);
    let admin = admin_client(dir, &addr, true);
    let port = free_port();
    broker_config(dir, port, true);
    let tls_args = |name: &str| -> Vec<String> {
        vec![
            "--control".into(),
            addr.clone(),
            "--name".into(),
            "k1".into(),
            "--control-ca".into(),
            dir.join("ca.pem").display().to_string(),
            "--control-cert".into(),
            dir.join(format!("{name}.pem")).display().to_string(),
            "--control-key".into(),
            dir.join(format!("{name}.key")).display().to_string(),
        ]
    };
    // A client certificate naming another broker is refused before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
        .arg("--config")
        .arg(dir.join("broker.yaml"))
        .args(tls_args("k2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("names spiffe://example.org/kms-broker/k2, but this broker is spiffe://example.org/kms-broker/k1"),
        "{stderr}"
    );
    // Plaintext towards a non-loopback address is refused too.
    let out = Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
        .arg("--config")
        .arg(dir.join("broker.yaml"))
        .args([
            "--control",
            "10.0.0.1:7000",
            "--name",
            "k1",
            "--insecure-plaintext",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not loopback: 10.0.0.1:7000"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut args = tls_args("k1");
    args.extend(["--heartbeat-interval".to_string(), "200ms".to_string()]);
    let broker = start_broker(dir, port, &args, "broker.log").await;
    let ca = home.pem();
    assert_eq!(call(&broker.url, &ca, &e1).await.unwrap(), "kek-a");
    // Its heartbeat: the KmsBroker resource it created, with its status.
    wait_until("the broker's heartbeat", DEADLINE, || {
        let admin = admin.clone();
        async move {
            let Ok(r) = admin.get("KmsBroker", "k1").await else {
                return false;
            };
            let st: serde_json::Value = serde_json::from_str(&r.status_json).unwrap_or_default();
            st["last_heartbeat_unix_ms"].as_u64().unwrap_or(0) > 0
                && st["config_source"] == "control_plane"
                && st["trust_domains"] == serde_json::json!(["example.org"])
        }
    })
    .await;
    // The deny list arrives over the mTLS watch.
    apply(
        &admin,
        "DenyList",
        "leak",
        serde_json::json!({"spiffe_ids": [id("edge/e1")]}),
    )
    .await;
    wait_until("e1 to be refused", DEADLINE, || {
        let (url, ca, e1) = (broker.url.clone(), ca.clone(), e1.clone());
        async move {
            matches!(call(&url, &ca, &e1).await, Err(s) if s.code() == Code::PermissionDenied
                && s.message() == "spiffe://example.org/edge/e1 may not KmsBroker/ResolveAlias (deny-listed by DenyList/leak)")
        }
    })
    .await;

    // Serving certificate replaced on disk: the next handshake presents it,
    // an open connection keeps working.
    let mut open = client(&broker.url, &ca, &e2);
    assert_eq!(resolve(&mut open).await.unwrap(), "kek-a");
    assert_eq!(served_cn(port, &ca, &e2).await, "first");
    let second = home.leaf(
        &["127.0.0.1", "localhost"],
        Some(&id("kms-broker/k1")),
        "second",
    );
    // The key first, then the certificate: the poller may see a mismatched
    // pair in between, which it must reject and then pick up the good one.
    write(dir, "server.key", &second.1);
    write(dir, "server.pem", &second.0);
    wait_until("the new certificate to be served", DEADLINE, || async {
        served_cn(port, &ca, &e2).await == "second"
    })
    .await;
    assert_eq!(resolve(&mut open).await.unwrap(), "kek-a");
    assert_eq!(call(&broker.url, &ca, &e2).await.unwrap(), "kek-a");
    log_contains(&broker.log, "certificate reloaded; new handshakes use it").await;
}

//! Authorization fails closed at a real edge process: an `authorization:`
//! block whose last rule was removed denies everything (live, on an open
//! connection), and only an explicit `mode: allow_all` allows all.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_rule_list_denies_and_allow_all_must_be_written_out() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let (cert, key) = ca.leaf("edge", &[]).write(dir.path(), "server");
    let broker = FakeBroker::start(None).await;
    let (port, base) = (free_port(), free_range(4));
    let tls = format!(
        "      cert: {}\n      key: {}\n      client_trust_bundles: [{{ trust_domain: example.org, pem: {:?} }}]",
        cert.display(),
        key.display(),
        ca.pem
    );
    let config = dir.path().join("edge.yaml");
    let write = |authorization: &str| {
        let upstream = format!("      bootstrap_servers: [\"127.0.0.1:{}\"]", broker.port);
        let yaml = edge_config(port, base, &upstream, &tls, "")
            + &format!("    authorization: {authorization}\n");
        write_atomic(&config, &yaml);
    };
    write(
        r#"{ rules: [{ principal: "spiffe://example.org/ns/shop/sa/orders", allow: [Write], topic: "orders" }] }"#,
    );
    let edge = EdgeProcess::start(&config, dir.path());
    let client = client_config(
        &ca.pem,
        Some(&ca.leaf("orders", &["spiffe://example.org/ns/shop/sa/orders"])),
    );
    let mut stream = connect_tls(port, client.clone()).await.unwrap();
    let answered = send(&mut stream, &produce_to(1, "orders")).await;
    assert_eq!(
        answered.as_ref().ok(),
        Some(&1),
        "{answered:?}; edge log:\n{}",
        edge.log_text()
    );
    assert_eq!(broker.frames(), 1, "allowed by the rule: forwarded");

    // The last rule removed: the same open connection is denied (answered by
    // the edge, never forwarded).
    write("{ rules: [] }");
    let deny = [("virtual_cluster", "vc"), ("result", "deny")];
    let mut id = 1;
    let deadline = std::time::Instant::now() + DEADLINE;
    while edge.metric("strait_authz_decisions_total", &deny) == 0.0 {
        id += 1;
        assert_eq!(
            send(&mut stream, &produce_to(id, "orders")).await.unwrap(),
            id
        );
        assert!(
            std::time::Instant::now() < deadline,
            "rules never emptied; edge log:\n{}",
            edge.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let forwarded = broker.frames();
    id += 1;
    assert_eq!(
        send(&mut stream, &produce_to(id, "orders")).await.unwrap(),
        id
    );
    assert_eq!(broker.frames(), forwarded, "denied: not forwarded");
    assert!(!edge.log_text().contains("no authorization configured"));

    // allow_all, written out, allows everything.
    write("{ mode: allow_all }");
    edge.wait_for("allow_all in force", |e| {
        e.log_text()
            .contains("authorization: mode allow_all, every request is allowed")
    })
    .await;
    let mut fresh = connect_tls(port, client).await.unwrap();
    let before = broker.frames();
    assert_eq!(
        send(&mut fresh, &produce_to(100, "anything"))
            .await
            .unwrap(),
        100
    );
    assert_eq!(broker.frames(), before + 1, "allow_all: forwarded");
}

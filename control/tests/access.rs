//! Authorization of control-plane callers, against real nodes on mTLS:
//! identities from the SPIFFE ID of the client certificate, roles, edge
//! scoping, AccessRule resources, audit, and the plaintext rule.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::*;
use strait_control_client::{
    heartbeat_once, watch_edge_config, ClientConfig, ControlClient, EdgeSnapshot, EdgeWatchConfig,
    TlsConfig,
};
use strait_control_state::spec::EdgeStatus;
use strait_proto::control as pb;
use tonic::Code;

const T: Duration = Duration::from_secs(30);
const DOMAIN: &str = "test.example";

fn tls(pki: &Pki, name: Option<&str>) -> TlsConfig {
    TlsConfig {
        ca_pem: std::fs::read(pki.ca_path()).unwrap(),
        cert_pem: name.map(|n| std::fs::read(pki.cert(n)).unwrap()),
        key_pem: name.map(|n| std::fs::read(pki.key(n)).unwrap()),
        domain: None,
    }
}

fn client(cluster: &Cluster, tls: TlsConfig) -> ControlClient {
    let mut cfg = ClientConfig::new(&cluster.endpoints());
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.request_timeout = Duration::from_secs(3);
    cfg.tls = Some(tls);
    ControlClient::new(&cfg).unwrap()
}

fn apply_req(kind: &str, name: &str, spec: &str) -> pb::ApplyRequest {
    pb::ApplyRequest {
        resource: Some(pb::Resource {
            kind: kind.into(),
            name: name.into(),
            spec_json: spec.into(),
            ..Default::default()
        }),
        expected_revision: None,
    }
}

fn vc(edge: &str, cluster: &str, port: u16) -> String {
    format!(
        r#"{{"edge":"{edge}","cluster":"{cluster}","bootstrap":"127.0.0.1:{port}",
            "brokers":{{"advertised_host":"127.0.0.1","port_range":"{}-{}"}}}}"#,
        port + 1,
        port + 50
    )
}

fn names(l: &pb::ListResponse) -> Vec<String> {
    l.resources.iter().map(|r| r.name.clone()).collect()
}

fn write_pki(dir: &Path) -> Pki {
    let pki = Pki::new(dir, "");
    let id = |p: &str| format!("spiffe://{DOMAIN}/{p}");
    pki.issue("node", &["127.0.0.1", "localhost"], Some(&id("control/n")));
    pki.issue("admin", &[], Some(&id("admin/ops")));
    pki.issue("e1", &[], Some(&id("edge/e1")));
    pki.issue("e2", &[], Some(&id("edge/e2")));
    pki.issue("dash", &[], Some(&id("ns/ops/sa/dash")));
    pki.issue("plain", &["client.test"], None);
    let rogue = Pki::new(dir, "rogue-");
    rogue.issue("rogue-admin", &[], Some(&id("admin/ops")));
    pki
}

async fn until_snapshot(
    rx: &mut tokio::sync::watch::Receiver<Option<Arc<EdgeSnapshot>>>,
    what: &str,
    f: impl Fn(&EdgeSnapshot) -> bool,
) {
    let deadline = Instant::now() + T;
    loop {
        if rx.borrow().as_deref().is_some_and(&f) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => panic!("timed out waiting for: {what}; last {:?}", rx.borrow()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_are_authorized_by_their_spiffe_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = write_pki(dir);
    let audit = dir.join("audit.jsonl");
    let p = |x: std::path::PathBuf| x.to_str().unwrap().to_string();
    let args = [
        "--tls-cert".to_string(),
        p(pki.cert("node")),
        "--tls-key".into(),
        p(pki.key("node")),
        "--tls-client-ca".into(),
        p(pki.ca_path()),
        "--trust-domain".into(),
        DOMAIN.into(),
        "--admin-identity".into(),
        format!("spiffe://{DOMAIN}/admin/*"),
        "--audit-log".into(),
        p(audit.clone()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start(3, &args);
    cluster.tls = Some(tls(&pki, Some("admin")));
    // Raft over mTLS between node certificates (role control) elects.
    let leader = cluster.wait_leader(T).await;

    let admin = client(&cluster, tls(&pki, Some("admin")));
    for (kind, name, spec) in [
        (
            "KafkaCluster",
            "east",
            r#"{"bootstrap_servers":["127.0.0.1:9092"]}"#.to_string(),
        ),
        (
            "KafkaCluster",
            "west",
            r#"{"bootstrap_servers":["127.0.0.1:9093"]}"#.to_string(),
        ),
        ("VirtualCluster", "a", vc("e1", "east", 19000)),
        ("VirtualCluster", "b", vc("e2", "west", 19100)),
    ] {
        admin
            .apply(apply_req(kind, name, &spec))
            .await
            .expect("admin writes");
    }

    // No certificate: UNAUTHENTICATED, saying so.
    let anon = client(&cluster, tls(&pki, None));
    let e = anon.list("KafkaCluster", "").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        e.message(),
        "Control/List KafkaCluster needs a client certificate with a SPIFFE ID: no client certificate"
    );
    // A certificate without a SPIFFE ID: UNAUTHENTICATED.
    let plain = client(&cluster, tls(&pki, Some("plain")));
    let e = plain.list("KafkaCluster", "").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message()
            .ends_with("the client certificate carries no spiffe:// URI SAN"),
        "{e:?}"
    );
    // A certificate from another CA claiming the admin's ID: the server ends
    // the TLS handshake. With TLS 1.3 the client learns it on its first
    // request, as a broken connection (which code depends on the timing).
    let mut rogue_tls = tls(&pki, None);
    rogue_tls.cert_pem = Some(std::fs::read(pki.cert("rogue-admin")).unwrap());
    rogue_tls.key_pem = Some(std::fs::read(pki.key("rogue-admin")).unwrap());
    let rogue = client(&cluster, rogue_tls);
    let e = rogue.list("KafkaCluster", "").await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ),
        "{e:?}"
    );

    // An edge may not write configuration.
    let e1 = client(&cluster, tls(&pki, Some("e1")));
    let e = e1
        .apply(apply_req("VirtualCluster", "x", &vc("e1", "east", 19200)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "spiffe://test.example/edge/e1 may not Control/Apply VirtualCluster/x"
    );
    let e = e1.delete("VirtualCluster", "b").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // It reads its own resources, and nothing of another edge's.
    assert_eq!(names(&e1.list("VirtualCluster", "").await.unwrap()), ["a"]);
    assert_eq!(names(&e1.list("KafkaCluster", "").await.unwrap()), ["east"]);
    assert_eq!(
        names(&e1.list("", "").await.unwrap()),
        ["east", "a"],
        "every kind, filtered"
    );
    assert_eq!(e1.get("VirtualCluster", "a").await.unwrap().name, "a");
    let e = e1.get("VirtualCluster", "b").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "spiffe://test.example/edge/e1 may not Control/Get VirtualCluster/b"
    );
    let e = e1.list("AccessRule", "").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Its own status (the heartbeat registers the Edge), not another's.
    heartbeat_once(&e1, "e1", &EdgeStatus::default())
        .await
        .expect("own heartbeat");
    let e = e1
        .update_status("Edge", "e2", "{\"last_heartbeat_unix_ms\":1}".into())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "spiffe://test.example/edge/e1 may not Control/UpdateStatus Edge/e2"
    );

    // The edge's watch follows its scope as the configuration moves.
    let mut wcfg = EdgeWatchConfig::new(&cluster.endpoints(), "e1", &dir.join("cache"));
    wcfg.client.tls = Some(tls(&pki, Some("e1")));
    let mut w = watch_edge_config(wcfg).unwrap();
    until_snapshot(&mut w.config, "e1's first snapshot", |s| {
        s.virtual_clusters.keys().eq(["a"]) && s.kafka_clusters.keys().eq(["east"])
    })
    .await;
    admin
        .apply(apply_req("VirtualCluster", "b", &vc("e1", "west", 19100)))
        .await
        .unwrap();
    until_snapshot(&mut w.config, "b given to e1", |s| {
        s.virtual_clusters.keys().eq(["a", "b"]) && s.kafka_clusters.keys().eq(["east", "west"])
    })
    .await;
    admin
        .apply(apply_req("VirtualCluster", "b", &vc("e2", "west", 19100)))
        .await
        .unwrap();
    until_snapshot(&mut w.config, "b given back to e2", |s| {
        s.virtual_clusters.keys().eq(["a"]) && s.kafka_clusters.keys().eq(["east"])
    })
    .await;
    w.task.abort();
    // What an edge was sent depends on its scope at the time: it lists again
    // rather than resuming.
    let mut raw = pb::control_client::ControlClient::new(tls_channel(
        &cluster.addr(leader),
        &tls(&pki, Some("e1")),
    ));
    let e = raw
        .watch(pb::WatchRequest {
            kinds: vec![],
            label_selector: String::new(),
            start_revision: 2,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);

    // A reader role granted by an AccessRule.
    let dash = client(&cluster, tls(&pki, Some("dash")));
    let e = dash.list("KafkaCluster", "").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "spiffe://test.example/ns/ops/sa/dash may not Control/List KafkaCluster"
    );
    let e = e1
        .apply(apply_req(
            "AccessRule",
            "ops",
            r#"{"identities":["spiffe://test.example/edge/*"],"role":"admin"}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "an edge cannot grant itself a role"
    );
    admin
        .apply(apply_req(
            "AccessRule",
            "ops-readers",
            r#"{"identities":["spiffe://test.example/ns/ops/sa/*"],"role":"reader"}"#,
        ))
        .await
        .unwrap();
    // Every node applies the rule when it commits; the client may ask any.
    eventually("the reader rule in force on every node", T, || {
        let eps = cluster.endpoints();
        let pki = &pki;
        async move {
            for ep in eps {
                let mut cfg = ClientConfig::new(&[ep]);
                cfg.tls = Some(tls(pki, Some("dash")));
                let c = ControlClient::new(&cfg).unwrap();
                if c.list("KafkaCluster", "")
                    .await
                    .map(|l| l.resources.len())
                    .ok()
                    != Some(2)
                {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let e = dash
        .apply(apply_req(
            "KafkaCluster",
            "east",
            r#"{"bootstrap_servers":["h:1"]}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "a reader cannot write");

    // Raft: control-node certificates only.
    let batch = || pb::RaftBatch {
        from_id: leader,
        from_addr: cluster.addr(leader),
        messages: vec![],
    };
    let target = cluster.addr(if leader == 1 { 2 } else { 1 });
    let mut as_node =
        pb::raft_client::RaftClient::new(tls_channel(&target, &tls(&pki, Some("node"))));
    as_node
        .send(batch())
        .await
        .expect("a control node may send Raft messages");
    let mut as_admin =
        pb::raft_client::RaftClient::new(tls_channel(&target, &tls(&pki, Some("admin"))));
    let e = as_admin.send(batch()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "spiffe://test.example/admin/ops may not Raft/Send"
    );
    let mut as_nobody = pb::raft_client::RaftClient::new(tls_channel(&target, &tls(&pki, None)));
    let e = as_nobody.send(batch()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Health stays open to callers without a certificate.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(tls_channel(&target, &tls(&pki, None)));
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a certificate");

    // The audit trail: writes and refusals, with the caller.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let has = |caller: &str, op: &str, kind: &str, name: &str, outcome: &str| {
        lines.iter().any(|l| {
            l["caller"] == caller
                && l["operation"] == op
                && l["kind"] == kind
                && l["name"] == name
                && l["outcome"] == outcome
                && l["time"].as_str().is_some_and(|t| t.ends_with('Z'))
        })
    };
    assert!(has(
        "spiffe://test.example/admin/ops",
        "Control/Apply",
        "VirtualCluster",
        "a",
        "ok"
    ));
    assert!(has(
        "spiffe://test.example/edge/e1",
        "Control/Apply",
        "VirtualCluster",
        "x",
        "denied"
    ));
    assert!(has(
        "spiffe://test.example/edge/e1",
        "Control/UpdateStatus",
        "Edge",
        "e2",
        "denied"
    ));
    assert!(has(
        "spiffe://test.example/edge/e1",
        "Control/UpdateStatus",
        "Edge",
        "e1",
        "ok"
    ));
    assert!(has(
        "anonymous",
        "Control/List",
        "KafkaCluster",
        "",
        "unauthenticated"
    ));
    assert!(has(
        "spiffe://test.example/admin/ops",
        "Raft/Send",
        "",
        "",
        "denied"
    ));
    let denied = lines
        .iter()
        .find(|l| l["caller"] == "spiffe://test.example/edge/e1" && l["name"] == "x")
        .unwrap();
    assert_eq!(
        denied["reason"],
        "spiffe://test.example/edge/e1 may not Control/Apply VirtualCluster/x"
    );
}

#[tokio::test]
async fn access_rules_file_bootstraps_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = write_pki(dir);
    let rules = dir.join("rules.yaml");
    let metrics = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &rules,
        "- name: dashboards\n  identities: [\"spiffe://test.example/ns/ops/sa/*\"]\n  role: reader\n",
    )
    .unwrap();
    let p = |x: std::path::PathBuf| x.to_str().unwrap().to_string();
    let args = [
        "--tls-cert".to_string(),
        p(pki.cert("node")),
        "--tls-key".into(),
        p(pki.key("node")),
        "--tls-client-ca".into(),
        p(pki.ca_path()),
        "--trust-domain".into(),
        DOMAIN.into(),
        "--access-rules".into(),
        p(rules),
        "--metrics-listen".into(),
        metrics.clone(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start(1, &args);
    cluster.tls = Some(tls(&pki, Some("dash")));
    let dash = client(&cluster, tls(&pki, Some("dash")));
    eventually("the bootstrapped rule", T, || {
        let dash = dash.clone();
        async move {
            dash.list("AccessRule", "")
                .await
                .is_ok_and(|l| names(&l) == ["dashboards"])
        }
    })
    .await;
    // Without --admin-identity nobody is admin, not even by its ID's path.
    // (The dashboards' own calls before the rule existed were refused too.)
    let before = denied_lists(&metrics);
    let admin = client(&cluster, tls(&pki, Some("admin")));
    let e = admin.list("KafkaCluster", "").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(denied_lists(&metrics), before + 1);
}

fn denied_lists(metrics: &str) -> u64 {
    let body = http_get(metrics, "/metrics");
    body.lines()
        .find_map(|l| {
            l.strip_prefix("strait_control_requests_denied_total{operation=\"Control/List\"} ")
        })
        .map_or(0, |v| v.parse().unwrap())
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn run(bin: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin).args(args).output().unwrap()
}

#[test]
fn plaintext_only_when_asked_for_and_on_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let d = data.to_str().unwrap();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let o = run(BIN, &["--dev", "--data-dir", d, "--listen", &listen]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no TLS configured"), "{err}");
    let o = run(
        BIN,
        &[
            "--dev",
            "--insecure-plaintext",
            "--data-dir",
            d,
            "--listen",
            &format!("0.0.0.0:{port}"),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("not loopback: 0.0.0.0:{port}")),
        "{err}"
    );
    let o = run(
        BIN,
        &[
            "--id",
            "1",
            "--insecure-plaintext",
            "--data-dir",
            d,
            "--listen",
            &listen,
            "--peers",
            &format!("1={listen},2=10.9.9.9:7001"),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not loopback: 10.9.9.9:7001"), "{err}");
    let o = run(
        BIN,
        &[
            "--dev",
            "--data-dir",
            d,
            "--listen",
            &listen,
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--tls-client-ca is required"), "{err}");

    let o = run(CTL, &["--endpoints", "127.0.0.1:1", "members"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("straitctl: no TLS configured"), "{err}");
    let o = run(
        CTL,
        &[
            "--insecure-plaintext",
            "--endpoints",
            "10.9.9.9:7001",
            "members",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not loopback: 10.9.9.9:7001"), "{err}");
}

#[test]
fn bad_access_flags_stop_the_node_with_every_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    let listen = format!("127.0.0.1:{}", free_port());
    let rules = tmp.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "- name: ok\n  identities: [\"spiffe://d/a\"]\n  role: reader\n\
         - name: Bad_Name\n  identities: [\"d/no-scheme\"]\n  role: reader\n",
    )
    .unwrap();
    let base = [
        "--dev",
        "--insecure-plaintext",
        "--data-dir",
        d.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    let o = run(
        BIN,
        &[&base[..], &["--access-rules", rules.to_str().unwrap()]].concat(),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("[1] (Bad_Name): name: 'Bad_Name' is not a valid name"),
        "{err}"
    );
    assert!(
        err.contains("[1] (Bad_Name): spec.identities[0]: 'd/no-scheme' must start with spiffe://"),
        "{err}"
    );
    std::fs::write(
        &rules,
        "- name: x\n  identities: [\"spiffe://d/a\"]\n  role: root\n",
    )
    .unwrap();
    let o = run(
        BIN,
        &[&base[..], &["--access-rules", rules.to_str().unwrap()]].concat(),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("[0].role: unknown variant `root`"), "{err}");
    let o = run(BIN, &[&base[..], &["--admin-identity", "admin/*"]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--admin-identity: 'admin/*' must start with spiffe://"),
        "{err}"
    );
}

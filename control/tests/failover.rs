//! Disaster-recovery failover against a real node on mTLS: an admin fails
//! a FailoverGroup over and back with straitctl, a stale generation is a
//! conflict, an edge may not decide, the edge's watch follows the decision
//! and `get fg` shows what each edge applied. Everything is audited.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::*;
use strait_control_client::{
    heartbeat_once, watch_edge_config, ClientConfig, ControlClient, EdgeSnapshot, EdgeWatchConfig,
    TlsConfig,
};
use strait_control_state::spec::{AppliedFailover, EdgeStatus};
use strait_proto::control as pb;
use tonic::Code;

const T: Duration = Duration::from_secs(30);
const DOMAIN: &str = "test.example";

fn tls(pki: &Pki, name: &str) -> TlsConfig {
    TlsConfig {
        ca_pem: std::fs::read(pki.ca_path()).unwrap(),
        cert_pem: Some(std::fs::read(pki.cert(name)).unwrap()),
        key_pem: Some(std::fs::read(pki.key(name)).unwrap()),
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

fn active(s: &EdgeSnapshot) -> Option<(&str, u64)> {
    s.failover_groups.get("pay").map(|g| g.active())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_fails_over_and_back_and_edges_follow() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir, "");
    let id = |p: &str| format!("spiffe://{DOMAIN}/{p}");
    pki.issue("node", &["127.0.0.1", "localhost"], Some(&id("control/n")));
    pki.issue("admin", &[], Some(&id("admin/ops")));
    pki.issue("e1", &[], Some(&id("edge/e1")));
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
    let mut cluster = Cluster::start(1, &args);
    cluster.tls = Some(tls(&pki, "admin"));
    cluster.wait_leader(T).await;
    let endpoints = cluster.endpoints().join(",");
    let ctl = |who: &str, a: &[&str]| ctl_tls(dir, &endpoints, Some(who), a);

    let admin = client(&cluster, tls(&pki, "admin"));
    for (kind, name, spec) in [
        (
            "KafkaCluster",
            "east",
            r#"{"bootstrap_servers":["127.0.0.1:9092"]}"#,
        ),
        (
            "KafkaCluster",
            "west",
            r#"{"bootstrap_servers":["127.0.0.1:9093"]}"#,
        ),
        (
            "KafkaCluster",
            "north",
            r#"{"bootstrap_servers":["127.0.0.1:9094"]}"#,
        ),
        (
            "FailoverGroup",
            "pay",
            r#"{"primary":"east","standby":["west","north"],
                "replication":{"kind":"mirrormaker2","source_alias":"east"}}"#,
        ),
        (
            "VirtualCluster",
            "pay",
            r#"{"edge":"e1","failover_group":"pay","bootstrap":"127.0.0.1:19092",
                "brokers":{"advertised_host":"127.0.0.1","port_range":"19100-19199"}}"#,
        ),
    ] {
        admin
            .apply(apply_req(kind, name, spec))
            .await
            .expect("admin writes");
    }

    // The edge's watch gets the group, its decision and every member.
    let mut wcfg = EdgeWatchConfig::new(&cluster.endpoints(), "e1", &dir.join("cache"));
    wcfg.client.tls = Some(tls(&pki, "e1"));
    let mut w = watch_edge_config(wcfg).unwrap();
    until_snapshot(&mut w.config, "the group at the primary", |s| {
        active(s) == Some(("east", 0)) && s.kafka_clusters.keys().eq(["east", "north", "west"])
    })
    .await;

    // Failover without a target: the first standby.
    let o = ctl("admin", &["failover", "pay", "--reason", "east is down"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "FailoverGroup/pay: active west at generation 1 (was east)"
    );
    until_snapshot(&mut w.config, "the edge follows to west", |s| {
        active(s) == Some(("west", 1))
    })
    .await;

    // A decision on a stale view is refused, and changes nothing.
    let o = ctl(
        "admin",
        &[
            "failover",
            "pay",
            "--to",
            "north",
            "--expect-generation",
            "0",
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("FailoverGroup 'pay': generation 0 expected, 1 found")
            && err.contains("Aborted"),
        "{err}"
    );

    // An edge may not decide, by straitctl or by the API.
    let o = ctl("e1", &["failover", "pay", "--expect-generation", "1"]);
    assert!(!o.status.success(), "{}", text(&o));
    let e1 = client(&cluster, tls(&pki, "e1"));
    let e = e1
        .failover(pb::FailoverRequest {
            group: "pay".into(),
            to: Some("east".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        "spiffe://test.example/edge/e1 may not Control/Failover FailoverGroup/pay"
    );
    // Nor may an admin write the status beside Failover.
    let e = admin
        .update_status(
            "FailoverGroup",
            "pay",
            r#"{"active":"east","generation":9,"by":"x","at_unix_ms":1}"#.into(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Nor drop the active cluster from the group.
    let e = admin
        .apply(apply_req(
            "FailoverGroup",
            "pay",
            r#"{"primary":"east","standby":["north"]}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("'west' is the active cluster"),
        "{e:?}"
    );

    // The edge reports what it runs; `get fg` shows it beside the decision.
    let running = EdgeStatus {
        ready: true,
        failover: vec![AppliedFailover {
            virtual_cluster: "pay".into(),
            group: "pay".into(),
            cluster: "west".into(),
            generation: 1,
            fenced: false,
        }],
        ..EdgeStatus::default()
    };
    heartbeat_once(&e1, "e1", &running).await.unwrap();
    let o = ctl("admin", &["get", "fg", "pay", "-o", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got["status"]["active"], "west");
    assert_eq!(got["status"]["generation"], 1);
    assert_eq!(got["status"]["by"], "spiffe://test.example/admin/ops");
    assert_eq!(got["status"]["reason"], "east is down");
    assert_eq!(
        got["status"]["edges"],
        serde_json::json!({"e1": {"generation": 1, "cluster": "west", "virtual_cluster": "pay"}})
    );
    let o = ctl("admin", &["get", "fg", "pay", "-o", "yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let yaml: serde_json::Value = serde_yaml_ng::from_slice(&o.stdout).unwrap();
    assert_eq!(yaml["status"]["edges"], got["status"]["edges"]);

    // Failback: the primary again. (`--planned` fences and waits for the
    // edges' replication measurements: integration/tests/test_failover_planned.py.)
    let o = ctl("admin", &["failback", "pay"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "FailoverGroup/pay: active east at generation 2 (was west)"
    );
    until_snapshot(&mut w.config, "the edge follows back to east", |s| {
        active(s) == Some(("east", 2))
    })
    .await;
    w.task.abort();

    // Audited with the caller: decisions, the conflict and the refusal.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |caller: &str, outcome: &str| {
        lines
            .iter()
            .filter(|l| {
                l["caller"] == caller
                    && l["operation"] == "Control/Failover"
                    && l["kind"] == "FailoverGroup"
                    && l["name"] == "pay"
                    && l["outcome"] == outcome
            })
            .count()
    };
    assert_eq!(count("spiffe://test.example/admin/ops", "ok"), 2);
    assert_eq!(count("spiffe://test.example/admin/ops", "failed"), 1);
    assert_eq!(count("spiffe://test.example/edge/e1", "denied"), 2);
}

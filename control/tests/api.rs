//! Watch semantics, straitctl, and the edge client library against real
//! strait-control processes.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use strait_control_client::{
    spawn_heartbeat, watch_edge_config, EdgeWatchConfig, HeartbeatConfig, SnapshotSource,
};
use strait_control_state::spec::EdgeStatus;
use strait_proto::control as pb;
use tonic::Code;

const T: Duration = Duration::from_secs(15);

fn ctl(endpoints: &str, args: &[&str]) -> Output {
    ctl_cmd()
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .output()
        .expect("run straitctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumes_and_reports_compacted_revisions() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let cluster = Cluster::start(
        1,
        &["--watch-history", "10", "--metrics-listen", &metrics_addr],
    );
    cluster.wait_leader(T).await;
    let mut c = cluster.node_client(1);
    for i in 0..30 {
        c.apply(kc_request("w", &format!("h{i}:1"))).await.unwrap();
    }
    // Resume from a retained revision: exactly the missed changes.
    let mut s = c
        .watch(pb::WatchRequest {
            kinds: vec!["KafkaCluster".into()],
            label_selector: String::new(),
            start_revision: 25,
        })
        .await
        .unwrap()
        .into_inner();
    let mut revs = Vec::new();
    while revs.len() < 6 {
        let ev = s.message().await.unwrap().unwrap();
        revs.push(ev.revision);
    }
    assert_eq!(revs, vec![25, 26, 27, 28, 29, 30]);
    // Live changes follow on the same stream.
    c.apply(kc_request("w", "live:1")).await.unwrap();
    let ev = tokio::time::timeout(T, s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.revision, 31);
    assert!(ev.resource.unwrap().spec_json.contains("live:1"));

    // Metrics reflect the open watch and the applied log.
    let body = http_get(&metrics_addr, "/metrics").await;
    assert!(body.contains("strait_control_api_watchers 1"), "{body}");
    assert!(body.contains("strait_control_raft_is_leader 1"), "{body}");
    let applied: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("strait_control_raft_applied_index "))
        .and_then(|v| v.trim().parse().ok())
        .expect("applied index metric");
    assert!(applied >= 31, "{body}");

    // A compacted revision is refused with OUT_OF_RANGE.
    let err = match c
        .watch(pb::WatchRequest {
            kinds: vec![],
            label_selector: String::new(),
            start_revision: 5,
        })
        .await
    {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("list again"), "{}", err.message());

    // List-then-watch: current objects, SYNCED, then changes; filtered by kind
    // and label selector.
    let mut req = kc_request("labelled", "a:1");
    req.resource
        .as_mut()
        .unwrap()
        .labels
        .insert("env".into(), "prod".into());
    c.apply(req).await.unwrap();
    let mut s = c
        .watch(pb::WatchRequest {
            kinds: vec!["KafkaCluster".into()],
            label_selector: "env=prod".into(),
            start_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.resource.unwrap().name, "labelled");
    let synced = s.message().await.unwrap().unwrap();
    assert_eq!(synced.r#type, pb::EventType::Synced as i32);
    c.apply(kc_request("w", "unlabelled-change:1"))
        .await
        .unwrap();
    c.delete(pb::DeleteRequest {
        kind: "KafkaCluster".into(),
        name: "labelled".into(),
        expected_revision: None,
    })
    .await
    .unwrap();
    let ev = tokio::time::timeout(T, s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.r#type, pb::EventType::Delete as i32, "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn straitctl_apply_get_delete_round_trip() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(T).await;
    let eps = cluster.endpoints().join(",");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        r#"kind: KafkaCluster
name: east
spec:
  bootstrap_servers: [127.0.0.1:9092]
---
kind: VirtualCluster
name: east-local
labels: {team: payments}
spec:
  edge: edge-east
  cluster: east
  bootstrap: 127.0.0.1:19092
  brokers: { advertised_host: 127.0.0.1, port_range: 19100-19199 }
"#,
    )
    .unwrap();
    let o = ctl(&eps, &["apply", "-f", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("KafkaCluster/east created"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("VirtualCluster/east-local created"));
    // Idempotent re-apply.
    let o = ctl(&eps, &["apply", "-f", good.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).matches("unchanged").count(), 2, "{}", stdout(&o));

    let o = ctl(&eps, &["get", "vc"]);
    let out = stdout(&o);
    assert!(out.starts_with("KIND"), "{out}");
    assert!(
        out.contains("east-local") && out.contains("team=payments"),
        "{out}"
    );
    let o = ctl(&eps, &["get", "VirtualCluster", "east-local", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spec"]["brokers"]["port_range"], "19100-19199");
    let o = ctl(&eps, &["get", "kafkaclusters", "-o", "yaml"]);
    assert!(stdout(&o).contains("bootstrap_servers"), "{}", stdout(&o));
    let o = ctl(&eps, &["get", "vc", "-l", "team=other"]);
    assert!(!stdout(&o).contains("east-local"));

    // A bad file names the file, the document and the field, and applies nothing.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        r#"kind: KafkaCluster
name: west
spec:
  bootstrap_servers: [127.0.0.1:9093]
---
kind: VirtualCluster
name: west-local
spec:
  edge: edge-west
  cluster: west
  bootstrap: 127.0.0.1:29092
  brokers: { advertised_host: 127.0.0.1, port_range: 29199-29100 }
"#,
    )
    .unwrap();
    let o = ctl(&eps, &["apply", "-f", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(err.contains("document 2"), "{err}");
    assert!(err.contains("spec.brokers.port_range"), "{err}");
    let o = ctl(&eps, &["get", "kc", "west"]);
    assert!(!o.status.success(), "nothing from a bad file is applied");
    assert!(stderr(&o).contains("not found"));

    let unknown = dir.path().join("unknown.yaml");
    std::fs::write(&unknown, "kind: Pod\nname: x\nspec: {}\n").unwrap();
    let o = ctl(&eps, &["apply", "-f", unknown.to_str().unwrap()]);
    assert!(stderr(&o).contains("document 1") && stderr(&o).contains("unknown kind 'Pod'"));

    let o = ctl(&eps, &["delete", "vc", "east-local"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ctl(&eps, &["get", "vc", "east-local"]);
    assert!(!o.status.success());

    let o = ctl(&eps, &["members"]);
    assert_eq!(stdout(&o).matches("leader").count(), 1, "{}", stdout(&o));

    // The shipped example covers every kind and stays valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mesh.yaml");
    let o = ctl(&eps, &["apply", "-f", example]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 13, "{}", stdout(&o));
    let o = ctl(&eps, &["get", "all"]);
    for kind in [
        "KafkaCluster",
        "Edge",
        "VirtualCluster",
        "AuthorizationPolicy",
        "EncryptionPolicy",
        "KmsRealm",
        "TrustBundle",
        "FailoverGroup",
        "AccessRule",
        "DenyList",
        "KmsBroker",
    ] {
        assert!(stdout(&o).contains(kind), "{kind} missing: {}", stdout(&o));
    }
}

/// `straitctl watch` keeps following when the member it streams from dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn straitctl_watch_survives_member_loss() {
    use std::io::BufRead;
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_leader(T).await;
    let eps = cluster.endpoints().join(",");
    let mut child = ctl_cmd()
        .args(["--endpoints", &eps, "watch", "kc"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_line = |needle: &str| {
        let deadline = std::time::Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no watch line containing {needle}: {e}"),
            }
        }
    };
    wait_line("SYNCED");
    let client = cluster.client();
    client.apply(kc_request("first", "a:1")).await.unwrap();
    wait_line("KafkaCluster/first");
    // The watch streams from the first endpoint; take it away.
    cluster.kill(1);
    cluster.wait_leader(T).await;
    client.apply(kc_request("second", "b:1")).await.unwrap();
    let l = wait_line("KafkaCluster/second");
    assert!(l.contains("PUT"), "{l}");
    let _ = child.kill();
    let _ = child.wait();
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edge_client_follows_reconnects_and_serves_from_cache() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_leader(T).await;
    let eps = cluster.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let f = write(
        dir.path(),
        "edge.yaml",
        r#"kind: KafkaCluster
name: east
spec: { bootstrap_servers: [127.0.0.1:9092] }
---
kind: KafkaCluster
name: west
spec: { bootstrap_servers: [127.0.0.1:9093] }
---
kind: VirtualCluster
name: east-local
spec:
  edge: edge-east
  cluster: east
  bootstrap: 127.0.0.1:19092
  brokers: { advertised_host: 127.0.0.1, port_range: 19100-19199 }
---
kind: AuthorizationPolicy
name: readers
spec:
  rules:
  - principal: "spiffe://east/*"
    allow: [read, describe]
    topics: ["orders-*"]
"#,
    );
    let o = ctl(&eps.join(","), &["apply", "-f", &f]);
    assert!(o.status.success(), "{}", stderr(&o));

    let mut cfg = EdgeWatchConfig::new(&eps, "edge-east", &cache);
    cfg.backoff_max = Duration::from_millis(300);
    let mut w = watch_edge_config(cfg.clone()).unwrap();
    let snap = tokio::time::timeout(T, w.config.wait_for(|s| s.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(snap.source, SnapshotSource::ControlPlane);
    assert!(snap.virtual_clusters.contains_key("east-local"));
    assert_eq!(snap.kafka_clusters.keys().collect::<Vec<_>>(), vec!["east"]);
    assert_eq!(snap.authorization_policies["readers"].rules.len(), 1);

    // A rule change arrives live.
    let f2 = write(
        dir.path(),
        "rule.yaml",
        r#"kind: AuthorizationPolicy
name: readers
spec:
  rules:
  - principal: "spiffe://east/*"
    allow: [read, describe]
    topics: ["orders-*", "payments-*"]
"#,
    );
    assert!(ctl(&eps.join(","), &["apply", "-f", &f2]).status.success());
    tokio::time::timeout(
        T,
        w.config.wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| s.authorization_policies["readers"].rules[0].topics.len() == 2)
        }),
    )
    .await
    .unwrap()
    .unwrap();

    // Heartbeat creates the Edge resource and writes its status.
    let hb = spawn_heartbeat(
        HeartbeatConfig {
            client: cfg.client.clone(),
            edge_name: "edge-east".into(),
            interval: Duration::from_millis(100),
        },
        || EdgeStatus {
            ready: true,
            version: "test".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let client = cluster.client();
    eventually("edge heartbeat recorded", T, || {
        let client = client.clone();
        async move {
            client.get("Edge", "edge-east").await.is_ok_and(|r| {
                r.status_json.contains("last_heartbeat_unix_ms") && r.status_json.contains("test")
            })
        }
    })
    .await;
    hb.abort();

    // Kill the member the watcher starts on (the first endpoint): the
    // watcher reconnects to another one and resumes.
    cluster.kill(1);
    cluster.wait_leader(T).await;
    let f3 = write(
        dir.path(),
        "vc2.yaml",
        r#"kind: VirtualCluster
name: east-second
spec:
  edge: edge-east
  cluster: west
  bootstrap: 127.0.0.1:19093
  brokers: { advertised_host: 127.0.0.1, port_range: 19200-19299 }
"#,
    );
    let o = ctl(&eps.join(","), &["apply", "-f", &f3]);
    assert!(o.status.success(), "{}", stderr(&o));
    tokio::time::timeout(
        T,
        w.config.wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| s.virtual_clusters.len() == 2 && s.kafka_clusters.len() == 2)
        }),
    )
    .await
    .unwrap()
    .unwrap();

    // Control plane gone: the last config stays, and a restarted edge loads it
    // from the cache.
    for id in 1..=3 {
        cluster.kill(id);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        w.config.borrow().as_ref().unwrap().virtual_clusters.len(),
        2
    );
    w.task.abort();
    let w2 = watch_edge_config(cfg).unwrap();
    let cached = w2.config.borrow().clone().expect("config from cache");
    assert_eq!(cached.source, SnapshotSource::Cache);
    assert_eq!(cached.virtual_clusters.len(), 2);
    assert!(cached.authorization_policies["readers"].rules[0]
        .topics
        .contains(&"payments-*".to_string()));
    w2.task.abort();
}

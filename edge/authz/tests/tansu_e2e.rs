//! End to end: a real broker (Tansu), the real edge data path with this
//! filter installed, and a real client (kafka-python). Principals are
//! anonymous here (client TLS lives in the proxy); rules name `anonymous`.
//! Both kafka-python and confluent-kafka (librdkafka) are driven.
//!
//! Needs `tansu` (`STRAIT_TANSU_BIN`, else `tansu` on PATH, else
//! `~/.cache/strait/tools/bin/tansu`) and a Python with kafka-python and confluent-kafka
//! (`STRAIT_PYTHON`, else `~/.cache/strait/venv/bin/python`).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use strait_authz::{
    AuditConfig, AuditSink, AuthorizationConfig, AuthorizationFilterFactory, Authorizer,
    AuthzMetrics,
};
use strait_filter::FilterFactory;
use strait_proxy::metrics::ProxyMetrics;
use strait_proxy::Edge;

fn home_path(rel: &str) -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(rel)
}

fn find_binary(env: &str, name: &str, fallback: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let fallback = home_path(fallback);
    assert!(
        fallback.is_file(),
        "{name} not found: set {env}, put {name} on PATH, or install it at {}",
        fallback.display()
    );
    fallback
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A base port with `n` consecutive free ports after it.
fn free_range(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base > u16::MAX - n {
            continue;
        }
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no range of {n} free ports");
}

async fn wait_for_port(port: u16, child: &mut tokio::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tansu exited early: {status}");
        }
        assert!(Instant::now() < deadline, "tansu did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SCRIPT: &str = r#"
import json, sys
from kafka import KafkaAdminClient, KafkaProducer, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
edge, broker = sys.argv[1], sys.argv[2]
out = {}
admin = KafkaAdminClient(bootstrap_servers=broker)
admin.create_topics([NewTopic("orders-1", 1, 1), NewTopic("payments", 1, 1), NewTopic("lease-1", 1, 1)])
admin.close()

# A leased grant: produce until the lease ends (polled, with a deadline).
import time
leased = KafkaProducer(bootstrap_servers=edge, retries=0, max_block_ms=10000, request_timeout_ms=10000)
out["lease_ok"] = 0
deadline = time.time() + 60
while time.time() < deadline:
    try:
        leased.send("lease-1", b"l").get(timeout=20)
        out["lease_ok"] += 1
    except Exception as e:
        out["lease_error"] = type(e).__name__
        out["lease_error_at"] = time.time()
        break
    time.sleep(0.1)
leased.close(timeout=5)

producer = KafkaProducer(bootstrap_servers=edge, retries=0, max_block_ms=10000, request_timeout_ms=10000)
out["allowed_offset"] = producer.send("orders-1", b"ok").get(timeout=20).offset
try:
    producer.send("payments", b"secret").get(timeout=20)
    out["denied_produce"] = "written"
except Exception as e:
    out["denied_produce"] = type(e).__name__
producer.close(timeout=5)

# Listing through the edge hides what may not be described.
lister = KafkaConsumer(bootstrap_servers=edge)
out["visible_topics"] = sorted(lister.topics())
lister.close()

consumer = KafkaConsumer("orders-1", bootstrap_servers=edge, group_id="shop-a",
                         auto_offset_reset="earliest", consumer_timeout_ms=15000)
out["consumed"] = [m.value.decode() for m in consumer][:1]
consumer.close()

try:
    c = KafkaConsumer("orders-1", bootstrap_servers=edge, group_id="other",
                      auto_offset_reset="earliest", consumer_timeout_ms=8000)
    list(c)
    c.close()
    out["denied_group"] = "consumed"
except Exception as e:
    out["denied_group"] = type(e).__name__

# librdkafka (confluent-kafka): uses newer versions (Fetch with topic ids).
import confluent_kafka
delivered = []
p = confluent_kafka.Producer({"bootstrap.servers": edge, "message.timeout.ms": 10000})
p.produce("orders-1", b"rd", on_delivery=lambda err, msg: delivered.append(err.name() if err else "ok"))
p.produce("payments", b"rd-secret", on_delivery=lambda err, msg: delivered.append(err.name() if err else "ok"))
p.flush(20)
out["rd_delivered"] = sorted(delivered)
c = confluent_kafka.Consumer({"bootstrap.servers": edge, "group.id": "shop-rd", "auto.offset.reset": "earliest"})
c.subscribe(["orders-1"])
got = []
deadline = time.time() + 30
while time.time() < deadline and len(got) < 2:
    m = c.poll(0.5)
    if m is not None and m.error() is None:
        got.append(m.value().decode())
c.close()
out["rd_consumed"] = sorted(got)

direct = KafkaConsumer(bootstrap_servers=broker)
ends = direct.end_offsets([TopicPartition("orders-1", 0), TopicPartition("payments", 0), TopicPartition("lease-1", 0)])
out["broker_end_offsets"] = {tp.topic: off for tp, off in ends.items()}
direct.close()
print("RESULT " + json.dumps(out))
"#;

const RULES: &str = r#"
rules:
  - principal: "anonymous"
    allow: [Write, Describe]
    topic: "lease-*"
    not_after: "NOT_AFTER"
  - principal: "anonymous"
    allow: [Write, Read, Describe]
    topic: "orders-*"
  - principal: "anonymous"
    allow: [Read]
    group: "shop-*"
  - principal: "*"
    allow: [Describe]
    cluster: true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_through_the_edge_against_tansu() {
    let tansu = find_binary("STRAIT_TANSU_BIN", "tansu", ".cache/strait/tools/bin/tansu");
    let python = match std::env::var("STRAIT_PYTHON") {
        Ok(path) => PathBuf::from(path),
        Err(_) => {
            let path = home_path(".cache/strait/venv/bin/python");
            assert!(
                path.is_file(),
                "python with kafka-python not found: set STRAIT_PYTHON or create {}",
                path.display()
            );
            path
        }
    };
    let broker_port = free_port();
    let broker_url = format!("tcp://127.0.0.1:{broker_port}");
    let mut broker = tokio::process::Command::new(&tansu)
        .args([
            "broker",
            "--listener-url",
            &broker_url,
            "--advertised-listener-url",
            &broker_url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tansu");
    wait_for_port(broker_port, &mut broker).await;

    let edge_port = free_port();
    let range = free_range(8);
    let config = strait_edge_config::parse(&format!(
        r#"
virtual_clusters:
  - name: secure
    bootstrap: 127.0.0.1:{edge_port}
    brokers: {{ advertised_host: 127.0.0.1, port_range: {range}-{last} }}
    upstream: {{ bootstrap_servers: [127.0.0.1:{broker_port}] }}
"#,
        last = range + 7
    ))
    .expect("edge config");

    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let mut registry = Registry::default();
    let authz_metrics = AuthzMetrics::register(&mut registry);
    let (audit, audit_writer) = AuditSink::spawn(
        &AuditConfig {
            path: audit_path.to_str().unwrap().into(),
            sample_allows: 1.0,
        },
        authz_metrics.clone(),
    )
    .unwrap();
    // The lease ends a few seconds into the client run.
    let not_after = std::time::SystemTime::now() + Duration::from_secs(8);
    let not_after_text = time::OffsetDateTime::from(not_after)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let rules = RULES.replace("NOT_AFTER", &not_after_text);
    let authorizer =
        Arc::new(Authorizer::new(&AuthorizationConfig::from_yaml(&rules).unwrap()).unwrap());
    let factory: Arc<dyn FilterFactory> = Arc::new(AuthorizationFilterFactory::new(
        authorizer,
        audit,
        &authz_metrics,
        "secure",
    ));
    let mut filters = HashMap::new();
    filters.insert("secure".to_string(), vec![factory]);
    let proxy_metrics = ProxyMetrics::register(&mut registry);
    let tls_metrics = strait_tls::TlsMetrics::register(&mut registry);
    let edge = Edge::start(
        &config,
        proxy_metrics,
        tls_metrics,
        filters,
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .expect("edge starts");

    let edge_addr: SocketAddr = format!("127.0.0.1:{edge_port}").parse().unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .args([
                "-c",
                SCRIPT,
                &edge_addr.to_string(),
                &format!("127.0.0.1:{broker_port}"),
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("client script timed out")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("client script failed:\n{stdout}\n{stderr}"));
    let result: serde_json::Value = serde_json::from_str(line).unwrap();

    assert_eq!(result["allowed_offset"], 0, "{result}");
    assert_eq!(
        result["denied_produce"], "TopicAuthorizationFailedError",
        "{result}"
    );
    assert_eq!(
        result["visible_topics"],
        serde_json::json!(["orders-1"]),
        "{result}"
    );
    assert_eq!(result["consumed"], serde_json::json!(["ok"]), "{result}");
    assert_eq!(
        result["denied_group"], "GroupAuthorizationFailedError",
        "{result}"
    );
    // Checked at the broker itself: the denied record was never written.
    assert_eq!(
        result["rd_delivered"],
        serde_json::json!(["TOPIC_AUTHORIZATION_FAILED", "ok"]),
        "{result}"
    );
    assert_eq!(
        result["rd_consumed"],
        serde_json::json!(["ok", "rd"]),
        "{result}"
    );
    assert_eq!(result["broker_end_offsets"]["orders-1"], 2, "{result}");
    assert_eq!(result["broker_end_offsets"]["payments"], 0, "{result}");
    // The lease: writes succeeded before not_after, the first refusal came
    // after it, and the broker holds exactly the accepted records.
    let lease_ok = result["lease_ok"].as_u64().unwrap();
    assert!(lease_ok >= 1, "{result}");
    assert_eq!(
        result["lease_error"], "TopicAuthorizationFailedError",
        "{result}"
    );
    let refused_at = result["lease_error_at"].as_f64().unwrap();
    let not_after_secs = not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        refused_at >= not_after_secs,
        "refused {refused_at} before the lease ended {not_after_secs}"
    );
    assert_eq!(
        result["broker_end_offsets"]["lease-1"], lease_ok,
        "{result}"
    );

    edge.shutdown().await;
    broker.kill().await.ok();
    drop(registry);
    // The edge's connections (and their filters) are gone; the writer ends
    // when the factory's sink clones are dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), audit_writer).await;
    let text = std::fs::read_to_string(&audit_path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // kafka-python asks Metadata for the topic first; the denial is audited there.
    assert!(lines
        .iter()
        .any(|l| l["decision"] == "deny" && l["resource_name"] == "payments"));
    assert!(lines.iter().any(|l| l["decision"] == "deny"
        && l["resource_type"] == "Group"
        && l["resource_name"] == "other"));
    assert!(lines.iter().any(|l| l["decision"] == "allow"
        && l["api_key"] == "Produce"
        && l["resource_name"] == "orders-1"
        && l["principal"] == "anonymous"));
}

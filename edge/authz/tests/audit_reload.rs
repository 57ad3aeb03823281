//! Audit lines (format, sampling, back-pressure trade-off), metrics, and
//! rule reloads from files (a broken file keeps the old rules).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use strait_authz::audit::{AuditRecord, AUDIT_CHANNEL_CAPACITY};
use strait_authz::{
    AuditConfig, AuditSink, AuthorizationConfig, AuthorizationFilterFactory, Authorizer,
    AuthzMetrics, Operation, ResourceType,
};
use strait_filter::{
    ConnectionInfo, Endpoint, Filter, FilterContext, Principal, RequestFrame, RequestVerdict,
};
use strait_kafka::kafka_protocol::messages::*;
use strait_kafka::kafka_protocol::protocol::StrBytes;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const ORDERS: &str = "spiffe://example.org/ns/shop/sa/orders";
const RULES: &str = r#"
rules:
  - principal: "spiffe://example.org/ns/shop/sa/orders"
    allow: [Write, Describe]
    topic: "orders-*"
"#;

fn produce(topics: &[&str]) -> RequestFrame {
    let body = ProduceRequest::default().with_acks(-1).with_topic_data(
        topics
            .iter()
            .map(|t| {
                produce_request::TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partition_data(vec![Default::default()])
            })
            .collect(),
    );
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(9)
        .with_correlation_id(1);
    RequestFrame::new(header, RequestKind::Produce(body)).unwrap()
}

fn info() -> ConnectionInfo {
    ConnectionInfo {
        via_peer: None,
        virtual_cluster: "secure".into(),
        client_addr: "127.0.0.1:45678".parse().unwrap(),
        endpoint: Endpoint::Broker(1),
        principal: Principal::Named(ORDERS.into()),
    }
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text
}

async fn decide(factory: &AuthorizationFilterFactory, topics: &[&str]) -> RequestVerdict {
    let info = info();
    let mut filter = factory.filter_for(&info);
    let ctx = FilterContext {
        connection: &info,
        now: SystemTime::now(),
    };
    filter.on_request(&ctx, &mut produce(topics)).await
}

#[tokio::test]
async fn audit_lines_are_json_with_every_field_and_metrics_count_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut registry = Registry::default();
    let metrics = AuthzMetrics::register(&mut registry);
    let config = AuditConfig {
        path: path.to_str().unwrap().into(),
        sample_allows: 1.0,
    };
    let (sink, writer) = AuditSink::spawn(&config, metrics.clone()).unwrap();
    let authorizer =
        Arc::new(Authorizer::new(&AuthorizationConfig::from_yaml(RULES).unwrap()).unwrap());
    let factory = AuthorizationFilterFactory::new(authorizer, sink, &metrics, "secure");
    assert!(matches!(
        decide(&factory, &["orders-eu"]).await,
        RequestVerdict::Forward
    ));
    assert!(matches!(
        decide(&factory, &["payments"]).await,
        RequestVerdict::Respond(_)
    ));
    // Dropping every sink clone ends the writer after a final flush.
    drop(factory);
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("audit writer did not finish")
        .unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in &lines {
        let time = line["time"].as_str().unwrap();
        OffsetDateTime::parse(time, &Rfc3339).expect("RFC 3339 time");
        assert_eq!(line["principal"], ORDERS);
        assert_eq!(line["client_address"], "127.0.0.1:45678");
        assert_eq!(line["virtual_cluster"], "secure");
        assert_eq!(line["api_key"], "Produce");
        assert_eq!(line["resource_type"], "Topic");
        assert_eq!(line["operation"], "Write");
    }
    assert_eq!(lines[0]["resource_name"], "orders-eu");
    assert_eq!(lines[0]["decision"], "allow");
    assert_eq!(lines[0]["rule"]["index"], 0);
    assert_eq!(lines[0]["rule"]["principal"], ORDERS);
    assert_eq!(lines[1]["resource_name"], "payments");
    assert_eq!(lines[1]["decision"], "deny");
    assert_eq!(lines[1]["rule"], "default-deny");

    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"authz_decisions_total{virtual_cluster="secure",result="allow"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"authz_decisions_total{virtual_cluster="secure",result="deny"} 1"#));
    assert!(text.contains("authz_audit_lines_written_total 2"), "{text}");
}

#[tokio::test]
async fn allows_are_sampled_denies_never() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut registry = Registry::default();
    let metrics = AuthzMetrics::register(&mut registry);
    let config = AuditConfig {
        path: path.to_str().unwrap().into(),
        sample_allows: 0.0,
    };
    let (sink, writer) = AuditSink::spawn(&config, metrics.clone()).unwrap();
    let authorizer =
        Arc::new(Authorizer::new(&AuthorizationConfig::from_yaml(RULES).unwrap()).unwrap());
    let factory = AuthorizationFilterFactory::new(authorizer, sink, &metrics, "secure");
    for _ in 0..20 {
        decide(&factory, &["orders-eu"]).await;
    }
    decide(&factory, &["payments", "secrets"]).await;
    drop(factory);
    writer.await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let denied: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(denied.len(), 2, "{text}");
    assert!(denied.iter().all(|l| l["decision"] == "deny"));
    let text = metrics_text(&registry);
    assert!(text.contains(r#"authz_decisions_total{virtual_cluster="secure",result="allow"} 20"#));
}

fn record(allowed: bool) -> AuditRecord {
    AuditRecord {
        time: SystemTime::now(),
        principal: ORDERS.into(),
        client_addr: "127.0.0.1:1".parse().unwrap(),
        virtual_cluster: "secure".into(),
        api_key: ApiKey::Produce as i16,
        resource_type: ResourceType::Topic,
        resource_name: "orders-eu".into(),
        operation: Operation::Write,
        allowed,
        rule: None,
        via_peer: None,
    }
}

#[tokio::test]
async fn a_stalled_writer_drops_allows_and_delays_denies() {
    let mut registry = Registry::default();
    let metrics = AuthzMetrics::register(&mut registry);
    // A pipe nobody reads: the writer blocks once its buffers are full.
    let (stalled, _reader) = tokio::io::duplex(1024);
    let (sink, _writer) = AuditSink::spawn_with_writer(stalled, 1.0, metrics.clone());
    let started = Instant::now();
    // Feed the writer until it is stuck in a write, then fill the channel.
    for _ in 0..3 {
        for _ in 0..(AUDIT_CHANNEL_CAPACITY + 1000) {
            sink.record_allow(record(true));
        }
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..(AUDIT_CHANNEL_CAPACITY + 1000) {
        sink.record_allow(record(true));
    }
    // Allows never block the data path.
    assert!(started.elapsed() < Duration::from_secs(5));
    let text = metrics_text(&registry);
    let dropped_allows: u64 = text
        .lines()
        .find(|l| l.starts_with(r#"authz_audit_lines_dropped_total{decision="allow"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("allow drops counted");
    assert!(dropped_allows >= 1000, "{dropped_allows}");
    // A deny waits for room (up to DENY_WAIT) before being given up.
    let started = Instant::now();
    sink.record_deny(record(false)).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"authz_audit_lines_dropped_total{decision="deny"} 1"#),
        "{text}"
    );
}

fn orders_may_write(authorizer: &Authorizer, topic: &str) -> bool {
    authorizer
        .rules()
        .decide(
            &Principal::Named(ORDERS.into()),
            ResourceType::Topic,
            topic,
            Operation::Write,
            SystemTime::now(),
        )
        .allowed
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn reload_from_file_keeps_old_rules_on_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, format!("authorization:\n{}", indent(RULES))).unwrap();
    let authorizer = Authorizer::new(&AuthorizationConfig::default()).unwrap();
    authorizer.reload_from_file(&path).unwrap();
    assert!(orders_may_write(&authorizer, "orders-eu"));

    std::fs::write(&path, "rules:\n  - principal: x\n    allow: [Read]\n").unwrap();
    let err = authorizer.reload_from_file(&path).unwrap_err();
    assert!(err.to_string().contains("authorization.rules[0]"), "{err}");
    std::fs::write(&path, "rules: [unclosed\n").unwrap();
    assert!(authorizer.reload_from_file(&path).is_err());
    assert!(authorizer
        .reload_from_file(&dir.path().join("missing.yaml"))
        .is_err());
    assert!(orders_may_write(&authorizer, "orders-eu"), "old rules kept");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[tokio::test]
async fn watcher_reloads_valid_files_and_ignores_broken_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, RULES).unwrap();
    let mut registry = Registry::default();
    let metrics = AuthzMetrics::register(&mut registry);
    let authorizer = Arc::new(Authorizer::new(&AuthorizationConfig::default()).unwrap());
    authorizer.reload_from_file(&path).unwrap();
    let watcher = authorizer.clone().watch_file(
        path.clone(),
        Duration::from_millis(25),
        Some(metrics.clone()),
    );

    std::fs::write(&path, "rules:\n  - principal: [\n").unwrap();
    wait_until("the broken file to be rejected", || {
        metrics_text(&registry).contains(r#"authz_rule_reloads_total{result="rejected"} 1"#)
    })
    .await;
    assert!(orders_may_write(&authorizer, "orders-eu"));

    std::fs::write(
        &path,
        "rules:\n  - principal: \"spiffe://example.org/ns/shop/sa/orders\"\n    allow: [Write]\n    topic: \"payments\"\n",
    )
    .unwrap();
    wait_until("the new rules", || {
        orders_may_write(&authorizer, "payments")
    })
    .await;
    assert!(!orders_may_write(&authorizer, "orders-eu"));
    assert!(metrics_text(&registry).contains(r#"authz_rule_reloads_total{result="ok"} 1"#));
    watcher.abort();
}

//! Added cost of the authorization filter per request, with 100 rules.
//!
//! `cargo bench -p strait-authz --bench authorize`
//!
//! Each iteration runs the filter's `on_request` inside a current-thread
//! Tokio `block_on`; the `baseline/block_on` case measures that harness alone
//! so its cost can be subtracted.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use prometheus_client::registry::Registry;
use strait_authz::{
    AuditSink, AuthorizationConfig, AuthorizationFilterFactory, Authorizer, AuthzMetrics,
};
use strait_filter::{ConnectionInfo, Endpoint, Filter, FilterContext, Principal, RequestFrame};
use strait_kafka::kafka_protocol::messages::*;
use strait_kafka::kafka_protocol::protocol::StrBytes;

const ORDERS: &str = "spiffe://example.org/ns/shop/sa/orders";

/// 100 rules. With `shared_principal` the 96 filler rules apply to every
/// principal (`*`), so each decision scans them all (worst case); otherwise
/// they belong to other service accounts and are skipped per connection.
fn rules(shared_principal: bool) -> String {
    let mut text = String::from("rules:\n");
    for i in 0..96 {
        let principal = if shared_principal {
            "*".to_owned()
        } else {
            format!("spiffe://example.org/ns/team{i}/sa/*")
        };
        text.push_str(&format!(
            "  - principal: \"{principal}\"\n    allow: [Read, Write]\n    topic: \"team{i}-*\"\n"
        ));
    }
    text.push_str(&format!(
        r#"  - principal: "{ORDERS}"
    allow: [Write, Describe]
    topic: "orders-*"
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read, Describe]
    topic: "orders-*"
    not_after: "2099-01-01T00:00:00Z"
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read]
    group: "shop-*"
  - principal: "*"
    allow: [Describe]
    cluster: true
"#
    ));
    text
}

fn name(text: String) -> TopicName {
    TopicName(StrBytes::from_string(text))
}

fn produce() -> RequestFrame {
    let body = ProduceRequest::default()
        .with_acks(-1)
        .with_topic_data(vec![produce_request::TopicProduceData::default()
            .with_name(name("orders-eu".into()))
            .with_partition_data(vec![Default::default()])]);
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(9)
        .with_correlation_id(1);
    RequestFrame::new(header, RequestKind::Produce(body)).unwrap()
}

fn fetch() -> RequestFrame {
    // Sessionless, as the filter leaves it, so the frame is not re-encoded.
    let body = FetchRequest::default()
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(
            (0..10)
                .map(|i| {
                    fetch_request::FetchTopic::default()
                        .with_topic(name(format!("orders-{i}")))
                        .with_partitions(vec![Default::default()])
                })
                .collect(),
        );
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Fetch as i16)
        .with_request_api_version(12)
        .with_correlation_id(2);
    RequestFrame::new(header, RequestKind::Fetch(body)).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let info = ConnectionInfo {
        via_peer: None,
        virtual_cluster: "bench".into(),
        client_addr: "127.0.0.1:1".parse().unwrap(),
        endpoint: Endpoint::Broker(0),
        principal: Principal::Named(ORDERS.into()),
    };
    let mut group = c.benchmark_group("authorize");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);

    group.bench_function("baseline/block_on", |b| {
        b.iter(|| rt.block_on(async { std::hint::black_box(1) }))
    });

    for (label, shared) in [
        ("100_rules_4_for_principal", false),
        ("100_rules_all_for_principal", true),
    ] {
        let config = AuthorizationConfig::from_yaml(&rules(shared)).unwrap();
        let authorizer = Arc::new(Authorizer::new(&config).unwrap());
        let mut registry = Registry::default();
        let metrics = AuthzMetrics::register(&mut registry);
        for (audit_label, audited) in [("no_audit", false), ("audit_all", true)] {
            let audit = if audited {
                let _guard = rt.enter();
                AuditSink::spawn_with_writer(tokio::io::sink(), 1.0, metrics.clone()).0
            } else {
                AuditSink::disabled()
            };
            let factory =
                AuthorizationFilterFactory::new(authorizer.clone(), audit, &metrics, "bench");
            let mut filter = factory.filter_for(&info);
            let mut frame = produce();
            group.bench_function(format!("produce_1_topic/{label}/{audit_label}"), |b| {
                b.iter(|| {
                    let ctx = FilterContext {
                        connection: &info,
                        now: SystemTime::now(),
                    };
                    rt.block_on(filter.on_request(&ctx, &mut frame))
                })
            });
            let mut frame = fetch();
            group.bench_function(format!("fetch_10_topics/{label}/{audit_label}"), |b| {
                b.iter(|| {
                    let ctx = FilterContext {
                        connection: &info,
                        now: SystemTime::now(),
                    };
                    rt.block_on(filter.on_request(&ctx, &mut frame))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Reconfiguring a running edge: clusters are added, kept, replaced on the
//! same port, and removed, with their ports bound and released accordingly.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use strait_proxy::metrics::ProxyMetrics;
use strait_proxy::{Edge, FiltersByCluster};
use strait_tls::TlsMetrics;
use tokio::net::TcpStream;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(clusters: &[(&str, u16, &str)]) -> strait_edge_config::Config {
    let mut yaml = String::from("virtual_clusters:\n");
    for (i, (name, port, upstream)) in clusters.iter().enumerate() {
        let base = 40000 + 100 * i as u16 + (port % 50);
        yaml.push_str(&format!(
            "  - name: {name}\n    bootstrap: 127.0.0.1:{port}\n    brokers: {{ advertised_host: 127.0.0.1, port_range: {base}-{} }}\n    upstream: {{ bootstrap_servers: [\"{upstream}\"] }}\n",
            base + 9
        ));
    }
    strait_edge_config::parse(&yaml).unwrap()
}

async fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

#[tokio::test]
async fn apply_adds_keeps_replaces_and_removes_clusters() {
    let (a, b) = (free_port(), free_port());
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(&mut registry);
    let tls = TlsMetrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let mut edge = Edge::start(
        &config(&[("a", a, "127.0.0.1:9")]),
        metrics,
        tls,
        FiltersByCluster::new(),
        ready.clone(),
    )
    .await
    .unwrap();
    assert!(ready.load(std::sync::atomic::Ordering::Acquire));
    assert!(accepts(a).await);
    assert!(!accepts(b).await);

    let report = edge
        .apply(
            &config(&[("a", a, "127.0.0.1:9"), ("b", b, "127.0.0.1:9")]),
            FiltersByCluster::new(),
        )
        .await
        .unwrap();
    assert_eq!(report.added, vec!["b"]);
    assert_eq!(report.unchanged, vec!["a"]);
    assert!(accepts(b).await);

    // A changed upstream replaces the cluster on the same bootstrap port.
    let report = edge
        .apply(
            &config(&[("a", a, "127.0.0.1:10"), ("b", b, "127.0.0.1:9")]),
            FiltersByCluster::new(),
        )
        .await
        .unwrap();
    assert_eq!(report.replaced, vec!["a"]);
    assert!(accepts(a).await);

    let report = edge
        .apply(
            &config(&[("a", a, "127.0.0.1:10")]),
            FiltersByCluster::new(),
        )
        .await
        .unwrap();
    assert_eq!(report.removed, vec!["b"]);
    assert!(!accepts(b).await, "a removed cluster's port is closed");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), edge.shutdown())
            .await
            .unwrap()
    );
    assert!(!ready.load(std::sync::atomic::Ordering::Acquire));
}

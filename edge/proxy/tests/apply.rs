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

    // A changed upstream is swapped in place: same listeners.
    let report = edge
        .apply(
            &config(&[("a", a, "127.0.0.1:10"), ("b", b, "127.0.0.1:9")]),
            FiltersByCluster::new(),
        )
        .await
        .unwrap();
    assert_eq!(report.switched, vec!["a"]);
    assert_eq!(report.unchanged, vec!["b"]);
    assert!(report.replaced.is_empty());
    assert!(accepts(a).await);

    // Changed listeners (another bootstrap port) replace the cluster.
    let a2 = free_port();
    let report = edge
        .apply(
            &config(&[("a", a2, "127.0.0.1:10"), ("b", b, "127.0.0.1:9")]),
            FiltersByCluster::new(),
        )
        .await
        .unwrap();
    assert_eq!(report.replaced, vec!["a"]);
    assert!(accepts(a2).await);
    assert!(!accepts(a).await, "the old bootstrap port is closed");
    let a = a2;

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

/// A fake broker: accepts connections and reports each one.
async fn fake_broker() -> (String, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if tx.send(stream).is_err() {
                return;
            }
        }
    });
    (address, rx)
}

async fn next_connection(rx: &mut tokio::sync::mpsc::UnboundedReceiver<TcpStream>) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a connection upstream within 10 s")
        .expect("the fake broker runs")
}

#[tokio::test]
async fn a_swapped_upstream_keeps_the_listener_and_moves_every_connection() {
    use tokio::io::AsyncReadExt;
    let port = free_port();
    let (primary, mut primary_conns) = fake_broker().await;
    let (standby, mut standby_conns) = fake_broker().await;
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(&mut registry);
    let tls = TlsMetrics::register(&mut registry);
    let mut edge = Edge::start(
        &config(&[("orders", port, &primary)]),
        metrics,
        tls,
        FiltersByCluster::new(),
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .unwrap();
    let mut before = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut at_primary = next_connection(&mut primary_conns).await;

    let report = edge
        .apply(
            &config(&[("orders", port, &standby)]),
            FiltersByCluster::new(),
        )
        .await
        .unwrap();
    assert_eq!(report.switched, vec!["orders"]);
    // The client's connection to the old upstream is closed (it had nothing
    // in flight), and so is the edge's connection to the old broker.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), before.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    let read = tokio::time::timeout(Duration::from_secs(10), at_primary.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    // The same bootstrap now leads to the standby, and only there.
    let _after = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _at_standby = next_connection(&mut standby_conns).await;
    assert!(
        primary_conns.try_recv().is_err(),
        "nothing more reached the primary"
    );
    let text = {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    };
    assert!(
        text.lines()
            .any(|l| l.starts_with("upstream_swaps_total{virtual_cluster=\"orders\"} 1")),
        "{text}"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(10), edge.shutdown())
            .await
            .unwrap()
    );
}

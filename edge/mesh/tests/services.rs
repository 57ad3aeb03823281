//! Mesh services end to end: two real meshes on loopback (QUIC), a TLS echo
//! service behind the far edge (east), forwards on the near edge (west).
//! The TLS session runs between the client and the service through the
//! tunnel, verified against the service's name, not the forward's address.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{bundle, ca, free_tcp, free_udp, host_port, leaf, metric, peer, wait_until, write_ca};
use prometheus_client::registry::Registry;
use rcgen::{CertifiedIssuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use strait_edge_config::MeshTransport;
use strait_edge_config::{Mesh as MeshConfig, MeshForward, MeshPeer, MeshService};
use strait_mesh::metrics::MeshMetrics;
use strait_mesh::Mesh;
use strait_tls::ServedCertificate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const EAST: &str = "spiffe://east.example/edge/edge-east";
const WEST: &str = "spiffe://west.example/edge/edge-west";
const SERVICE_NAME: &str = "svc.east.example";

/// A TLS echo server for `SERVICE_NAME`: echoes until the client half-closes.
async fn tls_echo(ca: &CertifiedIssuer<'static, KeyPair>, dir: &Path) -> SocketAddr {
    let (cert, key) = leaf(
        ca,
        vec![SanType::DnsName(SERVICE_NAME.try_into().unwrap())],
        dir,
        "service",
    );
    let certs = vec![CertificateDer::from_pem_file_compat(&cert)];
    let key = PrivateKeyDer::from_pem_file_compat(&key);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

trait FromPemFile {
    fn from_pem_file_compat(path: &Path) -> Self;
}

impl FromPemFile for CertificateDer<'static> {
    fn from_pem_file_compat(path: &Path) -> Self {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_file(path).unwrap()
    }
}

impl FromPemFile for PrivateKeyDer<'static> {
    fn from_pem_file_compat(path: &Path) -> Self {
        use rustls::pki_types::pem::PemObject;
        PrivateKeyDer::from_pem_file(path).unwrap()
    }
}

/// The forward's peer closed the local connection: EOF (or a reset), fast.
async fn closed_promptly(addr: SocketAddr) {
    let started = tokio::time::Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
        .await
        .expect("the local connection was not closed within 3 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

struct Sites {
    _dir: tempfile::TempDir,
    east: Mesh,
    west: Mesh,
    east_metrics: Registry,
    west_metrics: Registry,
    service_ca: CertifiedIssuer<'static, KeyPair>,
    /// west forwards: echo, hidden (defined at east, not exported), down
    /// (exported, nothing listening), gone (a peer that never comes up).
    echo: SocketAddr,
    hidden: SocketAddr,
    down: SocketAddr,
    gone: SocketAddr,
}

async fn sites() -> Sites {
    sites_over(MeshTransport::Quic).await
}

async fn sites_over(transport: MeshTransport) -> Sites {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (east_ca, west_ca, service_ca) = (ca("east"), ca("west"), ca("service"));
    let east_uri = vec![SanType::URI(EAST.try_into().unwrap())];
    let west_uri = vec![SanType::URI(WEST.try_into().unwrap())];
    let (east_cert, east_key) = leaf(&east_ca, east_uri, d, "east");
    let (west_cert, west_key) = leaf(&west_ca, west_uri, d, "west");
    let (east_bundle, west_bundle) = (
        write_ca(&east_ca, d, "east-ca"),
        write_ca(&west_ca, d, "west-ca"),
    );
    let service = tls_echo(&service_ca, d).await;
    // QUIC listens on UDP, the fallback on TCP.
    let east_listen = match transport {
        MeshTransport::Quic => free_udp(),
        MeshTransport::TlsTcp => free_tcp(),
    };
    let services = vec![
        MeshService {
            name: "echo".into(),
            address: host_port(service),
        },
        MeshService {
            name: "hidden".into(),
            address: host_port(service),
        },
        MeshService {
            name: "down".into(),
            address: host_port(free_tcp()),
        },
    ];
    let (listen, listen_tcp) = match transport {
        MeshTransport::Quic => (Some(east_listen), None),
        MeshTransport::TlsTcp => (None, Some(east_listen)),
    };
    let east_config = MeshConfig {
        listen,
        listen_tcp,
        identity: ServedCertificate::Files {
            cert: east_cert,
            key: east_key,
        },
        trust_bundles: vec![bundle("west.example", west_bundle)],
        peers: vec![peer("edge-west", WEST, vec![], &["echo", "down"])],
        services,
        forwards: vec![],
    };
    let (echo, hidden, down, gone) = (free_tcp(), free_tcp(), free_tcp(), free_tcp());
    let forward = |listen, peer: &str, service: &str| MeshForward {
        listen,
        peer: peer.into(),
        service: service.into(),
    };
    let west_config = MeshConfig {
        listen: None,
        listen_tcp: None,
        identity: ServedCertificate::Files {
            cert: west_cert,
            key: west_key,
        },
        trust_bundles: vec![bundle("east.example", east_bundle)],
        peers: vec![
            MeshPeer {
                transport,
                ..peer("edge-east", EAST, vec![host_port(east_listen)], &[])
            },
            // Nothing answers there: its tunnel never comes up.
            peer(
                "edge-gone",
                "spiffe://east.example/edge/gone",
                vec![host_port(free_udp())],
                &[],
            ),
        ],
        services: vec![],
        forwards: vec![
            forward(echo, "edge-east", "echo"),
            forward(hidden, "edge-east", "hidden"),
            forward(down, "edge-east", "down"),
            forward(gone, "edge-gone", "echo"),
        ],
    };
    let (mut east_metrics, mut west_metrics) = (Registry::default(), Registry::default());
    let targets = || tokio::sync::watch::channel(Default::default()).1;
    let east = Mesh::start(
        &east_config,
        None,
        None,
        targets(),
        MeshMetrics::register(east_metrics.sub_registry_with_prefix("strait")),
    )
    .await
    .unwrap();
    let west = Mesh::start(
        &west_config,
        None,
        None,
        targets(),
        MeshMetrics::register(west_metrics.sub_registry_with_prefix("strait")),
    )
    .await
    .unwrap();
    let states = west.tunnel_states();
    wait_until("west's tunnel to east is up", || {
        states().contains(&("edge-east".to_owned(), true))
    })
    .await;
    Sites {
        _dir: dir,
        east,
        west,
        east_metrics,
        west_metrics,
        service_ca,
        echo,
        hidden,
        down,
        gone,
    }
}

/// TLS to the service through the forward at `addr`, verified as `SERVICE_NAME`.
async fn tls_through(
    addr: SocketAddr,
    ca: &CertifiedIssuer<'static, KeyPair>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVICE_NAME).unwrap(), tcp)
        .await
}

/// End-to-end TLS through west's forward and east's service stream: 1 MiB
/// each way (more than the relay buffers and a stream window's share).
async fn echo_one_mib(s: &Sites) {
    let mut tls = tls_through(s.echo, &s.service_ca).await.unwrap();
    let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut tls);
    let sent = payload.clone();
    let ((), echoed) = tokio::join!(
        async move {
            w.write_all(&sent).await.unwrap();
            w.flush().await.unwrap();
        },
        async move {
            let mut got = vec![0u8; 1 << 20];
            r.read_exact(&mut got).await.unwrap();
            got
        }
    );
    assert!(echoed == payload, "the service's bytes came back changed");
    drop(tls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_reaches_an_exported_service_and_nothing_else() {
    let s = sites().await;

    echo_one_mib(&s).await;
    let streams =
        r#"strait_mesh_service_streams_total{peer="edge-east",service="echo",outcome="forwarded"}"#;
    let served =
        r#"strait_mesh_service_streams_total{peer="edge-west",service="echo",outcome="served"}"#;
    assert_eq!(metric(&s.west_metrics, streams), 1.0);
    assert_eq!(metric(&s.east_metrics, served), 1.0);
    // TLS records add framing: at least the payload each way, counted at both edges.
    for (registry, peer) in [
        (&s.west_metrics, "edge-east"),
        (&s.east_metrics, "edge-west"),
    ] {
        for direction in ["to_service", "from_service"] {
            let bytes = format!(
                r#"strait_mesh_service_bytes_total{{peer="{peer}",service="echo",direction="{direction}"}}"#
            );
            assert!(metric(registry, &bytes) >= (1 << 20) as f64, "{bytes}");
        }
    }

    // Defined at east but not exported to west: refused at stream open,
    // counted on both sides, and the local connection closed.
    closed_promptly(s.hidden).await;
    let refused = r#"strait_mesh_stream_refusals_total{peer="edge-west",direction="inbound",reason="not_exported"}"#;
    assert_eq!(metric(&s.east_metrics, refused), 1.0);
    let hidden = r#"strait_mesh_service_streams_total{peer="edge-east",service="hidden",outcome="not_exported"}"#;
    assert_eq!(metric(&s.west_metrics, hidden), 1.0);

    // Exported, but nothing listens at its address: unavailable.
    closed_promptly(s.down).await;
    let down = r#"strait_mesh_service_streams_total{peer="edge-east",service="down",outcome="unavailable"}"#;
    assert_eq!(metric(&s.west_metrics, down), 1.0);
    let down_east = r#"strait_mesh_service_streams_total{peer="edge-west",service="down",outcome="unavailable"}"#;
    assert_eq!(metric(&s.east_metrics, down_east), 1.0);

    // A peer that is down: closed at once, no stream.
    closed_promptly(s.gone).await;
    let gone =
        r#"strait_mesh_service_streams_total{peer="edge-gone",service="echo",outcome="no_tunnel"}"#;
    assert_eq!(metric(&s.west_metrics, gone), 1.0);

    s.west.shutdown().await;
    s.east.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_closes_its_connections_at_once_while_the_peer_is_down() {
    let s = sites().await;
    // East gone: west's tunnel goes down (east closed it), and the forward
    // closes new connections at once instead of holding them.
    s.east.shutdown().await;
    let states = s.west.tunnel_states();
    wait_until("west saw the tunnel close", || {
        states().contains(&("edge-east".to_owned(), false))
    })
    .await;
    closed_promptly(s.echo).await;
    let none =
        r#"strait_mesh_service_streams_total{peer="edge-east",service="echo",outcome="no_tunnel"}"#;
    assert_eq!(metric(&s.west_metrics, none), 1.0);
    assert!(tls_through(s.echo, &s.service_ca).await.is_err());
    s.west.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_streams_cross_the_tls_over_tcp_fallback_too() {
    let s = sites_over(MeshTransport::TlsTcp).await;
    // Over yamux too the refusal itself reaches the near edge (not a reset
    // stream): the far edge ends the stream after its answer.
    echo_one_mib(&s).await;
    let served =
        r#"strait_mesh_service_streams_total{peer="edge-west",service="echo",outcome="served"}"#;
    assert_eq!(metric(&s.east_metrics, served), 1.0);
    closed_promptly(s.hidden).await;
    let hidden = r#"strait_mesh_service_streams_total{peer="edge-east",service="hidden",outcome="not_exported"}"#;
    assert_eq!(metric(&s.west_metrics, hidden), 1.0);
    s.west.shutdown().await;
    s.east.shutdown().await;
}

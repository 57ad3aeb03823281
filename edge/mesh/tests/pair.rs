//! A pair of edges keeps one connection, on both transports: streams go
//! both ways on it whichever edge dialed, and when both dial at once the
//! two edges agree on one connection and retire the other. Two real meshes
//! on loopback; each exports a TCP echo service the other reaches through a
//! forward, so a stream in each direction is checked end to end.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{bundle, ca, free_tcp, free_udp, host_port, leaf, metric, peer, wait_until, write_ca};
use prometheus_client::registry::Registry;
use rcgen::SanType;
use strait_edge_config::{HostPort, Mesh as MeshConfig, MeshForward, MeshService, MeshTransport};
use strait_mesh::metrics::MeshMetrics;
use strait_mesh::Mesh;
use strait_tls::ServedCertificate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Notify;

const EAST: &str = "spiffe://east.example/edge/edge-east";
const WEST: &str = "spiffe://west.example/edge/edge-west";

/// A TCP echo server.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Holds the first connection (TCP) or the first datagrams (UDP) of each
/// of two relays until both have some, so two edges' dials complete
/// together: both connections come up, whatever the scheduling.
#[derive(Clone, Default)]
struct Gate {
    arrived: Arc<AtomicUsize>,
    open: Arc<Notify>,
}

impl Gate {
    fn is_open(&self) -> bool {
        self.arrived.load(Ordering::Acquire) >= 2
    }

    /// Counts a relay in, once.
    fn arrive(&self, counted: &mut bool) {
        if !std::mem::replace(counted, true) && self.arrived.fetch_add(1, Ordering::AcqRel) + 1 >= 2
        {
            self.open.notify_waiters();
        }
    }

    async fn wait_open(&self) {
        loop {
            let notified = self.open.notified();
            if self.is_open() {
                return;
            }
            notified.await;
        }
    }
}

/// A TCP relay to `target` behind `gate`; returns its address.
async fn tcp_relay(target: SocketAddr, gate: Gate) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut counted = false;
        while let Ok((mut client, _)) = listener.accept().await {
            gate.arrive(&mut counted);
            gate.wait_open().await;
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// A UDP relay to `target` for one client behind `gate` (datagrams before
/// it opens are dropped; QUIC retransmits its Initial); returns its address.
async fn udp_relay(target: SocketAddr, gate: Gate) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(target).await.unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (f, b, c) = (front.clone(), back.clone(), client.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut counted = false;
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().unwrap() = Some(from);
            gate.arrive(&mut counted);
            if !gate.is_open() {
                continue;
            }
            let _ = b.send(&buf[..n]).await;
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().unwrap();
            if let Some(to) = to {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    addr
}

struct Site {
    config: MeshConfig,
    metrics: Registry,
    mesh: Option<Mesh>,
    /// The forward to the other site's echo service.
    forward: SocketAddr,
}

impl Site {
    async fn start(&mut self) {
        self.metrics = Registry::default();
        let metrics = MeshMetrics::register(self.metrics.sub_registry_with_prefix("strait"));
        let targets = tokio::sync::watch::channel(Default::default()).1;
        self.mesh = Some(
            Mesh::start(&self.config, None, None, targets, metrics)
                .await
                .unwrap(),
        );
    }

    async fn stop(&mut self) {
        if let Some(mesh) = self.mesh.take() {
            mesh.shutdown().await;
        }
    }

    fn connected(&self, peer: &str) -> f64 {
        metric(
            &self.metrics,
            &format!(r#"strait_mesh_peer_connected{{peer="{peer}"}}"#),
        )
    }

    fn connections(&self, peer: &str, direction: &str) -> f64 {
        metric(
            &self.metrics,
            &format!(r#"strait_mesh_connections_total{{peer="{peer}",direction="{direction}"}}"#),
        )
    }
}

/// How each edge reaches the other's listener.
enum Dialing {
    /// Only west dials (east has no address for it).
    WestOnly,
    /// Only east dials.
    EastOnly,
    /// Both dial, through relays that make both dials complete together.
    BothAtOnce,
}

async fn sites(transport: MeshTransport, dialing: Dialing) -> (Site, Site, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (east_ca, west_ca) = (ca("east"), ca("west"));
    let (east_cert, east_key) = leaf(
        &east_ca,
        vec![SanType::URI(EAST.try_into().unwrap())],
        d,
        "east",
    );
    let (west_cert, west_key) = leaf(
        &west_ca,
        vec![SanType::URI(WEST.try_into().unwrap())],
        d,
        "west",
    );
    let (east_bundle, west_bundle) = (
        write_ca(&east_ca, d, "east-ca"),
        write_ca(&west_ca, d, "west-ca"),
    );
    let (east_listen, west_listen) = match transport {
        MeshTransport::Quic => (free_udp(), free_udp()),
        MeshTransport::TlsTcp => (free_tcp(), free_tcp()),
    };
    let gate = Gate::default();
    let relay = |target| {
        let gate = gate.clone();
        async move {
            match transport {
                MeshTransport::Quic => udp_relay(target, gate).await,
                MeshTransport::TlsTcp => tcp_relay(target, gate).await,
            }
        }
    };
    let (east_dials, west_dials): (Vec<HostPort>, Vec<HostPort>) = match dialing {
        Dialing::WestOnly => (vec![], vec![host_port(east_listen)]),
        Dialing::EastOnly => (vec![host_port(west_listen)], vec![]),
        Dialing::BothAtOnce => (
            vec![host_port(relay(west_listen).await)],
            vec![host_port(relay(east_listen).await)],
        ),
    };
    let config =
        |cert, key, listen: SocketAddr, bundle_of_other, other: (&str, &str), dials, echo| {
            let (listen, listen_tcp) = match transport {
                MeshTransport::Quic => (Some(listen), None),
                MeshTransport::TlsTcp => (None, Some(listen)),
            };
            let forward = free_tcp();
            let config = MeshConfig {
                listen,
                listen_tcp,
                identity: ServedCertificate::Files { cert, key },
                trust_bundles: vec![bundle_of_other],
                peers: vec![strait_edge_config::MeshPeer {
                    transport,
                    ..peer(other.0, other.1, dials, &["echo"])
                }],
                services: vec![MeshService {
                    name: "echo".into(),
                    address: host_port(echo),
                }],
                forwards: vec![MeshForward {
                    listen: forward,
                    peer: other.0.into(),
                    service: "echo".into(),
                }],
            };
            Site {
                config,
                metrics: Registry::default(),
                mesh: None,
                forward,
            }
        };
    let east = config(
        east_cert,
        east_key,
        east_listen,
        bundle("west.example", west_bundle),
        ("edge-west", WEST),
        east_dials,
        echo_server().await,
    );
    let west = config(
        west_cert,
        west_key,
        west_listen,
        bundle("east.example", east_bundle),
        ("edge-east", EAST),
        west_dials,
        echo_server().await,
    );
    (east, west, dir)
}

/// 256 KiB through `forward` and back: a stream from one edge to the other.
async fn echoes(forward: SocketAddr) {
    let mut tcp = TcpStream::connect(forward).await.unwrap();
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = tcp.split();
    let sent = payload.clone();
    let ((), echoed) = tokio::join!(
        async move {
            w.write_all(&sent).await.unwrap();
        },
        async move {
            let mut got = vec![0u8; payload.len()];
            r.read_exact(&mut got).await.unwrap();
            got == payload
        }
    );
    assert!(echoed, "the echo came back changed");
}

/// Both edges see exactly one connection to each other and use it both ways.
async fn one_connection_both_ways(east: &Site, west: &Site) {
    wait_until("one connection at each edge", || {
        east.connected("edge-west") == 1.0 && west.connected("edge-east") == 1.0
    })
    .await;
    echoes(west.forward).await;
    echoes(east.forward).await;
    assert_eq!(east.connected("edge-west"), 1.0);
    assert_eq!(west.connected("edge-east"), 1.0);
}

async fn the_accepting_edge_opens_streams_too(transport: MeshTransport) {
    let (mut east, mut west, _dir) = sites(transport, Dialing::WestOnly).await;
    east.start().await;
    west.start().await;
    one_connection_both_ways(&east, &west).await;
    assert_eq!(east.connections("edge-west", "dialed"), 0.0);
    assert_eq!(east.connections("edge-west", "accepted"), 1.0);
    assert_eq!(west.connections("edge-east", "dialed"), 1.0);
    west.stop().await;
    east.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_over_tcp_the_accepting_edge_opens_streams_on_the_dialed_connection() {
    the_accepting_edge_opens_streams_too(MeshTransport::TlsTcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_the_accepting_edge_opens_streams_on_the_dialed_connection() {
    the_accepting_edge_opens_streams_too(MeshTransport::Quic).await;
}

async fn both_dial_one_stays(transport: MeshTransport) {
    let (mut east, mut west, _dir) = sites(transport, Dialing::BothAtOnce).await;
    tokio::join!(east.start(), west.start());
    // Both dials completed (the relays held them until both were in)...
    wait_until("both dials and both accepts completed", || {
        east.connections("edge-west", "dialed") == 1.0
            && east.connections("edge-west", "accepted") == 1.0
            && west.connections("edge-east", "dialed") == 1.0
            && west.connections("edge-east", "accepted") == 1.0
    })
    .await;
    // ...and the pair retired one of the two.
    one_connection_both_ways(&east, &west).await;

    // East restarts: the pair is back to one connection, used both ways.
    east.stop().await;
    wait_until("west saw east go", || west.connected("edge-east") == 0.0).await;
    east.start().await;
    one_connection_both_ways(&east, &west).await;
    west.stop().await;
    east.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_over_tcp_edges_that_both_dial_keep_one_connection() {
    both_dial_one_stays(MeshTransport::TlsTcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_edges_that_both_dial_keep_one_connection() {
    both_dial_one_stays(MeshTransport::Quic).await;
}

/// Two instances of east (HA: one SPIFFE ID, one certificate) both dial
/// west, which dials neither. West keeps both connections, each instance
/// opening its streams on its own: were west to retire one as a duplicate,
/// that instance would redial, and the two would push each other out for
/// ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_instances_of_an_ha_peer_keep_their_connections() {
    let (mut east, mut west, _dir) = sites(MeshTransport::TlsTcp, Dialing::EastOnly).await;
    let forward = free_tcp();
    let mut config = east.config.clone();
    config.listen_tcp = Some(free_tcp());
    config.forwards[0].listen = forward;
    let mut east2 = Site {
        config,
        metrics: Registry::default(),
        mesh: None,
        forward,
    };
    west.start().await;
    east.start().await;
    east2.start().await;
    wait_until("a connection from each instance", || {
        west.connections("edge-east", "accepted") == 2.0
            && west.connected("edge-east") == 2.0
            && east.connected("edge-west") == 1.0
            && east2.connected("edge-west") == 1.0
    })
    .await;
    echoes(east.forward).await;
    echoes(east2.forward).await;
    echoes(west.forward).await;
    // A window in which something must not happen: longer than a
    // duplicate's idle time before it is retired.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(west.connected("edge-east"), 2.0);
    assert_eq!(west.connections("edge-east", "accepted"), 2.0);
    assert_eq!(east.connections("edge-west", "dialed"), 1.0);
    assert_eq!(east2.connections("edge-west", "dialed"), 1.0);
    echoes(east.forward).await;
    echoes(east2.forward).await;
    for site in [&mut west, &mut east, &mut east2] {
        site.stop().await;
    }
}

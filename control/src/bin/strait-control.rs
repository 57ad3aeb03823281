//! strait-control: one node of the Raft-replicated control plane.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use strait_control_api::{spawn_health, ControlService};
use strait_control_raft::{Node, NodeConfig, TlsClientConfig};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

#[derive(Parser, Debug)]
#[command(name = "strait-control", about = "Strait control plane node")]
struct Args {
    /// Raft id of this node (> 0).
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// gRPC listen address (API and Raft transport).
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// Address peers and clients use to reach this node (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long)]
    data_dir: PathBuf,
    /// Initial members: `1=host:port,2=host:port,...` (must include this node).
    #[arg(long)]
    peers: Option<String>,
    /// Single-node development mode.
    #[arg(long)]
    dev: bool,
    /// Start empty and wait to be added with `straitctl members add`.
    #[arg(long)]
    join: bool,
    /// PEM certificate of this node (server, and client towards peers).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA that client and peer certificates must chain to (enables mTLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Raft tick. Election timeout is randomised in [1, 2) x election_ticks.
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
    #[arg(long, default_value_t = 10)]
    election_ticks: usize,
    #[arg(long, default_value_t = 2)]
    heartbeat_ticks: usize,
    /// Snapshot and compact the Raft log every N applied entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_threshold: u64,
    /// Watch events kept for resumption; older revisions answer OUT_OF_RANGE.
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
    #[arg(long, default_value_t = 5000)]
    proposal_timeout_ms: u64,
    /// Allow test-only RPCs (SetPartitioned).
    #[arg(long)]
    enable_test_hooks: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("--peers: '{part}' is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("--peers: '{id}' is not a node id"))?;
        if id == 0 {
            bail!("--peers: node id 0 is reserved");
        }
        out.insert(id, addr.trim().to_string());
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    // Built in one workspace with the AWS SDK, rustls has two crypto
    // providers compiled in and cannot pick one by itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.id == 0 {
        bail!("--id must be > 0");
    }
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| args.listen.to_string());
    let mut peers = match (&args.peers, args.dev) {
        (Some(p), _) => parse_peers(p)?,
        (None, true) => BTreeMap::new(),
        (None, false) if args.join => BTreeMap::new(),
        (None, false) => bail!("--peers is required (or --dev for a single node, --join to join)"),
    };
    if !args.join {
        match peers.get(&args.id) {
            Some(a) if *a != advertise => {
                bail!(
                    "--peers lists {a} for node {}, but this node advertises {advertise}",
                    args.id
                )
            }
            Some(_) => {}
            None if args.peers.is_none() => {
                peers.insert(args.id, advertise.clone());
            }
            None => bail!("--peers must include this node ({})", args.id),
        }
    }

    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (server_tls, client_tls) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let cert = read(cert)?;
            let key = read(key)?;
            let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(&cert, &key));
            let mut client = None;
            if let Some(ca) = &args.tls_client_ca {
                let ca = read(ca)?;
                cfg = cfg.client_ca_root(Certificate::from_pem(&ca));
                client = Some(TlsClientConfig {
                    ca_pem: ca,
                    cert_pem: cert,
                    key_pem: key,
                });
            }
            (Some(cfg), client)
        }
        _ => (None, None),
    };

    let cfg = NodeConfig {
        id: args.id,
        advertise_addr: advertise.clone(),
        data_dir: args.data_dir.clone(),
        peers,
        join: args.join,
        tick: Duration::from_millis(args.tick_ms.max(1)),
        election_ticks: args.election_ticks,
        heartbeat_ticks: args.heartbeat_ticks,
        snapshot_threshold: args.snapshot_threshold.max(1),
        watch_history: args.watch_history,
        proposal_timeout: Duration::from_millis(args.proposal_timeout_ms),
        tls: client_tls,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = strait_control_raft::RaftMetrics::new(&mut registry);
    let (node, raft_svc) = Node::start(cfg, metrics).context("starting the raft node")?;
    let control = ControlService::new(node.clone(), args.enable_test_hooks, &mut registry);
    if let Some(addr) = args.metrics_listen {
        let registry = std::sync::Arc::new(registry);
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        ),
                        Err(e) => ([("content-type", "text/plain")], format!("error: {e}")),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-listen {addr}"))?;
        tracing::info!(%addr, "metrics listening");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    let (reporter, health) = tonic_health::server::health_reporter();
    spawn_health(node.clone(), reporter);

    let mut builder = Server::builder();
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls).context("TLS configuration")?;
    }
    tracing::info!(id = args.id, listen = %args.listen, "strait-control listening");
    let shutdown_node = node.clone();
    builder
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(control.into_server())
        .add_service(raft_svc.into_server())
        .serve_with_shutdown(args.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("gRPC server")?;
    shutdown_node.shutdown();
    Ok(())
}

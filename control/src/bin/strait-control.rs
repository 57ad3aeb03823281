//! strait-control: one node of the Raft-replicated control plane.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[path = "../ca_flags.rs"]
mod ca_flags;
use strait_control_api::access::{
    rules_of, Access, Audit, Authorizer, Caller, ControlMethod, Glob, Operation, Policy,
};
use strait_control_api::identity::{IdentityService, NodeCertRequest};
use strait_control_api::node_tls::{NodeServerResolver, PeerTls, ServedCertificates};
use strait_control_api::{spawn_health, status_of, ControlService};
use strait_control_client::plaintext::check_plaintext;
use strait_control_raft::{Node, NodeConfig, TlsClientConfig};
use strait_control_state::spec::AccessRole;
use strait_control_state::{validate_command, Command, CommandError, Kind};
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
    /// CA that client and peer certificates must chain to. Callers are
    /// authorized by the SPIFFE ID of their certificate; one without a
    /// certificate reaches only what needs none (health).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve without TLS, where every caller may do everything. Only when
    /// --listen, --advertise and every --peers address are loopback.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    insecure_plaintext: bool,
    /// Trust domain of this control plane: `spiffe://D/edge/*`,
    /// `/kms-broker/*` and `/control/*` get the edge, kms-broker and
    /// control roles. Required with TLS.
    #[arg(long, value_name = "D")]
    trust_domain: Option<String>,
    /// SPIFFE ID glob that may do everything (repeatable). Always in force,
    /// whatever the AccessRule resources say.
    #[arg(long = "admin-identity", value_name = "GLOB")]
    admin_identities: Vec<String>,
    /// YAML list of AccessRules (`- {name, identities, role}`) created at
    /// start when no AccessRule of that name exists.
    #[arg(long, value_name = "FILE")]
    access_rules: Option<PathBuf>,
    /// Append one JSON line per write and per refused call to FILE.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
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
    #[command(flatten)]
    ca: ca_flags::CaArgs,
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

/// One entry of `--access-rules`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    name: String,
    identities: Vec<String>,
    role: AccessRole,
}

/// Parses and validates the whole file, reporting every error with its
/// place, before the node starts.
fn load_access_rules(path: &PathBuf) -> Result<Vec<Command>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = path.display().to_string();
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    let entries: Vec<RuleEntry> = serde_path_to_error::deserialize(de)
        .map_err(|e| anyhow::anyhow!("--access-rules {file}: {}: {}", e.path(), e.inner()))?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let cmd = Command::Apply {
            kind: Kind::AccessRule,
            name: e.name.clone(),
            labels: BTreeMap::new(),
            spec: serde_json::json!({"identities": e.identities, "role": e.role}),
            expected_revision: Some(0),
        };
        match validate_command(&cmd) {
            Ok(()) => out.push(cmd),
            Err(CommandError::Invalid { errors: es, .. }) => {
                for err in es {
                    errors.push(format!("--access-rules {file}: [{i}] ({}): {err}", e.name));
                }
            }
            Err(err) => errors.push(format!("--access-rules {file}: [{i}]: {err}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(out)
}

/// Creates the `--access-rules` that do not exist yet, once a leader is
/// known; a rule an admin changed since is left as it is.
async fn bootstrap_access_rules(node: Node, authz: Authorizer, rules: Vec<Command>) {
    let caller = Caller::Local("--access-rules");
    for cmd in rules {
        let Command::Apply { name, .. } = &cmd else {
            continue;
        };
        let access = Access::resource(
            Operation::Control(ControlMethod::Create),
            Kind::AccessRule,
            name,
        );
        let mut pause = Duration::from_millis(100);
        loop {
            if node.state().get(Kind::AccessRule, name).is_some() {
                break;
            }
            if node.status().leader_id != 0 {
                let result = node.propose(&cmd).await.map_err(status_of);
                match &result {
                    Ok(_) => {
                        authz.audit_write(&caller, &access, &result);
                        break;
                    }
                    Err(s) if s.code() == tonic::Code::AlreadyExists => break,
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {
                        authz.audit_write(&caller, &access, &result);
                        break;
                    }
                    Err(s) => {
                        tracing::debug!(rule = %name, error = %s, "AccessRule bootstrap: retrying")
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

/// The node's certificate request: `spiffe://D/control/<id>` with the
/// host it advertises and the IP it listens on (when specific) as SANs.
fn node_cert_request(
    td: &str,
    id: u64,
    listen: SocketAddr,
    advertise: &str,
) -> Result<NodeCertRequest> {
    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    let host = advertise
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(advertise)
        .trim_matches(['[', ']']);
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ips.push(ip),
        Err(_) if !host.is_empty() => dns_names.push(host.to_string()),
        Err(_) => bail!("--advertise '{advertise}' names no host"),
    }
    if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
        ips.push(listen.ip());
    }
    Ok(NodeCertRequest {
        spiffe_id: format!("spiffe://{td}/control/{id}"),
        dns_names,
        ips,
    })
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
    let (server_tls, client_tls) = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            if args.trust_domain.is_none() {
                bail!(
                    "--trust-domain is required with TLS: the roles of edges, kms-brokers and \
                     control nodes (Raft peers) derive from it"
                );
            }
            let cert = read(cert)?;
            let key = read(key)?;
            let ca = read(ca)?;
            // Optional at the handshake, so that a caller without a
            // certificate gets UNAUTHENTICATED naming what it lacks; a
            // certificate that is presented must chain to the CA.
            let cfg = ServerTlsConfig::new()
                .identity(Identity::from_pem(&cert, &key))
                .client_ca_root(Certificate::from_pem(&ca))
                .client_auth_optional(true);
            let client = (ca, cert, key);
            (Some(cfg), Some(client))
        }
        (Some(_), Some(_), None) => bail!(
            "--tls-client-ca is required with --tls-cert: callers are authorized by their client certificate"
        ),
        _ => {
            let listen = args.listen.to_string();
            let addrs = [listen.as_str(), advertise.as_str()]
                .into_iter()
                .chain(peers.values().map(String::as_str));
            check_plaintext(args.insecure_plaintext, "strait-control", addrs)
                .map_err(anyhow::Error::msg)?;
            tracing::warn!(
                "serving the control plane WITHOUT TLS (--insecure-plaintext): every local caller may do everything"
            );
            (None, None)
        }
    };
    let tls = server_tls.is_some();
    // The node's credential: the bootstrap files, replaced by CA-issued
    // certificates once the CA runs (see node_tls). Raft connections take
    // it and the roots (bootstrap CA plus the CA's bundle, once known) at
    // each new connection.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let identity_cell: std::sync::Arc<std::sync::OnceLock<IdentityService>> = Default::default();
    let mut credential = None;
    let client_tls = match client_tls {
        Some((ca, cert, key)) => {
            let bootstrap = std::sync::Arc::new(
                strait_tls::certified_key(
                    &cert,
                    &key,
                    args.tls_cert
                        .as_deref()
                        .unwrap_or(std::path::Path::new("--tls-cert")),
                    args.tls_key
                        .as_deref()
                        .unwrap_or(std::path::Path::new("--tls-key")),
                )
                .context("--tls-cert / --tls-key")?,
            );
            let (tx, rx) = tokio::sync::watch::channel(bootstrap.clone());
            let roots = strait_control_api::tls::parse_certs("--tls-client-ca", &ca)?;
            let cell = identity_cell.clone();
            let source: strait_control_api::tls::BundleSource = std::sync::Arc::new(move || {
                cell.get()
                    .map(|i| i.bundle_pem(strait_control_api::identity::now_unix()))
                    .unwrap_or_default()
            });
            let peers = PeerTls::new(provider.clone(), roots, Some(source), Some(rx.clone()))
                .context("--tls-client-ca")?;
            credential = Some((bootstrap, tx, rx));
            Some(TlsClientConfig(std::sync::Arc::new(move || peers.config())))
        }
        None => None,
    };
    let mut admins = Vec::new();
    for g in &args.admin_identities {
        admins.push(Glob::new(g).map_err(|e| anyhow::anyhow!("--admin-identity: {e}"))?);
    }
    let policy = Policy::new(args.trust_domain.as_deref(), admins)
        .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
    if tls && args.admin_identities.is_empty() {
        tracing::warn!("no --admin-identity: only AccessRule resources grant the admin role");
    }
    let bootstrap_rules = match &args.access_rules {
        Some(p) => load_access_rules(p)?,
        None => Vec::new(),
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
    let audit = Audit::new(args.audit_log.as_deref(), &mut registry)?;
    let rules_node = node.clone();
    let authz = Authorizer::new(policy, tls, move || rules_of(&rules_node.state()), audit);
    if !bootstrap_rules.is_empty() {
        tokio::spawn(bootstrap_access_rules(
            node.clone(),
            authz.clone(),
            bootstrap_rules,
        ));
    }
    strait_control_api::failover_controller::spawn_failover_controller(node.clone(), authz.clone());
    let control = ControlService::new(
        node.clone(),
        args.enable_test_hooks,
        authz.clone(),
        &mut registry,
    );
    let served_certificates = ServedCertificates::new(&mut registry);
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

    if args.ca.enabled() {
        // The node runs the CA of --trust-domain on its own TLS listener:
        // client certificates are verified against --tls-client-ca plus the
        // CA's live bundle (certificates the CA issued work at once and
        // across rotation); the Authorizer decides every call as elsewhere.
        let (Some(td), Some(client_ca), Some((bootstrap, cred_tx, cred_rx))) =
            (args.trust_domain.clone(), &args.tls_client_ca, credential)
        else {
            bail!(
                "the CA (--ca-seal-key-file / --ca-seal-kms) needs TLS: --tls-cert, --tls-key, \
                 --tls-client-ca and --trust-domain"
            );
        };
        let client_ca = read(client_ca)?;
        let identity =
            ca_flags::identity_service(&args.ca, &td, node.clone(), &client_ca, authz.clone())
                .await?;
        let _ = identity_cell.set(identity.clone());
        strait_control_api::identity::spawn_manager(identity.clone(), Duration::from_secs(1));
        strait_control_api::identity::spawn_node_certificate(
            identity.clone(),
            node_cert_request(&td, args.id, args.listen, &advertise)?,
            cred_tx,
        );
        let bootstrap_roots = strait_control_api::tls::parse_certs("--tls-client-ca", &client_ca)?;
        let source: strait_control_api::tls::BundleSource = {
            let identity = identity.clone();
            std::sync::Arc::new(move || {
                identity.bundle_pem(strait_control_api::identity::now_unix())
            })
        };
        let verifier = std::sync::Arc::new(strait_control_api::tls::DynamicClientVerifier::new(
            provider.clone(),
            bootstrap_roots,
            Some(source),
        ));
        let acceptor = strait_control_api::tls::acceptor_with_resolver(
            NodeServerResolver::new(bootstrap, cred_rx, served_certificates),
            verifier,
            provider,
        )?;
        let incoming = strait_control_api::tls::incoming(args.listen, acceptor).await?;
        tracing::info!(id = args.id, listen = %args.listen, trust_domain = %td, "strait-control listening (CA)");
        let shutdown_node = node.clone();
        Server::builder()
            .tcp_nodelay(true)
            .add_service(health)
            .add_service(identity.into_server())
            .add_service(control.into_server())
            .add_service(tonic::service::interceptor::InterceptedService::new(
                raft_svc.into_server(),
                authz.raft_interceptor(),
            ))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("gRPC server")?;
        shutdown_node.shutdown();
        return Ok(());
    }

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
        .add_service(tonic::service::interceptor::InterceptedService::new(
            raft_svc.into_server(),
            authz.raft_interceptor(),
        ))
        .serve_with_shutdown(args.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("gRPC server")?;
    shutdown_node.shutdown();
    Ok(())
}

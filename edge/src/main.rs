//! `strait-edge`: parse flags, load and validate the configuration, run.

#![forbid(unsafe_code)]

mod control;
mod filters;
mod health;
mod lag;
mod offsets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use prometheus_client::registry::Registry;
use strait_control_client::identity::SvidRequest;
use strait_control_client::state::spec::EdgeStatus;
use strait_control_client::svid::{self, Role, SvidCache};
use strait_control_client::{ControlConnectionArgs, EdgeSnapshot, EdgeWatchConfig, SvidArgs};
use strait_proxy::admin::AdminServer;
use strait_proxy::metrics::ProxyMetrics;
use strait_proxy::Edge;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "strait-edge", version, about = "Strait Kafka edge gateway")]
struct Args {
    /// Configuration file (YAML). Optional with --control.
    #[arg(long, value_name = "FILE", required_unless_present_any = ["check_config", "control"])]
    config: Option<PathBuf>,
    /// Validate a configuration file, print every error with its path, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    // `--control`, `--name`, `--control-ca/-cert/-key`, `--insecure-plaintext`:
    // the same flags as strait-kms-broker's.
    #[command(flatten)]
    control: ControlConnectionArgs,
    // `--join-token` (the edge gets `spiffe://<domain>/edge/<name>` from the
    // control plane's CA and renews it itself), `--svid-dns/-ip/-ttl`.
    #[command(flatten)]
    svid: SvidArgs,
    /// Where the last control-plane configuration is kept, to serve it when the control plane is down.
    #[arg(long, default_value = ".strait-edge-cache")]
    cache_dir: PathBuf,
    /// Admin endpoint address; overrides `admin.listen`.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Log format; the level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "STRAIT_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return match strait_edge_config::load(path) {
            Ok(_) => {
                println!("{}: configuration is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: configuration is invalid:", path.display());
                for error in &errors.0 {
                    eprintln!("  {error}");
                }
                ExitCode::FAILURE
            }
        };
    }
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(%err, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The inputs the configuration is composed from.
struct Sources {
    file: Option<PathBuf>,
    file_text: Option<String>,
    snapshot: Option<Arc<EdgeSnapshot>>,
    controlled: bool,
    cache_dir: PathBuf,
    admin: Option<SocketAddr>,
}

impl Sources {
    fn compose(&self) -> anyhow::Result<strait_edge_config::Config> {
        let mut config = control::compose(
            self.file_text.as_deref(),
            self.snapshot.as_deref(),
            self.controlled,
            &self.cache_dir,
        )?;
        if self.admin.is_some() {
            config.admin = self.admin;
        }
        Ok(config)
    }

    /// Re-reads the file; true if its text changed.
    fn file_changed(&mut self) -> bool {
        let Some(path) = &self.file else {
            return false;
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return false;
        };
        if self.file_text.as_deref() == Some(text.as_str()) {
            return false;
        }
        tracing::info!(path = %path.display(), "configuration file changed");
        self.file_text = Some(text);
        true
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The AWS SDK and tonic bring different rustls crypto providers; pick one.
    strait_kms_broker::kms::ensure_crypto_provider();
    let file_text = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let svid_expiry = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    let (svid_names, svid_names_rx) = tokio::sync::watch::channel(SvidRequest::default());
    let edge_svid = match svid_mode(&args) {
        Some(name) => {
            // The names the listeners serve, from what is known before the
            // control plane answers (the file, the cached snapshot).
            let known = control::compose(
                file_text.as_deref(),
                strait_control_client::read_cache(&args.cache_dir, name).as_ref(),
                true,
                &args.cache_dir,
            )
            .ok();
            svid_names.send_replace(svid_request(&args, known.as_ref()));
            let started = svid::start(
                svid::SvidOptions {
                    endpoints: args.control.control.clone(),
                    role: Role::Edge,
                    name: name.to_owned(),
                    token: args.svid.join_token.clone(),
                    cache: SvidCache::new(&args.cache_dir, Role::Edge),
                    timeout: Duration::from_secs(10),
                },
                svid_names_rx,
                svid_expiry.clone(),
            )
            .await
            .context("cannot get the edge's certificate from the control plane")?;
            Some(started)
        }
        None => None,
    };
    let control_client = control_client_config(&args, edge_svid.is_some())?;
    let control = match &edge_svid {
        Some(identity) => {
            let tls = strait_control_client::live_tls::live_client_config(
                identity.control_roots.clone(),
                strait_tls::WatchedCertifiedKey::new(identity.credentials.clone()),
            )
            .map_err(|err| anyhow::anyhow!("control-plane TLS: {err}"))?;
            Some(
                strait_control_client::ControlClient::with_rustls(&control_client, tls)
                    .map_err(|err| anyhow::anyhow!("cannot follow the control plane: {err}"))?,
            )
        }
        None if !args.control.control.is_empty() => Some(
            strait_control_client::ControlClient::new(&control_client)
                .map_err(|err| anyhow::anyhow!("cannot follow the control plane: {err}"))?,
        ),
        None => None,
    };
    let mut control_watch = match (&args.control.name, &control) {
        (Some(name), Some(client)) => {
            let watch_config = EdgeWatchConfig::new(&args.control.control, name, &args.cache_dir);
            let watch =
                strait_control_client::watch_edge_config_with_client(watch_config, client.clone());
            Some(watch.config)
        }
        _ => None,
    };
    let mut sources = Sources {
        file: args.config.clone(),
        file_text,
        snapshot: control_watch.as_ref().and_then(|w| w.borrow().clone()),
        controlled: control_watch.is_some(),
        cache_dir: args.cache_dir.clone(),
        admin: args.admin,
    };
    if let Some(snapshot) = &sources.snapshot {
        tracing::info!(revision = snapshot.revision, source = ?snapshot.source, "control-plane configuration");
    }
    let config = sources.compose()?;

    // Library metrics (KMS, encryption) carry their full `strait_*` names; the
    // edge's own families get the prefix from a sub-registry.
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(registry.sub_registry_with_prefix("strait"));
    let tls_metrics = strait_tls::TlsMetrics::register(registry.sub_registry_with_prefix("strait"));
    if edge_svid.is_some() {
        registry.sub_registry_with_prefix("strait").register(
            "svid_expiry_seconds",
            "Seconds until the edge's own certificate (SVID) expires; negative once expired",
            svid_expiry.clone(),
        );
    }
    // The mesh starts before the virtual clusters (remote ones need its
    // links) and serves the clusters' runtimes to peers once they run.
    let (tunnel_targets, tunnel_targets_rx) = tokio::sync::watch::channel(Default::default());
    let mesh_metrics =
        strait_mesh::metrics::MeshMetrics::register(registry.sub_registry_with_prefix("strait"));
    let probe_metrics = health::ProbeMetrics::register(registry.sub_registry_with_prefix("strait"));
    let svid_credentials = edge_svid.as_ref().map(|s| s.credentials.clone());
    // Only an SVID identity needs a kept seed for its stateless-reset key
    // (a file identity derives it from its key file).
    let mesh_reset_seed = match edge_svid {
        Some(_) => match strait_mesh::reset_seed_in(&args.cache_dir) {
            Ok(seed) => Some(seed),
            Err(err) => {
                tracing::warn!(%err, dir = %args.cache_dir.display(), "no kept mesh reset seed; peers of a restarted edge wait for their idle timeout");
                None
            }
        },
        None => None,
    };
    let mut mesh = match &config.mesh {
        Some(mesh) => Some(
            strait_mesh::Mesh::start(
                mesh,
                svid_credentials.clone(),
                mesh_reset_seed.clone(),
                tunnel_targets_rx.clone(),
                mesh_metrics.clone(),
            )
            .await?,
        ),
        None => None,
    };
    // What /readyz lists: the tunnels of the mesh in force, whichever that is.
    let tunnel_view: Arc<Mutex<Option<strait_proxy::admin::TunnelStates>>> =
        Arc::new(Mutex::new(mesh.as_ref().map(|m| m.tunnel_states())));
    let registry = Arc::new(RwLock::new(registry));
    let ready = Arc::new(AtomicBool::new(false));
    let own_identity = edge_svid
        .as_ref()
        .map(|s| strait_kms_broker::client::OwnIdentity {
            credentials: s.credentials.clone(),
            bundle: s.bundle.clone(),
            trust_domain: s.state.borrow().trust_domain().to_owned(),
        });
    let mut filter_builder = filters::FilterBuilder::new(registry.clone(), own_identity)
        .with_svid(edge_svid.as_ref().map(|s| s.credentials.clone()));
    filter_builder.set_remote(mesh.as_ref().map(|m| m.upstreams()));
    let initial_filters = filter_builder.build(&config).await?;

    let stop_admin = CancellationToken::new();
    let admin = match config.admin {
        Some(address) => {
            let mut server = AdminServer::bind(address, registry.clone(), ready.clone())
                .await
                .map_err(|err| anyhow::anyhow!("cannot bind admin endpoint {address}: {err}"))?;
            let view = tunnel_view.clone();
            server = server.with_tunnels(Arc::new(move || {
                view.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|states| states())
                    .unwrap_or_default()
            }));
            tracing::info!(address = %server.local_addr()?, "admin endpoint listening");
            Some(tokio::spawn(server.serve(stop_admin.clone())))
        }
        None => None,
    };

    names_before_listening(&args, &config, &svid_names, edge_svid.as_ref()).await;
    let mut edge = Edge::start_with_extras(
        &config,
        metrics,
        tls_metrics,
        initial_filters,
        ready.clone(),
        strait_proxy::EdgeExtras {
            svid: edge_svid.as_ref().map(|s| s.credentials.clone()),
            remote: mesh.as_ref().map(|m| m.upstreams()),
            tunnel_targets: Some(tunnel_targets),
        },
    )
    .await?;
    let probes = Arc::new(Mutex::new(health::Probes::start(
        &config.health_probes,
        &probe_metrics,
        mesh.as_ref().map(|m| m.upstreams()),
    )));
    let lag_checks = Arc::new(Mutex::new(lag::LagChecks::start(
        lag::wanted(&config),
        mesh.as_ref().map(|m| m.upstreams()),
    )));
    let status = Arc::new(Mutex::new(EdgeStatus {
        ready: true,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        config_revision: sources.snapshot.as_ref().map_or(0, |s| s.revision),
        virtual_clusters: edge.cluster_names().map(str::to_owned).collect(),
        failover: control::applied_failover(&config),
        ..EdgeStatus::default()
    }));
    tracing::info!(
        virtual_clusters = ?edge.cluster_names().collect::<Vec<_>>(),
        "strait-edge started"
    );
    let heartbeat = match (&args.control.name, &control) {
        (Some(name), Some(client)) => {
            let status = status.clone();
            let svid_state = edge_svid.as_ref().map(|s| s.state.clone());
            let probes = probes.clone();
            let lag_checks = lag_checks.clone();
            Some(strait_control_client::spawn_heartbeat_with_client(
                strait_control_client::HeartbeatConfig {
                    client: control_client.clone(),
                    edge_name: name.clone(),
                    interval: Duration::from_secs(2),
                },
                client.clone(),
                move || {
                    let mut status = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    status.health = probes.lock().unwrap_or_else(|e| e.into_inner()).reports();
                    status.replication = lag_checks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .reports();
                    // The remaining lifetime of the edge's certificate, when it is at risk.
                    if let Some(line) = svid_state.as_ref().and_then(|s| s.borrow().message()) {
                        status.message = Some(match status.message {
                            Some(config) => format!("{config}; {line}"),
                            None => line,
                        });
                    }
                    status
                },
            ))
        }
        _ => None,
    };

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = config;
    let mut credential_files = strait_edge_config::read_credential_files(&running);
    loop {
        let changed = tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: draining"); break }
            _ = interrupt.recv() => { tracing::info!("SIGINT: draining"); break }
            // A rotated SASL credential file counts as a change of the configuration
            // (`|`, not `||`: the credential check also records what it read).
            _ = ticker.tick() => sources.file_changed() | credential_files_changed(&running, &mut credential_files),
            changed = wait_snapshot(&mut control_watch) => {
                if changed {
                    sources.snapshot = control_watch.as_ref().and_then(|w| w.borrow().clone());
                    if let Some(snapshot) = &sources.snapshot {
                        tracing::info!(revision = snapshot.revision, "control-plane configuration changed");
                    }
                } else {
                    control_watch = None;
                }
                changed
            }
        };
        if !changed {
            continue;
        }
        let config = match sources.compose() {
            Ok(config) => config,
            Err(err) => {
                // Fail closed: the last good configuration stays in force,
                // and the control plane sees why the new one is not.
                tracing::warn!("{err:#}; keeping the running configuration");
                let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
                status.message = Some(format!(
                    "configuration{} not applied, running the last good one: {err:#}",
                    sources
                        .snapshot
                        .as_ref()
                        .map(|s| format!(" revision {}", s.revision))
                        .unwrap_or_default()
                ));
                continue;
            }
        };
        if config == running {
            // Nothing to change, but what is in force is this revision.
            let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
            status.config_revision = sources.snapshot.as_ref().map_or(0, |s| s.revision);
            status.message = None;
            continue;
        }
        let trust_only = match (&running.mesh, &config.mesh, &mesh) {
            (Some(before), Some(after), Some(live)) if before.differs_only_in_trust(after) => {
                match live.set_trust_bundles(&after.trust_bundles) {
                    Ok(()) => {
                        tracing::info!("mesh trust bundles replaced; tunnels that are up stay");
                        true
                    }
                    Err(err) => {
                        tracing::warn!(%err, "the new mesh trust bundles cannot be loaded; rebuilding the mesh");
                        false
                    }
                }
            }
            _ => false,
        };
        // Probes and replication checks through the old mesh's tunnels
        // start again on the new one's.
        let mesh_rebuilt = config.mesh != running.mesh && !trust_only;
        if mesh_rebuilt {
            // Tunnels are rebuilt (open tunneled connections end; clients
            // reconnect), then the remote clusters restart on the new links.
            if let Some(old) = mesh.take() {
                old.shutdown().await;
            }
            *tunnel_view.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if let Some(wanted) = &config.mesh {
                match strait_mesh::Mesh::start(
                    wanted,
                    svid_credentials.clone(),
                    mesh_reset_seed.clone(),
                    tunnel_targets_rx.clone(),
                    mesh_metrics.clone(),
                )
                .await
                {
                    Ok(started) => {
                        tracing::info!(peers = wanted.peers.len(), "mesh (re)configured");
                        *tunnel_view.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(started.tunnel_states());
                        mesh = Some(started);
                    }
                    Err(err) => {
                        tracing::warn!(%err, "the new mesh section cannot start; virtual clusters behind peers are down until it can");
                    }
                }
            }
            edge.replace_remote_upstreams(mesh.as_ref().map(|m| m.upstreams()))
                .await;
            filter_builder.set_remote(mesh.as_ref().map(|m| m.upstreams()));
        }
        // A revocation takes effect even if the rest of the change fails below.
        edge.set_deny_list(&config.deny_identities);
        {
            let mut probes = probes.lock().unwrap_or_else(|e| e.into_inner());
            if mesh_rebuilt || probes.config() != config.health_probes.as_slice() {
                *probes = health::Probes::start(
                    &config.health_probes,
                    &probe_metrics,
                    mesh.as_ref().map(|m| m.upstreams()),
                );
            }
        }
        let message = match filter_builder.build(&config).await {
            Ok(filters) => {
                names_before_listening(&args, &config, &svid_names, edge_svid.as_ref()).await;
                match edge.apply(&config, filters).await {
                    Ok(_) => None,
                    Err(err) => {
                        tracing::warn!(%err, "new configuration could not be applied in full");
                        Some(err.to_string())
                    }
                }
            }
            Err(err) => {
                // Nothing of it was applied (but the deny list): the running
                // configuration and its revision stay, and the next change retries.
                tracing::warn!("{err:#}; keeping the running configuration");
                status.lock().unwrap_or_else(|e| e.into_inner()).message = Some(format!(
                    "configuration not applied, running the last good one: {err:#}"
                ));
                continue;
            }
        };
        running = config;
        credential_files = strait_edge_config::read_credential_files(&running);
        {
            // Measured from the running configuration: only once the fence
            // is in force here does this edge's measurement count.
            let wanted = lag::wanted(&running);
            let mut checks = lag_checks.lock().unwrap_or_else(|e| e.into_inner());
            if mesh_rebuilt || checks.config() != wanted.as_slice() {
                *checks = lag::LagChecks::start(wanted, mesh.as_ref().map(|m| m.upstreams()));
            }
        }
        let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
        status.config_revision = sources.snapshot.as_ref().map_or(0, |s| s.revision);
        status.virtual_clusters = edge.cluster_names().map(str::to_owned).collect();
        // What runs now, so an operator sees this edge reach the generation.
        status.failover = control::applied_failover(&running);
        status.message = message;
    }
    if let Some(heartbeat) = heartbeat {
        heartbeat.abort();
    }
    ready.store(false, Ordering::Release);
    edge.shutdown().await;
    if let Some(mesh) = mesh {
        mesh.shutdown().await;
    }
    stop_admin.cancel();
    if let Some(admin) = admin {
        admin.await??;
    }
    tracing::info!("strait-edge stopped");
    Ok(())
}

/// The edge's name when it gets its certificate from the control plane's CA.
fn svid_mode(args: &Args) -> Option<&str> {
    svid::svid_mode(
        &args.control,
        &args.svid,
        &SvidCache::new(&args.cache_dir, Role::Edge),
    )
}

/// Asks for an SVID naming the hosts `config`'s listeners are reached at,
/// and waits (bounded) until it does: a listener that started on a
/// certificate without its host would be refused by every client that
/// verifies the host name until the renewal. Without an SVID, nothing.
async fn names_before_listening(
    args: &Args,
    config: &strait_edge_config::Config,
    names: &tokio::sync::watch::Sender<SvidRequest>,
    svid: Option<&svid::RunningSvid>,
) {
    let Some(svid) = svid else { return };
    let wanted = svid_request(args, Some(config));
    names.send_if_modified(|names| svid::update_request(names, wanted.clone()));
    if !svid
        .wait_until_it_names(&wanted, Duration::from_secs(10))
        .await
    {
        tracing::warn!(dns = ?wanted.dns_names, ips = ?wanted.ips, "no SVID naming the listeners' hosts yet; starting them on the current one (it is renewed for them as soon as the control plane answers)");
    }
}

/// What the edge's certificate should name: the hosts its listeners are
/// reached at (bootstrap addresses, advertised broker hosts, SNI bootstrap
/// hosts) and `--svid-dns` / `--svid-ip`.
fn svid_request(args: &Args, config: Option<&strait_edge_config::Config>) -> SvidRequest {
    let mut hosts = Vec::new();
    for vc in config
        .map(|c| c.virtual_clusters.as_slice())
        .unwrap_or_default()
    {
        hosts.push(vc.bootstrap.ip().to_string());
        match &vc.brokers {
            strait_edge_config::BrokerAddressing::PortPerBroker {
                advertised_host, ..
            } => hosts.push(advertised_host.clone()),
            strait_edge_config::BrokerAddressing::Sni { bootstrap_host, .. } => {
                hosts.push(bootstrap_host.clone())
            }
        }
    }
    args.svid.request(hosts.iter().map(String::as_str))
}

/// The connection to the control plane: mTLS with `--control-ca/-cert/-key`
/// (or the edge's SVID, set up by the caller), or plaintext when asked for
/// and every address is loopback.
fn control_client_config(
    args: &Args,
    svid: bool,
) -> anyhow::Result<strait_control_client::ClientConfig> {
    let control = &args.control;
    let mut config = strait_control_client::ClientConfig::new(&control.control);
    if control.control.is_empty() || svid {
        return Ok(config);
    }
    match (
        &control.control_ca,
        &control.control_cert,
        &control.control_key,
    ) {
        (Some(ca), Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            };
            config.tls = Some(strait_control_client::TlsConfig {
                ca_pem: read(ca)?,
                cert_pem: Some(read(cert)?),
                key_pem: Some(read(key)?),
                domain: None,
            });
        }
        _ => {
            strait_control_client::plaintext::check_plaintext(
                control.insecure_plaintext,
                "strait-edge --control",
                control.control.iter().map(String::as_str),
            )
            .map_err(anyhow::Error::msg)?;
            tracing::warn!(
                "following the control plane WITHOUT TLS (--insecure-plaintext); loopback only"
            );
        }
    }
    Ok(config)
}

/// Whether a SASL credential file of `running` changed since the last check.
fn credential_files_changed(
    running: &strait_edge_config::Config,
    last: &mut Vec<Option<strait_edge_config::Secret>>,
) -> bool {
    let now = strait_edge_config::read_credential_files(running);
    if now == *last {
        return false;
    }
    tracing::info!("an upstream SASL credential file changed");
    *last = now;
    true
}

/// Resolves when the control-plane snapshot changes (true) or the watch ends
/// (false); never resolves without a control plane.
async fn wait_snapshot(
    watch: &mut Option<tokio::sync::watch::Receiver<Option<Arc<EdgeSnapshot>>>>,
) -> bool {
    match watch {
        Some(receiver) => receiver.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

fn init_logging(format: LogFormat) {
    // The Vault client logs every 404 and failed call at ERROR; the edge
    // reports those outcomes itself (WARN, metrics), so they are muted by default.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustify=off,vaultrs=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

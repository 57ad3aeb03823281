//! `strait-edge`: parse flags, load and validate the configuration, run.

#![forbid(unsafe_code)]

mod filters;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use prometheus_client::registry::Registry;
use strait_proxy::admin::AdminServer;
use strait_proxy::metrics::ProxyMetrics;
use strait_proxy::Edge;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "strait-edge", version, about = "Strait Kafka edge gateway")]
struct Args {
    /// Configuration file (YAML).
    #[arg(long, value_name = "FILE", required_unless_present = "check_config")]
    config: Option<PathBuf>,
    /// Validate a configuration file, print every error with its path, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
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
    let Some(path) = args.config else {
        return ExitCode::FAILURE;
    };
    let config = match strait_edge_config::load(&path) {
        Ok(config) => config,
        Err(errors) => {
            for error in &errors.0 {
                tracing::error!(%error, "invalid configuration");
            }
            return ExitCode::FAILURE;
        }
    };
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
    match runtime.block_on(run(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: PathBuf, config: strait_edge_config::Config) -> anyhow::Result<()> {
    // The AWS SDK and tonic bring different rustls crypto providers; pick one.
    strait_kms_broker::kms::ensure_crypto_provider();
    let mut registry = Registry::with_prefix("strait");
    let metrics = ProxyMetrics::register(&mut registry);
    let tls_metrics = strait_tls::TlsMetrics::register(&mut registry);
    let registry = Arc::new(RwLock::new(registry));
    let ready = Arc::new(AtomicBool::new(false));
    let mut filter_builder = filters::FilterBuilder::new(registry.clone());
    let initial_filters = filter_builder.build(&config).await?;

    let stop_admin = CancellationToken::new();
    let admin = match config.admin {
        Some(address) => {
            let server = AdminServer::bind(address, registry.clone(), ready.clone())
                .await
                .map_err(|err| anyhow::anyhow!("cannot bind admin endpoint {address}: {err}"))?;
            tracing::info!(address = %server.local_addr()?, "admin endpoint listening");
            Some(tokio::spawn(server.serve(stop_admin.clone())))
        }
        None => None,
    };

    let mut edge = Edge::start(&config, metrics, tls_metrics, initial_filters, ready).await?;
    tracing::info!(
        virtual_clusters = ?edge.cluster_names().collect::<Vec<_>>(),
        "strait-edge started"
    );

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut watcher = ConfigWatcher::new(path, config);
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: draining"); break }
            _ = interrupt.recv() => { tracing::info!("SIGINT: draining"); break }
            _ = ticker.tick() => {
                if let Some(config) = watcher.changed() {
                    match filter_builder.build(&config).await {
                        Ok(filters) => {
                            if let Err(err) = edge.apply(&config, filters).await {
                                tracing::warn!(%err, "new configuration could not be applied in full");
                            }
                        }
                        Err(err) => tracing::warn!("{err:#}; keeping the running configuration"),
                    }
                }
            }
        }
    }
    edge.shutdown().await;
    stop_admin.cancel();
    if let Some(admin) = admin {
        admin.await??;
    }
    tracing::info!("strait-edge stopped");
    Ok(())
}

/// Notices edits of the configuration file: a valid new version is applied
/// live, an invalid one is reported once and the running configuration stays.
struct ConfigWatcher {
    path: PathBuf,
    text: Option<String>,
    current: strait_edge_config::Config,
}

impl ConfigWatcher {
    fn new(path: PathBuf, current: strait_edge_config::Config) -> Self {
        let text = std::fs::read_to_string(&path).ok();
        ConfigWatcher {
            path,
            text,
            current,
        }
    }

    fn changed(&mut self) -> Option<strait_edge_config::Config> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        if self.text.as_deref() == Some(text.as_str()) {
            return None;
        }
        self.text = Some(text.clone());
        match strait_edge_config::parse(&text) {
            Ok(config) if config == self.current => None,
            Ok(config) => {
                tracing::info!(path = %self.path.display(), "configuration file changed");
                self.current = config.clone();
                Some(config)
            }
            Err(errors) => {
                for error in &errors.0 {
                    tracing::warn!(%error, "configuration file changed but is invalid; keeping the running configuration");
                }
                None
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

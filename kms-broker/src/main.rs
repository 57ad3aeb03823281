//! `strait-kms-broker --config FILE [--control ADDRS --name NAME ...]`:
//! serve the KMS broker over mTLS gRPC, optionally following the control
//! plane for trust bundles and deny lists.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use strait_control_client::ControlConnectionArgs;
use strait_kms_broker::callers::Callers;
use strait_kms_broker::follow::{follow_control_plane, ControlArgs};
use strait_kms_broker::kms::build_kms_set;
use strait_kms_broker::service::{serve, serve_metrics, BrokerConfig, BrokerService};
use strait_kms_broker::tls::{provider, TrustDomainVerifier};

#[derive(Parser)]
#[command(
    name = "strait-kms-broker",
    about = "Strait KMS broker (mTLS gRPC in front of Vault / AWS KMS)"
)]
struct Args {
    /// YAML config file.
    #[arg(long, env = "STRAIT_KMS_BROKER_CONFIG")]
    config: PathBuf,
    #[command(flatten)]
    control: ControlConnectionArgs,
    /// Where the last control-plane snapshot is kept, to keep serving with
    /// it when the control plane is down.
    #[arg(long, default_value = ".strait-kms-broker-cache")]
    cache_dir: PathBuf,
    /// How often the broker writes the status of its KmsBroker resource.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_interval: std::time::Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    strait_kms_broker::kms::ensure_crypto_provider();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let base = args
        .config
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let cfg = BrokerConfig::from_yaml(&text, &base)
        .map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", args.config.display()))?;
    let file_bundles = cfg.file_bundles()?;
    if file_bundles.is_empty() && args.control.control.is_empty() {
        // Fail closed: with no roots at all every caller would be refused;
        // say so instead of starting a broker nobody can use.
        anyhow::bail!(
            "no trust bundle: give tls.client_ca / tls.client_trust_bundles, or --control to take TrustBundles from the control plane"
        );
    }
    let verifier = TrustDomainVerifier::new(provider());
    if let Some(e) = verifier.set_bundles(&file_bundles).first() {
        anyhow::bail!("{e}");
    }
    let callers = Callers::new(cfg.callers());
    tracing::info!(callers = ?callers.allowed(), trust_domains = ?verifier.trust_domains(), "caller policy");
    let _follow = match &args.control.name {
        Some(name) if !args.control.control.is_empty() => Some(
            follow_control_plane(
                ControlArgs {
                    endpoints: args.control.control.clone(),
                    name: name.clone(),
                    trust_domain: cfg.trust_domain.clone(),
                    ca: args.control.control_ca.clone(),
                    cert: args.control.control_cert.clone(),
                    key: args.control.control_key.clone(),
                    insecure_plaintext: args.control.insecure_plaintext,
                    cache_dir: args.cache_dir.clone(),
                    heartbeat_interval: args.heartbeat_interval,
                },
                file_bundles,
                verifier.clone(),
                callers.clone(),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let mut registry = Registry::default();
    let kms = build_kms_set(&cfg.kms, &mut registry)
        .await
        .context("building backend KMSs")?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(listen = %listener.local_addr()?, backends = ?kms, "strait-kms-broker serving (mTLS)");
    let service = BrokerService::new(&kms, cfg.alias_cache_ttl, Arc::clone(&callers));
    if let Some(addr) = &cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics listener {addr}"))?;
        tracing::info!(listen = %l.local_addr()?, "metrics at /metrics");
        let registry = std::sync::Arc::new(std::mem::take(&mut registry));
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(l, registry).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    serve(service, &cfg.tls, verifier, listener, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
    .await?;
    Ok(())
}

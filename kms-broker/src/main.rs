//! `strait-kms-broker --config FILE`: serve the KMS broker over mTLS gRPC.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use strait_kms_broker::kms::build_kms_set;
use strait_kms_broker::service::{serve, serve_metrics, BrokerConfig, BrokerService};

#[derive(Parser)]
#[command(
    name = "strait-kms-broker",
    about = "Strait KMS broker (mTLS gRPC in front of Vault / AWS KMS)"
)]
struct Args {
    /// YAML config file.
    #[arg(long, env = "STRAIT_KMS_BROKER_CONFIG")]
    config: PathBuf,
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
    let mut registry = Registry::default();
    let kms = build_kms_set(&cfg.kms, &mut registry)
        .await
        .context("building backend KMSs")?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(listen = %listener.local_addr()?, backends = ?kms, "strait-kms-broker serving (mTLS)");
    let service = BrokerService::new(&kms, cfg.alias_cache_ttl);
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
    serve(service, &cfg.tls, listener, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
    .await?;
    Ok(())
}

//! `strait-kms-broker --config FILE [--control ADDRS --name NAME ...]`:
//! serve the KMS broker over mTLS gRPC, optionally following the control
//! plane for trust bundles and deny lists, and optionally with its own
//! identity from the control plane's CA (`--join-token`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use strait_control_client::svid::{self, Role, RunningSvid, SvidCache, SvidOptions};
use strait_control_client::{ControlConnectionArgs, SvidArgs};
use strait_kms_broker::callers::Callers;
use strait_kms_broker::client::OwnIdentity;
use strait_kms_broker::follow::{
    follow_control_plane, shred_ledger_path, ControlArgs, SvidConnection,
};
use strait_kms_broker::kms::build_kms_set_with;
use strait_kms_broker::policy::Policy;
use strait_kms_broker::service::{serve, serve_metrics, BrokerConfig, BrokerService};
use strait_kms_broker::shred::Shredder;
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
    // `--control`, `--name`, `--control-ca/-cert/-key`, `--insecure-plaintext`:
    // the same flags as strait-edge's.
    #[command(flatten)]
    control: ControlConnectionArgs,
    // `--join-token` (the broker gets `spiffe://<domain>/kms-broker/<name>`
    // from the control plane's CA and renews it itself), `--svid-dns/-ip/-ttl`.
    #[command(flatten)]
    svid: SvidArgs,
    /// Where the last control-plane snapshot (and, with --join-token, the
    /// broker's certificate, in svid/, mode 0600) is kept, to keep serving
    /// with it when the control plane is down.
    #[arg(long, default_value = ".strait-kms-broker-cache")]
    cache_dir: PathBuf,
    /// How often the broker writes the status of its KmsBroker resource.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
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
    let svid_expiry = Gauge::<i64>::default();
    let identity = own_identity(&args, &cfg, svid_expiry.clone()).await?;
    let verifier = TrustDomainVerifier::new(provider());
    if let Some(e) = verifier.set_bundles(&file_bundles).first() {
        anyhow::bail!("{e}");
    }
    let callers = Callers::new(cfg.callers());
    let mut registry = Registry::default();
    let policy = Policy::new(
        callers.clone(),
        cfg.trust_domain.clone(),
        cfg.grants(),
        &mut registry,
    );
    tracing::info!(callers = ?callers.allowed(), grants = policy.grant_count(), trust_domains = ?verifier.trust_domains(), "caller policy");
    let svid_connection = match &identity {
        Some(identity) => Some(SvidConnection {
            tls: strait_control_client::live_tls::live_client_config(
                identity.control_roots.clone(),
                strait_tls::WatchedCertifiedKey::new(identity.credentials.clone()),
            )
            .map_err(|err| anyhow::anyhow!("control-plane TLS: {err}"))?,
            state: identity.state.clone(),
        }),
        None => None,
    };
    if identity.is_some() {
        registry.sub_registry_with_prefix("strait").register(
            "svid_expiry_seconds",
            "Seconds until the broker's own certificate (SVID) expires; negative once expired",
            svid_expiry,
        );
    }
    // A `broker:` backend with `identity: svid` presents the broker's own
    // SVID to the broker it forwards to.
    let own = identity.as_ref().map(|running| OwnIdentity {
        credentials: running.credentials.clone(),
        bundle: running.bundle.clone(),
        trust_domain: running.state.borrow().trust_domain().to_string(),
    });
    let kms = build_kms_set_with(&cfg.kms, &mut registry, own.as_ref())
        .await
        .context("building backend KMSs")?;
    // The shreds done before are refused from the start, control plane or
    // not (the ledger lives in --cache-dir, named after --name).
    let shredder = Arc::new(
        Shredder::new(
            kms.clone(),
            cfg.kms
                .iter()
                .filter(|k| k.broker.is_none())
                .map(|k| k.name.clone()),
            policy.clone(),
            args.control
                .name
                .as_deref()
                .map(|name| shred_ledger_path(&args.cache_dir, name)),
        )
        .map_err(anyhow::Error::msg)?,
    );
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
                    svid: svid_connection,
                },
                file_bundles,
                verifier.clone(),
                callers.clone(),
                shredder.clone(),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    // Stops re-reading the certificate files when serving ends.
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let serving = match (&identity, &cfg.tls.cert, &cfg.tls.key) {
        (Some(identity), _, _) if cfg.tls.uses_svid() => identity.credentials.clone(),
        (_, Some(cert), Some(key)) => strait_kms_broker::tls::serving_certificate(
            cert.clone(),
            key.clone(),
            cfg.tls.reload_interval,
            stop,
        )?,
        // Fail closed: validation guarantees files or svid, and
        // own_identity refuses svid without an SVID.
        _ => anyhow::bail!("tls: no serving certificate"),
    };
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(listen = %listener.local_addr()?, backends = ?kms, "strait-kms-broker serving (mTLS)");
    let service = BrokerService::new(&kms, cfg.alias_cache_ttl, Arc::clone(&policy));
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
    serve(service, serving, verifier, listener, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
    .await?;
    Ok(())
}

/// The broker's own SVID, when it joins with `--join-token` (or has a
/// still-valid certificate from an earlier join in `--cache-dir`): joined,
/// checked against the configuration's trust domain, and kept renewed.
async fn own_identity(
    args: &Args,
    cfg: &BrokerConfig,
    expiry: Gauge,
) -> anyhow::Result<Option<RunningSvid>> {
    let cache = SvidCache::new(&args.cache_dir, Role::KmsBroker);
    let Some(name) = svid::svid_mode(&args.control, &args.svid, &cache) else {
        if cfg.tls.uses_svid() {
            anyhow::bail!(
                "tls.identity: svid, but the broker has no SVID: start it with --control ADDRS --name NAME --join-token T (or with a still-valid certificate in --cache-dir {})",
                args.cache_dir.display()
            );
        }
        return Ok(None);
    };
    // The names callers dial: the listen address (an unspecified one names
    // nothing) and --svid-dns / --svid-ip.
    let listen_ip = cfg
        .listen
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let request = args.svid.request([listen_ip.as_str()]);
    // The names do not change while the broker runs: no sender is kept.
    let (_, names_rx) = tokio::sync::watch::channel(request);
    let running = svid::start(
        SvidOptions {
            endpoints: args.control.control.clone(),
            role: Role::KmsBroker,
            name: name.to_owned(),
            token: args.svid.join_token.clone(),
            cache,
            timeout: Duration::from_secs(10),
        },
        names_rx,
        expiry,
    )
    .await
    .context("cannot get the broker's certificate from the control plane")?;
    let want = Role::KmsBroker.spiffe_id(&cfg.trust_domain, name);
    let got = running.state.borrow().spiffe_id.clone();
    if got != want {
        anyhow::bail!(
            "the control plane issued {got}, but this broker is {want} (trust_domain in {} and --name)",
            args.config.display()
        );
    }
    Ok(Some(running))
}

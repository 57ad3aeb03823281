//! Following the control plane: the broker takes the TrustBundles (roots
//! of its callers, per trust domain) and DenyLists from it, with the same
//! connection flags as `strait-edge` (mTLS with files or with its own SVID
//! from `--join-token`, or `--insecure-plaintext` on loopback only). The
//! last snapshot is cached on disk, so the broker keeps its trust and its
//! deny lists while the control plane is down.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strait_control_client::broker::{
    watch_broker_config, BrokerSnapshot, BrokerWatchConfig, ClientSource,
};
use strait_control_client::state::spec::KmsBrokerStatus;
use strait_control_client::svid::SvidState;
use strait_control_client::{ClientConfig, ClientError, ControlClient, SnapshotSource, TlsConfig};
use tokio::sync::watch;

use crate::callers::{deny_lists, Callers};
use crate::tls::{certificates, spiffe_id_of_der, Bundles, TrustDomainVerifier};

pub struct ControlArgs {
    pub endpoints: Vec<String>,
    pub name: String,
    pub trust_domain: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure_plaintext: bool,
    pub cache_dir: PathBuf,
    /// How often the broker writes its KmsBroker status.
    pub heartbeat_interval: Duration,
    /// With its own SVID (`--join-token`): the connection's TLS instead of
    /// the files, and the SVID's state for the status.
    pub svid: Option<SvidConnection>,
}

/// The control-plane connection of a broker with its own SVID.
#[derive(Clone)]
pub struct SvidConnection {
    /// From `strait_control_client::live_tls::live_client_config`: the
    /// newest SVID as client certificate, the newest control-plane roots.
    pub tls: strait_control_client::live_tls::TlsSource,
    pub state: watch::Receiver<SvidState>,
}

impl ControlArgs {
    /// The identity the control plane must see.
    pub fn identity(&self) -> String {
        format!("spiffe://{}/kms-broker/{}", self.trust_domain, self.name)
    }
}

/// The client configuration, files read now (called at every reconnect, so
/// a rotated client certificate is presented by the next connection).
fn client_config(a: &ControlArgs) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::new(&a.endpoints);
    match (&a.ca, &a.cert, &a.key) {
        (Some(ca), Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            let cert_pem = read(cert)?;
            let leaf =
                certificates(&cert.display().to_string(), &cert_pem).map_err(|e| e.to_string())?;
            let want = a.identity();
            let got = spiffe_id_of_der(leaf[0].as_ref());
            if got.as_deref() != Some(want.as_str()) {
                return Err(format!(
                    "--control-cert {}: names {}, but this broker is {want} (trust_domain and --name)",
                    cert.display(),
                    got.as_deref().unwrap_or("no SPIFFE ID"),
                ));
            }
            config.tls = Some(TlsConfig {
                ca_pem: read(ca)?,
                cert_pem: Some(cert_pem),
                key_pem: Some(read(key)?),
                domain: None,
            });
        }
        _ => {
            strait_control_client::plaintext::check_plaintext(
                a.insecure_plaintext,
                "strait-kms-broker --control",
                a.endpoints.iter().map(String::as_str),
            )?;
        }
    }
    Ok(config)
}

/// A client for a new connection: over the SVID's live TLS, or with the
/// files read now.
fn connect(a: &ControlArgs) -> Result<ControlClient, ClientError> {
    match &a.svid {
        Some(svid) => {
            ControlClient::with_rustls(&ClientConfig::new(&a.endpoints), svid.tls.clone())
        }
        None => {
            let config =
                client_config(a).map_err(|e| ClientError::Endpoint(a.endpoints.join(","), e))?;
            ControlClient::new(&config)
        }
    }
}

/// The roots in force: the config file's plus the control plane's, per
/// trust domain (several TrustBundles of one domain add up, which is how a
/// CA rotation publishes the new root beside the old one).
pub fn merged_bundles(file: &Bundles, snap: &BrokerSnapshot) -> (Bundles, Vec<String>) {
    let mut out = file.clone();
    let mut errors = Vec::new();
    for (name, tb) in &snap.trust_bundles {
        match certificates(&format!("TrustBundle/{name}"), tb.pem.as_bytes()) {
            Ok(certs) => out
                .entry(tb.trust_domain.clone())
                .or_default()
                .extend(certs),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (out, errors)
}

fn apply(snap: &BrokerSnapshot, file: &Bundles, verifier: &TrustDomainVerifier, callers: &Callers) {
    let (bundles, mut errors) = merged_bundles(file, snap);
    errors.extend(verifier.set_bundles(&bundles));
    for e in &errors {
        tracing::warn!(error = %e, "trust bundle left out; its callers are refused");
    }
    let denied = deny_lists(
        snap.deny_lists
            .iter()
            .map(|(n, d)| (n, d.spiffe_ids.as_slice(), d.reason.as_deref())),
    );
    let count = denied.len();
    callers.set_deny_lists(denied);
    tracing::info!(
        revision = snap.revision,
        source = ?snap.source,
        trust_domains = ?verifier.trust_domains(),
        denied_identities = count,
        "control-plane snapshot applied"
    );
}

/// Starts following; the cached snapshot (if any) is applied before this
/// returns. The returned task runs as long as the process.
pub fn follow_control_plane(
    args: ControlArgs,
    file_bundles: Bundles,
    verifier: Arc<TrustDomainVerifier>,
    callers: Arc<Callers>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    // Check the flags and files once up front, with a clear error.
    if args.svid.is_none() {
        client_config(&args)?;
        if args.ca.is_none() {
            tracing::warn!(
                "following the control plane WITHOUT TLS (--insecure-plaintext); loopback only"
            );
        }
    }
    tracing::info!(identity = %args.identity(), endpoints = ?args.endpoints, "following the control plane");
    let name = args.name.clone();
    let cache_dir = args.cache_dir.clone();
    let args = Arc::new(args);
    let source: ClientSource = {
        let args = args.clone();
        Arc::new(move || connect(&args))
    };
    let watch = watch_broker_config(BrokerWatchConfig {
        client: source,
        broker_name: name,
        cache_dir,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
    })
    .map_err(|e| format!("cannot follow the control plane: {e}"))?;
    let mut rx = watch.config;
    tokio::spawn(heartbeat(
        args.clone(),
        rx.clone(),
        verifier.clone(),
        callers.clone(),
    ));
    if let Some(snap) = rx.borrow_and_update().clone() {
        apply(&snap, &file_bundles, &verifier, &callers);
    }
    Ok(tokio::spawn(async move {
        let _task = watch.task;
        while rx.changed().await.is_ok() {
            let snap = rx.borrow_and_update().clone();
            if let Some(snap) = snap {
                apply(&snap, &file_bundles, &verifier, &callers);
            }
        }
    }))
}

/// Every `heartbeat_interval`, writes the broker's state into the status of
/// its KmsBroker resource (created on the first beat). A failure is logged
/// and the next beat tries again; serving never depends on it.
async fn heartbeat(
    args: Arc<ControlArgs>,
    snapshots: tokio::sync::watch::Receiver<Option<Arc<BrokerSnapshot>>>,
    verifier: Arc<TrustDomainVerifier>,
    callers: Arc<Callers>,
) {
    let mut tick = tokio::time::interval(args.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (revision, source) = match snapshots.borrow().as_ref() {
            Some(s) => (
                s.revision,
                match s.source {
                    SnapshotSource::ControlPlane => "control_plane",
                    SnapshotSource::Cache => "cache",
                },
            ),
            None => (0, "none"),
        };
        let status = KmsBrokerStatus {
            last_heartbeat_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            config_revision: revision,
            config_source: source.into(),
            trust_domains: verifier.trust_domains(),
            denied_identities: callers.denied_count(),
            version: env!("CARGO_PKG_VERSION").into(),
            // The remaining lifetime of the broker's certificate, when it is at risk.
            message: args.svid.as_ref().and_then(|s| s.state.borrow().message()),
        };
        let json = serde_json::to_string(&status).expect("status serializes");
        // A fresh client each beat: a rotated client certificate is used at once.
        let result = match connect(&args) {
            Ok(client) => {
                strait_control_client::write_own_status(&client, "KmsBroker", &args.name, json)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

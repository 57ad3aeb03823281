//! Following the control plane: the broker takes the TrustBundles (roots
//! of its callers, per trust domain) and DenyLists from it, with the same
//! connection flags as `strait-edge` (mTLS with files or with its own SVID
//! from `--join-token`, or `--insecure-plaintext` on loopback only), and on
//! a second watch the federation kinds `KmsGrant` and `KekShred`
//! ([`crate::shred`]). Both snapshots are cached on disk, so the broker
//! keeps its trust, deny lists, grants and shreds while the control plane
//! is down.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strait_control_client::broker::{
    watch_broker_config, BrokerSnapshot, BrokerWatchConfig, ClientSource,
};
use strait_control_client::state::spec::KmsBrokerStatus;
use strait_control_client::svid::SvidState;
use strait_control_client::{ClientConfig, ClientError, ControlClient, SnapshotSource, TlsConfig};
use strait_proto::control as cpb;
use tokio::sync::watch;
use tonic::Code;

use crate::callers::{deny_lists, Callers};
use crate::shred::{FederationSnapshot, ShredStatus, Shredder, KEK_SHRED, KMS_GRANT};
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

/// Starts following; the cached snapshots (if any) are applied before this
/// returns (the shreds a cached snapshot asks for run in the background).
/// The returned task runs as long as the process.
pub fn follow_control_plane(
    args: ControlArgs,
    file_bundles: Bundles,
    verifier: Arc<TrustDomainVerifier>,
    callers: Arc<Callers>,
    shredder: Arc<Shredder>,
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
        client: source.clone(),
        broker_name: name,
        cache_dir,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
    })
    .map_err(|e| format!("cannot follow the control plane: {e}"))?;
    let mut rx = watch.config;
    let federation_cache = federation_cache_path(&args.cache_dir, &args.name);
    let cached = read_federation_cache(&federation_cache);
    if let Some(snap) = &cached {
        // Grants and refusals in force before serving, as the bundles are.
        shredder.grant_and_refuse(snap);
    }
    tokio::spawn(follow_federation(
        source.clone(),
        federation_cache,
        cached,
        shredder.clone(),
    ));
    tokio::spawn(heartbeat(
        args.clone(),
        rx.clone(),
        verifier.clone(),
        callers.clone(),
        shredder,
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
    shredder: Arc<Shredder>,
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
        let base = KmsBrokerStatus {
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
            // Filled below from the shredder (`BrokerStatus::shredded`).
            shredded: Vec::new(),
        };
        let status = BrokerStatus {
            base,
            shredded: shredder.status(),
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

/// The KmsBroker status: the control plane's [`KmsBrokerStatus`] plus the
/// KEKs this broker shredded (left out while there are none, so a status
/// reader that predates shreds still reads it).
#[derive(serde::Serialize)]
struct BrokerStatus {
    #[serde(flatten)]
    base: KmsBrokerStatus,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shredded: Vec<ShredStatus>,
}

pub fn federation_cache_path(cache_dir: &std::path::Path, broker: &str) -> PathBuf {
    cache_dir.join(format!("kms-broker-{broker}-federation.json"))
}

/// Where the shreds this broker did are remembered (see [`Shredder`]).
pub fn shred_ledger_path(cache_dir: &std::path::Path, broker: &str) -> PathBuf {
    cache_dir.join(format!("kms-broker-{broker}-shredded.json"))
}

fn read_federation_cache(path: &std::path::Path) -> Option<FederationSnapshot> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable federation cache");
            None
        }
    }
}

/// How often a shred that failed transiently is tried again.
const SHRED_RETRY: Duration = Duration::from_secs(30);

/// Watches `KmsGrant` and `KekShred` by name (list, then changes), applies
/// each new snapshot and caches it. Until the control plane serves these
/// kinds (an older one answers "unknown kind") the last known snapshot
/// stays in force: grants only add, and a shred is never undone.
async fn follow_federation(
    source: ClientSource,
    cache: PathBuf,
    mut last: Option<FederationSnapshot>,
    shredder: Arc<Shredder>,
) {
    if let Some(snap) = &last {
        shredder.apply(snap).await;
    }
    let mut backoff = Duration::from_millis(100);
    let mut warned: Option<String> = None;
    loop {
        let outcome = match source() {
            Ok(client) => watch_federation(&client, &cache, &mut last, &shredder).await,
            Err(e) => Err(e.to_string()),
        };
        let Err(why) = outcome;
        // Once per distinct reason at WARN: an older control plane answers
        // the same thing at every attempt.
        if warned.as_deref() != Some(why.as_str()) {
            tracing::warn!(error = %why, kinds = ?[KMS_GRANT, KEK_SHRED], "control-plane federation watch lost; the last known grants and shreds stay in force");
            warned = Some(why);
        }
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        // Meanwhile, shreds that failed transiently are tried again.
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = tokio::time::sleep(SHRED_RETRY), if shredder.has_pending() => {
                    if let Some(snap) = &last {
                        shredder.apply(snap).await;
                    }
                }
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One list-then-watch; returns why it ended.
async fn watch_federation(
    client: &ControlClient,
    cache: &std::path::Path,
    last: &mut Option<FederationSnapshot>,
    shredder: &Shredder,
) -> Result<std::convert::Infallible, String> {
    let (endpoint, mut pb) = client.current();
    let req = cpb::WatchRequest {
        kinds: vec![KMS_GRANT.into(), KEK_SHRED.into()],
        label_selector: String::new(),
        start_revision: 0,
    };
    let mut stream = match pb.watch(req).await {
        Ok(r) => r.into_inner(),
        Err(s) if matches!(s.code(), Code::InvalidArgument | Code::PermissionDenied) => {
            return Err(format!(
                "{endpoint}: {} (a control plane without the federation kinds, or no read access to them)",
                s.message()
            ))
        }
        Err(s) => return Err(format!("{endpoint}: {s}")),
    };
    let mut fresh = FederationSnapshot::default();
    let mut synced = false;
    loop {
        let ev = tokio::select! {
            ev = stream.message() => ev,
            _ = tokio::time::sleep(SHRED_RETRY), if shredder.has_pending() => {
                if let Some(snap) = last.as_ref() {
                    shredder.apply(snap).await;
                }
                continue;
            }
        };
        let ev = match ev {
            Ok(Some(ev)) => ev,
            Ok(None) => return Err(format!("{endpoint}: watch stream ended")),
            Err(s) => return Err(format!("{endpoint}: {s}")),
        };
        match cpb::EventType::try_from(ev.r#type) {
            Ok(cpb::EventType::Synced) => {
                synced = true;
                fresh.revision = ev.revision;
            }
            Ok(t @ (cpb::EventType::Put | cpb::EventType::Delete)) => {
                let Some(r) = ev.resource else { continue };
                let map = match r.kind.as_str() {
                    KMS_GRANT => &mut fresh.grants,
                    KEK_SHRED => &mut fresh.shreds,
                    _ => continue,
                };
                if t == cpb::EventType::Delete {
                    map.remove(&r.name);
                } else {
                    match serde_json::from_str(&r.spec_json) {
                        Ok(spec) => {
                            map.insert(r.name, spec);
                        }
                        // Left out: a grant that does not parse grants nothing.
                        Err(e) => {
                            tracing::warn!(kind = %r.kind, name = %r.name, error = %e, "bad spec JSON from the control plane")
                        }
                    }
                }
                if synced {
                    fresh.revision = ev.revision;
                }
            }
            _ => continue,
        }
        if !synced {
            continue;
        }
        let unchanged = last
            .as_ref()
            .is_some_and(|l| l.grants == fresh.grants && l.shreds == fresh.shreds);
        if unchanged {
            continue;
        }
        let bytes = serde_json::to_vec_pretty(&fresh).expect("snapshot serializes");
        let dir = cache.parent().unwrap_or_else(|| std::path::Path::new("."));
        if let Err(e) = strait_control_client::write_atomic(dir, cache, &bytes) {
            tracing::warn!(error = %e, "could not write the federation cache");
        }
        shredder.apply(&fresh).await;
        *last = Some(fresh.clone());
    }
}

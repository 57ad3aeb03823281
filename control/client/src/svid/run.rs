//! Getting the first certificate and keeping it renewed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tonic::Code;

use super::{RunningSvid, SvidError, SvidOptions, SvidState};
use crate::identity::{
    discover_bundle, now_unix, IdentityEndpoints, IdentityError, Svid, SvidRequest,
};

/// Whether the failure says nothing about the credential (the control plane
/// is down or unreachable), so the current certificate stays in use.
fn unreachable(err: &IdentityError) -> bool {
    match err {
        IdentityError::Status(s) => matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        ),
        IdentityError::Endpoint(..) | IdentityError::NoMember(_) => true,
        _ => false,
    }
}

fn certified(svid: &Svid) -> Result<Arc<CertifiedKey>, SvidError> {
    let path = Path::new("svid");
    strait_tls::certified_key(
        svid.cert_pem.as_bytes(),
        svid.key_pem.as_bytes(),
        path,
        path,
    )
    .map(Arc::new)
    .map_err(SvidError::Load)
}

async fn join(
    opts: &SvidOptions,
    token: &str,
    request: &SvidRequest,
) -> Result<(Svid, String), SvidError> {
    let bundle = discover_bundle(&opts.endpoints, token)
        .await
        .map_err(SvidError::Discover)?;
    let spiffe_id = opts.role.spiffe_id(&bundle.trust_domain, &opts.name);
    let ids = IdentityEndpoints::new(&opts.endpoints, &bundle.server_ca_pem, opts.timeout)?;
    let svid = ids
        .join(token, &spiffe_id, request)
        .await
        .map_err(|error| SvidError::Join { spiffe_id, error })?;
    tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, not_after_unix = svid.not_after_unix, "joined the control plane with the join token");
    Ok((svid, bundle.server_ca_pem))
}

/// Gets the first certificate (renewing the cached one, or joining with the
/// token) and starts keeping it renewed. `names` holds the names the
/// process serves, read at each renewal; `expiry` follows the seconds left.
pub async fn start(
    opts: SvidOptions,
    names: watch::Receiver<SvidRequest>,
    expiry: Gauge,
) -> Result<RunningSvid, SvidError> {
    let request = names.borrow().clone();
    let (svid, server_ca) = match opts.cache.load(&opts.name) {
        Some((cached, server_ca)) => {
            let ids = IdentityEndpoints::new(
                &opts.endpoints,
                &control_roots(&server_ca, &cached),
                opts.timeout,
            )?;
            match ids.renew(&cached, &request).await {
                Ok(svid) => {
                    tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, not_after_unix = svid.not_after_unix, "rejoined the control plane with the cached certificate");
                    (svid, server_ca)
                }
                Err(err) if unreachable(&err) => {
                    tracing::warn!(%err, spiffe_id = %cached.spiffe_id, serial = %cached.serial, expires_in_seconds = cached.not_after_unix - now_unix(), "control plane unreachable; serving the cached certificate until it can be renewed");
                    (cached, server_ca)
                }
                Err(err) => match &opts.token {
                    Some(token) => {
                        tracing::warn!(%err, "the cached certificate was not renewed; joining with the token");
                        join(&opts, token, &request).await?
                    }
                    None => return Err(SvidError::Renew(err)),
                },
            }
        }
        None => {
            let token = opts
                .token
                .as_deref()
                .ok_or_else(|| SvidError::NoToken(opts.cache.dir().display().to_string()))?;
            join(&opts, token, &request).await?
        }
    };
    if let Err(err) = opts.cache.store(&svid, &server_ca) {
        tracing::warn!("{err}: the SVID is not cached; a restart needs a new join token");
    }
    expiry.set(svid.not_after_unix - now_unix());
    let (credentials_tx, credentials) = watch::channel(certified(&svid)?);
    let (roots_tx, roots) = watch::channel(control_roots(&server_ca, &svid));
    let (bundle_tx, bundle) = watch::channel(svid.bundle_pem.clone());
    let (state_tx, state) = watch::channel(SvidState::of(&svid));
    // A cached certificate renewed or kept: it was issued for the names
    // known at start at best.
    let (issued_tx, issued_for) = watch::channel(request);
    tokio::spawn(
        Renewal {
            opts,
            names,
            svid,
            server_ca,
            expiry,
            credentials: credentials_tx,
            roots: roots_tx,
            bundle: bundle_tx,
            state: state_tx,
            issued_for: issued_tx,
        }
        .run(),
    );
    Ok(RunningSvid {
        credentials,
        control_roots: roots,
        bundle,
        state,
        issued_for,
    })
}

/// The renewal task's state: the certificate in force and where each new
/// one is published.
struct Renewal {
    opts: SvidOptions,
    names: watch::Receiver<SvidRequest>,
    svid: Svid,
    server_ca: String,
    expiry: Gauge,
    credentials: watch::Sender<Arc<CertifiedKey>>,
    roots: watch::Sender<String>,
    bundle: watch::Sender<String>,
    state: watch::Sender<SvidState>,
    issued_for: watch::Sender<SvidRequest>,
}

impl Renewal {
    async fn run(mut self) {
        let mut next_attempt = self.svid.renew_at_unix();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expired_reported = false;
        loop {
            // New names wake the task at once (see below).
            let names_changed = tokio::select! {
                _ = ticker.tick() => false,
                Ok(()) = self.names.changed() => true,
            };
            if self.credentials.is_closed() {
                return;
            }
            let left = self.svid.not_after_unix - now_unix();
            self.expiry.set(left);
            if left <= 0 && !expired_reported {
                expired_reported = true;
                tracing::warn!(spiffe_id = %self.svid.spiffe_id, serial = %self.svid.serial, "the SVID has EXPIRED without a renewal: listeners with tls.identity: svid refuse handshakes until the {} rejoins (a new --join-token)", self.opts.role.path());
                self.state.send_modify(|_| {});
            }
            // New listener names (the control plane's config arrived after
            // the join, a virtual cluster was added): renew now, so clients
            // that verify the host name are not refused until half-life.
            if names_changed || self.names.has_changed().unwrap_or(false) {
                self.names.mark_unchanged();
                tracing::info!("the names the listeners serve changed; renewing the SVID for them");
                next_attempt = now_unix();
            }
            if now_unix() < next_attempt {
                continue;
            }
            match self.renew_once(left).await {
                Ok(()) => {
                    next_attempt = self.svid.renew_at_unix();
                    expired_reported = false;
                }
                Err(err) => {
                    let left = self.svid.not_after_unix - now_unix();
                    // Retry often enough to fit several attempts in what is left.
                    let retry = (left / 10).clamp(2, 30);
                    next_attempt = now_unix() + retry;
                    tracing::warn!(error = %err, expires_in_seconds = left, retry_in_seconds = retry, spiffe_id = %self.svid.spiffe_id, "SVID renewal failed; serving the current certificate until it expires");
                    self.state.send_modify(|s| s.renewal_error = Some(err));
                }
            }
        }
    }

    /// One renewal (a join with the token once the certificate has expired)
    /// and, on success, its publication.
    async fn renew_once(&mut self, left: i64) -> Result<(), String> {
        let request = self.names.borrow_and_update().clone();
        let roots = control_roots(&self.server_ca, &self.svid);
        let ids = IdentityEndpoints::new(&self.opts.endpoints, &roots, self.opts.timeout)
            .map_err(|e| e.to_string())?;
        let new = match (ids.renew(&self.svid, &request).await, &self.opts.token) {
            (Err(err), Some(token)) if left <= 0 => {
                tracing::warn!(%err, "the expired SVID cannot be renewed; trying the join token");
                let (svid, ca) = join(&self.opts, token, &request)
                    .await
                    .map_err(|e| e.to_string())?;
                self.server_ca = ca;
                svid
            }
            (other, _) => other.map_err(|e| e.to_string())?,
        };
        let key = certified(&new).map_err(|e| e.to_string())?;
        // The roots that verify the control plane may have moved (a CA
        // rotation); fetch them over the verified connection.
        if let Ok(bundle) = ids.trust_bundle().await {
            if !bundle.server_ca_pem.is_empty() && bundle.server_ca_pem != self.server_ca {
                tracing::info!(
                    "control-plane server root changed; new connections verify against it"
                );
                self.server_ca = bundle.server_ca_pem;
            }
        }
        self.roots
            .send_if_modified(|r| replace(r, &control_roots(&self.server_ca, &new)));
        if let Err(err) = self.opts.cache.store(&new, &self.server_ca) {
            tracing::warn!("{err}: the renewed SVID is not cached");
        }
        tracing::info!(spiffe_id = %new.spiffe_id, serial = %new.serial, not_after_unix = new.not_after_unix, "SVID renewed; new handshakes use it");
        self.credentials.send_replace(key);
        self.bundle
            .send_if_modified(|b| replace(b, &new.bundle_pem));
        self.state.send_replace(SvidState::of(&new));
        self.issued_for.send_replace(request);
        self.expiry.set(new.not_after_unix - now_unix());
        self.svid = new;
        Ok(())
    }
}

/// The roots that verify control nodes: the server root the join pinned
/// (their bootstrap certificate's) and the CA's bundle, so that clients name
/// both and get the nodes' CA-issued certificates (which keep working after
/// the bootstrap certificate has expired, and follow a CA rotation with each
/// renewal).
fn control_roots(server_ca: &str, svid: &Svid) -> String {
    let mut pem = server_ca.trim_end().to_string();
    if !svid.bundle_pem.trim().is_empty() {
        pem.push('\n');
        pem.push_str(svid.bundle_pem.trim_end());
    }
    pem.push('\n');
    pem
}

fn replace(current: &mut String, new: &str) -> bool {
    if current == new || new.is_empty() {
        return false;
    }
    *current = new.to_string();
    true
}

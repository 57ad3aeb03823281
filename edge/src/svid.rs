//! The edge's own identity from the control plane's CA (`--join-token`).
//!
//! The key is generated in memory; only a CSR leaves. The first certificate
//! comes through `Identity/Join` (the token's pin authenticates the control
//! plane), later ones through `Identity/Renew` at half-life, authenticated
//! by the current certificate. Each one is published on a credential channel
//! that the listeners with `tls.identity: svid` and the control-plane
//! connections read at every handshake, and kept in `<cache-dir>/svid/`
//! (mode 0600) so a restart renews with it instead of needing a new token.
//! With the control plane unreachable, the current certificate is served
//! until it expires; an expired one is never presented (the resolver refuses
//! it, see `strait_tls::WatchedCertifiedKey`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::gauge::Gauge;
use strait_control_client::identity::{
    discover_bundle, now_unix, write_atomic, IdentityEndpoints, IdentityError, Svid, SvidRequest,
};
use strait_tls::CredentialReceiver;
use tokio::sync::watch;
use tonic::Code;
use zeroize::Zeroizing;

/// Where the SVID is kept between runs.
pub struct SvidCache {
    dir: PathBuf,
}

const CERT: &str = "cert.pem";
const KEY: &str = "key.pem";
const BUNDLE: &str = "bundle.pem";
const SERVER_CA: &str = "server-ca.pem";

impl SvidCache {
    pub fn new(cache_dir: &Path) -> Self {
        SvidCache {
            dir: cache_dir.join("svid"),
        }
    }

    /// The cached certificate and the control plane's root, if both are
    /// there, parse and the certificate has not expired.
    pub fn load(&self, edge_name: &str) -> Option<(Svid, String)> {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).ok();
        let (cert, key, bundle, server_ca) =
            (read(CERT)?, read(KEY)?, read(BUNDLE)?, read(SERVER_CA)?);
        let key = Zeroizing::new(key);
        let (spiffe_id, serial, not_after) = match describe(&cert) {
            Ok(d) => d,
            Err(err) => {
                tracing::warn!(dir = %self.dir.display(), %err, "ignoring an unreadable cached SVID");
                return None;
            }
        };
        if !spiffe_id.ends_with(&format!("/edge/{edge_name}")) {
            tracing::warn!(dir = %self.dir.display(), %spiffe_id, "ignoring a cached SVID of another edge");
            return None;
        }
        if not_after <= now_unix() {
            tracing::info!(dir = %self.dir.display(), %spiffe_id, %serial, "the cached SVID has expired");
            return None;
        }
        Some((
            Svid {
                cert_pem: cert,
                key_pem: key,
                bundle_pem: bundle,
                spiffe_id,
                serial,
                not_after_unix: not_after,
                received_unix: now_unix(),
            },
            server_ca,
        ))
    }

    /// Key first, every file 0600, each written atomically.
    pub fn store(&self, svid: &Svid, server_ca: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot restrict {}", self.dir.display()))?;
        }
        write_atomic(&self.dir, KEY, svid.key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.dir, CERT, svid.cert_pem.as_bytes(), 0o600)?;
        write_atomic(&self.dir, BUNDLE, svid.bundle_pem.as_bytes(), 0o600)?;
        write_atomic(&self.dir, SERVER_CA, server_ca.as_bytes(), 0o600)?;
        Ok(())
    }
}

/// (SPIFFE ID, serial in lowercase hex, notAfter) of a PEM certificate.
fn describe(cert_pem: &str) -> anyhow::Result<(String, String, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("not X.509: {e}"))?;
    let spiffe_id = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                    Some(u.to_string())
                }
                _ => None,
            })
        })
        .context("no SPIFFE ID in the certificate")?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok((spiffe_id, serial, cert.validity().not_after.timestamp()))
}

/// What the edge's identity looks like now, for the status and the logs.
#[derive(Debug, Clone, PartialEq)]
pub struct SvidState {
    pub spiffe_id: String,
    pub serial: String,
    pub not_after_unix: i64,
    /// The last renewal's error, until one succeeds.
    pub renewal_error: Option<String>,
}

impl SvidState {
    fn of(svid: &Svid) -> Self {
        SvidState {
            spiffe_id: svid.spiffe_id.clone(),
            serial: svid.serial.clone(),
            not_after_unix: svid.not_after_unix,
            renewal_error: None,
        }
    }

    /// A line for `EdgeStatus.message` while renewal fails or after expiry.
    pub fn message(&self) -> Option<String> {
        let left = self.not_after_unix - now_unix();
        if left <= 0 {
            return Some(format!(
                "SVID {} (serial {}) expired {}s ago; listeners with tls.identity: svid refuse handshakes",
                self.spiffe_id, self.serial, -left
            ));
        }
        self.renewal_error.as_ref().map(|err| {
            format!(
                "SVID {} (serial {}) expires in {left}s and could not be renewed: {err}",
                self.spiffe_id, self.serial
            )
        })
    }
}

pub struct SvidOptions {
    pub endpoints: Vec<String>,
    pub edge_name: String,
    pub token: Option<String>,
    pub cache: SvidCache,
    pub request: SvidRequest,
    pub timeout: Duration,
}

/// The running identity: channels that follow each new certificate.
pub struct EdgeSvid {
    /// The current certificate and key, for rustls resolvers.
    pub credentials: CredentialReceiver,
    /// PEM of the root that verifies the control plane's server certificates.
    pub control_roots: watch::Receiver<String>,
    pub state: watch::Receiver<SvidState>,
}

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

fn certified(svid: &Svid) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
    let path = Path::new("svid");
    Ok(Arc::new(
        strait_tls::certified_key(
            svid.cert_pem.as_bytes(),
            svid.key_pem.as_bytes(),
            path,
            path,
        )
        .context("the SVID from the control plane does not load")?,
    ))
}

async fn join(opts: &SvidOptions, token: &str) -> anyhow::Result<(Svid, String)> {
    let bundle = discover_bundle(&opts.endpoints, token)
        .await
        .context("cannot reach a control-plane member matching the join token's pin")?;
    let spiffe_id = format!("spiffe://{}/edge/{}", bundle.trust_domain, opts.edge_name);
    let ids = IdentityEndpoints::new(&opts.endpoints, &bundle.server_ca_pem, opts.timeout)?;
    let svid = ids
        .join(token, &spiffe_id, &opts.request)
        .await
        .with_context(|| format!("join as {spiffe_id} refused"))?;
    tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, not_after_unix = svid.not_after_unix, "joined the control plane with the join token");
    Ok((svid, bundle.server_ca_pem))
}

/// Gets the edge's first certificate (renewing the cached one, or joining
/// with the token) and starts keeping it renewed. `names` holds the names
/// the listeners serve, read at each renewal.
pub async fn start(
    opts: SvidOptions,
    names: watch::Receiver<SvidRequest>,
    expiry: Gauge,
) -> anyhow::Result<EdgeSvid> {
    let request = names.borrow().clone();
    let (svid, server_ca) = match opts.cache.load(&opts.edge_name) {
        Some((cached, server_ca)) => {
            let ids = IdentityEndpoints::new(&opts.endpoints, &server_ca, opts.timeout)?;
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
                        join(&opts, token).await?
                    }
                    None => anyhow::bail!(
                        "the control plane refused to renew the cached certificate: {err}"
                    ),
                },
            }
        }
        None => {
            let token = opts.token.as_deref().context(
                "no valid certificate in the cache directory: --join-token is needed to join",
            )?;
            join(&opts, token).await?
        }
    };
    if let Err(err) = opts.cache.store(&svid, &server_ca) {
        tracing::warn!("{err:#}: the SVID is not cached; a restart needs a new join token");
    }
    expiry.set(svid.not_after_unix - now_unix());
    let (credentials_tx, credentials) = watch::channel(certified(&svid)?);
    let (roots_tx, control_roots) = watch::channel(server_ca.clone());
    let (state_tx, state) = watch::channel(SvidState::of(&svid));
    tokio::spawn(keep_renewed(
        opts,
        names,
        svid,
        server_ca,
        expiry,
        credentials_tx,
        roots_tx,
        state_tx,
    ));
    Ok(EdgeSvid {
        credentials,
        control_roots,
        state,
    })
}

#[allow(clippy::too_many_arguments)]
async fn keep_renewed(
    opts: SvidOptions,
    mut names: watch::Receiver<SvidRequest>,
    mut svid: Svid,
    mut server_ca: String,
    expiry: Gauge,
    credentials: watch::Sender<Arc<rustls::sign::CertifiedKey>>,
    roots: watch::Sender<String>,
    state: watch::Sender<SvidState>,
) {
    let mut next_attempt = svid.renew_at_unix();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expired_reported = false;
    loop {
        ticker.tick().await;
        if credentials.is_closed() {
            return;
        }
        let left = svid.not_after_unix - now_unix();
        expiry.set(left);
        if left <= 0 && !expired_reported {
            expired_reported = true;
            tracing::warn!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, "the SVID has EXPIRED without a renewal: listeners with tls.identity: svid refuse handshakes until the edge rejoins (a new --join-token)");
            state.send_modify(|_| {});
        }
        // New listener names (the control plane's config arrived after the
        // join, a virtual cluster was added): renew now, so clients that
        // verify the host name are not refused until half-life.
        if names.has_changed().unwrap_or(false) {
            names.mark_unchanged();
            tracing::info!("the names the listeners serve changed; renewing the SVID for them");
            next_attempt = now_unix();
        }
        if now_unix() < next_attempt {
            continue;
        }
        let request = names.borrow_and_update().clone();
        let ids = match IdentityEndpoints::new(&opts.endpoints, &server_ca, opts.timeout) {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!(%err, "cannot renew the SVID");
                next_attempt = now_unix() + 10;
                continue;
            }
        };
        let result = match ids.renew(&svid, &request).await {
            Err(err) if left <= 0 && opts.token.is_some() => {
                tracing::warn!(%err, "the expired SVID cannot be renewed; trying the join token");
                join(&opts, opts.token.as_deref().unwrap_or_default())
                    .await
                    .map(|(svid, ca)| {
                        server_ca = ca;
                        svid
                    })
                    .map_err(|e| format!("{e:#}"))
            }
            other => other.map_err(|e| e.to_string()),
        };
        match result.and_then(|new| {
            certified(&new)
                .map(|k| (new, k))
                .map_err(|e| format!("{e:#}"))
        }) {
            Ok((new, key)) => {
                // The roots that verify the control plane may have moved
                // (a CA rotation); fetch them over the verified connection.
                if let Ok(bundle) = ids.trust_bundle().await {
                    if !bundle.server_ca_pem.is_empty() && bundle.server_ca_pem != server_ca {
                        tracing::info!(
                            "control-plane server root changed; new connections verify against it"
                        );
                        server_ca = bundle.server_ca_pem;
                        roots.send_replace(server_ca.clone());
                    }
                }
                if let Err(err) = opts.cache.store(&new, &server_ca) {
                    tracing::warn!("{err:#}: the renewed SVID is not cached");
                }
                tracing::info!(spiffe_id = %new.spiffe_id, serial = %new.serial, not_after_unix = new.not_after_unix, "SVID renewed; new handshakes use it");
                credentials.send_replace(key);
                state.send_replace(SvidState::of(&new));
                svid = new;
                next_attempt = svid.renew_at_unix();
                expired_reported = false;
                expiry.set(svid.not_after_unix - now_unix());
            }
            Err(err) => {
                let left = svid.not_after_unix - now_unix();
                // Retry often enough to fit several attempts in what is left.
                let retry = (left / 10).clamp(2, 30);
                next_attempt = now_unix() + retry;
                tracing::warn!(error = %err, expires_in_seconds = left, retry_in_seconds = retry, spiffe_id = %svid.spiffe_id, "SVID renewal failed; serving the current certificate until it expires");
                state.send_modify(|s| s.renewal_error = Some(err));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(id: &str, secs: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = time_after(secs);
        let key = rcgen::KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        (c.pem(), key.serialize_pem())
    }

    fn time_after(secs: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(now_unix() + secs).unwrap()
    }

    fn svid(id: &str, secs: i64) -> Svid {
        let (cert, key) = cert(id, secs);
        Svid {
            cert_pem: cert,
            key_pem: Zeroizing::new(key),
            bundle_pem: "bundle".into(),
            spiffe_id: id.into(),
            serial: "01".into(),
            not_after_unix: now_unix() + secs,
            received_unix: now_unix(),
        }
    }

    #[test]
    fn cache_keeps_a_valid_svid_private_and_drops_an_expired_one() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvidCache::new(dir.path());
        let id = "spiffe://example.org/edge/e1";
        cache.store(&svid(id, 600), "server-ca").unwrap();
        let (back, ca) = cache.load("e1").expect("a valid cached SVID loads");
        assert_eq!(back.spiffe_id, id);
        assert_eq!(ca, "server-ca");
        assert!((back.not_after_unix - (now_unix() + 600)).abs() <= 1);
        assert!(
            cache.load("e2").is_none(),
            "another edge's SVID is not used"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for name in [CERT, KEY, BUNDLE, SERVER_CA] {
                let mode = std::fs::metadata(dir.path().join("svid").join(name))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{name}");
            }
        }
        cache.store(&svid(id, -5), "server-ca").unwrap();
        assert!(cache.load("e1").is_none(), "an expired SVID is not used");
    }

    #[test]
    fn state_message_reports_failing_renewal_and_expiry() {
        let mut s = SvidState {
            spiffe_id: "spiffe://example.org/edge/e1".into(),
            serial: "ab".into(),
            not_after_unix: now_unix() + 100,
            renewal_error: None,
        };
        assert_eq!(s.message(), None);
        s.renewal_error = Some("unavailable".into());
        let m = s.message().unwrap();
        assert!(m.contains("could not be renewed: unavailable"), "{m}");
        s.not_after_unix = now_unix() - 3;
        let m = s.message().unwrap();
        assert!(
            m.contains("expired") && m.contains("refuse handshakes"),
            "{m}"
        );
    }
}

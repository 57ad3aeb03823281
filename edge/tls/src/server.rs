//! Server configurations from PEM files, and their hot reload.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::server::ResolvesServerCert;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::{self, TrustBundleSettings};
use crate::credentials::{
    certified_key, CredentialLabel, CredentialReceiver, FileCredentials, WatchedCertifiedKey,
};
use crate::identity::PrincipalSource;
use crate::metrics::TlsMetrics;
use crate::trust::{trust_domain_error, SpiffeClientVerifier};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("invalid TLS material: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client trust bundle: {0}")]
    Verifier(String),
    #[error("identity: svid, but this edge has no SVID: start it with --control and --join-token (or a still-valid certificate in its --cache-dir)")]
    NoSvid,
}

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A certificate signed by the trust bundle is required.
    Required,
    /// A certificate is verified if presented; otherwise the client is anonymous.
    Optional,
    /// No certificate is asked for.
    None,
}

/// Where a listener's certificate comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ServedCertificate {
    /// A certificate and key file pair, re-read every `reload_interval`.
    Files { cert: PathBuf, key: PathBuf },
    /// The edge's own SVID from the control plane's CA (`tls.identity: svid`),
    /// renewed and swapped live by the edge.
    Svid,
}

/// Validated TLS settings of one virtual cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTlsSettings {
    pub certificate: ServedCertificate,
    /// Verifies certificates without a SPIFFE ID; binds no trust domain.
    pub client_ca: Option<PathBuf>,
    /// Each trust domain's bundle: a certificate with a SPIFFE ID is verified
    /// only against the bundle of its ID's trust domain.
    pub client_trust_bundles: Vec<TrustBundleSettings>,
    pub client_auth: ClientAuth,
    pub principal_sources: Vec<PrincipalSource>,
}

impl ServerTlsSettings {
    fn verifies_clients(&self) -> bool {
        self.client_ca.is_some() || !self.client_trust_bundles.is_empty()
    }
}

/// The bytes the client verifier was built from, to notice when files change.
#[derive(PartialEq, Eq)]
struct TrustMaterial {
    client_ca: Option<Vec<u8>>,
    bundles: Vec<Vec<u8>>,
}

impl TrustMaterial {
    fn read(settings: &ServerTlsSettings) -> Result<Self, TlsError> {
        Ok(TrustMaterial {
            client_ca: settings
                .client_ca
                .as_ref()
                .map(|path| {
                    std::fs::read(path).map_err(|source| TlsError::Read {
                        path: path.clone(),
                        source,
                    })
                })
                .transpose()?,
            bundles: settings
                .client_trust_bundles
                .iter()
                .map(|bundle| bundle.source.read())
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Builds rustls server configurations.
pub struct ServerTls;

impl ServerTls {
    /// Reads the files and builds a configuration, to check them.
    pub fn load(settings: &ServerTlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
        let resolver: Arc<dyn ResolvesServerCert> = match &settings.certificate {
            ServedCertificate::Files { cert, key } => {
                let certified = certified_key(&read(cert)?, &read(key)?, cert, key)?;
                // No sender: the configuration keeps this certificate.
                WatchedCertifiedKey::new(watch::channel(Arc::new(certified)).1)
            }
            // The SVID arrives at run time; this checks the trust material.
            ServedCertificate::Svid => Arc::new(NoCertificateYet),
        };
        let trust = TrustMaterial::read(settings)?;
        Ok(Self::build(settings, &trust, resolver)?.0)
    }

    /// The configuration, serving whatever `credentials` holds at each
    /// handshake, and the seconds until the trust bundles' first certificate
    /// expires.
    fn build(
        settings: &ServerTlsSettings,
        trust: &TrustMaterial,
        resolver: Arc<dyn ResolvesServerCert>,
    ) -> Result<(Arc<ServerConfig>, Option<i64>), TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;

        let mut ca_expiry = None;
        let builder = match settings.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            _ if !settings.verifies_clients() => {
                return Err(TlsError::Verifier(
                    "client_auth needs client_trust_bundles or a client_ca".into(),
                ))
            }
            auth => {
                let plain = match (&settings.client_ca, &trust.client_ca) {
                    (Some(path), Some(bytes)) => {
                        let certs = bundle::certificates(bytes, path)?;
                        let mut roots = RootCertStore::empty();
                        for cert in certs {
                            ca_expiry = ca_expiry.or_else(|| seconds_until_expiry(&cert));
                            roots.add(cert).map_err(|err| TlsError::Pem {
                                path: path.clone(),
                                what: err.to_string(),
                            })?;
                        }
                        Some(roots)
                    }
                    _ => None,
                };
                let mut domains = BTreeMap::new();
                for (bundle, bytes) in settings.client_trust_bundles.iter().zip(&trust.bundles) {
                    let (roots, certs) = bundle::roots(bytes, bundle)?;
                    ca_expiry = ca_expiry.or_else(|| certs.first().and_then(seconds_until_expiry));
                    if domains.insert(bundle.trust_domain.clone(), roots).is_some() {
                        return Err(TlsError::Verifier(format!(
                            "trust domain '{}' has two bundles",
                            bundle.trust_domain
                        )));
                    }
                }
                let verifier = SpiffeClientVerifier::new(
                    domains,
                    plain,
                    auth == ClientAuth::Required,
                    provider,
                )
                .map_err(TlsError::Verifier)?;
                builder.with_client_cert_verifier(Arc::new(verifier))
            }
        };
        let config = builder.with_cert_resolver(resolver);
        Ok((Arc::new(config), ca_expiry))
    }
}

/// Validation only: serves nothing.
#[derive(Debug)]
struct NoCertificateYet;

impl ResolvesServerCert for NoCertificateYet {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.clone(),
        source,
    })
}

pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Seconds from now until the certificate's notAfter (negative once expired).
pub fn seconds_until_expiry(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp() - now_unix())
}

/// Publishes a virtual cluster's server configuration. The certificate is
/// swapped live through a resolver (new handshakes get the new one, open
/// connections keep theirs); a change of the trust bundles publishes a new
/// configuration.
pub struct CredentialWatcher;

impl CredentialWatcher {
    /// Serves the certificate and key files of `settings`, re-read every
    /// `interval` until `stop`. Fails if they are invalid: an edge must not
    /// start without its certificate.
    pub fn start(
        virtual_cluster: &str,
        settings: ServerTlsSettings,
        metrics: TlsMetrics,
        interval: Duration,
        stop: CancellationToken,
    ) -> Result<watch::Receiver<Arc<ServerConfig>>, TlsError> {
        let ServedCertificate::Files { cert, key } = &settings.certificate else {
            return Err(TlsError::NoSvid);
        };
        let credentials = FileCredentials::start(
            cert.clone(),
            key.clone(),
            CredentialLabel {
                owner: virtual_cluster.to_owned(),
                certificate: "server",
            },
            Some(metrics.clone()),
            interval,
            stop.clone(),
        )?;
        Self::start_with_credentials(
            virtual_cluster,
            settings,
            credentials,
            metrics,
            interval,
            stop,
        )
    }

    /// Like [`CredentialWatcher::start`], serving whatever `credentials`
    /// publishes (e.g. an SVID from the control plane's CA) instead of the
    /// certificate files.
    pub fn start_with_credentials(
        virtual_cluster: &str,
        settings: ServerTlsSettings,
        credentials: CredentialReceiver,
        metrics: TlsMetrics,
        interval: Duration,
        stop: CancellationToken,
    ) -> Result<watch::Receiver<Arc<ServerConfig>>, TlsError> {
        let material = TrustMaterial::read(&settings)?;
        let resolver: Arc<dyn ResolvesServerCert> = WatchedCertifiedKey::new(credentials);
        let (config, ca_expiry) = ServerTls::build(&settings, &material, resolver.clone())?;
        if let Some(ca_expiry) = ca_expiry {
            metrics.expiry(virtual_cluster, "client_ca", ca_expiry);
        }
        let (tx, rx) = watch::channel(config);
        if !settings.verifies_clients() {
            return Ok(rx);
        }
        let name = virtual_cluster.to_owned();
        tokio::spawn(async move {
            let mut current = material;
            // The last rejected material, so a broken file is reported once, not every tick.
            let mut rejected: Option<TrustMaterial> = None;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let material = match TrustMaterial::read(&settings) {
                    Ok(material) => material,
                    Err(err) => {
                        tracing::warn!(virtual_cluster = %name, %err, "cannot read client trust bundles; keeping the current ones");
                        continue;
                    }
                };
                if material == current || rejected.as_ref() == Some(&material) {
                    continue;
                }
                match ServerTls::build(&settings, &material, resolver.clone()) {
                    Ok((config, ca_expiry)) => {
                        if let Some(ca_expiry) = ca_expiry {
                            metrics.expiry(&name, "client_ca", ca_expiry);
                        }
                        metrics.reload(&name, true);
                        tracing::info!(virtual_cluster = %name, "client trust bundles reloaded");
                        tx.send_replace(config);
                        current = material;
                        rejected = None;
                    }
                    Err(err) => {
                        metrics.reload(&name, false);
                        tracing::warn!(virtual_cluster = %name, %err, "new client trust bundles rejected; keeping the current ones");
                        rejected = Some(material);
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// The trust-domain refusal that made a handshake fail, if that is why.
pub fn trust_domain_refusal(err: &std::io::Error) -> Option<&crate::TrustDomainError> {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(trust_domain_error)
}

/// A short label for why a handshake failed, for metrics and logs.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    if err.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        return "eof";
    }
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        // The resolver had no certificate to serve: the SVID expired.
        rustls::Error::General(m) if m.contains("no server certificate") => "no_server_certificate",
        other if trust_domain_error(other).is_some() => {
            trust_domain_error(other).map_or("bad_certificate", |e| e.reason())
        }
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::Revoked => "revoked",
            _ => "bad_certificate",
        },
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "protocol",
    }
}

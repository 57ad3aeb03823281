//! Server configurations from PEM files, and their hot reload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::PrincipalSource;
use crate::metrics::TlsMetrics;

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

/// Validated TLS settings of one virtual cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub principal_sources: Vec<PrincipalSource>,
}

/// The bytes a configuration was built from, to notice when files change.
#[derive(PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Material {
    fn read(settings: &ServerTlsSettings) -> Result<Self, TlsError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })
        };
        Ok(Material {
            cert: read(&settings.cert)?,
            key: read(&settings.key)?,
            client_ca: settings.client_ca.as_ref().map(read).transpose()?,
        })
    }
}

/// Builds rustls server configurations.
pub struct ServerTls;

impl ServerTls {
    /// Reads the files and builds a configuration.
    pub fn load(settings: &ServerTlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
        let material = Material::read(settings)?;
        Ok(Self::build(settings, &material)?.0)
    }

    /// The configuration, and the seconds until the served certificate and
    /// the trust bundle's first certificate expire.
    fn build(
        settings: &ServerTlsSettings,
        material: &Material,
    ) -> Result<(Arc<ServerConfig>, i64, Option<i64>), TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&material.cert)
            .collect::<Result<_, _>>()
            .map_err(|err| TlsError::Pem {
                path: settings.cert.clone(),
                what: err.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Pem {
                path: settings.cert.clone(),
                what: "no certificate found".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&material.key).map_err(|err| TlsError::Pem {
            path: settings.key.clone(),
            what: err.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;

        let mut ca_expiry = None;
        let builder = match (settings.client_auth, &material.client_ca) {
            (ClientAuth::None, _) => builder.with_no_client_auth(),
            (auth, Some(bundle)) => {
                let path = settings.client_ca.clone().unwrap_or_default();
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(bundle) {
                    let cert = cert.map_err(|err| TlsError::Pem {
                        path: path.clone(),
                        what: err.to_string(),
                    })?;
                    ca_expiry = ca_expiry.or_else(|| seconds_until_expiry(&cert));
                    roots.add(cert).map_err(|err| TlsError::Pem {
                        path: path.clone(),
                        what: err.to_string(),
                    })?;
                }
                if roots.is_empty() {
                    return Err(TlsError::Pem {
                        path,
                        what: "no certificate found in the trust bundle".into(),
                    });
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                let verifier = verifier
                    .build()
                    .map_err(|err| TlsError::Verifier(err.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            (_, None) => {
                return Err(TlsError::Verifier(
                    "client_auth needs a client_ca trust bundle".into(),
                ))
            }
        };
        let expiry = seconds_until_expiry(&certs[0]).unwrap_or(0);
        let config = builder.with_single_cert(certs, key)?;
        Ok((Arc::new(config), expiry, ca_expiry))
    }
}

fn seconds_until_expiry(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(parsed.validity().not_after.timestamp() - now)
}

/// Publishes a virtual cluster's server configuration and replaces it when
/// its files change.
pub struct CredentialWatcher;

impl CredentialWatcher {
    /// Loads the configuration (failing if it is invalid: an edge must not
    /// start without its certificate) and re-reads the files every `interval`
    /// until `stop`.
    pub fn start(
        virtual_cluster: &str,
        settings: ServerTlsSettings,
        metrics: TlsMetrics,
        interval: Duration,
        stop: CancellationToken,
    ) -> Result<watch::Receiver<Arc<ServerConfig>>, TlsError> {
        let material = Material::read(&settings)?;
        let (config, expiry, ca_expiry) = ServerTls::build(&settings, &material)?;
        metrics.expiry(virtual_cluster, "server", expiry);
        if let Some(ca_expiry) = ca_expiry {
            metrics.expiry(virtual_cluster, "client_ca", ca_expiry);
        }
        let (tx, rx) = watch::channel(config);
        let name = virtual_cluster.to_owned();
        tokio::spawn(async move {
            let mut current = material;
            // The last rejected material, so a broken file is reported once, not every tick.
            let mut rejected: Option<Material> = None;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let material = match Material::read(&settings) {
                    Ok(material) => material,
                    Err(err) => {
                        tracing::warn!(virtual_cluster = %name, %err, "cannot read TLS files; keeping the current credentials");
                        continue;
                    }
                };
                if material == current || rejected.as_ref() == Some(&material) {
                    continue;
                }
                match ServerTls::build(&settings, &material) {
                    Ok((config, expiry, ca_expiry)) => {
                        metrics.expiry(&name, "server", expiry);
                        if let Some(ca_expiry) = ca_expiry {
                            metrics.expiry(&name, "client_ca", ca_expiry);
                        }
                        metrics.reload(&name, true);
                        tracing::info!(virtual_cluster = %name, "TLS credentials reloaded");
                        tx.send_replace(config);
                        current = material;
                        rejected = None;
                    }
                    Err(err) => {
                        // Often a rotation caught between writing the certificate and the key:
                        // the next tick sees both.
                        metrics.reload(&name, false);
                        tracing::warn!(virtual_cluster = %name, %err, "new TLS credentials rejected; keeping the current ones");
                        rejected = Some(material);
                    }
                }
            }
        });
        Ok(rx)
    }
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

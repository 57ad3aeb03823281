//! The broker's TLS listener, built from `strait-tls` (the edge's pieces):
//! a serving certificate swapped live and client certificates verified
//! against the bundle of the trust domain they claim.
//!
//! * The serving certificate: [`strait_tls::FileCredentials`] polls the
//!   files and publishes `CertifiedKey`s on a `watch` channel that
//!   [`strait_tls::WatchedCertifiedKey`] reads at every handshake. New
//!   handshakes use a replaced certificate at once; open connections keep
//!   the session they negotiated. An SVID issued by the control plane's CA
//!   can publish into the same kind of channel.
//! * [`TrustDomainVerifier`]: [`strait_tls::SpiffeClientVerifier`] (a
//!   certificate whose SPIFFE ID names trust domain `Y` must chain to `Y`'s
//!   bundle) inside a [`strait_tls::LiveClientVerifier`], swapped when the
//!   control plane's TrustBundles change; [`strait_tls::tls_incoming`]
//!   accepts for tonic.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use strait_tls::{
    tls_incoming, CredentialLabel, CredentialReceiver, FileCredentials, LiveClientVerifier,
    SpiffeClientVerifier, TlsIncoming, WatchedCertifiedKey,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Credentials(#[from] strait_tls::TlsError),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in `pem` (at least one).
pub fn certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.into(),
            message: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// The serving certificate, re-read every `interval` until `stop`.
pub fn serving_certificate(
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    stop: CancellationToken,
) -> Result<CredentialReceiver, TlsError> {
    let label = CredentialLabel {
        owner: "kms-broker".into(),
        certificate: "server",
    };
    Ok(FileCredentials::start(
        cert, key, label, None, interval, stop,
    )?)
}

/// The first `spiffe://` URI SAN of a DER certificate (the caller's
/// identity, as in the control plane).
pub fn spiffe_id_of_der(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_string()),
        _ => None,
    })
}

/// Roots per trust domain.
pub type Bundles = BTreeMap<String, Vec<CertificateDer<'static>>>;

/// [`SpiffeClientVerifier`] with bundles replaceable live
/// ([`LiveClientVerifier`]); client certificates are mandatory, and
/// certificates without a SPIFFE ID are refused (no plain `client_ca`: the
/// broker has no subject-based callers).
#[derive(Debug)]
pub struct TrustDomainVerifier {
    provider: Arc<CryptoProvider>,
    live: Arc<LiveClientVerifier<SpiffeClientVerifier>>,
}

impl TrustDomainVerifier {
    pub fn new(provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(TrustDomainVerifier {
            live: Arc::new(LiveClientVerifier::new(provider.clone(), true)),
            provider,
        })
    }

    /// Replaces every bundle. A domain whose roots do not load is left out
    /// (its callers are refused) and named in the returned errors.
    pub fn set_bundles(&self, bundles: &Bundles) -> Vec<String> {
        let mut errors = Vec::new();
        let mut domains = BTreeMap::new();
        for (domain, certs) in bundles {
            let mut roots = RootCertStore::empty();
            let (_, bad) = roots.add_parsable_certificates(certs.iter().cloned());
            if bad > 0 || roots.is_empty() {
                errors.push(format!(
                    "trust bundle of '{domain}': {bad} of {} certificates unusable",
                    certs.len()
                ));
                continue;
            }
            domains.insert(domain.clone(), roots);
        }
        let verifier = if domains.is_empty() {
            None
        } else {
            match SpiffeClientVerifier::new(domains, None, true, self.provider.clone()) {
                Ok(v) => Some(Arc::new(v)),
                Err(e) => {
                    errors.push(format!("trust bundles: {e}"));
                    None
                }
            }
        };
        self.live.store(verifier);
        errors
    }

    pub fn trust_domains(&self) -> Vec<String> {
        match self.live.current() {
            Some(v) => v.trust_domains().map(str::to_string).collect(),
            None => Vec::new(),
        }
    }
}

/// The acceptor: the live certificate, the per-domain verifier, HTTP/2.
pub fn acceptor(
    cert: CredentialReceiver,
    verifier: Arc<TrustDomainVerifier>,
) -> Result<TlsAcceptor, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier.live.clone())
        .with_cert_resolver(WatchedCertifiedKey::new(cert));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts TCP connections and hands completed handshakes to tonic. A
/// refused certificate drops that connection and is audited with its reason.
pub fn incoming(listener: TcpListener, acceptor: TlsAcceptor) -> TlsIncoming {
    tls_incoming(listener, acceptor, "kms-broker")
}

//! The broker's TLS listener: a serving certificate swapped live and client
//! certificates verified against the bundle of the trust domain they claim.
//!
//! * [`watch_files`] polls a certificate and key and publishes
//!   [`CertifiedKey`]s on a `watch` channel; [`WatchedCert`] (a rustls
//!   server and client resolver) answers every handshake with the newest
//!   one. New handshakes use a replaced certificate at once; open
//!   connections keep the session they negotiated. An SVID issued by the
//!   control plane's CA can publish into the same kind of channel.
//! * [`TrustDomainVerifier`]: a certificate whose SPIFFE ID names trust
//!   domain `Y` is accepted only if it chains to `Y`'s bundle. The bundles
//!   are replaced live ([`TrustDomainVerifier::set_bundles`]) when the
//!   control plane's TrustBundles change.
//!
//! This file is self-contained on purpose: the edge (`strait-tls`) and the
//! control nodes have the same pieces, and the three belong in one small
//! shared crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
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

/// A certificate chain and its key from PEM; the key must match.
pub fn certified_key(
    what: &str,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let certs = certificates(what, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        what: format!("{what} key"),
        message: e.to_string(),
    })?;
    Ok(CertifiedKey::from_der(certs, key, &provider())?)
}

pub type CredentialReceiver = watch::Receiver<Arc<CertifiedKey>>;

/// Loads `cert` and `key` (failing if they do not load: nothing serves
/// without its certificate), then re-reads them every `interval` while
/// anyone holds the receiver. A changed pair that does not load (often a
/// rotation caught between writing the certificate and the key) is
/// reported once and the current one stays.
pub fn watch_files(
    what: &'static str,
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
) -> Result<CredentialReceiver, TlsError> {
    let mut current = (read(&cert)?, read(&key)?);
    let loaded = certified_key(what, &current.0, &current.1)?;
    let (tx, rx) = watch::channel(Arc::new(loaded));
    tokio::spawn(async move {
        let mut rejected: Option<(Vec<u8>, Vec<u8>)> = None;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !tx.is_closed() {
            tick.tick().await;
            let material = match (read(&cert), read(&key)) {
                (Ok(c), Ok(k)) => (c, k),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(certificate = what, error = %e, "cannot read the certificate files; keeping the current certificate");
                    continue;
                }
            };
            if material == current || rejected.as_ref() == Some(&material) {
                continue;
            }
            match certified_key(what, &material.0, &material.1) {
                Ok(k) => {
                    tracing::info!(
                        certificate = what,
                        "certificate reloaded; new handshakes use it"
                    );
                    tx.send_replace(Arc::new(k));
                    current = material;
                    rejected = None;
                }
                Err(e) => {
                    tracing::warn!(certificate = what, error = %e, "new certificate rejected; keeping the current one");
                    rejected = Some(material);
                }
            }
        }
    });
    Ok(rx)
}

/// Answers every handshake with the newest certificate of its channel.
#[derive(Debug)]
pub struct WatchedCert(pub CredentialReceiver);

impl ResolvesServerCert for WatchedCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.borrow().clone())
    }
}

impl ResolvesClientCert for WatchedCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.borrow().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Why a client certificate was refused; carried in the handshake error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustDomainError {
    #[error("the client certificate carries no spiffe:// URI SAN; this broker serves SPIFFE identities only")]
    NoSpiffeId,
    #[error("the client certificate's SPIFFE ID '{0}' is malformed")]
    Malformed(String),
    #[error("client certificate names {id}, but trust domain '{domain}' has no trust bundle here")]
    NoBundle { id: String, domain: String },
    #[error("client certificate names {id}, but does not chain to the trust bundle of '{domain}'")]
    WrongIssuer { id: String, domain: String },
}

impl TrustDomainError {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
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

/// The trust domain of `spiffe://<domain>/...`, if it is a valid one.
pub fn trust_domain_of(id: &str) -> Option<&str> {
    let domain = id.strip_prefix("spiffe://")?.split('/').next()?;
    let ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    ok.then_some(domain)
}

/// Roots per trust domain.
pub type Bundles = BTreeMap<String, Vec<CertificateDer<'static>>>;

/// Client certificates verified per trust domain, bundles replaceable live.
/// Client certificates are mandatory.
pub struct TrustDomainVerifier {
    provider: Arc<CryptoProvider>,
    domains: ArcSwap<BTreeMap<String, Arc<dyn ClientCertVerifier>>>,
}

impl std::fmt::Debug for TrustDomainVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustDomainVerifier")
            .field("domains", &self.domains.load().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TrustDomainVerifier {
    pub fn new(provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(TrustDomainVerifier {
            provider,
            domains: ArcSwap::from_pointee(BTreeMap::new()),
        })
    }

    /// Replaces every bundle. A domain whose roots do not load is left out
    /// (its callers are refused) and named in the returned errors.
    pub fn set_bundles(&self, bundles: &Bundles) -> Vec<String> {
        let mut errors = Vec::new();
        let mut built = BTreeMap::new();
        for (domain, certs) in bundles {
            let mut roots = RootCertStore::empty();
            let (_, bad) = roots.add_parsable_certificates(certs.iter().cloned());
            let verifier = if bad > 0 || roots.is_empty() {
                Err(format!("{bad} of {} certificates unusable", certs.len()))
            } else {
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| e.to_string())
            };
            match verifier {
                Ok(v) => {
                    built.insert(domain.clone(), v);
                }
                Err(e) => errors.push(format!("trust bundle of '{domain}': {e}")),
            }
        }
        self.domains.store(Arc::new(built));
        errors
    }

    pub fn trust_domains(&self) -> Vec<String> {
        self.domains.load().keys().cloned().collect()
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: the bundles change live, and the callers (edges) present
    /// their one certificate regardless.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = spiffe_id_of_der(end_entity.as_ref())
            .ok_or_else(|| TrustDomainError::NoSpiffeId.into_rustls())?;
        let domain = trust_domain_of(&id)
            .ok_or_else(|| TrustDomainError::Malformed(id.clone()).into_rustls())?
            .to_string();
        let domains = self.domains.load();
        let Some(verifier) = domains.get(&domain) else {
            return Err(TrustDomainError::NoBundle { id, domain }.into_rustls());
        };
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    TrustDomainError::WrongIssuer { id, domain }.into_rustls()
                }
                other => other,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The acceptor: the live certificate, the per-domain verifier, HTTP/2.
pub fn acceptor(
    cert: CredentialReceiver,
    verifier: Arc<TrustDomainVerifier>,
) -> Result<TlsAcceptor, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(WatchedCert(cert)));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

pub type Incoming = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// Accepts TCP connections and hands completed handshakes to tonic. A
/// refused certificate drops that connection and is audited with its reason.
pub fn incoming(listener: TcpListener, acceptor: TlsAcceptor) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of descriptors and the like: back off a little.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        // A port probe or a client that gave up: nothing refused.
                        tracing::debug!(%peer, error = %e, "connection closed during the handshake")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(target: "audit", %peer, reason = %refusal_reason(&e), "kms-broker handshake refused")
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The handshake error as a sentence: the trust-domain refusal itself
/// when that is what it was.
pub fn refusal_reason(e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) = inner {
        if let Some(t) = o.0.downcast_ref::<TrustDomainError>() {
            return t.to_string();
        }
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains() {
        assert_eq!(
            trust_domain_of("spiffe://example.org/edge/e1"),
            Some("example.org")
        );
        for bad in [
            "spiffe:///edge",
            "spiffe://Example.org/x",
            "https://example.org/x",
        ] {
            assert_eq!(trust_domain_of(bad), None, "{bad}");
        }
    }
}

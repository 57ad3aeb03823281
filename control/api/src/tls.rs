//! The node's TLS listener when it runs the CA (`--trust-domain`): client
//! certificates are optional at the handshake (Join and TrustBundle work
//! without one) and are verified against the bootstrap client CA
//! (`--tls-client-ca`) plus the CA's current trust bundle, which changes
//! with rotation, so the verifier's roots follow it. Whether a call needs a
//! certificate, and which, is the [`crate::access::Authorizer`]'s decision.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use strait_tls::LiveClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("server roots: {0}")]
    Roots(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub fn parse_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let certs = certs.map_err(|e| TlsSetupError::Pem {
        what: what.into(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Pem {
            what: what.into(),
            message: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

fn parse_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| TlsSetupError::Pem {
            what: what.into(),
            message: e.to_string(),
        })?
        .ok_or_else(|| TlsSetupError::Pem {
            what: what.into(),
            message: "no PEM private key found".into(),
        })
}

/// Where the verifier reads the CA's current bundle (concatenated PEM).
pub type BundleSource = Arc<dyn Fn() -> String + Send + Sync>;

/// Client-certificate verification over the bootstrap roots plus the CA's
/// bundle. The bundle is read at every handshake (from the local replica:
/// cheap) and the verifier rebuilt only when it changed, so a certificate
/// is accepted as soon as this node knows the root that signed it. The
/// live swap itself is strait-tls's [`LiveClientVerifier`] (the kms-broker
/// uses the same); this type only decides when to rebuild.
pub struct DynamicClientVerifier {
    provider: Arc<CryptoProvider>,
    bootstrap: Vec<CertificateDer<'static>>,
    source: Option<BundleSource>,
    last_pem: std::sync::Mutex<Option<String>>,
    /// Optional client certificates; refuses every one while no root is
    /// usable.
    live: LiveClientVerifier,
}

impl std::fmt::Debug for DynamicClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicClientVerifier")
            .field("bootstrap_roots", &self.bootstrap.len())
            .finish_non_exhaustive()
    }
}

impl DynamicClientVerifier {
    pub fn new(
        provider: Arc<CryptoProvider>,
        bootstrap: Vec<CertificateDer<'static>>,
        source: Option<BundleSource>,
    ) -> Self {
        let v = DynamicClientVerifier {
            live: LiveClientVerifier::new(provider.clone(), false),
            provider,
            bootstrap,
            source,
            last_pem: std::sync::Mutex::new(None),
        };
        v.set_bundle(&[]);
        v
    }

    /// Re-reads the bundle from the source; rebuilds when it changed.
    fn refresh(&self) {
        let Some(source) = &self.source else {
            return;
        };
        let pem = source();
        let mut last = self.last_pem.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() == Some(pem.as_str()) {
            return;
        }
        let certs = if pem.trim().is_empty() {
            Vec::new()
        } else {
            match parse_certs("CA bundle", pem.as_bytes()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "CA bundle unusable; keeping the previous roots");
                    return;
                }
            }
        };
        self.set_bundle(&certs);
        *last = Some(pem);
    }

    /// Trusts the bootstrap roots plus `bundle` from now on.
    pub fn set_bundle(&self, bundle: &[CertificateDer<'static>]) {
        let mut roots = RootCertStore::empty();
        for c in self.bootstrap.iter().chain(bundle) {
            if let Err(e) = roots.add(c.clone()) {
                tracing::warn!(error = %e, "ignoring an unusable client root");
            }
        }
        let inner = if roots.is_empty() {
            None
        } else {
            match WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .allow_unauthenticated()
            .build()
            {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(error = %e, "client verifier");
                    None
                }
            }
        };
        self.live.store(inner);
    }
}

impl ClientCertVerifier for DynamicClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.live.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.live.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.live.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.refresh();
        self.live.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.live.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.live.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.live.supported_verify_schemes()
    }
}

/// The acceptor for the node's gRPC port.
pub fn acceptor(
    cert_pem: &[u8],
    key_pem: &[u8],
    verifier: Arc<DynamicClientVerifier>,
    provider: Arc<CryptoProvider>,
) -> Result<TlsAcceptor, TlsSetupError> {
    let certs = parse_certs("--tls-cert", cert_pem)?;
    let key = parse_key("--tls-key", key_pem)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The acceptor for the node's gRPC port, its certificate chosen per
/// handshake by `resolver` (see [`crate::node_tls::NodeServerResolver`]).
pub fn acceptor_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    verifier: Arc<DynamicClientVerifier>,
    provider: Arc<CryptoProvider>,
) -> Result<TlsAcceptor, TlsSetupError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts TCP connections on `addr` and hands completed TLS handshakes
/// to tonic (`serve_with_incoming`); a failed handshake only drops that
/// connection (and is audited by the shared accept loop).
pub async fn incoming(
    addr: SocketAddr,
    acceptor: TlsAcceptor,
) -> Result<strait_tls::TlsIncoming, TlsSetupError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| TlsSetupError::Bind { addr, source })?;
    Ok(strait_tls::tls_incoming(
        listener,
        acceptor,
        "strait-control",
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use strait_control_ca::{generate_root, new_key_and_csr, Lifetimes, SignRequest, Signer};

    use super::*;

    fn ca(generation: u64, now: i64) -> (String, Signer) {
        let root =
            generate_root("example.org", generation, now, Duration::from_secs(86400)).unwrap();
        let signer = Signer::new("example.org", generation, &root.cert_pem, &root.key_der).unwrap();
        (root.cert_pem, signer)
    }

    fn leaf(signer: &Signer, id: &str, now: i64) -> CertificateDer<'static> {
        let (_key, csr) = new_key_and_csr().unwrap();
        let issued = signer
            .sign(
                &SignRequest {
                    csr_pem: csr,
                    spiffe_id: id.into(),
                    dns_names: vec![],
                    ips: vec![],
                    ttl: None,
                },
                &Lifetimes::default(),
                now,
            )
            .unwrap();
        parse_certs("leaf", issued.cert_pem.as_bytes())
            .unwrap()
            .remove(0)
    }

    #[test]
    fn client_roots_follow_the_bundle() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let now = UnixTime::now().as_secs() as i64;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (boot_pem, boot) = ca(1, now);
        let (ca_pem, issuing) = ca(2, now);
        let bootstrap = parse_certs("bootstrap", boot_pem.as_bytes()).unwrap();
        let bundle = Arc::new(Mutex::new(String::new()));
        let src = bundle.clone();
        let source: BundleSource = Arc::new(move || src.lock().unwrap().clone());
        let v = DynamicClientVerifier::new(provider.clone(), bootstrap.clone(), Some(source));
        let admin = leaf(&boot, "spiffe://example.org/admin/a", now);
        let workload = leaf(&issuing, "spiffe://example.org/ns/a/sa/b", now);
        let t = UnixTime::now();
        assert!(v.verify_client_cert(&admin, &[], t).is_ok());
        // The CA's root is not known yet: its certificates are refused...
        assert!(v.verify_client_cert(&workload, &[], t).is_err());
        // ... and accepted as soon as the bundle names it.
        *bundle.lock().unwrap() = ca_pem.clone();
        assert!(v.verify_client_cert(&workload, &[], t).is_ok());
        // A root that leaves the bundle (retired) stops being trusted.
        *bundle.lock().unwrap() = String::new();
        assert!(v.verify_client_cert(&workload, &[], t).is_err());
        assert!(!v.client_auth_mandatory());
    }
}

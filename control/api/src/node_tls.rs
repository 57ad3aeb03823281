//! The node's own credentials once the CA exists: a certificate for
//! `spiffe://D/control/<id>` issued by this control plane, swapped in live,
//! and the roots peers are verified against (bootstrap CA plus the CA's
//! bundle).
//!
//! The credential is a `watch` channel of [`CertifiedKey`]s, the shape the
//! edge uses ([`strait_tls::CredentialReceiver`]): it starts with the
//! bootstrap files (`--tls-cert`, `--tls-key`) and gets each CA-issued
//! certificate. Which one a handshake gets is decided per client:
//!
//! * as a server, the CA-issued certificate goes to a client whose
//!   ClientHello names the CA root in `certificate_authorities` (RFC 8446
//!   4.2.4: Raft peers and clients built on [`PeerTls`] send it); any other
//!   client (straitctl, edges and kms-brokers holding only the bootstrap
//!   CA, TLS 1.2) keeps getting the bootstrap certificate, so nothing that
//!   trusts only the bootstrap CA breaks when the CA appears;
//! * as a Raft client, the node presents its newest certificate (peers
//!   verify clients against bootstrap CA plus bundle).

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use strait_tls::{CredentialReceiver, WatchedCertifiedKey};

use crate::tls::{parse_certs, BundleSource};

/// The issuer (DER Name, with its SEQUENCE) of a credential's leaf.
fn issuer_of(key: &CertifiedKey) -> Option<Vec<u8>> {
    let leaf = key.end_entity_cert().ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(cert.issuer().as_raw().to_vec())
}

/// Server resolver: the node's newest certificate to clients that say they
/// trust its issuer, the bootstrap certificate to everyone else.
#[derive(Debug)]
pub struct NodeServerResolver {
    bootstrap: Arc<CertifiedKey>,
    current: CredentialReceiver,
}

impl NodeServerResolver {
    pub fn new(bootstrap: Arc<CertifiedKey>, current: CredentialReceiver) -> Arc<Self> {
        Arc::new(NodeServerResolver { bootstrap, current })
    }
}

impl ResolvesServerCert for NodeServerResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.borrow().clone();
        if Arc::ptr_eq(&current, &self.bootstrap) {
            return Some(current);
        }
        let trusted = match (hello.certificate_authorities(), issuer_of(&current)) {
            (Some(names), Some(issuer)) => names.iter().any(|n| n.as_ref() == issuer.as_slice()),
            _ => false,
        };
        Some(if trusted {
            current
        } else {
            self.bootstrap.clone()
        })
    }
}

/// A server verifier that sends the subjects of its roots as
/// `certificate_authorities` hints.
#[derive(Debug)]
struct HintingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    hints: Vec<DistinguishedName>,
}

impl ServerCertVerifier for HintingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        Some(&self.hints)
    }
}

/// rustls client configurations for connections to control nodes: roots
/// are the bootstrap CA plus the CA's current bundle (announced as
/// `certificate_authorities`), the client certificate is the node's newest
/// credential (or none). Rebuilt only when the bundle changed.
pub struct PeerTls {
    provider: Arc<CryptoProvider>,
    bootstrap: Vec<CertificateDer<'static>>,
    source: Option<BundleSource>,
    client: Option<CredentialReceiver>,
    cache: Mutex<Option<(String, Arc<rustls::ClientConfig>)>>,
}

impl PeerTls {
    pub fn new(
        provider: Arc<CryptoProvider>,
        bootstrap: Vec<CertificateDer<'static>>,
        source: Option<BundleSource>,
        client: Option<CredentialReceiver>,
    ) -> Arc<Self> {
        Arc::new(PeerTls {
            provider,
            bootstrap,
            source,
            client,
            cache: Mutex::new(None),
        })
    }

    /// The configuration for the next connection.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        let pem = self.source.as_ref().map(|s| s()).unwrap_or_default();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last, cfg)) = cache.as_ref() {
            if *last == pem {
                return cfg.clone();
            }
        }
        let bundle = if pem.trim().is_empty() {
            Vec::new()
        } else {
            match parse_certs("CA bundle", pem.as_bytes()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "CA bundle unusable; peers verified against the bootstrap CA only");
                    Vec::new()
                }
            }
        };
        let cfg = Arc::new(self.build(&bundle));
        *cache = Some((pem, cfg.clone()));
        cfg
    }

    fn build(&self, bundle: &[CertificateDer<'static>]) -> rustls::ClientConfig {
        let mut roots = RootCertStore::empty();
        for c in self.bootstrap.iter().chain(bundle) {
            if let Err(e) = roots.add(c.clone()) {
                tracing::warn!(error = %e, "ignoring an unusable server root");
            }
        }
        let hints = roots.subjects();
        let builder = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default versions");
        // An empty root store cannot happen (the bootstrap CA parsed at
        // start); if it did, every peer would be refused, which is closed.
        let verifier: Arc<dyn ServerCertVerifier> =
            match WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            {
                Ok(inner) => Arc::new(HintingVerifier { inner, hints }),
                Err(e) => {
                    tracing::error!(error = %e, "server verifier");
                    Arc::new(RefuseAll(self.provider.clone()))
                }
            };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut cfg = match &self.client {
            Some(rx) => builder.with_client_cert_resolver(WatchedCertifiedKey::new(rx.clone())),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg
    }
}

#[derive(Debug)]
struct RefuseAll(Arc<CryptoProvider>);

impl ServerCertVerifier for RefuseAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General("no server root is usable".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no server root is usable".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no server root is usable".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

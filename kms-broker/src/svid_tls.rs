//! TLS towards a broker with the process's own SVID (`identity: svid` in a
//! `kms:` broker entry): the client certificate comes from the SVID's
//! credential channel, renewed live, and without a `ca` file the broker is
//! verified against the trust domain's bundle (which follows a CA rotation)
//! and must be a `spiffe://<domain>/kms-broker/<name>` identity, so that
//! another edge or a workload holding a certificate for the broker's host
//! name cannot pose as it.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use strait_tls::{CredentialReceiver, WatchedCertifiedKey};
use tokio::sync::watch;

use crate::tls::spiffe_id_of_der;

/// The process's own SVID, as a broker client needs it.
#[derive(Clone)]
pub struct OwnIdentity {
    /// The current certificate and key.
    pub credentials: CredentialReceiver,
    /// PEM of the trust domain's roots.
    pub bundle: watch::Receiver<String>,
    /// The SVID's trust domain: the broker must be in it.
    pub trust_domain: String,
}

/// Verifies against the newest roots of a PEM channel (the SVID's bundle,
/// which gains the new root of a CA rotation before it signs). A broker
/// serves one certificate, so no root hints are needed and one verifier
/// serves every connection; it is rebuilt when the PEM changes.
#[derive(Debug)]
struct LiveBundle {
    pem: watch::Receiver<String>,
    provider: Arc<CryptoProvider>,
    built: RwLock<(String, Arc<WebPkiServerVerifier>)>,
}

fn verifier_of(
    pem: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        store
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| e.to_string())
}

impl LiveBundle {
    fn new(pem: watch::Receiver<String>) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = pem.borrow().clone();
        let built = verifier_of(&current, &provider)?;
        Ok(LiveBundle {
            pem,
            provider,
            built: RwLock::new((current, built)),
        })
    }

    fn current(&self) -> Arc<WebPkiServerVerifier> {
        let pem = self.pem.borrow().clone();
        let mut built = self.built.write().unwrap_or_else(|e| e.into_inner());
        if built.0 != pem {
            match verifier_of(&pem, &self.provider) {
                Ok(v) => built.1 = v,
                // A broken bundle keeps the roots in force.
                Err(e) => {
                    tracing::warn!(error = %e, "new trust bundle rejected; keeping the current roots")
                }
            }
            built.0 = pem;
        }
        built.1.clone()
    }
}

/// Chains to the bundle (and names the host dialled), then the SPIFFE ID.
#[derive(Debug)]
struct MeshBrokerVerifier {
    roots: LiveBundle,
    prefix: String,
}

impl ServerCertVerifier for MeshBrokerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.roots.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )?;
        match spiffe_id_of_der(end_entity.as_ref()) {
            Some(id) if id.len() > self.prefix.len() && id.starts_with(&self.prefix) => {
                Ok(verified)
            }
            other => Err(rustls::Error::General(format!(
                "the broker's certificate names {}, not a {}<name> identity",
                other.as_deref().unwrap_or("no SPIFFE ID"),
                self.prefix
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.roots
            .current()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.roots
            .current()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.roots.current().supported_verify_schemes()
    }
}

/// A client configuration presenting the SVID: verifying the broker against
/// `ca` when given (as with certificate files), else against the bundle.
pub fn svid_client_config(
    identity: &OwnIdentity,
    ca: Option<&Path>,
) -> Result<ClientConfig, String> {
    let credentials = identity.credentials.clone();
    if let Some(ca) = ca {
        return strait_tls::client_config(ca, Some(credentials)).map_err(|e| e.to_string());
    }
    if !strait_tls::is_trust_domain(&identity.trust_domain) {
        return Err(format!(
            "the SVID's trust domain '{}' is not valid",
            identity.trust_domain
        ));
    }
    let verifier = MeshBrokerVerifier {
        roots: LiveBundle::new(identity.bundle.clone())
            .map_err(|e| format!("the SVID's trust bundle: {e}"))?,
        prefix: format!("spiffe://{}/kms-broker/", identity.trust_domain),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(WatchedCertifiedKey::new(credentials));
    // As strait_tls::client_config: long-lived connections gain little.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

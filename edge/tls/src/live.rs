//! A client-certificate verifier whose inner verifier is replaced live
//! (trust bundles pushed by the control plane, a CA rotating its root):
//! rustls keeps the `Arc<dyn ClientCertVerifier>` of its `ServerConfig` for
//! good, so the swap happens behind it. New handshakes use the newest
//! verifier; open connections keep the session they negotiated.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::trust::{spiffe_ids, trust_domain_of, TrustDomainError};

/// See the module docs. `V` is the inner verifier (a
/// [`crate::SpiffeClientVerifier`], or any `dyn ClientCertVerifier`).
pub struct LiveClientVerifier<V: ClientCertVerifier + ?Sized = dyn ClientCertVerifier> {
    provider: Arc<CryptoProvider>,
    mandatory: bool,
    /// None: nothing trusted (yet); every presented certificate is refused.
    current: ArcSwap<Option<Arc<V>>>,
}

impl<V: ClientCertVerifier + ?Sized> std::fmt::Debug for LiveClientVerifier<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveClientVerifier")
            .field("mandatory", &self.mandatory)
            .field("trusting", &self.current.load().is_some())
            .finish()
    }
}

impl<V: ClientCertVerifier + ?Sized> LiveClientVerifier<V> {
    /// Starts trusting nothing. `mandatory`: a client without a certificate
    /// fails the handshake (otherwise it is let through unauthenticated and
    /// the application decides).
    pub fn new(provider: Arc<CryptoProvider>, mandatory: bool) -> Self {
        LiveClientVerifier {
            provider,
            mandatory,
            current: ArcSwap::from_pointee(None),
        }
    }

    /// Verifies with `inner` from the next handshake on; `None` refuses
    /// every certificate.
    pub fn store(&self, inner: Option<Arc<V>>) {
        self.current.store(Arc::new(inner));
    }

    /// The verifier in use now.
    pub fn current(&self) -> Option<Arc<V>> {
        self.current.load().as_ref().clone()
    }
}

/// The refusal when nothing is trusted: named as the trust-domain refusals
/// are, so the caller's log says which domain lacks a bundle.
fn nothing_trusted(end_entity: &CertificateDer<'_>) -> rustls::Error {
    let refusal = match spiffe_ids(end_entity) {
        Err(e) => return e,
        Ok(ids) => match ids.as_slice() {
            [] => TrustDomainError::NoSpiffeId,
            [id] => match trust_domain_of(id) {
                Ok(domain) => TrustDomainError::NoBundle {
                    id: id.clone(),
                    domain,
                    hint: "",
                },
                Err(e) => e,
            },
            several => TrustDomainError::SeveralIds(several.len()),
        },
    };
    refusal.into_rustls()
}

impl<V: ClientCertVerifier + ?Sized> ClientCertVerifier for LiveClientVerifier<V> {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    /// No hints: the roots change live, and the callers present their one
    /// certificate regardless.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.current.load().as_ref() {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(nothing_trusted(end_entity)),
        }
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

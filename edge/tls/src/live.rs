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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    use rustls::RootCertStore;

    use super::*;
    use crate::SpiffeClientVerifier;

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, id: &str) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(id.try_into().unwrap()));
        let key = KeyPair::generate().unwrap();
        params.signed_by(&key, ca).unwrap().der().clone()
    }

    fn message(err: rustls::Error) -> String {
        match err {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                o.0.to_string()
            }
            other => other.to_string(),
        }
    }

    #[test]
    fn refuses_until_a_verifier_is_stored_and_follows_each_swap() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (home, other) = (ca("home"), ca("other"));
        let e1 = leaf(&home, "spiffe://example.org/edge/e1");
        let live = LiveClientVerifier::<SpiffeClientVerifier>::new(provider.clone(), true);
        assert!(live.client_auth_mandatory());
        let now = UnixTime::now();
        assert_eq!(
            message(live.verify_client_cert(&e1, &[], now).unwrap_err()),
            "client certificate names spiffe://example.org/edge/e1, but trust domain 'example.org' has no client trust bundle"
        );
        let with = |ca: &CertifiedIssuer<'static, KeyPair>| {
            let mut roots = RootCertStore::empty();
            roots.add(ca.der().clone()).unwrap();
            let domains = BTreeMap::from([("example.org".to_string(), roots)]);
            Some(Arc::new(
                SpiffeClientVerifier::new(domains, None, true, provider.clone()).unwrap(),
            ))
        };
        live.store(with(&home));
        assert!(live.verify_client_cert(&e1, &[], now).is_ok());
        // The domain's bundle replaced by another CA's: e1 is refused at once
        // (its CA is now trusted for nothing here: an unknown issuer).
        live.store(with(&other));
        assert_eq!(
            message(live.verify_client_cert(&e1, &[], now).unwrap_err()),
            "client certificate names spiffe://example.org/edge/e1, but chains to no CA trusted here (not to the trust bundle of 'example.org' nor any other)"
        );
        live.store(None);
        assert!(live.current().is_none());
        assert!(live.verify_client_cert(&e1, &[], now).is_err());
    }
}

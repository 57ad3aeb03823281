//! Client certificates verified against the trust bundle of the SPIFFE trust
//! domain they claim.
//!
//! A single bundle holding every CA lets any of them vouch for any SPIFFE ID:
//! a certificate from CA X could claim `spiffe://Y/...`. Here each bundle is
//! bound to one trust domain, and a certificate whose URI SAN is a SPIFFE ID
//! is verified only against the bundle of that ID's trust domain. A plain
//! `client_ca` binds no domain: it verifies certificates without a SPIFFE
//! ID (subject-based principals) and never one that carries a SPIFFE ID.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use thiserror::Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a client certificate was refused by the trust-domain check. Carried
/// inside `rustls::Error` so the handshake failure names it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TrustDomainError {
    #[error("client certificate names {id}, but trust domain '{domain}' has no client trust bundle{hint}")]
    NoBundle {
        id: String,
        domain: String,
        hint: &'static str,
    },
    #[error("client certificate names {id}, but does not chain to the trust bundle of '{domain}'")]
    WrongIssuer { id: String, domain: String },
    #[error("client certificate names {id}, but chains to no CA trusted here (not to the trust bundle of '{domain}' nor any other)")]
    UnknownIssuer { id: String, domain: String },
    #[error("client certificate has {0} SPIFFE IDs; an X.509 SVID has exactly one")]
    SeveralIds(usize),
    #[error("client certificate's SPIFFE ID '{0}' is malformed")]
    Malformed(String),
    #[error("client certificate has no SPIFFE ID, and no client_ca is configured for certificates without one")]
    NoSpiffeId,
}

impl TrustDomainError {
    /// The `reason` label of `strait_tls_handshakes_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            TrustDomainError::NoBundle { .. } => "unknown_trust_domain",
            TrustDomainError::WrongIssuer { .. } => "wrong_trust_domain",
            TrustDomainError::UnknownIssuer { .. } => "unknown_issuer",
            TrustDomainError::SeveralIds(_) => "several_spiffe_ids",
            TrustDomainError::Malformed(_) => "malformed_spiffe_id",
            TrustDomainError::NoSpiffeId => "no_spiffe_id",
        }
    }

    pub(crate) fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The trust domain of a SPIFFE ID (`spiffe://<domain>/<path>`), or why it
/// has none. Domains are compared in lower case, as the SPIFFE spec requires
/// them to be written.
pub fn trust_domain_of(id: &str) -> Result<String, TrustDomainError> {
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| TrustDomainError::Malformed(id.to_owned()))?;
    let domain = rest.split('/').next().unwrap_or_default();
    if !is_trust_domain(domain) {
        return Err(TrustDomainError::Malformed(id.to_owned()));
    }
    Ok(domain.to_owned())
}

/// Whether `text` is a valid SPIFFE trust domain name: lower-case letters,
/// digits, `.`, `-` and `_`, not empty.
pub fn is_trust_domain(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 255
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
}

/// The SPIFFE IDs in a certificate's URI SANs.
pub fn spiffe_ids(end_entity: &CertificateDer<'_>) -> Result<Vec<String>, rustls::Error> {
    let (_, cert) = X509Certificate::from_der(end_entity.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    Ok(sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                        Some((*uri).to_owned())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Verifies client certificates per trust domain; see the module docs.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    domains: BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    plain: Option<Arc<dyn ClientCertVerifier>>,
    /// Signatures are checked the same way whichever bundle verified the chain.
    signatures: Arc<dyn ClientCertVerifier>,
    hints: Vec<DistinguishedName>,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// `domains`: each trust domain's roots; `plain`: the roots of a
    /// `client_ca` for certificates without a SPIFFE ID. At least one must be
    /// given.
    pub fn new(
        domains: BTreeMap<String, RootCertStore>,
        plain: Option<RootCertStore>,
        mandatory: bool,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, String> {
        let build = |roots: RootCertStore| {
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|err| err.to_string())
        };
        let mut hints = Vec::new();
        let mut verifiers = BTreeMap::new();
        for (domain, roots) in domains {
            let verifier = build(roots)?;
            hints.extend_from_slice(verifier.root_hint_subjects());
            verifiers.insert(domain, verifier);
        }
        let plain = match plain {
            Some(roots) => {
                let verifier = build(roots)?;
                hints.extend_from_slice(verifier.root_hint_subjects());
                Some(verifier)
            }
            None => None,
        };
        // One CA may be bound to several domains and be the client_ca too: hint it once.
        let mut seen = std::collections::HashSet::new();
        hints.retain(|name| seen.insert(name.as_ref().to_vec()));
        let signatures = plain
            .clone()
            .or_else(|| verifiers.values().next().cloned())
            .ok_or("no client trust bundle and no client_ca")?;
        Ok(SpiffeClientVerifier {
            domains: verifiers,
            plain,
            signatures,
            hints,
            mandatory,
        })
    }

    /// Whether the chain reaches a bundle other than `domain`'s, or the plain
    /// `client_ca`. Only asked on a refusal, to name it.
    fn trusted_elsewhere(
        &self,
        domain: &str,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        self.domains
            .iter()
            .filter(|(other, _)| other.as_str() != domain)
            .map(|(_, verifier)| verifier)
            .chain(self.plain.iter())
            .any(|verifier| {
                verifier
                    .verify_client_cert(end_entity, intermediates, now)
                    .is_ok()
            })
    }

    /// The trust domains that have a bundle.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ids = spiffe_ids(end_entity)?;
        let id = match ids.as_slice() {
            [] => {
                return match &self.plain {
                    Some(plain) => plain.verify_client_cert(end_entity, intermediates, now),
                    None => Err(TrustDomainError::NoSpiffeId.into_rustls()),
                }
            }
            [id] => id,
            several => return Err(TrustDomainError::SeveralIds(several.len()).into_rustls()),
        };
        let domain = trust_domain_of(id).map_err(TrustDomainError::into_rustls)?;
        let Some(verifier) = self.domains.get(&domain) else {
            let hint = if self.plain.is_some() {
                " (a plain client_ca vouches for no trust domain)"
            } else {
                ""
            };
            return Err(TrustDomainError::NoBundle {
                id: id.clone(),
                domain,
                hint,
            }
            .into_rustls());
        };
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|err| match err {
                // A CA this listener trusts for something else claiming the domain is the forgery
                // the binding exists for; a CA it does not know at all is an unknown issuer.
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    let id = id.clone();
                    if self.trusted_elsewhere(&domain, end_entity, intermediates, now) {
                        TrustDomainError::WrongIssuer { id, domain }.into_rustls()
                    } else {
                        TrustDomainError::UnknownIssuer { id, domain }.into_rustls()
                    }
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
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// The trust-domain refusal inside a handshake error, if that is what it was.
pub fn trust_domain_error(err: &rustls::Error) -> Option<&TrustDomainError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<TrustDomainError>()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains_of_spiffe_ids() {
        assert_eq!(
            trust_domain_of("spiffe://example.org/ns/a/sa/b").unwrap(),
            "example.org"
        );
        assert_eq!(
            trust_domain_of("spiffe://example.org").unwrap(),
            "example.org"
        );
        for bad in [
            "spiffe:///ns/a",
            "spiffe://Example.org/x",
            "spiffe://ex ample/x",
            "https://example.org/x",
        ] {
            assert!(trust_domain_of(bad).is_err(), "{bad}");
        }
    }
}

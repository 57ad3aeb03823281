//! CA roots and the signing of CSRs. The CA never sees a subject's private
//! key: a caller generates its key in memory and sends a CSR, whose
//! signature proves it holds the key.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::spiffe::{validate_trust_domain, Lifetimes, SpiffeError, SpiffeId};

/// Certificates are valid from a little before they are signed, so a
/// verifier whose clock is slightly behind accepts them at once.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Identity(#[from] SpiffeError),
    #[error(transparent)]
    Lifetime(#[from] crate::spiffe::LifetimeError),
    #[error("the CSR is invalid or its signature does not verify: {0}")]
    BadCsr(String),
    #[error("the CSR names '{csr}', but the request is for '{requested}'")]
    CsrIdentityMismatch { csr: String, requested: String },
    #[error("'{0}' is not a valid DNS name")]
    BadDnsName(String),
    #[error("CA generation {generation} expires at {not_after} and cannot sign now ({now})")]
    Expired {
        generation: u64,
        not_after: i64,
        now: i64,
    },
    #[error("CA certificate or key unusable: {0}")]
    Key(String),
}

/// A freshly generated root: the certificate (public) and its private key
/// as PKCS#8 DER (wiped on drop; seal it before it goes anywhere).
pub struct GeneratedRoot {
    pub cert_pem: String,
    pub key_der: Zeroizing<Vec<u8>>,
    pub not_after_unix: i64,
}

fn odt(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| CaError::Key(e.to_string()))
}

fn random_serial() -> [u8; 16] {
    rand::random()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Generates the self-signed root of generation `generation` of
/// `trust_domain` (ECDSA P-256), valid from `now_unix` for `validity`.
pub fn generate_root(
    trust_domain: &str,
    generation: u64,
    now_unix: i64,
    validity: Duration,
) -> Result<GeneratedRoot, CaError> {
    validate_trust_domain(trust_domain)?;
    let key = KeyPair::generate().map_err(|e| CaError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Strait");
    dn.push(
        DnType::CommonName,
        format!("Strait CA {trust_domain} generation {generation}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // The SPIFFE bundle convention: the root names the trust domain.
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Key(e.to_string()))?,
    )];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let not_after = now_unix + validity.as_secs() as i64;
    params.not_before = odt(now_unix - BACKDATE.as_secs() as i64)?;
    params.not_after = odt(not_after)?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Key(e.to_string()))?;
    Ok(GeneratedRoot {
        cert_pem: cert.pem(),
        key_der: Zeroizing::new(key.serialize_der()),
        not_after_unix: not_after,
    })
}

/// The pin of a root as join tokens carry it: SHA-256 of its DER, hex.
pub fn root_pin(cert_pem: &str) -> Result<String, CaError> {
    let der = pem_to_der(cert_pem)?;
    Ok(hex(&Sha256::digest(&der)))
}

/// DER of the first certificate of a PEM text.
pub fn pem_to_der(cert_pem: &str) -> Result<Vec<u8>, CaError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CaError::Key(format!("not a PEM certificate: {e}")))?;
    Ok(pem.contents)
}

/// What a caller asks the CA to sign.
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub csr_pem: String,
    pub spiffe_id: String,
    /// DNS names a listener serves (validated).
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// None: the role's default lifetime.
    pub ttl: Option<Duration>,
}

/// A signed certificate and what the issuance record keeps of it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub serial_hex: String,
    pub spiffe_id: String,
    pub not_after_unix: i64,
    pub ca_generation: u64,
}

/// One CA generation, unsealed in memory, able to sign.
pub struct Signer {
    trust_domain: String,
    generation: u64,
    cert_pem: String,
    not_after_unix: i64,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

pub fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl Signer {
    /// `key_der`: the unsealed PKCS#8 key of the root `cert_pem`.
    pub fn new(
        trust_domain: &str,
        generation: u64,
        cert_pem: &str,
        key_der: &[u8],
    ) -> Result<Signer, CaError> {
        let key = KeyPair::try_from(key_der).map_err(|e| CaError::Key(e.to_string()))?;
        let der = pem_to_der(cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::Key(format!("CA certificate: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Key(format!(
                "the key of CA generation {generation} does not match its certificate"
            )));
        }
        let not_after_unix = cert.validity().not_after.timestamp();
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| CaError::Key(format!("CA certificate: {e}")))?;
        Ok(Signer {
            trust_domain: trust_domain.to_string(),
            generation,
            cert_pem: cert_pem.to_string(),
            not_after_unix,
            issuer,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs `req` at `now_unix`: the SPIFFE ID must follow the scheme in
    /// this CA's trust domain; the lifetime is the role's (bounded, and cut
    /// at the CA's own expiry).
    pub fn sign(
        &self,
        req: &SignRequest,
        lifetimes: &Lifetimes,
        now_unix: i64,
    ) -> Result<Issued, CaError> {
        let id = SpiffeId::parse_in(&req.spiffe_id, &self.trust_domain)?;
        let ttl = lifetimes.resolve(id.role(), req.ttl)?;
        if now_unix + crate::spiffe::MIN_LIFETIME.as_secs() as i64 > self.not_after_unix {
            return Err(CaError::Expired {
                generation: self.generation,
                not_after: self.not_after_unix,
                now: now_unix,
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(&req.csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        // Names come from the request alone; a CSR naming another SPIFFE ID
        // is a confused caller, refused rather than silently rewritten.
        for san in &csr.params.subject_alt_names {
            if let SanType::URI(u) = san {
                if u.as_str() != req.spiffe_id {
                    return Err(CaError::CsrIdentityMismatch {
                        csr: u.as_str().to_string(),
                        requested: req.spiffe_id.clone(),
                    });
                }
            }
        }
        let mut sans = vec![SanType::URI(
            req.spiffe_id
                .clone()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?,
        )];
        for d in &req.dns_names {
            if !valid_dns_name(d) {
                return Err(CaError::BadDnsName(d.clone()));
            }
            sans.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|_| CaError::BadDnsName(d.clone()))?,
            ));
        }
        for ip in &req.ips {
            sans.push(SanType::IpAddress(*ip));
        }
        let serial = random_serial();
        let not_after = (now_unix + ttl.as_secs() as i64).min(self.not_after_unix);
        let mut params = CertificateParams::default();
        // X.509-SVID: the identity is the URI SAN; the subject stays empty
        // (rcgen then marks the SAN extension critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = odt(now_unix - BACKDATE.as_secs() as i64)?;
        params.not_after = odt(not_after)?;
        params.use_authority_key_identifier_extension = true;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| CaError::Key(e.to_string()))?;
        Ok(Issued {
            cert_pem: signed.pem(),
            serial_hex: hex(&serial),
            spiffe_id: req.spiffe_id.clone(),
            not_after_unix: not_after,
            ca_generation: self.generation,
        })
    }
}

/// A new key and a CSR for it, in memory (what `straitctl` and agents do
/// before asking for a certificate). Returns (key PEM, CSR PEM).
pub fn new_key_and_csr() -> Result<(Zeroizing<String>, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| CaError::Key(e.to_string()))?;
    Ok((Zeroizing::new(key.serialize_pem()), csr))
}

/// The first `spiffe://` URI SAN of a DER certificate, if any.
pub fn spiffe_id_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some(u.to_string())
        }
        _ => None,
    })
}

/// `notAfter` of a DER certificate, unix seconds.
pub fn not_after_of(cert_der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests;

//! Trust bundles: PEM certificates, or a SPIFFE bundle (a JWK set whose
//! `x509-svid` keys carry their CA certificate in `x5c`).

use std::path::PathBuf;

use base64::Engine;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;

use crate::server::TlsError;

/// Where a trust domain's bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSource {
    /// Re-read on every reload check.
    File(PathBuf),
    Inline(String),
}

impl BundleSource {
    pub(crate) fn read(&self) -> Result<Vec<u8>, TlsError> {
        match self {
            BundleSource::File(path) => std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            }),
            BundleSource::Inline(text) => Ok(text.as_bytes().to_vec()),
        }
    }

    fn label(&self, trust_domain: &str) -> PathBuf {
        match self {
            BundleSource::File(path) => path.clone(),
            BundleSource::Inline(_) => PathBuf::from(format!("<bundle of {trust_domain}>")),
        }
    }
}

/// One trust domain and the roots that vouch for its SPIFFE IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundleSettings {
    pub trust_domain: String,
    pub source: BundleSource,
}

#[derive(Deserialize)]
struct SpiffeBundle {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    #[serde(rename = "use", default)]
    use_: Option<String>,
    #[serde(default)]
    x5c: Vec<String>,
}

/// The certificates of a bundle's bytes, PEM or SPIFFE bundle JSON.
pub(crate) fn certificates(
    bytes: &[u8],
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let certs: Vec<CertificateDer<'static>> = if bytes.trim_ascii_start().starts_with(b"{") {
        let bundle: SpiffeBundle = serde_json::from_slice(bytes)
            .map_err(|err| pem_error(format!("not a SPIFFE bundle: {err}")))?;
        let mut certs = Vec::new();
        for (index, key) in bundle.keys.iter().enumerate() {
            // JWT-SVID keys have no certificate; only X.509-SVID authorities count.
            if key.use_.as_deref() != Some("x509-svid") {
                continue;
            }
            let [der] = key.x5c.as_slice() else {
                return Err(pem_error(format!(
                    "keys[{index}]: an x509-svid key has exactly one x5c certificate"
                )));
            };
            let der = base64::engine::general_purpose::STANDARD
                .decode(der)
                .map_err(|err| pem_error(format!("keys[{index}].x5c[0]: {err}")))?;
            certs.push(CertificateDer::from(der));
        }
        certs
    } else {
        CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<_, _>>()
            .map_err(|err| pem_error(err.to_string()))?
    };
    if certs.is_empty() {
        return Err(pem_error("no certificate found in the trust bundle".into()));
    }
    Ok(certs)
}

impl TrustBundleSettings {
    /// The bundle's roots as they are now (and their certificates).
    pub fn load(&self) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), TlsError> {
        roots(&self.source.read()?, self)
    }
}

/// A root store of a bundle's bytes.
pub(crate) fn roots(
    bytes: &[u8],
    settings: &TrustBundleSettings,
) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), TlsError> {
    let path = settings.source.label(&settings.trust_domain);
    let certs = certificates(bytes, &path)?;
    let mut roots = RootCertStore::empty();
    for cert in &certs {
        roots.add(cert.clone()).map_err(|err| TlsError::Pem {
            path: path.clone(),
            what: err.to_string(),
        })?;
    }
    Ok((roots, certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_bundle_json_and_pem_give_the_same_roots() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let der = base64::engine::general_purpose::STANDARD.encode(ca.der());
        let json = format!(
            r#"{{"spiffe_sequence": 1, "keys": [
                {{"use": "jwt-svid", "kty": "EC", "kid": "k"}},
                {{"use": "x509-svid", "kty": "EC", "x5c": ["{der}"]}}]}}"#
        );
        let path = std::path::Path::new("b.json");
        let from_json = certificates(json.as_bytes(), path).unwrap();
        let from_pem = certificates(ca.pem().as_bytes(), path).unwrap();
        assert_eq!(from_json, from_pem);
        assert_eq!(from_json.len(), 1);

        let err = certificates(br#"{"keys": []}"#, path).unwrap_err();
        assert!(err.to_string().contains("no certificate found"), "{err}");
    }
}

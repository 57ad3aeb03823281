//! Client certificate to principal.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use strait_filter::Principal;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Where a principal's name is read from, tried in the configured order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalSource {
    /// The first `spiffe://` URI SAN, kept whole (trust domain included).
    Spiffe,
    /// The subject distinguished name, e.g. `CN=orders,O=shop`.
    Subject,
    /// The subject's common name.
    CommonName,
    /// The first DNS SAN.
    DnsSan,
}

/// The principal of a verified client certificate chain, or anonymous when
/// no certificate was presented or none of `sources` yields a name.
pub fn principal_of(
    chain: Option<&[CertificateDer<'_>]>,
    sources: &[PrincipalSource],
) -> Principal {
    let Some(end_entity) = chain.and_then(|c| c.first()) else {
        return Principal::Anonymous;
    };
    let Ok((_, cert)) = X509Certificate::from_der(end_entity.as_ref()) else {
        return Principal::Anonymous;
    };
    for source in sources {
        if let Some(name) = name_from(&cert, *source) {
            return Principal::Named(Arc::from(name));
        }
    }
    Principal::Anonymous
}

fn name_from(cert: &X509Certificate<'_>, source: PrincipalSource) -> Option<String> {
    let sans = || {
        cert.subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| ext.value.general_names.clone())
            .unwrap_or_default()
    };
    match source {
        PrincipalSource::Spiffe => sans().into_iter().find_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_owned()),
            _ => None,
        }),
        PrincipalSource::DnsSan => sans().into_iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_owned()),
            _ => None,
        }),
        PrincipalSource::CommonName => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        PrincipalSource::Subject => {
            let subject = cert.subject().to_string();
            (!subject.is_empty()).then_some(subject)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(sans: Vec<SanType>, cn: &str) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn spiffe_first_then_fallbacks() {
        let spiffe = cert(
            vec![
                SanType::DnsName("orders.shop.svc".try_into().unwrap()),
                SanType::URI("spiffe://example.org/ns/shop/sa/orders".try_into().unwrap()),
            ],
            "orders",
        );
        let default = [PrincipalSource::Spiffe, PrincipalSource::Subject];
        assert_eq!(
            principal_of(Some(std::slice::from_ref(&spiffe)), &default).as_str(),
            "spiffe://example.org/ns/shop/sa/orders"
        );
        assert_eq!(
            principal_of(
                Some(std::slice::from_ref(&spiffe)),
                &[PrincipalSource::DnsSan]
            )
            .as_str(),
            "orders.shop.svc"
        );
        assert_eq!(
            principal_of(Some(&[spiffe]), &[PrincipalSource::CommonName]).as_str(),
            "orders"
        );
        let plain = cert(vec![], "legacy-app");
        assert_eq!(
            principal_of(Some(std::slice::from_ref(&plain)), &default).as_str(),
            "CN=legacy-app"
        );
        assert_eq!(
            principal_of(Some(&[plain]), &[PrincipalSource::Spiffe]),
            Principal::Anonymous
        );
        assert_eq!(principal_of(None, &default), Principal::Anonymous);
    }
}

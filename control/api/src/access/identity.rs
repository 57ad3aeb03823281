//! Who is calling: the first `spiffe://` URI SAN of the client certificate
//! that TLS verified. The control plane never reads identities from
//! anything the caller can set itself (metadata, request fields).

use std::fmt;

use tonic::Request;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A parsed SPIFFE ID, `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    id: String,
    domain_end: usize,
}

impl SpiffeId {
    pub fn parse(id: &str) -> Option<SpiffeId> {
        let rest = id.strip_prefix("spiffe://")?;
        let domain_len = rest.find('/').unwrap_or(rest.len());
        if domain_len == 0 {
            return None;
        }
        Some(SpiffeId {
            id: id.to_string(),
            domain_end: "spiffe://".len() + domain_len,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.domain_end]
    }

    /// The path, `/edge/e1` for `spiffe://d/edge/e1`.
    pub fn path(&self) -> &str {
        &self.id[self.domain_end..]
    }

    /// The last path segment: the edge's (or broker's) name.
    pub fn name(&self) -> &str {
        self.path().rsplit('/').next().unwrap_or("")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// The first `spiffe://` URI SAN of a DER certificate.
pub fn spiffe_id_of_der(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let sans = cert.subject_alternative_name().ok().flatten()?;
    sans.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => SpiffeId::parse(uri),
        _ => None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The node listens without TLS (`--insecure-plaintext`, loopback only):
    /// there is no identity to check, and the operator chose that.
    InsecureLocal,
    /// TLS without a usable client certificate; `why` says what was missing.
    Anonymous {
        why: &'static str,
    },
    Spiffe(SpiffeId),
    /// This node itself, writing on its own behalf (the `--access-rules`
    /// bootstrap); named for the audit trail, never a request's caller.
    Local(&'static str),
}

impl Caller {
    /// The caller of `req` on a server whose listener does TLS (`tls`) or not.
    pub fn of<T>(req: &Request<T>, tls: bool) -> Caller {
        if !tls {
            return Caller::InsecureLocal;
        }
        let Some(chain) = req.peer_certs() else {
            return Caller::Anonymous {
                why: "no client certificate",
            };
        };
        let Some(leaf) = chain.first() else {
            return Caller::Anonymous {
                why: "no client certificate",
            };
        };
        match spiffe_id_of_der(leaf.as_ref()) {
            Some(id) => Caller::Spiffe(id),
            None => Caller::Anonymous {
                why: "the client certificate carries no spiffe:// URI SAN",
            },
        }
    }

    pub fn spiffe(&self) -> Option<&SpiffeId> {
        match self {
            Caller::Spiffe(id) => Some(id),
            _ => None,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::InsecureLocal => f.write_str("insecure-plaintext"),
            Caller::Anonymous { .. } => f.write_str("anonymous"),
            Caller::Spiffe(id) => id.fmt(f),
            Caller::Local(what) => write!(f, "local:{what}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    #[test]
    fn parses_ids() {
        let id = SpiffeId::parse("spiffe://example.org/edge/e1").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/edge/e1");
        assert_eq!(id.name(), "e1");
        assert!(SpiffeId::parse("spiffe:///edge/e1").is_none());
        assert!(SpiffeId::parse("https://example.org/edge/e1").is_none());
        assert_eq!(SpiffeId::parse("spiffe://d").unwrap().name(), "");
    }

    #[test]
    fn first_spiffe_uri_san_wins() {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::DnsName("node.test".try_into().unwrap()),
            SanType::URI("https://example.org/x".try_into().unwrap()),
            SanType::URI("spiffe://example.org/admin/alice".try_into().unwrap()),
            SanType::URI("spiffe://example.org/admin/bob".try_into().unwrap()),
        ];
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let id = spiffe_id_of_der(cert.der()).unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/admin/alice");

        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName("node.test".try_into().unwrap())];
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        assert!(spiffe_id_of_der(cert.der()).is_none());
    }
}

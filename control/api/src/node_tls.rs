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
//!   4.2.4: Raft peers, and every client built on strait-control-client,
//!   send the roots they trust through [`strait_tls::HintingVerifier`]);
//!   any other client (one holding only the bootstrap CA, TLS 1.2, a
//!   client that sends no hints) keeps getting the bootstrap certificate
//!   while it is valid, so nothing that trusts only the bootstrap CA breaks
//!   when the CA appears. Once the bootstrap certificate has expired nobody
//!   can verify it, so everyone gets the CA-issued one: a client that
//!   trusts the CA root without saying so then works too;
//! * as a Raft client, the node presents its newest certificate (peers
//!   verify clients against bootstrap CA plus bundle).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use strait_tls::{CredentialReceiver, HintingVerifier, WatchedCertifiedKey};

use crate::identity::now_unix;
use crate::tls::{parse_certs, BundleSource, TlsSetupError};

/// The leaf of a credential, parsed.
fn leaf_of<T>(
    key: &CertifiedKey,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> T,
) -> Option<T> {
    let leaf = key.end_entity_cert().ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(f(&cert))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    certificate: &'static str,
}

/// `strait_control_served_certificates_total{certificate}`: full handshakes
/// by the certificate the node chose, `bootstrap` or `ca_issued`. Once no
/// client needs the bootstrap certificate any more, its count stops
/// growing (see docs/security.md, retiring the bootstrap certificate).
#[derive(Clone, Debug, Default)]
pub struct ServedCertificates(Family<CertificateLabel, Counter>);

impl ServedCertificates {
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let family = Family::<CertificateLabel, Counter>::default();
        registry.register(
            "strait_control_served_certificates",
            "TLS handshakes of the node's listener by the certificate served: bootstrap (--tls-cert) or ca_issued",
            family.clone(),
        );
        ServedCertificates(family)
    }

    fn count(&self, certificate: &'static str) {
        self.0
            .get_or_create(&CertificateLabel { certificate })
            .inc();
    }
}

/// Server resolver: the node's newest certificate to clients that say they
/// trust its issuer, the bootstrap certificate to everyone else until it
/// expires.
#[derive(Debug)]
pub struct NodeServerResolver {
    bootstrap: Arc<CertifiedKey>,
    /// Unix seconds; None when the certificate does not parse (then it is
    /// served as if valid, the client judges).
    bootstrap_not_after: Option<i64>,
    current: CredentialReceiver,
    served: ServedCertificates,
    /// Whether the switch after the bootstrap certificate's expiry was logged.
    expiry_logged: AtomicBool,
}

impl NodeServerResolver {
    pub fn new(
        bootstrap: Arc<CertifiedKey>,
        current: CredentialReceiver,
        served: ServedCertificates,
    ) -> Arc<Self> {
        let bootstrap_not_after = leaf_of(&bootstrap, |c| c.validity().not_after.timestamp());
        Arc::new(NodeServerResolver {
            bootstrap,
            bootstrap_not_after,
            current,
            served,
            expiry_logged: AtomicBool::new(false),
        })
    }

    fn bootstrap_expired(&self) -> bool {
        let expired = self.bootstrap_not_after.is_some_and(|t| t < now_unix());
        if expired && !self.expiry_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                not_after_unix = self.bootstrap_not_after,
                "the bootstrap certificate (--tls-cert) has expired; every client now gets the \
                 CA-issued certificate, and clients that trust only the bootstrap CA fail to verify it"
            );
        }
        expired
    }
}

impl ResolvesServerCert for NodeServerResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.borrow().clone();
        if Arc::ptr_eq(&current, &self.bootstrap) {
            self.served.count("bootstrap");
            return Some(current);
        }
        let issuer = leaf_of(&current, |c| c.issuer().as_raw().to_vec());
        let named = match (hello.certificate_authorities(), issuer) {
            (Some(names), Some(issuer)) => names.iter().any(|n| n.as_ref() == issuer.as_slice()),
            _ => false,
        };
        if named || self.bootstrap_expired() {
            self.served.count("ca_issued");
            Some(current)
        } else {
            self.served.count("bootstrap");
            Some(self.bootstrap.clone())
        }
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
    /// The bundle PEM the configuration was built for, and it.
    cache: Mutex<(String, Arc<rustls::ClientConfig>)>,
}

impl PeerTls {
    /// Fails when no bootstrap root is usable: no peer could be verified.
    pub fn new(
        provider: Arc<CryptoProvider>,
        bootstrap: Vec<CertificateDer<'static>>,
        source: Option<BundleSource>,
        client: Option<CredentialReceiver>,
    ) -> Result<Arc<Self>, TlsSetupError> {
        let first = build(&provider, &bootstrap, &[], client.as_ref())?;
        Ok(Arc::new(PeerTls {
            provider,
            bootstrap,
            source,
            client,
            cache: Mutex::new((String::new(), Arc::new(first))),
        }))
    }

    /// The configuration for the next connection.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        let pem = self.source.as_ref().map(|s| s()).unwrap_or_default();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 == pem {
            return cache.1.clone();
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
        match build(
            &self.provider,
            &self.bootstrap,
            &bundle,
            self.client.as_ref(),
        ) {
            Ok(cfg) => *cache = (pem, Arc::new(cfg)),
            // Cannot happen once `new` succeeded (the bootstrap roots are
            // in every store); the last configuration stays.
            Err(e) => {
                tracing::error!(error = %e, "peer TLS configuration; keeping the previous one")
            }
        }
        cache.1.clone()
    }
}

fn build(
    provider: &Arc<CryptoProvider>,
    bootstrap: &[CertificateDer<'static>],
    bundle: &[CertificateDer<'static>],
    client: Option<&CredentialReceiver>,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for c in bootstrap.iter().chain(bundle) {
        if let Err(e) = roots.add(c.clone()) {
            tracing::warn!(error = %e, "ignoring an unusable server root");
        }
    }
    let verifier = HintingVerifier::new(roots, provider.clone())
        .map_err(|e| TlsSetupError::Roots(e.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match client {
        Some(rx) => builder.with_client_cert_resolver(WatchedCertifiedKey::new(rx.clone())),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, ServerName};

    use super::*;

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    /// A serving certificate for 127.0.0.1, optionally already expired.
    fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, expired: bool) -> Arc<CertifiedKey> {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 2);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        let provider = rustls::crypto::ring::default_provider();
        Arc::new(
            CertifiedKey::from_der(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                &provider,
            )
            .unwrap(),
        )
    }

    /// A listener choosing with `resolver`; its address.
    async fn serve(resolver: Arc<NodeServerResolver>) -> String {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        addr
    }

    /// The leaf a handshake with `cfg` was shown, or the client's error.
    async fn shown(cfg: Arc<rustls::ClientConfig>, addr: &str) -> Result<Vec<u8>, String> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
    }

    /// A client that sends no hints, trusting `roots`.
    fn plain(roots: &[&CertifiedIssuer<'static, KeyPair>]) -> Arc<rustls::ClientConfig> {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.der().clone()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
        )
    }

    fn counts(registry: &prometheus_client::registry::Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        let mut lines: Vec<_> = out
            .lines()
            .filter(|l| l.starts_with("strait_control_served_certificates_total"))
            .collect();
        lines.sort();
        lines.join("\n")
    }

    #[tokio::test]
    async fn hinting_clients_get_the_ca_certificate_others_the_bootstrap_one_until_it_expires() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (boot_ca, node_ca) = (ca("bootstrap"), ca("strait-ca"));
        let issued = leaf(&node_ca, false);
        let bundle = node_ca.pem();
        let source: BundleSource = Arc::new(move || bundle.clone());
        let peers = PeerTls::new(
            provider.clone(),
            vec![boot_ca.der().clone()],
            Some(source),
            None,
        )
        .unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let served = ServedCertificates::new(&mut registry);
        let issued_der = issued.cert[0].to_vec();

        for expired in [false, true] {
            let bootstrap = leaf(&boot_ca, expired);
            let bootstrap_der = bootstrap.cert[0].to_vec();
            let (_tx, rx) = tokio::sync::watch::channel(issued.clone());
            let addr = serve(NodeServerResolver::new(bootstrap, rx, served.clone())).await;
            // Naming the CA root gets the CA's certificate, always.
            assert_eq!(shown(peers.config(), &addr).await.unwrap(), issued_der);
            if !expired {
                // Without hints, the bootstrap certificate, even to a
                // client that would verify either.
                assert_eq!(
                    shown(plain(&[&boot_ca, &node_ca]), &addr).await.unwrap(),
                    bootstrap_der
                );
                assert_eq!(
                    shown(plain(&[&boot_ca]), &addr).await.unwrap(),
                    bootstrap_der
                );
            } else {
                // Expired, nobody could verify it: the CA's certificate.
                assert_eq!(
                    shown(plain(&[&boot_ca, &node_ca]), &addr).await.unwrap(),
                    issued_der
                );
                assert_eq!(
                    shown(plain(&[&boot_ca]), &addr).await.unwrap_err(),
                    "invalid peer certificate: UnknownIssuer"
                );
            }
        }
        assert_eq!(
            counts(&registry),
            "strait_control_served_certificates_total{certificate=\"bootstrap\"} 2\n\
             strait_control_served_certificates_total{certificate=\"ca_issued\"} 4"
        );
    }

    #[tokio::test]
    async fn before_the_ca_certificate_everyone_gets_the_bootstrap_one() {
        let boot_ca = ca("bootstrap");
        let bootstrap = leaf(&boot_ca, false);
        let (_tx, rx) = tokio::sync::watch::channel(bootstrap.clone());
        let peers = PeerTls::new(
            Arc::new(rustls::crypto::ring::default_provider()),
            vec![boot_ca.der().clone()],
            None,
            None,
        )
        .unwrap();
        let addr = serve(NodeServerResolver::new(
            bootstrap.clone(),
            rx,
            ServedCertificates::default(),
        ))
        .await;
        assert_eq!(
            shown(peers.config(), &addr).await.unwrap(),
            bootstrap.cert[0].to_vec()
        );
    }

    #[test]
    fn peer_tls_needs_a_usable_bootstrap_root() {
        let err = PeerTls::new(
            Arc::new(rustls::crypto::ring::default_provider()),
            Vec::new(),
            None,
            None,
        )
        .err()
        .unwrap();
        assert!(err.to_string().starts_with("server roots: "), "{err}");
    }
}

//! Server verification that tells the server which roots the client trusts.
//!
//! rustls' own verifier (`with_root_certificates`) sends no
//! `certificate_authorities` extension (RFC 8446 4.2.4). A server that holds
//! several certificates (a control node: its bootstrap certificate and the
//! one its CA issued) can only pick the one a client verifies if the client
//! names its roots, so every Strait client built on this verifier does.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{VerifierBuilderError, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// Verifies servers as rustls' WebPKI verifier does, against `roots`, and
/// announces the subjects of `roots` as `certificate_authorities`.
#[derive(Debug)]
pub struct HintingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    hints: Vec<DistinguishedName>,
}

impl HintingVerifier {
    /// Fails when `roots` is empty (nothing could ever be verified).
    pub fn new(
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, VerifierBuilderError> {
        let hints = roots.subjects();
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        Ok(HintingVerifier { inner, hints })
    }

    /// The subjects sent in `certificate_authorities`.
    pub fn hints(&self) -> &[DistinguishedName] {
        &self.hints
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::server::{ClientHello, ResolvesServerCert};
    use rustls::sign::CertifiedKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    /// Serves `key` and records the `certificate_authorities` of each hello.
    #[derive(Debug)]
    struct Recording {
        key: Arc<CertifiedKey>,
        seen: Mutex<Vec<Option<Vec<Vec<u8>>>>>,
    }

    impl ResolvesServerCert for Recording {
        fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            let names = hello
                .certificate_authorities()
                .map(|n| n.iter().map(|d| d.as_ref().to_vec()).collect());
            self.seen.lock().unwrap().push(names);
            Some(self.key.clone())
        }
    }

    #[tokio::test]
    async fn announces_its_roots_and_verifies_against_them_only() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (home, other) = (ca("home"), ca("other"));
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &home)
            .unwrap();
        let key = CertifiedKey::from_der(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            &provider,
        )
        .unwrap();
        let resolver = Arc::new(Recording {
            key: Arc::new(key),
            seen: Mutex::new(Vec::new()),
        });
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"ok").await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        let connect = |roots: Vec<&CertifiedIssuer<'static, KeyPair>>| {
            let mut store = RootCertStore::empty();
            for r in roots {
                store.add(r.der().clone()).unwrap();
            }
            let verifier = HintingVerifier::new(store, provider.clone()).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = ServerName::try_from("localhost").unwrap();
                let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut got = String::new();
                tls.read_to_string(&mut got)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(got)
            }
        };
        let subject = |c: &CertifiedIssuer<'static, KeyPair>| {
            let (_, cert) = x509_parser::parse_x509_certificate(c.der().as_ref()).unwrap();
            cert.subject().as_raw().to_vec()
        };

        assert_eq!(connect(vec![&other, &home]).await.unwrap(), "ok");
        assert_eq!(
            connect(vec![&other]).await.unwrap_err(),
            "invalid peer certificate: UnknownIssuer"
        );
        let seen = resolver.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                Some(vec![subject(&other), subject(&home)]),
                Some(vec![subject(&other)]),
            ]
        );
        assert!(HintingVerifier::new(RootCertStore::empty(), provider).is_err());
    }
}

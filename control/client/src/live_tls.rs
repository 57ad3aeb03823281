//! Control-plane connections whose credentials change at run time: the
//! client certificate comes from a rustls resolver (an edge's renewed SVID)
//! and the roots that verify the control plane from a `watch` channel of PEM
//! (the Identity service's trust bundle, refreshed with every certificate).
//! Each new connection uses what the channels hold then.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

/// Verifies servers against the newest roots of a PEM channel.
#[derive(Debug)]
pub struct LiveRoots {
    roots: watch::Receiver<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    built: RwLock<(String, Arc<WebPkiServerVerifier>)>,
}

fn verifier(
    pem: &str,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut store = RootCertStore::empty();
    for cert in rustls_pki_types_certs(pem)? {
        store.add(cert).map_err(|e| e.to_string())?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| e.to_string())
}

fn rustls_pki_types_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("control-plane roots: {e}"))?;
    if certs.is_empty() {
        return Err("control-plane roots: no certificate".into());
    }
    Ok(certs)
}

impl LiveRoots {
    pub fn new(roots: watch::Receiver<String>) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pem = roots.borrow().clone();
        let built = verifier(&pem, &provider)?;
        Ok(LiveRoots {
            roots,
            provider,
            built: RwLock::new((pem, built)),
        })
    }

    fn current(&self) -> Arc<WebPkiServerVerifier> {
        let pem = self.roots.borrow().clone();
        {
            let built = self.built.read().unwrap_or_else(|e| e.into_inner());
            if built.0 == pem {
                return built.1.clone();
            }
        }
        match verifier(&pem, &self.provider) {
            Ok(v) => {
                *self.built.write().unwrap_or_else(|e| e.into_inner()) = (pem, v.clone());
                v
            }
            // A broken bundle keeps the roots in force.
            Err(e) => {
                tracing::warn!(error = %e, "new control-plane roots rejected; keeping the current ones");
                self.built
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .1
                    .clone()
            }
        }
    }
}

impl ServerCertVerifier for LiveRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// A client configuration for gRPC (ALPN h2) verifying the control plane
/// against `roots` and presenting what `client` resolves.
pub fn live_client_config(
    roots: watch::Receiver<String>,
    client: Arc<dyn ResolvesClientCert>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LiveRoots::new(roots)?))
        .with_client_cert_resolver(client);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A lazy channel to `endpoint` (`host:port`) over `tls`, verifying the
/// server's certificate for `host`.
pub fn channel(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    let addr = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .to_string();
    let host = addr
        .rsplit_once(':')
        .map_or(addr.as_str(), |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string();
    let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let target = addr.clone();
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    Ok(
        ep.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let target = target.clone();
            let name = name.clone();
            async move {
                let tcp =
                    tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(target))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}

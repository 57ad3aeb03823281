//! TLS of every control-plane connection this crate opens.
//!
//! One path: a [`TlsSource`] hands each new connection its rustls
//! configuration, whose server verifier is [`strait_tls::HintingVerifier`].
//! It names the roots the client trusts in `certificate_authorities`, and a
//! control node serves the certificate of a root named there: its CA-issued
//! one to a client that holds the CA's root, the bootstrap one (`--tls-cert`)
//! to a client that holds only the bootstrap CA (strait-control-api's
//! `node_tls`). Sources:
//!
//! * fixed ([`TlsSource::from_pem`], what [`crate::ControlClient::new`] uses
//!   for a [`crate::TlsConfig`]): roots and client certificate read once;
//! * live ([`LiveRoots`]): roots from a `watch` channel of PEM (the Identity
//!   service's trust bundle, refreshed with every certificate) and the
//!   client certificate from a rustls resolver (an edge's renewed SVID).
//!   rustls reads a verifier's hints by reference, so the configuration is
//!   rebuilt when the PEM changes (and cached by it): each new connection
//!   announces and verifies against the roots the channel holds then.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use strait_tls::HintingVerifier;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::TlsConfig;

/// What is wrong with the TLS material of a control-plane client.
/// Variants name the input, so a caller can name its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("control-plane CA certificates: {0}")]
    Roots(String),
    #[error("client certificate: {0}")]
    ClientCert(String),
    #[error("client key: {0}")]
    ClientKey(String),
    #[error("client certificate and key: {0}")]
    ClientPair(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The roots of `pem`; at least one must be usable.
fn roots(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Roots(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Roots("no PEM certificate found".into()));
    }
    let mut store = RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| TlsError::Roots(format!("unusable root: {e}")))?;
    }
    Ok(store)
}

/// A gRPC (ALPN h2) configuration verifying servers against `roots`,
/// announcing them, and presenting what `client` resolves.
fn build(
    provider: &Arc<CryptoProvider>,
    roots: RootCertStore,
    client: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let verifier = HintingVerifier::new(roots, provider.clone())
        .map_err(|e| TlsError::Roots(e.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client certificate (chain) and key of `cert_pem` and `key_pem`.
fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::ClientCert(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::ClientCert("no PEM certificate found".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::ClientKey(e.to_string()))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        TlsError::ClientPair(match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the key does not belong to the certificate".into()
            }
            other => other.to_string(),
        })
    })
}

/// A client certificate read once, presented as it is (the server judges
/// its validity, as it did when this crate used tonic's TLS).
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies control nodes against the newest roots of a PEM channel: see
/// the module docs.
pub struct LiveRoots {
    roots: watch::Receiver<String>,
    provider: Arc<CryptoProvider>,
    client: Arc<dyn ResolvesClientCert>,
    /// The roots PEM the configuration was built from, and it.
    built: Mutex<(String, Arc<rustls::ClientConfig>)>,
}

impl std::fmt::Debug for LiveRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveRoots").finish_non_exhaustive()
    }
}

impl LiveRoots {
    /// Fails when the roots the channel holds now are unusable.
    pub fn new(
        roots: watch::Receiver<String>,
        client: Arc<dyn ResolvesClientCert>,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pem = roots.borrow().clone();
        let config = build(
            &provider,
            self::roots(pem.as_bytes())?,
            Some(client.clone()),
        )?;
        Ok(LiveRoots {
            roots,
            provider,
            client,
            built: Mutex::new((pem, config)),
        })
    }

    /// The configuration for the next connection.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        let pem = self.roots.borrow().clone();
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if built.0 == pem {
            return built.1.clone();
        }
        match roots(pem.as_bytes())
            .and_then(|r| build(&self.provider, r, Some(self.client.clone())))
        {
            Ok(config) => *built = (pem, config),
            // A broken bundle keeps the roots in force (and is not retried
            // until the channel changes again).
            Err(e) => {
                tracing::warn!(error = %e, "new control-plane roots rejected; keeping the current ones");
                built.0 = pem;
            }
        }
        built.1.clone()
    }
}

/// Where each new control-plane connection takes its TLS configuration.
#[derive(Clone, Debug)]
pub struct TlsSource(Source);

#[derive(Clone, Debug)]
enum Source {
    Fixed(Arc<rustls::ClientConfig>),
    Live(Arc<LiveRoots>),
}

impl TlsSource {
    /// Roots from `tls.ca_pem`, the client certificate from `tls.cert_pem`
    /// and `tls.key_pem` (none unless both are given). `tls.domain` is not
    /// part of it: [`channel`] takes the server name.
    pub fn from_pem(tls: &TlsConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = roots(&tls.ca_pem)?;
        let client = match (&tls.cert_pem, &tls.key_pem) {
            (Some(cert), Some(key)) => {
                let key = certified_key(cert, key, &provider)?;
                Some(Arc::new(FixedClientCert(Arc::new(key))) as Arc<dyn ResolvesClientCert>)
            }
            _ => None,
        };
        Ok(TlsSource(Source::Fixed(build(&provider, roots, client)?)))
    }

    /// Roots from `roots` and the client certificate from `client`, both
    /// read again for each connection.
    pub fn live(
        roots: watch::Receiver<String>,
        client: Arc<dyn ResolvesClientCert>,
    ) -> Result<Self, TlsError> {
        Ok(TlsSource(Source::Live(Arc::new(LiveRoots::new(
            roots, client,
        )?))))
    }

    /// The configuration for the next connection.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        match &self.0 {
            Source::Fixed(c) => c.clone(),
            Source::Live(l) => l.config(),
        }
    }
}

/// [`TlsSource::live`] under its former name: a renewed SVID and refreshed
/// roots reach every new connection of [`crate::ControlClient::with_rustls`].
pub fn live_client_config(
    roots: watch::Receiver<String>,
    client: Arc<dyn ResolvesClientCert>,
) -> Result<TlsSource, TlsError> {
    TlsSource::live(roots, client)
}

/// `host:port` of an endpoint given as `host:port` or `scheme://host:port`,
/// and its host (without IPv6 brackets).
fn split_endpoint(endpoint: &str) -> (String, String) {
    let addr = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/')
        .to_string();
    let host = addr
        .rsplit_once(':')
        .map_or(addr.as_str(), |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string();
    (addr, host)
}

/// A TLS connection to `addr`, verified for `name` with `config`.
pub async fn connect(
    addr: &str,
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A lazy channel to `endpoint` (`host:port`) over `tls`, verifying the
/// server's certificate for `server_name` (default: the endpoint's host).
/// `request_timeout` bounds each call on the channel.
pub fn channel(
    endpoint: &str,
    tls: &TlsSource,
    server_name: Option<&str>,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
) -> Result<Channel, String> {
    let (addr, host) = split_endpoint(endpoint);
    let name = server_name.map_or(host, str::to_string);
    let name =
        ServerName::try_from(name.clone()).map_err(|e| format!("server name '{name}': {e}"))?;
    let mut ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    if let Some(t) = request_timeout {
        ep = ep.timeout(t);
    }
    let tls = tls.clone();
    Ok(
        ep.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let (addr, name, config) = (addr.clone(), name.clone(), tls.config());
            async move {
                let stream = connect(&addr, name, config, connect_timeout).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })),
    )
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::server::{ClientHello, ResolvesServerCert};

    use super::*;
    use crate::{ClientConfig, ControlClient};

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    /// (certificate PEM, key PEM) for `names`, signed by `ca`.
    fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn subject(ca: &CertifiedIssuer<'static, KeyPair>) -> Vec<u8> {
        let (_, cert) = x509_parser::parse_x509_certificate(ca.der().as_ref()).unwrap();
        cert.subject().as_raw().to_vec()
    }

    /// What the server saw of one handshake.
    #[derive(Debug, Clone, PartialEq)]
    struct Hello {
        sni: Option<String>,
        hints: Option<Vec<Vec<u8>>>,
    }

    #[derive(Debug)]
    struct Recording {
        key: Arc<CertifiedKey>,
        hellos: Mutex<Vec<Hello>>,
    }

    impl ResolvesServerCert for Recording {
        fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            self.hellos.lock().unwrap().push(Hello {
                sni: hello.server_name().map(str::to_string),
                hints: hello
                    .certificate_authorities()
                    .map(|n| n.iter().map(|d| d.as_ref().to_vec()).collect()),
            });
            Some(self.key.clone())
        }
    }

    /// A TLS listener serving `cert`: its address, what it saw, and how
    /// many handshakes completed.
    async fn server(
        cert: &(String, String),
    ) -> (String, Arc<Recording>, Arc<std::sync::atomic::AtomicUsize>) {
        let provider = rustls::crypto::ring::default_provider();
        let key = certified_key(cert.0.as_bytes(), cert.1.as_bytes(), &provider).unwrap();
        let recording = Arc::new(Recording {
            key: Arc::new(key),
            hellos: Mutex::new(Vec::new()),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(recording.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = done.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                // Completed handshakes are counted, then the connection is
                // dropped: no gRPC behind it.
                if acceptor.accept(tcp).await.is_ok() {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        (addr, recording, done)
    }

    #[derive(Debug)]
    struct NoClientCert;

    impl ResolvesClientCert for NoClientCert {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            None
        }

        fn has_certs(&self) -> bool {
            false
        }
    }

    async fn hints_of(source: &TlsSource, addr: &str, rec: &Recording) -> Option<Vec<Vec<u8>>> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        connect(addr, name, source.config(), Duration::from_secs(5))
            .await
            .unwrap();
        rec.hellos.lock().unwrap().last().unwrap().hints.clone()
    }

    #[tokio::test]
    async fn each_connection_announces_the_roots_the_channel_holds_then() {
        let (old, new) = (ca("old"), ca("new"));
        let (addr, rec, _) = server(&leaf(&old, &["127.0.0.1"])).await;
        let (tx, rx) = watch::channel(old.pem());
        let source = TlsSource::live(rx, Arc::new(NoClientCert)).unwrap();
        assert_eq!(
            hints_of(&source, &addr, &rec).await,
            Some(vec![subject(&old)])
        );
        let first = source.config();
        assert!(
            Arc::ptr_eq(&first, &source.config()),
            "rebuilt for the same roots"
        );
        tx.send_replace(format!("{}{}", new.pem(), old.pem()));
        assert_eq!(
            hints_of(&source, &addr, &rec).await,
            Some(vec![subject(&new), subject(&old)])
        );
        // A broken bundle keeps the roots in force.
        let current = source.config();
        tx.send_replace("not PEM".into());
        assert!(Arc::ptr_eq(&current, &source.config()));
        assert_eq!(
            hints_of(&source, &addr, &rec).await,
            Some(vec![subject(&new), subject(&old)])
        );
        // Roots that no longer verify the server: refused.
        tx.send_replace(new.pem());
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let err = connect(&addr, name, source.config(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "invalid peer certificate: UnknownIssuer");
        let (_, rx) = watch::channel("garbage".to_string());
        assert_eq!(
            TlsSource::live(rx, Arc::new(NoClientCert))
                .unwrap_err()
                .to_string(),
            "control-plane CA certificates: no PEM certificate found"
        );
    }

    /// `ControlClient::new` over TLS: the handshakes of its calls name the
    /// `ca_pem` roots, and `domain` is the name verified (and sent as SNI).
    #[tokio::test]
    async fn control_client_announces_its_roots_and_verifies_the_domain() {
        let root = ca("bootstrap");
        let (addr, rec, done) = server(&leaf(&root, &["control.test"])).await;
        let mut cfg = ClientConfig::new(&[addr.as_str()]);
        cfg.connect_timeout = Duration::from_millis(500);
        cfg.request_timeout = Duration::from_millis(500);
        let tls = TlsConfig {
            ca_pem: root.pem().into_bytes(),
            cert_pem: None,
            key_pem: None,
            domain: Some("control.test".into()),
        };
        cfg.tls = Some(tls.clone());
        // The server answers no gRPC: the call fails, after a handshake.
        assert!(ControlClient::new(&cfg).unwrap().members().await.is_err());
        let hellos = rec.hellos.lock().unwrap().clone();
        let expected = Hello {
            sni: Some("control.test".into()),
            hints: Some(vec![subject(&root)]),
        };
        assert!(!hellos.is_empty());
        assert!(hellos.iter().all(|h| *h == expected), "{hellos:?}");
        let completed = done.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(completed, hellos.len());

        // Without the override the endpoint's IP is verified, and the
        // certificate does not name it: no handshake completes.
        rec.hellos.lock().unwrap().clear();
        cfg.tls = Some(TlsConfig {
            domain: None,
            ..tls
        });
        let err = ControlClient::new(&cfg)
            .unwrap()
            .members()
            .await
            .unwrap_err();
        assert!(!rec.hellos.lock().unwrap().is_empty());
        assert_eq!(
            done.load(std::sync::atomic::Ordering::SeqCst),
            completed,
            "{err}"
        );
    }

    #[test]
    fn bad_material_is_named() {
        let root = ca("bootstrap");
        let (cert, key) = leaf(&root, &["client"]);
        let (_, other_key) = leaf(&root, &["client"]);
        let tls = |ca: &str, cert: &str, key: &str| TlsConfig {
            ca_pem: ca.as_bytes().to_vec(),
            cert_pem: Some(cert.as_bytes().to_vec()),
            key_pem: Some(key.as_bytes().to_vec()),
            domain: None,
        };
        let err = |t: TlsConfig| TlsSource::from_pem(&t).unwrap_err().to_string();
        assert!(TlsSource::from_pem(&tls(&root.pem(), &cert, &key)).is_ok());
        assert_eq!(
            err(tls("", &cert, &key)),
            "control-plane CA certificates: no PEM certificate found"
        );
        assert_eq!(
            err(tls(&root.pem(), &key, &key)),
            "client certificate: no PEM certificate found"
        );
        assert_eq!(
            err(tls(&root.pem(), &cert, &cert)),
            "client key: no items found"
        );
        assert_eq!(
            err(tls(&root.pem(), &cert, &other_key)),
            "client certificate and key: the key does not belong to the certificate"
        );
        let mut cfg = ClientConfig::new(&["127.0.0.1:1"]);
        cfg.tls = Some(tls("junk", &cert, &key));
        assert_eq!(
            ControlClient::new(&cfg).err().unwrap().to_string(),
            "control-plane TLS: control-plane CA certificates: no PEM certificate found"
        );
    }
}

//! Getting and renewing an X.509 SVID from the control plane's CA (the
//! `Identity` service), for anything that needs one: `straitctl cert
//! agent`, and edges or kms-brokers that join with a token.
//!
//! The private key is generated here, in memory; only a CSR leaves.
//!
//! ```ignore
//! let server_ca = discover(&endpoints, &token).await?;        // checks the token's pin
//! let ids = IdentityEndpoints::new(&endpoints, &server_ca, Duration::from_secs(10))?;
//! let svid = ids.join(&token, "spiffe://example.org/edge/e1", &names).await?;
//! // ... at svid.renew_at_unix():
//! let svid = ids.renew(&svid, &names).await?;
//! ```

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use strait_control_ca::{new_key_and_csr, Token};
use strait_proto::control as pb;
use strait_proto::control::identity_client::IdentityClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("join token: {0}")]
    Token(#[from] strait_control_ca::TokenError),
    #[error("{0}")]
    Status(#[from] Status),
    #[error("endpoint '{0}': {1}")]
    Endpoint(String, String),
    #[error("control-plane TLS: {0}")]
    Tls(#[from] crate::live_tls::TlsError),
    #[error("{endpoint}: the control plane's root does not match the join token's pin (got sha256 {got}); refusing to send the token")]
    PinMismatch { endpoint: String, got: String },
    #[error("no control-plane member could be verified: {0}")]
    NoMember(String),
    #[error("key generation: {0}")]
    Key(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A certificate, its key (in memory, wiped on drop) and the roots to trust.
#[derive(Clone)]
pub struct Svid {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
    pub bundle_pem: String,
    pub spiffe_id: String,
    pub serial: String,
    pub not_after_unix: i64,
    /// When this node received it (for the half-life).
    pub received_unix: i64,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Half of the lifetime left at reception.
    pub fn renew_at_unix(&self) -> i64 {
        self.received_unix + (self.not_after_unix - self.received_unix).max(0) / 2
    }
}

/// Names a listener serves (added as SANs) and the lifetime to ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvidRequest {
    pub dns_names: Vec<String>,
    pub ips: Vec<String>,
    /// None: the role's default.
    pub ttl: Option<Duration>,
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A server-certificate verifier that accepts anything: used for exactly
/// one call, TrustBundle, whose answer is then checked against the token's
/// pin before anything secret is sent.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn host_port(ep: &str) -> String {
    ep.split_once("://")
        .map(|(_, r)| r.to_string())
        .unwrap_or_else(|| ep.to_string())
}

/// Learns the control plane's server root from one member and checks it
/// against `pin` (SHA-256 of the root's DER, from the join token).
pub async fn discover_one(ep: &str, pin: &str) -> Result<String, IdentityError> {
    Ok(discover_one_bundle(ep, pin).await?.server_ca_pem)
}

/// [`discover_one`], returning the whole answer (trust domain, bundle).
pub async fn discover_one_bundle(
    ep: &str,
    pin: &str,
) -> Result<pb::TrustBundleResponse, IdentityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Endpoint(ep.into(), e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let addr = host_port(ep);
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .unwrap_or_else(|| addr.clone());
    let server_name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| IdentityError::Endpoint(ep.into(), e.to_string()))?;
    let target = addr.clone();
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| IdentityError::Endpoint(ep.into(), e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let target = target.clone();
            let name = server_name.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(target).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| IdentityError::Endpoint(ep.into(), e.to_string()))?;
    let resp = IdentityClient::new(channel)
        .trust_bundle(pb::TrustBundleRequest {})
        .await?
        .into_inner();
    let der = strait_control_ca::authority::pem_to_der(&resp.server_ca_pem)
        .map_err(|e| IdentityError::Endpoint(ep.into(), format!("server CA: {e}")))?;
    let got = strait_control_ca::authority::hex(&Sha256::digest(&der));
    if got != pin {
        return Err(IdentityError::PinMismatch {
            endpoint: ep.into(),
            got,
        });
    }
    Ok(resp)
}

/// [`discover`], returning the whole verified answer.
pub async fn discover_bundle(
    endpoints: &[String],
    token: &str,
) -> Result<pb::TrustBundleResponse, IdentityError> {
    let tok = Token::parse(token)?;
    let mut errors = Vec::new();
    for ep in endpoints {
        match discover_one_bundle(ep, &tok.pin).await {
            Ok(resp) => return Ok(resp),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(IdentityError::NoMember(errors.join("; ")))
}

/// [`discover_one`] over members until one is verified.
pub async fn discover(endpoints: &[String], token: &str) -> Result<String, IdentityError> {
    let tok = Token::parse(token)?;
    let mut errors = Vec::new();
    for ep in endpoints {
        match discover_one(ep, &tok.pin).await {
            Ok(pem) => return Ok(pem),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(IdentityError::NoMember(errors.join("; ")))
}

/// The Identity service of every member, verified against `server_ca_pem`.
pub struct IdentityEndpoints {
    endpoints: Vec<String>,
    server_ca_pem: String,
    timeout: Duration,
}

impl IdentityEndpoints {
    pub fn new(
        endpoints: &[String],
        server_ca_pem: &str,
        timeout: Duration,
    ) -> Result<Self, IdentityError> {
        if endpoints.is_empty() {
            return Err(IdentityError::NoMember("no endpoints given".into()));
        }
        Ok(IdentityEndpoints {
            endpoints: endpoints.to_vec(),
            server_ca_pem: server_ca_pem.to_string(),
            timeout,
        })
    }

    /// Channels verifying the members against `server_ca_pem` (named in
    /// `certificate_authorities`, see [`crate::live_tls`]), presenting
    /// `client` (cert, key PEM) if given.
    fn channels(
        &self,
        client: Option<(&str, &str)>,
    ) -> Result<Vec<(String, Channel)>, IdentityError> {
        let tls = crate::live_tls::TlsSource::from_pem(&crate::TlsConfig {
            ca_pem: self.server_ca_pem.as_bytes().to_vec(),
            cert_pem: client.map(|(c, _)| c.as_bytes().to_vec()),
            key_pem: client.map(|(_, k)| k.as_bytes().to_vec()),
            domain: None,
        })?;
        self.endpoints
            .iter()
            .map(|ep| {
                let channel = crate::live_tls::channel(
                    &host_port(ep),
                    &tls,
                    None,
                    Duration::from_secs(3),
                    Some(self.timeout),
                )
                .map_err(|e| IdentityError::Endpoint(ep.clone(), e))?;
                Ok((ep.clone(), channel))
            })
            .collect()
    }

    /// Redeems `token` for `spiffe_id`.
    pub async fn join(
        &self,
        token: &str,
        spiffe_id: &str,
        req: &SvidRequest,
    ) -> Result<Svid, IdentityError> {
        let (key, csr) = new_key_and_csr().map_err(|e| IdentityError::Key(e.to_string()))?;
        let r = pb::JoinRequest {
            token: token.to_string(),
            spiffe_id: spiffe_id.to_string(),
            csr_pem: csr,
            dns_names: req.dns_names.clone(),
            ips: req.ips.clone(),
            ttl_seconds: req.ttl.map(|d| d.as_secs()).unwrap_or(0),
        };
        let channels = self.channels(None)?;
        let resp = call_any(&channels, self.timeout, |mut c| {
            let r = r.clone();
            async move { c.join(r).await }
        })
        .await?;
        Ok(svid(resp, key))
    }

    /// The current trust bundle, from a member verified against the server
    /// root this was built with.
    pub async fn trust_bundle(&self) -> Result<pb::TrustBundleResponse, IdentityError> {
        let channels = self.channels(None)?;
        Ok(call_any(&channels, self.timeout, |mut c| async move {
            c.trust_bundle(pb::TrustBundleRequest {}).await
        })
        .await?)
    }

    /// A new certificate for the identity of `current`, authenticated by it.
    pub async fn renew(&self, current: &Svid, req: &SvidRequest) -> Result<Svid, IdentityError> {
        let (key, csr) = new_key_and_csr().map_err(|e| IdentityError::Key(e.to_string()))?;
        let r = pb::RenewRequest {
            csr_pem: csr,
            dns_names: req.dns_names.clone(),
            ips: req.ips.clone(),
            ttl_seconds: req.ttl.map(|d| d.as_secs()).unwrap_or(0),
        };
        let channels = self.channels(Some((&current.cert_pem, &current.key_pem)))?;
        let resp = call_any(&channels, self.timeout, |mut c| {
            let r = r.clone();
            async move { c.renew(r).await }
        })
        .await?;
        Ok(svid(resp, key))
    }
}

fn svid(resp: pb::CertificateResponse, key: Zeroizing<String>) -> Svid {
    Svid {
        cert_pem: resp.cert_pem,
        key_pem: key,
        bundle_pem: resp.bundle_pem,
        spiffe_id: resp.spiffe_id,
        serial: resp.serial,
        not_after_unix: resp.not_after_unix,
        received_unix: now_unix(),
    }
}

/// Calls `f` on each member in turn until one answers with something other
/// than UNAVAILABLE; when every member is unavailable (no leader yet, the
/// CA not created yet), tries again with backoff until `deadline`.
pub async fn call_any<T, F, Fut>(
    channels: &[(String, Channel)],
    deadline: Duration,
    f: F,
) -> Result<T, Status>
where
    F: Fn(IdentityClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let until = Instant::now() + deadline;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut last = Status::unavailable("no endpoint given");
        for (ep, ch) in channels {
            match f(IdentityClient::new(ch.clone())).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if matches!(s.code(), Code::Unavailable | Code::Unknown) => {
                    last = Status::new(s.code(), format!("{ep}: {}", s.message()));
                }
                Err(s) => return Err(s),
            }
        }
        if Instant::now() + backoff >= until {
            return Err(last);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Writes `contents` to `dir/name` atomically (temp file + fsync + rename)
/// with `mode`, so a reader never sees a half-written file.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), IdentityError> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let io = |source| IdentityError::Io {
        path: tmp.display().to_string(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, dir.join(name)).map_err(io)?;
    Ok(())
}

/// `cert.pem`, `key.pem` (0600) and `bundle.pem` in `dir`, the key first
/// so `cert.pem` never names a key that is not there yet.
pub fn write_files(dir: &Path, cert: &str, key: &str, bundle: &str) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    write_atomic(dir, "key.pem", key.as_bytes(), 0o600)?;
    write_atomic(dir, "cert.pem", cert.as_bytes(), 0o644)?;
    write_atomic(dir, "bundle.pem", bundle.as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_life_and_atomic_files() {
        let s = Svid {
            cert_pem: "c".into(),
            key_pem: Zeroizing::new("SECRET-KEY".into()),
            bundle_pem: "b".into(),
            spiffe_id: "spiffe://example.org/edge/e1".into(),
            serial: "01".into(),
            not_after_unix: 1060,
            received_unix: 1000,
        };
        assert_eq!(s.renew_at_unix(), 1030);
        assert!(!format!("{s:?}").contains("SECRET-KEY"));
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("svid");
        write_files(&d, "cert", "key", "bundle").unwrap();
        write_files(&d, "cert2", "key2", "bundle2").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cert.pem")).unwrap(),
            "cert2"
        );
        assert_eq!(std::fs::read_to_string(d.join("key.pem")).unwrap(), "key2");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

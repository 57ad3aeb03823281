//! TLS between edges: 1.3 only, ALPN `strait/1` (QUIC) or `strait-mux/1`
//! (TLS over TCP), both sides presenting the
//! edge's certificate (files or its SVID, swapped live) and verifying the
//! other by SPIFFE ID against the bundle of the trust domain that ID names.
//!
//! Host names play no part: an edge is who its SPIFFE ID says, whatever
//! address it was dialed at, and the ID must be the one configured for the
//! peer (dialing) or one of the configured peers' (accepting).

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use strait_tls::{
    CredentialReceiver, LiveClientVerifier, SpiffeClientVerifier, WatchedCertifiedKey,
};

/// The application protocol of tunnel connections (QUIC and TLS-over-TCP).
pub const ALPN: &[u8] = b"strait/1";
/// The TLS-over-TCP transport's: streams multiplexed by yamux
/// ([`crate::mux`]), which either side opens. Its own name, so an edge
/// that multiplexes otherwise fails at the handshake, saying why.
pub const ALPN_TCP: &[u8] = b"strait-mux/1";

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Each trust domain's roots, as the mesh was configured with them.
#[derive(Clone, PartialEq)]
pub struct MeshRoots {
    pub by_domain: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

impl MeshRoots {
    fn store(&self, domain: &str) -> RootCertStore {
        let mut store = RootCertStore::empty();
        for cert in self.by_domain.get(domain).into_iter().flatten() {
            // Loaded through strait_tls, which already refused unusable roots.
            let _ = store.add(cert.clone());
        }
        store
    }

    fn anchors(&self, domain: &str) -> Result<Vec<TrustAnchor<'static>>, String> {
        self.by_domain
            .get(domain)
            .ok_or_else(|| format!("no trust bundle for '{domain}'"))?
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("trust bundle of '{domain}': {e}"))
            })
            .collect()
    }
}

/// The roots in force, replaced live (a CA rotating its root, a bundle
/// pushed by the control plane): the next handshake on either side uses
/// the new roots; established connections keep going.
pub struct MeshTrust {
    /// The dialing side's anchors per domain.
    anchors: ArcSwap<BTreeMap<String, Vec<TrustAnchor<'static>>>>,
    /// The accepting side's verifier, swapped behind rustls.
    acceptor: Arc<LiveClientVerifier<SpiffeClientVerifier>>,
}

impl MeshTrust {
    pub fn new(roots: &MeshRoots) -> Result<Arc<MeshTrust>, String> {
        let trust = Arc::new(MeshTrust {
            anchors: ArcSwap::from_pointee(BTreeMap::new()),
            acceptor: Arc::new(LiveClientVerifier::new(provider(), true)),
        });
        trust.replace(roots)?;
        Ok(trust)
    }

    /// Trusts `roots` from the next handshake on; on an error nothing
    /// changes.
    pub fn replace(&self, roots: &MeshRoots) -> Result<(), String> {
        let anchors = roots
            .by_domain
            .keys()
            .map(|d| Ok((d.clone(), roots.anchors(d)?)))
            .collect::<Result<BTreeMap<_, _>, String>>()?;
        let domains = roots
            .by_domain
            .keys()
            .map(|d| (d.clone(), roots.store(d)))
            .collect();
        let verifier = SpiffeClientVerifier::new(domains, None, true, provider())?;
        self.acceptor.store(Some(Arc::new(verifier)));
        self.anchors.store(Arc::new(anchors));
        Ok(())
    }
}

/// What the accepting side serves: the edge's certificate, and peers
/// verified per trust domain (a certificate is mandatory).
pub fn server_config(
    credentials: CredentialReceiver,
    trust: &Arc<MeshTrust>,
) -> Result<ServerConfig, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(trust.acceptor.clone())
        .with_cert_resolver(WatchedCertifiedKey::new(credentials));
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// What the dialing side uses for `peer_id`: its certificate must chain to
/// the bundle of `peer_id`'s trust domain and carry exactly that ID.
pub fn client_config(
    credentials: CredentialReceiver,
    trust: &Arc<MeshTrust>,
    peer_id: &str,
) -> Result<ClientConfig, String> {
    let domain = strait_tls::trust_domain_of(peer_id).map_err(|e| e.to_string())?;
    if !trust.anchors.load().contains_key(&domain) {
        return Err(format!(
            "no trust bundle for '{domain}', the domain of {peer_id}"
        ));
    }
    let verifier = PeerVerifier {
        expected: peer_id.to_owned(),
        domain,
        trust: trust.clone(),
        provider: provider(),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(WatchedCertifiedKey::new(credentials));
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Verifies a peer edge's certificate as a SPIFFE X.509-SVID: the chain to
/// the domain's anchors (server-auth usage, validity), then the ID.
struct PeerVerifier {
    expected: String,
    domain: String,
    trust: Arc<MeshTrust>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

fn pki_error(err: webpki::Error) -> rustls::Error {
    let cert = match err {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert)
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let anchors = self.trust.anchors.load();
        let Some(anchors) = anchors.get(&self.domain) else {
            // The domain's bundle was withdrawn: nothing of it is trusted.
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let ids = strait_tls::spiffe_ids(end_entity)?;
        if ids.len() == 1 && ids[0] == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "the peer presented {}, not {}",
            if ids.is_empty() {
                "no SPIFFE ID".to_owned()
            } else {
                ids.join(", ")
            },
            self.expected
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The single SPIFFE ID of the peer's certificate chain (end entity first).
pub fn peer_spiffe_id(chain: Option<&[CertificateDer<'static>]>) -> Option<String> {
    let ids = strait_tls::spiffe_ids(chain?.first()?).ok()?;
    match ids.as_slice() {
        [id] => Some(id.clone()),
        _ => None,
    }
}

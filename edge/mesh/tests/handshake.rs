//! The tunnel handshake over real QUIC endpoints on loopback: a peer is who
//! its SPIFFE ID says, verified against its own trust domain's bundle.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use strait_mesh::tls::{client_config, peer_spiffe_id, server_config, MeshRoots};
use strait_tls::CredentialReceiver;

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// An edge certificate for `id`, signed by `ca`, as a credential channel.
fn edge(ca: &CertifiedIssuer<'static, KeyPair>, id: &str) -> CredentialReceiver {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, ca).unwrap();
    let certified = strait_tls::certified_key(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        Path::new("cert.pem"),
        Path::new("key.pem"),
    )
    .unwrap();
    tokio::sync::watch::channel(Arc::new(certified)).1
}

fn roots(domain: &str, ca: &CertifiedIssuer<'static, KeyPair>) -> MeshRoots {
    MeshRoots {
        by_domain: [(domain.to_owned(), vec![ca.der().clone()])].into(),
    }
}

/// East listening; returns its address and the endpoint.
fn east(credentials: CredentialReceiver, trusts: &MeshRoots) -> (SocketAddr, quinn::Endpoint) {
    let crypto = QuicServerConfig::try_from(server_config(credentials, trusts).unwrap()).unwrap();
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint.local_addr().unwrap(), endpoint)
}

/// West dialing `addr` expecting `peer_id`: the handshake's outcome on both sides.
async fn dial(
    addr: SocketAddr,
    server: &quinn::Endpoint,
    credentials: CredentialReceiver,
    trusts: &MeshRoots,
    peer_id: &str,
) -> (Result<(), String>, Result<Option<String>, String>) {
    let crypto =
        QuicClientConfig::try_from(client_config(credentials, trusts, peer_id).unwrap()).unwrap();
    let client = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let accepting = async {
        let incoming = server.accept().await.unwrap();
        match incoming.await {
            Ok(conn) => {
                let chain = conn
                    .peer_identity()
                    .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok());
                Ok(peer_spiffe_id(chain.as_deref().map(Vec::as_slice)))
            }
            Err(e) => Err(e.to_string()),
        }
    };
    let dialing = async {
        endpoint
            .connect_with(client, addr, "strait-peer")
            .unwrap()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    tokio::join!(dialing, accepting)
}

const EAST: &str = "spiffe://east.example/edge/edge-east";
const WEST: &str = "spiffe://west.example/edge/edge-west";

#[tokio::test]
async fn peers_verify_each_other_by_spiffe_id_per_trust_domain() {
    let (east_ca, west_ca) = (ca("east"), ca("west"));
    let (addr, server) = east(edge(&east_ca, EAST), &roots("west.example", &west_ca));
    let (dialed, accepted) = dial(
        addr,
        &server,
        edge(&west_ca, WEST),
        &roots("east.example", &east_ca),
        EAST,
    )
    .await;
    assert_eq!(dialed, Ok(()));
    assert_eq!(accepted, Ok(Some(WEST.to_owned())));
}

#[tokio::test]
async fn a_peer_with_another_id_of_the_right_ca_is_refused_by_the_dialer() {
    let (east_ca, west_ca) = (ca("east"), ca("west"));
    // East's CA, but not the identity west expects of edge-east.
    let (addr, server) = east(
        edge(&east_ca, "spiffe://east.example/ns/shop/sa/orders"),
        &roots("west.example", &west_ca),
    );
    let (dialed, _) = dial(
        addr,
        &server,
        edge(&west_ca, WEST),
        &roots("east.example", &east_ca),
        EAST,
    )
    .await;
    let err = dialed.unwrap_err();
    assert!(
        err.contains("the peer presented spiffe://east.example/ns/shop/sa/orders, not spiffe://east.example/edge/edge-east"),
        "{err}"
    );
}

#[tokio::test]
async fn a_certificate_claiming_a_domain_whose_bundle_did_not_sign_it_is_refused() {
    let (east_ca, west_ca, rogue_ca) = (ca("east"), ca("west"), ca("rogue"));
    let (addr, server) = east(edge(&east_ca, EAST), &roots("west.example", &west_ca));
    // Signed by another CA, claiming west's identity.
    let (_, accepted) = dial(
        addr,
        &server,
        edge(&rogue_ca, WEST),
        &roots("east.example", &east_ca),
        EAST,
    )
    .await;
    // In TLS 1.3 the client's handshake completes before the server has
    // judged its certificate, so the refusal is the accepting side's.
    let err = accepted.unwrap_err();
    assert!(
        err.contains("spiffe://west.example/edge/edge-west"),
        "{err}"
    );
}

//! The tunnel handshake over real QUIC endpoints on loopback: a peer is who
//! its SPIFFE ID says, verified against its own trust domain's bundle.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::ca;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{CertificateParams, CertifiedIssuer, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use strait_mesh::tls::{client_config, peer_spiffe_id, server_config, MeshRoots, MeshTrust};
use strait_tls::CredentialReceiver;

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

fn roots_of(domain: &str, cas: &[&CertifiedIssuer<'static, KeyPair>]) -> MeshRoots {
    MeshRoots {
        by_domain: [(
            domain.to_owned(),
            cas.iter().map(|ca| ca.der().clone()).collect(),
        )]
        .into(),
    }
}

fn roots(domain: &str, ca: &CertifiedIssuer<'static, KeyPair>) -> Arc<MeshTrust> {
    MeshTrust::new(&roots_of(domain, &[ca])).unwrap()
}

/// East listening; returns its address and the endpoint.
fn east(credentials: CredentialReceiver, trusts: &Arc<MeshTrust>) -> (SocketAddr, quinn::Endpoint) {
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
    trusts: &Arc<MeshTrust>,
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

#[tokio::test]
async fn trust_replaced_live_applies_to_the_next_handshake_on_both_sides() {
    let (east_ca, west_ca) = (ca("east"), ca("west"));
    let (new_east_ca, new_west_ca) = (ca("east-2"), ca("west-2"));
    let east_trust = roots("west.example", &west_ca);
    let west_trust = roots("east.example", &east_ca);
    // East already presents a certificate of its next root; west does not trust it yet.
    let (addr, server) = east(edge(&new_east_ca, EAST), &east_trust);
    let (dialed, _) = dial(addr, &server, edge(&new_west_ca, WEST), &west_trust, EAST).await;
    assert!(dialed.unwrap_err().contains("UnknownIssuer"));

    // Both rotations published: old and new roots, swapped into the running
    // configurations (same server endpoint, same trust objects).
    west_trust
        .replace(&roots_of("east.example", &[&east_ca, &new_east_ca]))
        .unwrap();
    east_trust
        .replace(&roots_of("west.example", &[&west_ca, &new_west_ca]))
        .unwrap();
    let (dialed, accepted) = dial(addr, &server, edge(&new_west_ca, WEST), &west_trust, EAST).await;
    assert_eq!(dialed, Ok(()));
    assert_eq!(accepted, Ok(Some(WEST.to_owned())));

    // The old root withdrawn at east: a west certificate of it is refused.
    east_trust
        .replace(&roots_of("west.example", &[&new_west_ca]))
        .unwrap();
    let (_, accepted) = dial(addr, &server, edge(&west_ca, WEST), &west_trust, EAST).await;
    assert!(accepted.is_err());
}

//! What the mesh's end-to-end tests share: certificates, free ports,
//! peers, metrics and waiting on conditions.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::registry::Registry;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use strait_edge_config::{HostPort, MeshPeer, MeshTransport};
use strait_tls::{BundleSource, TrustBundleSettings};

pub fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf signed by `ca` with `sans`, written to `dir`; returns (cert, key) paths.
pub fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    sans: Vec<SanType>,
    dir: &Path,
    name: &str,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, ca).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

pub fn write_ca(ca: &CertifiedIssuer<'static, KeyPair>, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

pub fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn host_port(addr: SocketAddr) -> HostPort {
    HostPort {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

pub fn peer(name: &str, id: &str, addresses: Vec<HostPort>, export_services: &[&str]) -> MeshPeer {
    MeshPeer {
        name: name.into(),
        addresses,
        spiffe_id: id.into(),
        transport: MeshTransport::Quic,
        may_assert: vec![],
        exports: vec![],
        export_services: export_services.iter().map(|s| s.to_string()).collect(),
    }
}

pub fn bundle(domain: &str, pem: PathBuf) -> TrustBundleSettings {
    TrustBundleSettings {
        trust_domain: domain.into(),
        source: BundleSource::File(pem),
    }
}

/// The value of the metric line starting with `prefix` (labels included), 0 if absent.
pub fn metric(registry: &Registry, prefix: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

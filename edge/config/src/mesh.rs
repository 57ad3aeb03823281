//! `mesh:` (the edge's tunnels to peer edges) and `upstream.remote` (a
//! virtual cluster served here whose brokers are behind a peer edge).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use strait_tls::{BundleSource, ServedCertificate, TrustBundleSettings};

use crate::mesh_services::{MeshForward, MeshService};
use crate::validate::{parse_host_port, parse_socket_addr, Errors};
use crate::HostPort;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMesh {
    /// UDP address peers dial (QUIC).
    pub listen: Option<String>,
    /// TCP address for peers on the TLS-over-TCP fallback.
    pub listen_tcp: Option<String>,
    pub identity: RawMeshIdentity,
    #[serde(default)]
    pub trust_bundles: Vec<RawMeshBundle>,
    #[serde(default)]
    pub peers: Vec<RawMeshPeer>,
    /// TCP services this edge exports to peers (`export_services`).
    #[serde(default)]
    pub services: Vec<crate::mesh_services::RawMeshService>,
    /// Local listeners relayed to a peer's service.
    #[serde(default)]
    pub forwards: Vec<crate::mesh_services::RawMeshForward>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeshIdentity {
    /// `files` (the default: `cert` and `key`) or `svid`.
    pub source: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeshBundle {
    pub trust_domain: String,
    /// A PEM file (re-read at each new peer connection).
    pub pem: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeshPeer {
    pub name: String,
    pub address: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    pub spiffe_id: String,
    pub transport: Option<String>,
    #[serde(default)]
    pub may_assert: Vec<String>,
    #[serde(default)]
    pub exports: Vec<String>,
    /// Our `mesh.services` this peer may reach.
    #[serde(default)]
    pub export_services: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemote {
    pub peer: String,
    pub virtual_cluster: String,
}

/// A validated `mesh:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    pub listen: Option<SocketAddr>,
    pub listen_tcp: Option<SocketAddr>,
    /// What the edge presents to peers, as server and as client.
    pub identity: ServedCertificate,
    /// Roots per trust domain; a peer is verified only against the bundle of
    /// the domain its SPIFFE ID names.
    pub trust_bundles: Vec<TrustBundleSettings>,
    pub peers: Vec<MeshPeer>,
    pub services: Vec<MeshService>,
    pub forwards: Vec<MeshForward>,
}

impl Mesh {
    /// Whether `other` differs from this only in its trust bundles: those
    /// are replaced in a running mesh, while anything else rebuilds it.
    pub fn differs_only_in_trust(&self, other: &Mesh) -> bool {
        let without_trust = |m: &Mesh| Mesh {
            trust_bundles: Vec::new(),
            ..m.clone()
        };
        self.trust_bundles != other.trust_bundles && without_trust(self) == without_trust(other)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshTransport {
    Quic,
    TlsTcp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeshPeer {
    pub name: String,
    /// Where to dial it, tried in turn; empty: it dials us.
    pub addresses: Vec<HostPort>,
    /// The identity its certificate must carry.
    pub spiffe_id: String,
    pub transport: MeshTransport,
    /// Globs of the principals it may forward to us (`anonymous` only if listed).
    pub may_assert: Vec<String>,
    /// Our virtual clusters it may reach.
    pub exports: Vec<String>,
    /// Our `mesh.services` it may reach (none unless listed).
    pub export_services: Vec<String>,
}

/// A virtual cluster whose brokers are behind a peer edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub peer: String,
    pub virtual_cluster: String,
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

pub(crate) fn validate_mesh(raw: &RawMesh, errors: &mut Errors) -> Option<Mesh> {
    let before = errors.0.len();
    let addr = |text: &Option<String>, path: &str, errors: &mut Errors| {
        text.as_ref().and_then(|t| {
            parse_socket_addr(t)
                .map_err(|message| errors.push(path, message))
                .ok()
        })
    };
    let listen = addr(&raw.listen, "mesh.listen", errors);
    let listen_tcp = addr(&raw.listen_tcp, "mesh.listen_tcp", errors);
    let identity = match (
        raw.identity.source.as_deref(),
        &raw.identity.cert,
        &raw.identity.key,
    ) {
        (None | Some("files"), Some(cert), Some(key)) => Some(ServedCertificate::Files {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        }),
        (None | Some("files"), _, _) => {
            errors.push(
                "mesh.identity",
                "cert and key are required (or source: svid)",
            );
            None
        }
        (Some("svid"), None, None) => Some(ServedCertificate::Svid),
        (Some("svid"), _, _) => {
            errors.push(
                "mesh.identity",
                "source: svid presents the edge's own certificate: remove cert and key",
            );
            None
        }
        (Some(other), _, _) => {
            errors.push(
                "mesh.identity.source",
                format!("'{other}' is not one of files, svid"),
            );
            None
        }
    };
    let mut trust_bundles = Vec::new();
    let mut domains = HashSet::new();
    for (i, bundle) in raw.trust_bundles.iter().enumerate() {
        let path = format!("mesh.trust_bundles[{i}]");
        if !strait_tls::is_trust_domain(&bundle.trust_domain) {
            errors.push(
                format!("{path}.trust_domain"),
                format!("'{}' is not a trust domain", bundle.trust_domain),
            );
        } else if !domains.insert(bundle.trust_domain.as_str()) {
            errors.push(
                format!("{path}.trust_domain"),
                format!(
                    "'{}' has a bundle already: concatenate the CAs into one file",
                    bundle.trust_domain
                ),
            );
        }
        if !std::path::Path::new(&bundle.pem).is_file() {
            errors.push(
                format!("{path}.pem"),
                format!("'{}' is not a readable file", bundle.pem),
            );
        }
        trust_bundles.push(TrustBundleSettings {
            trust_domain: bundle.trust_domain.clone(),
            source: BundleSource::File(PathBuf::from(&bundle.pem)),
        });
    }
    let mut peers = Vec::new();
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for (i, peer) in raw.peers.iter().enumerate() {
        let path = format!("mesh.peers[{i}]");
        if !valid_name(&peer.name) {
            errors.push(
                format!("{path}.name"),
                "letters, digits, '-', '_' and '.' only, not empty",
            );
        } else if !names.insert(peer.name.as_str()) {
            errors.push(
                format!("{path}.name"),
                format!("duplicate peer '{}'", peer.name),
            );
        }
        match strait_tls::trust_domain_of(&peer.spiffe_id) {
            Ok(domain) if domains.contains(domain.as_str()) || raw.trust_bundles.is_empty() => {}
            Ok(domain) => errors.push(
                format!("{path}.spiffe_id"),
                format!("no trust bundle for its trust domain '{domain}' in mesh.trust_bundles"),
            ),
            Err(err) => errors.push(format!("{path}.spiffe_id"), err.to_string()),
        }
        if !ids.insert(peer.spiffe_id.as_str()) {
            errors.push(
                format!("{path}.spiffe_id"),
                "another peer has this identity: peers are told apart by it",
            );
        }
        let mut addresses = Vec::new();
        let written: Vec<&String> = peer.address.iter().chain(&peer.addresses).collect();
        if peer.address.is_some() && !peer.addresses.is_empty() {
            errors.push(&path, "use one of address, addresses");
        }
        for (j, a) in written.into_iter().enumerate() {
            match parse_host_port(a) {
                Ok(hp) => addresses.push(hp),
                Err(message) => errors.push(format!("{path}.addresses[{j}]"), message),
            }
        }
        let transport = match peer.transport.as_deref() {
            None | Some("quic") => MeshTransport::Quic,
            Some("tls-tcp") => MeshTransport::TlsTcp,
            Some(other) => {
                errors.push(
                    format!("{path}.transport"),
                    format!("'{other}' is not one of quic, tls-tcp"),
                );
                MeshTransport::Quic
            }
        };
        for (j, glob) in peer.may_assert.iter().enumerate() {
            if let Err(err) = globset::Glob::new(glob) {
                errors.push(format!("{path}.may_assert[{j}]"), err.to_string());
            }
        }
        for (j, export) in peer.exports.iter().enumerate() {
            if !valid_name(export) {
                errors.push(
                    format!("{path}.exports[{j}]"),
                    format!("'{export}' is not a virtual cluster name"),
                );
            }
        }
        peers.push(MeshPeer {
            name: peer.name.clone(),
            addresses,
            spiffe_id: peer.spiffe_id.clone(),
            transport,
            may_assert: peer.may_assert.clone(),
            exports: peer.exports.clone(),
            export_services: crate::mesh_services::validate_exports(raw, i, errors),
        });
    }
    let services = crate::mesh_services::validate_services(raw, errors);
    let forwards = crate::mesh_services::validate_forwards(raw, errors);
    if raw.trust_bundles.is_empty() {
        errors.push(
            "mesh.trust_bundles",
            "at least one trust bundle is required: peers are verified against it",
        );
    }
    // Streams flow both ways on a connection, whichever side dialed it; a
    // peer without an address can only reach us if we listen.
    if peers.iter().any(|p| p.addresses.is_empty()) && listen.is_none() && listen_tcp.is_none() {
        errors.push(
            "mesh.listen",
            "required: a peer without an address dials this edge",
        );
    }
    if errors.0.len() != before {
        return None;
    }
    Some(Mesh {
        listen,
        listen_tcp,
        identity: identity?,
        trust_bundles,
        peers,
        services,
        forwards,
    })
}

/// `upstream.remote` of the virtual cluster at `path`, checked against the
/// mesh's peers.
pub(crate) fn validate_remote(
    raw: &RawRemote,
    mesh: Option<&RawMesh>,
    path: &str,
    errors: &mut Errors,
) -> Remote {
    let known = mesh.is_some_and(|m| m.peers.iter().any(|p| p.name == raw.peer));
    if !known {
        errors.push(
            format!("{path}.peer"),
            format!("'{}' is not a peer in mesh.peers", raw.peer),
        );
    }
    if !valid_name(&raw.virtual_cluster) {
        errors.push(
            format!("{path}.virtual_cluster"),
            format!("'{}' is not a virtual cluster name", raw.virtual_cluster),
        );
    }
    Remote {
        peer: raw.peer.clone(),
        virtual_cluster: raw.virtual_cluster.clone(),
    }
}

#[cfg(test)]
mod tests {
    use crate::{parse, MeshTransport};

    fn errors_of(yaml: &str) -> Vec<String> {
        parse(yaml)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// A west edge serving east's cluster, with `mesh` and the remote
    /// cluster's upstream written by the caller.
    fn west(mesh: &str, upstream: &str) -> String {
        format!(
            "mesh:\n{mesh}\nvirtual_clusters:\n  - name: east-orders\n    bootstrap: 127.0.0.1:29092\n    brokers: {{ advertised_host: 127.0.0.1, port_range: 29100-29199 }}\n    upstream: {upstream}\n"
        )
    }

    fn bundle() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "-----BEGIN CERTIFICATE-----\n").unwrap();
        file
    }

    #[test]
    fn accepts_the_documented_example() {
        let pem = bundle();
        let mesh = format!(
            "  listen: 127.0.0.1:7443\n  identity: {{ cert: w.pem, key: w.key }}\n  trust_bundles: [{{ trust_domain: east.example, pem: \"{}\" }}]\n  peers:\n    - name: edge-east\n      address: 127.0.0.1:7444\n      spiffe_id: spiffe://east.example/edge/edge-east\n      transport: quic\n      may_assert: [\"spiffe://east.example/*\"]\n      exports: [local-orders]",
            pem.path().display()
        );
        let config = parse(&west(
            &mesh,
            "{ remote: { peer: edge-east, virtual_cluster: orders } }",
        ))
        .unwrap();
        let mesh = config.mesh.unwrap();
        assert_eq!(mesh.peers[0].addresses[0].to_string(), "127.0.0.1:7444");
        assert_eq!(mesh.peers[0].transport, MeshTransport::Quic);
        let remote = config.virtual_clusters[0].upstream.remote.as_ref().unwrap();
        assert_eq!(
            (remote.peer.as_str(), remote.virtual_cluster.as_str()),
            ("edge-east", "orders")
        );
        assert!(config.virtual_clusters[0]
            .upstream
            .bootstrap_servers
            .is_empty());
    }

    #[test]
    fn reports_every_mesh_error_with_its_path() {
        let pem = bundle();
        let mesh = format!(
            "  identity: {{ source: svid, cert: w.pem }}\n  trust_bundles: [{{ trust_domain: east.example, pem: \"{}\" }}, {{ trust_domain: East, pem: /nonexistent }}]\n  peers:\n    - {{ name: edge-east, spiffe_id: \"spiffe://north.example/edge/n\", transport: udp, may_assert: [\"a[\"] }}\n    - {{ name: edge-east, address: nohost, spiffe_id: \"spiffe://east.example/edge/e\", exports: [\"no/slash\"] }}",
            pem.path().display()
        );
        let errors = errors_of(&west(
            &mesh,
            "{ bootstrap_servers: [\"h:1\"], remote: { peer: edge-north, virtual_cluster: orders }, sasl: { mechanism: PLAIN, username: u, password_env: HOME } }",
        ));
        let paths: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            paths,
            vec![
                "virtual_clusters[0].upstream.remote.peer",
                "virtual_clusters[0].upstream",
                "mesh.identity",
                "mesh.trust_bundles[1].trust_domain",
                "mesh.trust_bundles[1].pem",
                "mesh.peers[0].spiffe_id",
                "mesh.peers[0].transport",
                "mesh.peers[0].may_assert[0]",
                "mesh.peers[1].name",
                "mesh.peers[1].addresses[0]",
                "mesh.peers[1].exports[0]",
                "mesh.listen",
            ],
            "{errors:#?}"
        );
        assert!(errors[0].contains("'edge-north' is not a peer in mesh.peers"));
        assert!(errors[5].contains("no trust bundle for its trust domain 'north.example'"));
    }

    #[test]
    fn remote_takes_no_upstream_credentials_and_needs_a_mesh() {
        let ca = bundle();
        let errors = errors_of(&format!(
            "virtual_clusters:\n  - name: a\n    bootstrap: 127.0.0.1:19092\n    brokers: {{ advertised_host: h, port_range: 19100-19199 }}\n    upstream: {{ remote: {{ peer: p, virtual_cluster: b }}, tls: {{ ca: \"{}\" }} }}\n",
            ca.path().display()
        ));
        assert_eq!(
            errors,
            vec![
                "virtual_clusters[0].upstream.remote.peer: 'p' is not a peer in mesh.peers",
                "virtual_clusters[0].upstream: remote takes no tls or sasl: the peer edge authenticates to its brokers",
            ]
        );
    }
}

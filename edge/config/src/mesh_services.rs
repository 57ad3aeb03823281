//! `mesh.services` (named TCP services this edge exports to peers),
//! `mesh.forwards` (local listeners relayed to a peer's service) and each
//! peer's `export_services`: raw TCP carried through the tunnels, for
//! traffic that is not Kafka (kms-broker to kms-broker gRPC over its own
//! mTLS, say) between sites that reach each other only through the mesh.

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::Deserialize;

use crate::mesh::{valid_name, RawMesh};
use crate::validate::{parse_host_port, parse_socket_addr, Errors};
use crate::HostPort;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeshService {
    pub name: String,
    /// `host:port` this edge dials for each stream a peer opens to it.
    pub address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeshForward {
    /// Local TCP address; each accepted connection is one tunnel stream.
    pub listen: String,
    pub peer: String,
    /// The service's name at the peer (its `mesh.services[].name`).
    pub service: String,
}

/// A service this edge exports: peers whose `export_services` name it
/// reach `address` through their tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshService {
    pub name: String,
    pub address: HostPort,
}

/// A local listener relayed to `service` at `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshForward {
    pub listen: SocketAddr,
    pub peer: String,
    pub service: String,
}

/// `mesh.services`: names unique and valid, addresses parsed.
pub(crate) fn validate_services(raw: &RawMesh, errors: &mut Errors) -> Vec<MeshService> {
    let mut names = HashSet::new();
    let mut services = Vec::new();
    for (i, service) in raw.services.iter().enumerate() {
        let path = format!("mesh.services[{i}]");
        if !valid_name(&service.name) {
            errors.push(
                format!("{path}.name"),
                "letters, digits, '-', '_' and '.' only, not empty",
            );
        } else if !names.insert(service.name.as_str()) {
            errors.push(
                format!("{path}.name"),
                format!("duplicate service '{}'", service.name),
            );
        }
        match parse_host_port(&service.address) {
            Ok(address) => services.push(MeshService {
                name: service.name.clone(),
                address,
            }),
            Err(message) => errors.push(format!("{path}.address"), message),
        }
    }
    services
}

/// `mesh.peers[i].export_services`: each must be one of `mesh.services`
/// (deny by default: a peer reaches only what is exported to it, and an
/// export of nothing is a mistake worth hearing about).
pub(crate) fn validate_exports(raw: &RawMesh, peer: usize, errors: &mut Errors) -> Vec<String> {
    let defined: HashSet<&str> = raw.services.iter().map(|s| s.name.as_str()).collect();
    let mut seen = HashSet::new();
    for (j, name) in raw.peers[peer].export_services.iter().enumerate() {
        let path = format!("mesh.peers[{peer}].export_services[{j}]");
        if !defined.contains(name.as_str()) {
            errors.push(path, format!("'{name}' is not a service in mesh.services"));
        } else if !seen.insert(name.as_str()) {
            errors.push(path, format!("'{name}' is listed twice"));
        }
    }
    raw.peers[peer].export_services.clone()
}

/// `mesh.forwards`: a known peer, a valid service name, a listen address
/// used once (and not the mesh's own TCP listener).
pub(crate) fn validate_forwards(raw: &RawMesh, errors: &mut Errors) -> Vec<MeshForward> {
    let peers: HashSet<&str> = raw.peers.iter().map(|p| p.name.as_str()).collect();
    let listen_tcp = raw
        .listen_tcp
        .as_deref()
        .and_then(|t| parse_socket_addr(t).ok());
    let mut listens = HashSet::new();
    let mut forwards = Vec::new();
    for (i, forward) in raw.forwards.iter().enumerate() {
        let path = format!("mesh.forwards[{i}]");
        let listen = match parse_socket_addr(&forward.listen) {
            Ok(listen) if Some(listen) == listen_tcp => {
                errors.push(
                    format!("{path}.listen"),
                    format!("{listen} is mesh.listen_tcp"),
                );
                None
            }
            Ok(listen) if !listens.insert(listen) => {
                errors.push(
                    format!("{path}.listen"),
                    format!("another forward listens on {listen}"),
                );
                None
            }
            Ok(listen) => Some(listen),
            Err(message) => {
                errors.push(format!("{path}.listen"), message);
                None
            }
        };
        if !peers.contains(forward.peer.as_str()) {
            errors.push(
                format!("{path}.peer"),
                format!("'{}' is not a peer in mesh.peers", forward.peer),
            );
        }
        if !valid_name(&forward.service) {
            errors.push(
                format!("{path}.service"),
                format!("'{}' is not a service name", forward.service),
            );
        }
        if let Some(listen) = listen {
            forwards.push(MeshForward {
                listen,
                peer: forward.peer.clone(),
                service: forward.service.clone(),
            });
        }
    }
    forwards
}

#[cfg(test)]
mod tests {
    use crate::parse;

    fn bundle() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "-----BEGIN CERTIFICATE-----\n").unwrap();
        file
    }

    /// An edge with `services`, `forwards` and `export_services` (of the
    /// one peer, edge-east) as written by the caller.
    fn config(pem: &tempfile::NamedTempFile, extra: &str, exports: &str) -> String {
        format!(
            "mesh:\n  listen_tcp: 127.0.0.1:7445\n  identity: {{ cert: w.pem, key: w.key }}\n  trust_bundles: [{{ trust_domain: east.example, pem: \"{}\" }}]\n  peers:\n    - {{ name: edge-east, address: \"127.0.0.1:7444\", spiffe_id: \"spiffe://east.example/edge/e\", export_services: {exports} }}\n{extra}virtual_clusters:\n  - name: a\n    bootstrap: 127.0.0.1:19092\n    brokers: {{ advertised_host: h, port_range: 19100-19199 }}\n    upstream: {{ bootstrap_servers: [\"h:1\"] }}\n",
            pem.path().display()
        )
    }

    #[test]
    fn services_forwards_and_exports_are_read() {
        let pem = bundle();
        let mesh = parse(&config(
            &pem,
            "  services: [{ name: kms, address: \"127.0.0.1:7600\" }]\n  forwards: [{ listen: \"127.0.0.1:7601\", peer: edge-east, service: kms-east }]\n",
            "[kms]",
        ))
        .unwrap()
        .mesh
        .unwrap();
        assert_eq!(mesh.services.len(), 1);
        assert_eq!(
            (
                mesh.services[0].name.as_str(),
                mesh.services[0].address.to_string()
            ),
            ("kms", "127.0.0.1:7600".to_owned())
        );
        assert_eq!(
            mesh.forwards,
            vec![super::MeshForward {
                listen: "127.0.0.1:7601".parse().unwrap(),
                peer: "edge-east".into(),
                service: "kms-east".into(),
            }]
        );
        assert_eq!(mesh.peers[0].export_services, vec!["kms".to_owned()]);
    }

    #[test]
    fn every_service_error_is_reported_with_its_path() {
        let pem = bundle();
        let errors: Vec<String> = parse(&config(
            &pem,
            "  services:\n    - { name: kms, address: \"127.0.0.1:7600\" }\n    - { name: kms, address: nohost }\n    - { name: \"a/b\", address: \"127.0.0.1:1\" }\n  forwards:\n    - { listen: \"127.0.0.1:7601\", peer: edge-north, service: kms }\n    - { listen: \"127.0.0.1:7601\", peer: edge-east, service: \"\" }\n    - { listen: \"127.0.0.1:7445\", peer: edge-east, service: kms }\n    - { listen: nowhere, peer: edge-east, service: kms }\n",
            "[kms, vault, kms]",
        ))
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            errors,
            vec![
                "mesh.peers[0].export_services[1]: 'vault' is not a service in mesh.services",
                "mesh.peers[0].export_services[2]: 'kms' is listed twice",
                "mesh.services[1].name: duplicate service 'kms'",
                "mesh.services[1].address: 'nohost' is not HOST:PORT",
                "mesh.services[2].name: letters, digits, '-', '_' and '.' only, not empty",
                "mesh.forwards[0].peer: 'edge-north' is not a peer in mesh.peers",
                "mesh.forwards[1].listen: another forward listens on 127.0.0.1:7601",
                "mesh.forwards[1].service: '' is not a service name",
                "mesh.forwards[2].listen: 127.0.0.1:7445 is mesh.listen_tcp",
                "mesh.forwards[3].listen: 'nowhere' is not a socket address (expected IP:PORT, e.g. 127.0.0.1:19092)",
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn unknown_keys_in_services_and_forwards_are_refused() {
        let pem = bundle();
        for extra in [
            "  services: [{ name: kms, address: \"127.0.0.1:1\", tls: true }]\n",
            "  forwards: [{ listen: \"127.0.0.1:2\", peer: edge-east, service: kms, via: x }]\n",
        ] {
            let err = parse(&config(&pem, extra, "[]")).unwrap_err().to_string();
            assert!(err.contains("unknown field"), "{err}");
        }
    }
}

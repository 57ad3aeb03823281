//! The mesh's resources: which peer edges an edge links to, and what each
//! may do there.

use serde::{Deserialize, Serialize};

use crate::spec::{check_host_port, check_name_ref, Validate};
use crate::ValidationError;

/// `Edge.spec.mesh`: where the edge accepts tunnels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EdgeMeshSpec {
    /// UDP `host:port` for QUIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// TCP `host:port` for the TLS-over-TCP fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_tcp: Option<String>,
    /// TCP services this edge exports to peers (a MeshPeer's
    /// `export_services` names them): `mesh.services` of the edge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<MeshServiceSpec>,
    /// Local listeners relayed to a peer's service: `mesh.forwards`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<MeshForwardSpec>,
}

/// A TCP service an edge exports through its tunnels (e.g. the site's
/// kms-broker, for the other sites' kms-brokers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshServiceSpec {
    pub name: String,
    /// `host:port` the edge dials for each stream.
    pub address: String,
}

/// A local TCP listener whose connections go to `service` at `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshForwardSpec {
    pub listen: String,
    /// A MeshPeer's peer name of this edge.
    pub peer: String,
    /// The service's name at that peer.
    pub service: String,
}

/// `VirtualCluster.spec.remote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    /// A MeshPeer name of the virtual cluster's edge.
    pub peer: String,
    pub virtual_cluster: String,
}

/// One peer of one edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshPeerSpec {
    /// The Edge this peer entry belongs to.
    pub edge: String,
    /// The peer's name as that edge knows it (what its
    /// `VirtualCluster.spec.remote.peer` names); default: the resource name.
    /// Resource names are global, so two edges that peer with the same
    /// edge need two resources, e.g. `west-east` and `north-east`, both with
    /// `peer: edge-east`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// `host:port` to dial, tried in turn; empty: the peer dials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    pub spiffe_id: String,
    /// `quic` (default) or `tls-tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Globs of the principals the peer may forward to this edge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub may_assert: Vec<String>,
    /// Virtual clusters of this edge the peer may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<String>,
    /// Services of this edge (`Edge.spec.mesh.services`) the peer may
    /// reach; none unless listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_services: Vec<String>,
}

impl Validate for EdgeMeshSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        if let Some(l) = &self.listen {
            check_host_port("spec.mesh.listen", l, errs);
        }
        if let Some(l) = &self.listen_tcp {
            check_host_port("spec.mesh.listen_tcp", l, errs);
        }
        let mut names = std::collections::HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let path = format!("spec.mesh.services[{i}]");
            check_name_ref(&format!("{path}.name"), &service.name, errs);
            if !names.insert(service.name.as_str()) {
                errs.push(ValidationError::new(
                    &format!("{path}.name"),
                    format!("duplicate service '{}'", service.name),
                ));
            }
            check_host_port(&format!("{path}.address"), &service.address, errs);
        }
        let mut listens = std::collections::HashSet::new();
        for (i, forward) in self.forwards.iter().enumerate() {
            let path = format!("spec.mesh.forwards[{i}]");
            check_host_port(&format!("{path}.listen"), &forward.listen, errs);
            if !listens.insert(forward.listen.as_str()) {
                errs.push(ValidationError::new(
                    &format!("{path}.listen"),
                    format!("another forward listens on {}", forward.listen),
                ));
            }
            check_name_ref(&format!("{path}.peer"), &forward.peer, errs);
            check_name_ref(&format!("{path}.service"), &forward.service, errs);
        }
    }
}

impl Validate for MeshPeerSpec {
    fn validate(&self, errs: &mut Vec<ValidationError>) {
        check_name_ref("spec.edge", &self.edge, errs);
        if let Some(peer) = &self.peer {
            check_name_ref("spec.peer", peer, errs);
        }
        for (i, a) in self.addresses.iter().enumerate() {
            check_host_port(&format!("spec.addresses[{i}]"), a, errs);
        }
        let id_ok = self
            .spiffe_id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(domain, path)| !domain.is_empty() && !path.is_empty());
        if !id_ok {
            errs.push(ValidationError::new(
                "spec.spiffe_id",
                format!("'{}' is not spiffe://<domain>/<path>", self.spiffe_id),
            ));
        }
        match self.transport.as_deref() {
            None | Some("quic") | Some("tls-tcp") => {}
            Some(other) => errs.push(ValidationError::new(
                "spec.transport",
                format!("'{other}' is not one of quic, tls-tcp"),
            )),
        }
        for (i, g) in self.may_assert.iter().enumerate() {
            if g.trim().is_empty() {
                errs.push(ValidationError::new(
                    &format!("spec.may_assert[{i}]"),
                    "must not be empty",
                ));
            }
        }
        for (i, e) in self.exports.iter().enumerate() {
            check_name_ref(&format!("spec.exports[{i}]"), e, errs);
        }
        for (i, e) in self.export_services.iter().enumerate() {
            check_name_ref(&format!("spec.export_services[{i}]"), e, errs);
        }
    }
}

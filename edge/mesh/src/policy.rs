//! What a peer edge may do here, from `mesh.peers[]`: the principals it
//! may forward, the virtual clusters and services exported to it.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};
use strait_edge_config::{HostPort, MeshPeer, MeshService};

use crate::header::ForwardedPrincipal;

/// What a peer may do here, from `mesh.peers[]`.
pub struct PeerPolicy {
    pub name: Arc<str>,
    pub spiffe_id: String,
    pub addresses: Vec<HostPort>,
    /// Globs of named principals it may forward.
    may_assert: GlobSet,
    /// `anonymous` is listed in `may_assert`.
    may_assert_anonymous: bool,
    pub exports: Vec<String>,
    /// The services exported to it, with the address each is dialed at.
    services: HashMap<String, HostPort>,
}

impl PeerPolicy {
    /// `services`: the edge's `mesh.services`; the peer reaches only those
    /// its `export_services` name (validated to exist).
    pub fn new(peer: &MeshPeer, services: &[MeshService]) -> Result<Self, String> {
        let mut exported = HashMap::new();
        for name in &peer.export_services {
            let service = services
                .iter()
                .find(|s| &s.name == name)
                .ok_or_else(|| format!("export_services: '{name}' is not in mesh.services"))?;
            exported.insert(name.clone(), service.address.clone());
        }
        let mut globs = GlobSetBuilder::new();
        for glob in peer.may_assert.iter().filter(|g| *g != "anonymous") {
            globs.add(Glob::new(glob).map_err(|e| format!("may_assert '{glob}': {e}"))?);
        }
        Ok(PeerPolicy {
            name: peer.name.as_str().into(),
            spiffe_id: peer.spiffe_id.clone(),
            addresses: peer.addresses.clone(),
            may_assert: globs.build().map_err(|e| e.to_string())?,
            may_assert_anonymous: peer.may_assert.iter().any(|g| g == "anonymous"),
            exports: peer.exports.clone(),
            services: exported,
        })
    }

    /// Where the service `name` is dialed, if it is exported to this peer.
    pub fn service(&self, name: &str) -> Option<&HostPort> {
        self.services.get(name)
    }

    /// A peer may always assert its own SPIFFE ID, the one its handshake
    /// proved: those are the peer edge's own connections (its health probes
    /// and replication checks of a failover group member behind this edge).
    pub fn may_assert(&self, principal: &ForwardedPrincipal) -> bool {
        match principal {
            ForwardedPrincipal::Anonymous => self.may_assert_anonymous,
            ForwardedPrincipal::Named(name) if *name == self.spiffe_id => true,
            ForwardedPrincipal::Named(name) => self.may_assert.is_match(name),
        }
    }

    pub fn exports(&self, virtual_cluster: &str) -> bool {
        self.exports.iter().any(|e| e == virtual_cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::PeerPolicy;
    use crate::header::ForwardedPrincipal;
    use strait_edge_config::{MeshPeer, MeshTransport};

    #[test]
    fn a_peer_asserts_its_globs_and_its_own_identity_only() {
        let peer = MeshPeer {
            name: "edge-west".into(),
            addresses: vec![],
            spiffe_id: "spiffe://west.example/edge/edge-west".into(),
            transport: MeshTransport::Quic,
            may_assert: vec!["spiffe://west.example/ns/shop/*".into()],
            exports: vec![],
            export_services: vec![],
        };
        let policy = PeerPolicy::new(&peer, &[]).unwrap();
        let named = |s: &str| ForwardedPrincipal::Named(s.into());
        assert!(policy.may_assert(&named("spiffe://west.example/ns/shop/sa/orders")));
        // Its own connections (probes, replication checks) carry its own ID.
        assert!(policy.may_assert(&named("spiffe://west.example/edge/edge-west")));
        assert!(!policy.may_assert(&named("spiffe://west.example/edge/edge-north")));
        assert!(!policy.may_assert(&named("spiffe://west.example/ns/ops/sa/admin")));
        assert!(!policy.may_assert(&ForwardedPrincipal::Anonymous));
    }
}

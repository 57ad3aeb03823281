//! The control plane's mesh resources in the edge's raw schema: the Edge's
//! `spec.mesh` (listeners, services, forwards) and its MeshPeers (with their
//! `export_services`) become `mesh:`, with the TrustBundles of the peers'
//! trust domains written to files.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use strait_control_client::state::spec::{MeshForwardSpec, MeshServiceSpec};
use strait_control_client::EdgeSnapshot;

use super::write_pem;

/// `mesh:` for this edge, or none when the control plane names no peer and
/// no listener for it. The edge presents its own SVID (it joined with a
/// token): a control-plane mesh has no certificate files to point to.
pub(super) fn mesh_section(
    snapshot: &EdgeSnapshot,
    pem_dir: &Path,
) -> anyhow::Result<Option<Value>> {
    if snapshot.mesh_peers.is_empty() && snapshot.edge_mesh.is_none() {
        return Ok(None);
    }
    let mut domains: BTreeMap<String, String> = BTreeMap::new();
    let mut peers = Vec::new();
    for (name, peer) in &snapshot.mesh_peers {
        let domain = strait_tls::trust_domain_of(&peer.spiffe_id)
            .map_err(|e| anyhow::anyhow!("MeshPeer {name}: spec.spiffe_id: {e}"))?;
        domains.entry(domain).or_default();
        let mut value = json!({
            "name": peer.peer.as_deref().unwrap_or(name),
            "spiffe_id": peer.spiffe_id,
            "addresses": peer.addresses,
            "may_assert": peer.may_assert,
            "exports": peer.exports,
            "export_services": peer.export_services,
        });
        if let Some(transport) = &peer.transport {
            value["transport"] = json!(transport);
        }
        peers.push(value);
    }
    // Several TrustBundles of one domain are concatenated, as during a CA
    // rotation.
    for bundle in snapshot.trust_bundles.values() {
        if let Some(pem) = domains.get_mut(&bundle.trust_domain) {
            pem.push_str(&bundle.pem);
            pem.push('\n');
        }
    }
    let mut trust_bundles = Vec::new();
    for (domain, pem) in &domains {
        if pem.is_empty() {
            anyhow::bail!(
                "MeshPeer: no TrustBundle of trust domain '{domain}', which a peer's SPIFFE ID names"
            );
        }
        let file = write_pem(pem_dir, &format!("mesh-{domain}"), pem)
            .with_context(|| format!("trust bundle of {domain}"))?;
        trust_bundles.push(json!({ "trust_domain": domain, "pem": file }));
    }
    let mut mesh = json!({
        "identity": { "source": "svid" },
        "trust_bundles": trust_bundles,
        "peers": peers,
    });
    if let Some(listeners) = &snapshot.edge_mesh {
        if let Some(listen) = &listeners.listen {
            mesh["listen"] = json!(listen);
        }
        if let Some(listen_tcp) = &listeners.listen_tcp {
            mesh["listen_tcp"] = json!(listen_tcp);
        }
        // Typed spec to the raw schema field by field: a field added to one
        // and not the other fails to compile here instead of being dropped.
        let services: Vec<Value> = listeners
            .services
            .iter()
            .map(|MeshServiceSpec { name, address }| json!({ "name": name, "address": address }))
            .collect();
        let forwards: Vec<Value> = listeners
            .forwards
            .iter()
            .map(
                |MeshForwardSpec {
                     listen,
                     peer,
                     service,
                 }| {
                    json!({ "listen": listen, "peer": peer, "service": service })
                },
            )
            .collect();
        mesh["services"] = json!(services);
        mesh["forwards"] = json!(forwards);
    }
    Ok(Some(mesh))
}

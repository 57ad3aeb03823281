//! Which resources concern one edge: the same selection the edge makes for
//! itself (`strait_control_client::build_snapshot`), enforced by the server
//! so an edge never receives another edge's configuration.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use strait_control_state::spec::{
    AuthorizationPolicySpec, EncryptionPolicySpec, FailoverGroupSpec, MeshPeerSpec,
    VirtualClusterSpec,
};
use strait_control_state::{Kind, Resource};

fn typed<'a, T: DeserializeOwned>(
    all: &'a [&'a Resource],
    kind: Kind,
) -> impl Iterator<Item = (&'a str, T)> + 'a {
    all.iter().filter(move |r| r.kind == kind).filter_map(|r| {
        Some((
            r.name.as_str(),
            serde_json::from_value(r.spec.clone()).ok()?,
        ))
    })
}

/// The names, per kind, that concern one edge. Names, not resources: a
/// KafkaCluster a VirtualCluster of the edge names is in scope before it
/// exists, so its creation needs no recomputation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EdgeScope {
    edge: String,
    virtual_clusters: BTreeSet<String>,
    clusters: BTreeSet<String>,
    failover_groups: BTreeSet<String>,
    authorization_policies: BTreeSet<String>,
    encryption_policies: BTreeSet<String>,
    realms: BTreeSet<String>,
    mesh_peers: BTreeSet<String>,
}

impl EdgeScope {
    pub fn of<'a>(edge: &str, all: impl IntoIterator<Item = &'a Resource>) -> EdgeScope {
        let all: Vec<&Resource> = all.into_iter().collect();
        let mut s = EdgeScope {
            edge: edge.to_string(),
            ..EdgeScope::default()
        };
        let mut followed = BTreeSet::new();
        for (name, v) in typed::<VirtualClusterSpec>(&all, Kind::VirtualCluster) {
            if v.edge == edge {
                s.virtual_clusters.insert(name.to_string());
                if !v.cluster.is_empty() {
                    s.clusters.insert(v.cluster);
                }
                followed.extend(v.failover_group);
            }
        }
        for (name, p) in typed::<MeshPeerSpec>(&all, Kind::MeshPeer) {
            if p.edge == edge {
                s.mesh_peers.insert(name.to_string());
            }
        }
        // A failover group of a cluster the edge uses, or one a virtual
        // cluster follows, brings all its members: the edge must know where
        // to go when the group fails over. A followed group is in scope
        // before it exists, as a named cluster is.
        let used = s.clusters.clone();
        s.failover_groups.extend(followed.iter().cloned());
        for (name, g) in typed::<FailoverGroupSpec>(&all, Kind::FailoverGroup) {
            if followed.contains(name)
                || used.contains(&g.primary)
                || g.standby.iter().any(|c| used.contains(c))
            {
                s.failover_groups.insert(name.to_string());
                s.clusters.insert(g.primary);
                s.clusters.extend(g.standby);
            }
        }
        let vcs = &s.virtual_clusters;
        let applies =
            |targets: &[String]| targets.is_empty() || targets.iter().any(|t| vcs.contains(t));
        let mut eps = BTreeSet::new();
        let mut realms = BTreeSet::new();
        for (name, p) in typed::<EncryptionPolicySpec>(&all, Kind::EncryptionPolicy) {
            if applies(&p.virtual_clusters) {
                eps.insert(name.to_string());
                // The realms a DEK is also wrapped for are the edge's too:
                // it makes those wraps.
                for r in p.rules {
                    realms.insert(r.kms);
                    realms.extend(r.also_wrap_for.into_iter().map(|a| a.kms));
                }
            }
        }
        let mut aps = BTreeSet::new();
        for (name, p) in typed::<AuthorizationPolicySpec>(&all, Kind::AuthorizationPolicy) {
            if applies(&p.virtual_clusters) {
                aps.insert(name.to_string());
            }
        }
        s.encryption_policies = eps;
        s.realms = realms;
        s.authorization_policies = aps;
        s
    }

    pub fn contains(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Edge => name == self.edge,
            Kind::VirtualCluster => self.virtual_clusters.contains(name),
            Kind::KafkaCluster => self.clusters.contains(name),
            Kind::FailoverGroup => self.failover_groups.contains(name),
            Kind::AuthorizationPolicy => self.authorization_policies.contains(name),
            Kind::EncryptionPolicy => self.encryption_policies.contains(name),
            Kind::KmsRealm => self.realms.contains(name),
            // Its own peers only: another edge's peers say what it trusts.
            Kind::MeshPeer => self.mesh_peers.contains(name),
            // Public certificates; an edge may need any of them to verify peers.
            Kind::TrustBundle => true,
            // Every edge enforces every deny list and every shred.
            Kind::DenyList | Kind::KekShred => true,
            Kind::AccessRule
            | Kind::JoinToken
            | Kind::IssuedCertificate
            | Kind::CertificateAuthority
            | Kind::KmsBroker
            | Kind::KmsGrant => false,
        }
    }

    /// Whether a change to a resource of `kind` may change the scope (and
    /// not only whether that one resource is in it).
    pub fn depends_on(kind: Kind) -> bool {
        match kind {
            Kind::VirtualCluster
            | Kind::FailoverGroup
            | Kind::AuthorizationPolicy
            | Kind::EncryptionPolicy
            | Kind::MeshPeer => true,
            Kind::Edge
            | Kind::KafkaCluster
            | Kind::KmsRealm
            | Kind::TrustBundle
            | Kind::AccessRule
            | Kind::DenyList
            | Kind::JoinToken
            | Kind::IssuedCertificate
            | Kind::CertificateAuthority
            | Kind::KmsBroker
            | Kind::KmsGrant
            | Kind::KekShred => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn res(kind: Kind, name: &str, spec: serde_json::Value) -> Resource {
        Resource {
            kind,
            name: name.into(),
            labels: Default::default(),
            spec,
            status: serde_json::Value::Null,
            revision: 1,
            create_revision: 1,
        }
    }

    #[test]
    fn an_edge_sees_its_own_mesh_peers_and_remote_clusters_name_no_kafka_cluster() {
        let peer = |edge: &str| json!({"edge": edge, "spiffe_id": "spiffe://d/edge/x"});
        let all = vec![
            res(Kind::MeshPeer, "e1-x", peer("e1")),
            res(Kind::MeshPeer, "e2-x", peer("e2")),
            res(
                Kind::VirtualCluster,
                "remote",
                json!({"edge": "e1", "remote": {"peer": "x", "virtual_cluster": "orders"},
                       "bootstrap": "127.0.0.1:19092",
                       "brokers": {"advertised_host": "127.0.0.1", "port_range": "19100-19199"}}),
            ),
        ];
        let scope = EdgeScope::of("e1", &all);
        assert!(scope.contains(Kind::MeshPeer, "e1-x"));
        assert!(!scope.contains(Kind::MeshPeer, "e2-x"));
        assert!(scope.contains(Kind::VirtualCluster, "remote"));
        assert!(!scope.contains(Kind::KafkaCluster, ""));
        assert!(EdgeScope::depends_on(Kind::MeshPeer));
    }

    #[test]
    fn an_edge_sees_its_own_things_only() {
        let vc = |edge: &str, cluster: &str| {
            json!({"edge": edge, "cluster": cluster, "bootstrap": "127.0.0.1:19092",
                   "brokers": {"advertised_host": "127.0.0.1", "port_range": "19100-19199"}})
        };
        let all = vec![
            res(Kind::Edge, "e1", json!({})),
            res(Kind::Edge, "e2", json!({})),
            res(Kind::VirtualCluster, "a", vc("e1", "east")),
            res(Kind::VirtualCluster, "b", vc("e2", "west")),
            res(
                Kind::KafkaCluster,
                "east",
                json!({"bootstrap_servers": ["h:1"]}),
            ),
            res(
                Kind::KafkaCluster,
                "west",
                json!({"bootstrap_servers": ["h:2"]}),
            ),
            res(
                Kind::KafkaCluster,
                "east-dr",
                json!({"bootstrap_servers": ["h:3"]}),
            ),
            res(
                Kind::FailoverGroup,
                "fg",
                json!({"primary": "east", "standby": ["east-dr"]}),
            ),
            // A virtual cluster behind a group: the group and every member.
            res(
                Kind::VirtualCluster,
                "c",
                json!({"edge": "e1", "failover_group": "pay", "bootstrap": "127.0.0.1:19292",
                       "brokers": {"advertised_host": "127.0.0.1", "port_range": "19300-19399"}}),
            ),
            res(
                Kind::FailoverGroup,
                "pay",
                json!({"primary": "pay-east", "standby": ["pay-west", "pay-north"]}),
            ),
            res(
                Kind::FailoverGroup,
                "unrelated",
                json!({"primary": "west", "standby": ["west-dr"]}),
            ),
            res(
                Kind::KafkaCluster,
                "pay-east",
                json!({"bootstrap_servers": ["h:4"]}),
            ),
            res(
                Kind::KafkaCluster,
                "pay-west",
                json!({"bootstrap_servers": ["h:5"]}),
            ),
            res(
                Kind::KafkaCluster,
                "pay-north",
                json!({"bootstrap_servers": ["h:6"]}),
            ),
            res(
                Kind::KafkaCluster,
                "west-dr",
                json!({"bootstrap_servers": ["h:7"]}),
            ),
            res(
                Kind::AuthorizationPolicy,
                "all",
                json!({"rules": [{"principal": "*", "allow": ["read"], "topics": ["*"]}]}),
            ),
            res(
                Kind::AuthorizationPolicy,
                "only-b",
                json!({"virtual_clusters": ["b"], "rules": [{"principal": "*", "allow": ["read"], "topics": ["*"]}]}),
            ),
            res(
                Kind::EncryptionPolicy,
                "enc",
                json!({"virtual_clusters": ["a"], "rules": [{"topics": ["*"], "kms": "v", "kek_template": "K",
                    "also_wrap_for": [{"kms": "w", "kek_template": "K"}]}]}),
            ),
            res(Kind::KmsRealm, "v", json!({"provider": "local"})),
            res(Kind::KmsRealm, "w", json!({"provider": "local"})),
            res(Kind::KmsRealm, "other", json!({"provider": "local"})),
            res(
                Kind::TrustBundle,
                "tb",
                json!({"trust_domain": "d", "pem": "-----BEGIN CERTIFICATE-----"}),
            ),
            res(
                Kind::AccessRule,
                "r",
                json!({"identities": ["spiffe://d/**"], "role": "admin"}),
            ),
        ];
        let keys = |edge: &str| -> Vec<String> {
            let scope = EdgeScope::of(edge, &all);
            let mut v: Vec<(Kind, &str)> = all
                .iter()
                .filter(|r| scope.contains(r.kind, &r.name))
                .map(|r| (r.kind, r.name.as_str()))
                .collect();
            v.sort();
            v.into_iter().map(|(k, n)| format!("{k}/{n}")).collect()
        };
        let got = keys("e1");
        assert_eq!(
            got,
            vec![
                "KafkaCluster/east",
                "KafkaCluster/east-dr",
                "KafkaCluster/pay-east",
                "KafkaCluster/pay-north",
                "KafkaCluster/pay-west",
                "Edge/e1",
                "VirtualCluster/a",
                "VirtualCluster/c",
                "AuthorizationPolicy/all",
                "EncryptionPolicy/enc",
                "KmsRealm/v",
                "KmsRealm/w",
                "TrustBundle/tb",
                "FailoverGroup/fg",
                "FailoverGroup/pay",
            ]
        );
        // e2 uses west: its group comes with it, not pay's.
        assert!(keys("e2").contains(&"FailoverGroup/unrelated".to_string()));
        assert!(keys("e2").contains(&"KafkaCluster/west-dr".to_string()));
        assert!(!keys("e2").contains(&"FailoverGroup/pay".to_string()));
        // A followed group is in scope before it exists.
        let before: Vec<Resource> = all
            .iter()
            .filter(|r| r.kind != Kind::FailoverGroup)
            .cloned()
            .collect();
        assert!(EdgeScope::of("e1", &before).contains(Kind::FailoverGroup, "pay"));
        assert_eq!(
            keys("e3"),
            vec!["AuthorizationPolicy/all", "TrustBundle/tb"]
        );
        // A cluster named by the edge's VirtualCluster is in scope before it exists.
        assert!(EdgeScope::of("e1", &all).contains(Kind::KafkaCluster, "east"));
        assert!(!EdgeScope::of("e2", &all).contains(Kind::VirtualCluster, "a"));
    }
}

//! Configuration from the control plane.
//!
//! A control-plane snapshot is translated into the same raw configuration a
//! file holds, merged with the file (the file's virtual clusters and settings
//! come first), and validated by the same code, so a bad resource is reported
//! with a path just like a bad file. Trust bundles arrive as PEM text; they
//! are written under the cache directory and referred to by path. SASL
//! credentials arrive only as references (a file path or an environment
//! variable name on this host), which the edge's validation then reads.
//!
//! Translation fails closed: a VirtualCluster with `tls` and no client trust
//! bundle, or naming an unknown one, is an error (the edge keeps its last good
//! configuration and reports why in its status); a TrustBundle becomes an
//! entry bound to its `trust_domain`; an AuthorizationPolicy with no rule left
//! denies everything; DenyLists become `deny_identities`. A VirtualCluster
//! behind a FailoverGroup gets the upstream of the group's active cluster
//! and `upstream.failover`; an unknown group or active cluster is an error.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Map, Value};
use strait_control_client::state::spec::{KmsProvider, Operation, UpstreamSasl};
use strait_control_client::EdgeSnapshot;
use strait_edge_config::Config;

mod failover;
mod mesh;

pub use failover::applied_failover;

/// Builds the edge configuration from the file (if any) and the latest
/// snapshot (if any).
/// `controlled`: clusters may come later from the control plane, so an empty
/// configuration is valid.
pub fn compose(
    file_text: Option<&str>,
    snapshot: Option<&EdgeSnapshot>,
    controlled: bool,
    cache_dir: &Path,
) -> anyhow::Result<Config> {
    let mut root: Value = match file_text {
        Some(text) => serde_yaml_ng::from_str(text).context("configuration file is not YAML")?,
        None => json!({}),
    };
    if root.is_null() {
        root = json!({});
    }
    let object = root
        .as_object_mut()
        .context("configuration file must be a mapping")?;
    if let Some(snapshot) = snapshot {
        // A mesh written in the file stays the file's.
        if !object.contains_key("mesh") {
            if let Some(mesh) = mesh::mesh_section(snapshot, &cache_dir.join("pem"))? {
                object.insert("mesh".into(), mesh);
            }
        }
        let (clusters, kms) = translate(snapshot, cache_dir)?;
        append(object, "virtual_clusters", clusters);
        append(object, "kms", kms);
        let denied = snapshot
            .deny_lists
            .values()
            .flat_map(|list| list.spiffe_ids.iter().map(|id| json!(id)))
            .collect();
        append(object, "deny_identities", denied);
        append(
            object,
            "health_probes",
            failover::health_probes(snapshot, &cache_dir.join("pem")),
        );
    }
    let text = serde_json::to_string(&root)?;
    let raw = strait_edge_config::parse_raw(&text).map_err(|errors| anyhow::anyhow!("{errors}"))?;
    strait_edge_config::validate_with(&raw, controlled)
        .map_err(|errors| anyhow::anyhow!("{errors}"))
}

fn append(object: &mut Map<String, Value>, key: &str, items: Vec<Value>) {
    let entry = object
        .entry(key.to_owned())
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(existing) = entry {
        existing.extend(items);
    }
}

/// The snapshot's virtual clusters and KMS entries, in the edge's raw schema.
fn translate(
    snapshot: &EdgeSnapshot,
    cache_dir: &Path,
) -> anyhow::Result<(Vec<Value>, Vec<Value>)> {
    let pem_dir = cache_dir.join("pem");
    let mut clusters = Vec::new();
    let mut realms_used = std::collections::BTreeSet::new();
    for (name, vc) in &snapshot.virtual_clusters {
        if let Some(remote) = &vc.remote {
            let mut cluster = json!({
                "name": name,
                "bootstrap": vc.bootstrap,
                "brokers": { "advertised_host": vc.brokers.advertised_host, "port_range": vc.brokers.port_range },
                "upstream": { "remote": { "peer": remote.peer, "virtual_cluster": remote.virtual_cluster } },
            });
            listener_and_policies(snapshot, name, vc, &mut cluster, &pem_dir, &mut realms_used)?;
            clusters.push(cluster);
            continue;
        }
        let upstream = match &vc.failover_group {
            Some(group) => {
                let (active, state) = failover::active_cluster(snapshot, name, vc, group)?;
                // A member behind a peer edge is reached through the tunnel;
                // the swap between the two kinds is in place.
                let mut upstream = match vc.remote_members.get(active) {
                    Some(remote) => json!({ "remote": {
                        "peer": remote.peer, "virtual_cluster": remote.virtual_cluster } }),
                    None => kafka_upstream(snapshot, name, active, &pem_dir)?,
                };
                upstream["failover"] = state;
                upstream
            }
            None => kafka_upstream(snapshot, name, &vc.cluster, &pem_dir)?,
        };
        let mut cluster = json!({
            "name": name,
            "bootstrap": vc.bootstrap,
            "brokers": { "advertised_host": vc.brokers.advertised_host, "port_range": vc.brokers.port_range },
            "upstream": upstream,
        });
        listener_and_policies(snapshot, name, vc, &mut cluster, &pem_dir, &mut realms_used)?;
        clusters.push(cluster);
    }

    let mut kms = Vec::new();
    for name in realms_used {
        let realm = snapshot
            .kms_realms
            .get(&name)
            .with_context(|| format!("KmsRealm '{name}' is not known"))?;
        let entry = match realm.provider {
            KmsProvider::Vault => {
                let mut vault = json!({ "addresses": realm.endpoints });
                if let Some(token_env) = &realm.credentials_ref {
                    vault["token_env"] = json!(token_env);
                }
                if let Some(mount) = &realm.vault_mount {
                    vault["mount"] = json!(mount);
                }
                json!({ "name": name, "vault": vault })
            }
            KmsProvider::Aws => json!({
                "name": name,
                "aws_kms": { "endpoints": realm.endpoints, "region": realm.region.clone().unwrap_or_default() },
            }),
            KmsProvider::Local => json!({
                "name": name,
                "local": { "path": realm.credentials_ref.clone().or_else(|| realm.endpoints.first().cloned()).unwrap_or_default() },
            }),
            // The edge presents its SVID and verifies the broker against its
            // trust domain's bundle as a kms-broker identity: nothing on the
            // edge host to configure. An edge without an SVID (it did not
            // join with a token) refuses this config and keeps its last one.
            KmsProvider::Broker => {
                let mut broker = json!({ "endpoints": realm.endpoints, "identity": "svid" });
                if let Some(backend) = &realm.backend {
                    broker["backend"] = json!(backend);
                }
                // A broker reached through a mesh forward has a local
                // address: its certificate is verified against this name.
                if let Some(server_name) = &realm.server_name {
                    broker["server_name"] = json!(server_name);
                }
                json!({ "name": name, "broker": broker })
            }
        };
        kms.push(entry);
    }
    Ok((clusters, kms))
}

/// `upstream` of a virtual cluster served from KafkaCluster `cluster`:
/// its bootstrap servers, TLS (the CA written to a file) and SASL references.
fn kafka_upstream(
    snapshot: &EdgeSnapshot,
    name: &str,
    cluster: &str,
    pem_dir: &Path,
) -> anyhow::Result<Value> {
    let kafka = snapshot
        .kafka_clusters
        .get(cluster)
        .with_context(|| format!("VirtualCluster {name}: KafkaCluster '{cluster}' is not known"))?;
    let mut upstream = json!({ "bootstrap_servers": kafka.bootstrap_servers });
    if let Some(tls) = &kafka.tls {
        let ca_pem = match (&tls.trust_bundle, &tls.ca_pem) {
            (Some(bundle), _) => snapshot
                .trust_bundles
                .get(bundle)
                .map(|b| b.pem.clone())
                .with_context(|| {
                    format!(
                        "KafkaCluster {}: TrustBundle '{bundle}' is not known",
                        cluster
                    )
                })?,
            (None, Some(pem)) => pem.clone(),
            (None, None) => {
                anyhow::bail!("KafkaCluster {}: tls needs trust_bundle or ca_pem", cluster)
            }
        };
        let ca = write_pem(pem_dir, &format!("upstream-{cluster}"), &ca_pem)?;
        let mut tls_value = json!({ "ca": ca });
        if let Some(identity) = &tls.identity {
            tls_value["identity"] = json!(identity);
        }
        if let (Some(cert), Some(key)) = (&tls.client_cert_file, &tls.client_key_file) {
            tls_value["cert"] = json!(cert);
            tls_value["key"] = json!(key);
        }
        if let Some(server_name) = &tls.server_name {
            tls_value["server_name"] = json!(server_name);
        }
        upstream["tls"] = tls_value;
    }
    if let Some(sasl) = &kafka.sasl {
        upstream["sasl"] = sasl_value(sasl);
    }
    Ok(upstream)
}

/// What a virtual cluster gets whatever its upstream: its client-facing TLS
/// and the authorization and encryption policies that apply to it.
fn listener_and_policies(
    snapshot: &EdgeSnapshot,
    name: &str,
    vc: &strait_control_client::state::spec::VirtualClusterSpec,
    cluster: &mut Value,
    pem_dir: &Path,
    realms_used: &mut std::collections::BTreeSet<String>,
) -> anyhow::Result<()> {
    if let Some(tls) = &vc.tls {
        cluster["tls"] = json!({
            "client_auth": "required",
            "client_trust_bundles": client_trust_bundles(snapshot, name, &tls.client_trust_bundles, pem_dir)?,
        });
        if tls.identity.as_deref() == Some("svid") {
            cluster["tls"]["identity"] = json!("svid");
        } else {
            cluster["tls"]["cert"] = json!(tls.cert_file);
            cluster["tls"]["key"] = json!(tls.key_file);
        }
    }

    let applies = |targets: &[String]| targets.is_empty() || targets.iter().any(|t| t == name);
    let mut rules = Vec::new();
    // Fail closed: a policy that applies installs authorization even with
    // no rule left, which then denies everything.
    let mut authorized = false;
    for policy in snapshot.authorization_policies.values() {
        if !applies(&policy.virtual_clusters) {
            continue;
        }
        authorized = true;
        for rule in &policy.rules {
            let allow: Vec<&str> = rule.allow.iter().map(|op| operation_name(*op)).collect();
            let mut base = json!({ "principal": rule.principal, "allow": allow });
            if let Some(t) = &rule.not_before {
                base["not_before"] = json!(t);
            }
            if let Some(t) = &rule.not_after {
                base["not_after"] = json!(t);
            }
            for topic in &rule.topics {
                let mut r = base.clone();
                r["topic"] = json!(topic);
                rules.push(r);
            }
            for group in &rule.groups {
                let mut r = base.clone();
                r["group"] = json!(group);
                rules.push(r);
            }
        }
    }
    if authorized {
        cluster["authorization"] = json!({ "rules": rules });
    }

    let mut encryption_rules = Vec::new();
    let mut reject = false;
    let mut keys_topic: Option<Value> = None;
    let template = |t: &str| t.replace("$(topicName)", "$(topic)");
    for policy in snapshot.encryption_policies.values() {
        if !applies(&policy.virtual_clusters) {
            continue;
        }
        reject |= matches!(
            policy.unresolved_key_policy,
            strait_control_client::state::spec::UnresolvedKeyPolicy::Reject
        );
        if let Some(k) = &policy.keys_topic {
            let mut v = json!({});
            if let Some(name) = &k.name {
                v["name"] = json!(name);
            }
            if !k.also_read.is_empty() {
                v["also_read"] = json!(k.also_read);
            }
            keys_topic = Some(v);
        }
        for rule in &policy.rules {
            realms_used.insert(rule.kms.clone());
            let also: Vec<Value> = rule
                .also_wrap_for
                .iter()
                .map(|a| {
                    realms_used.insert(a.kms.clone());
                    json!({ "kms": a.kms, "kek": template(&a.kek_template) })
                })
                .collect();
            for topic in &rule.topics {
                let mut r = json!({
                    "topic": topic,
                    "kms": rule.kms,
                    "kek": template(&rule.kek_template),
                });
                if !also.is_empty() {
                    r["also_wrap_for"] = json!(also);
                }
                encryption_rules.push(r);
            }
        }
    }
    if !encryption_rules.is_empty() {
        let mut encryption = json!({
            "rules": encryption_rules,
            "on_missing_key": if reject { "reject" } else { "passthrough" },
        });
        if let Some(k) = keys_topic {
            encryption["keys_topic"] = k;
        }
        // Every shred, whatever its realms: the edge refuses the KEK name
        // both ways and its encryption core restarts with empty caches.
        let shredded: std::collections::BTreeSet<&str> = snapshot
            .kek_shreds
            .values()
            .map(|s| s.kek.as_str())
            .collect();
        if !shredded.is_empty() {
            encryption["shredded_keks"] = json!(shredded);
        }
        cluster["encryption"] = encryption;
    }
    Ok(())
}

/// A virtual cluster's `tls.client_trust_bundles`: one entry per trust
/// domain, each bound to the TrustBundles of that domain (several are
/// concatenated, as during a CA rotation). The PEM goes to a file so that a
/// rotated bundle reaches new handshakes through the file watcher without
/// restarting the cluster.
fn client_trust_bundles(
    snapshot: &EdgeSnapshot,
    virtual_cluster: &str,
    names: &[String],
    pem_dir: &Path,
) -> anyhow::Result<Vec<Value>> {
    if names.is_empty() {
        anyhow::bail!(
            "VirtualCluster {virtual_cluster}: tls.client_trust_bundles is empty; a virtual cluster with tls must verify client certificates"
        );
    }
    let mut by_domain: std::collections::BTreeMap<&str, String> = Default::default();
    for bundle_name in names {
        let trust = snapshot.trust_bundles.get(bundle_name).with_context(|| {
            format!("VirtualCluster {virtual_cluster}: TrustBundle '{bundle_name}' is not known")
        })?;
        let pem = by_domain.entry(trust.trust_domain.as_str()).or_default();
        pem.push_str(&trust.pem);
        pem.push('\n');
    }
    by_domain
        .into_iter()
        .map(|(domain, pem)| {
            let file = write_pem(
                pem_dir,
                &format!("clients-{virtual_cluster}-{domain}"),
                &pem,
            )?;
            Ok(json!({ "trust_domain": domain, "pem_file": file }))
        })
        .collect()
}

/// A KafkaCluster's `sasl` as the edge's `upstream.sasl`.
fn sasl_value(sasl: &UpstreamSasl) -> Value {
    let mut value = json!({ "mechanism": sasl.mechanism.as_str() });
    for (field, source) in [
        ("username", &sasl.username),
        ("username_file", &sasl.username_file),
        ("username_env", &sasl.username_env),
        ("password_file", &sasl.password_file),
        ("password_env", &sasl.password_env),
    ] {
        if let Some(source) = source {
            value[field] = json!(source);
        }
    }
    value
}

fn operation_name(op: Operation) -> &'static str {
    match op {
        Operation::Read => "Read",
        Operation::Write => "Write",
        Operation::Create => "Create",
        Operation::Delete => "Delete",
        Operation::Alter => "Alter",
        Operation::Describe => "Describe",
        Operation::DescribeConfigs => "DescribeConfigs",
        Operation::AlterConfigs => "AlterConfigs",
        Operation::ClusterAction => "ClusterAction",
        Operation::IdempotentWrite => "IdempotentWrite",
        Operation::All => "All",
    }
}

/// Writes PEM text to a file named after its use, only when it changed, so
/// the TLS watchers see a change exactly when there is one.
fn write_pem(dir: &Path, name: &str, pem: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{name}.pem"));
    if std::fs::read_to_string(&path).ok().as_deref() != Some(pem) {
        let tmp = dir.join(format!(".{name}.pem.tmp"));
        std::fs::write(&tmp, pem)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use strait_control_client::state::spec::{
        AuthorizationPolicySpec, BrokerAddressing, DenyListSpec, EncryptionPolicySpec,
        EncryptionRule, KafkaClusterSpec, KmsProvider, KmsRealmSpec, ListenerTls, SaslMechanism,
        TrustBundleSpec, UpstreamSasl, VirtualClusterSpec,
    };
    use strait_control_client::{EdgeSnapshot, SnapshotSource};

    use super::compose;

    fn snapshot(sasl: UpstreamSasl) -> EdgeSnapshot {
        EdgeSnapshot {
            edge: "edge-east".into(),
            revision: 7,
            source: SnapshotSource::ControlPlane,
            virtual_clusters: BTreeMap::from([(
                "orders".to_owned(),
                VirtualClusterSpec {
                    edge: "edge-east".into(),
                    cluster: "kafka-east".into(),
                    bootstrap: "127.0.0.1:19092".into(),
                    brokers: BrokerAddressing {
                        advertised_host: "127.0.0.1".into(),
                        port_range: "19100-19199".into(),
                    },
                    tls: None,
                    remote: None,
                    failover_group: None,
                    remote_members: Default::default(),
                },
            )]),
            kafka_clusters: BTreeMap::from([(
                "kafka-east".to_owned(),
                KafkaClusterSpec {
                    bootstrap_servers: vec!["127.0.0.1:9092".into()],
                    tls: None,
                    sasl: Some(sasl),
                },
            )]),
            authorization_policies: BTreeMap::new(),
            encryption_policies: BTreeMap::new(),
            kms_realms: BTreeMap::new(),
            trust_bundles: BTreeMap::new(),
            deny_lists: BTreeMap::new(),
            mesh_peers: BTreeMap::new(),
            edge_mesh: None,
            kek_shreds: BTreeMap::new(),
            failover_groups: BTreeMap::new(),
        }
    }

    #[test]
    fn kafka_cluster_sasl_becomes_upstream_sasl_read_on_this_host() {
        let dir = std::env::temp_dir().join(format!("strait-control-sasl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let password = dir.join("kafka-password");
        std::fs::write(&password, "edge-secret\n").unwrap();
        let sasl = UpstreamSasl {
            mechanism: SaslMechanism::ScramSha512,
            username: Some("edge".into()),
            username_file: None,
            username_env: None,
            password_file: Some(password.display().to_string()),
            password_env: None,
        };
        let config = compose(None, Some(&snapshot(sasl.clone())), true, &dir).unwrap();
        let upstream = &config.virtual_clusters[0].upstream;
        let got = upstream.sasl.as_ref().unwrap();
        assert_eq!(
            got.mechanism,
            strait_edge_config::SaslMechanism::ScramSha512
        );
        assert_eq!(got.username, "edge");
        assert_eq!(got.password.expose(), "edge-secret");

        // A reference that does not resolve on this host is reported with its path.
        std::fs::remove_file(&password).unwrap();
        let err = compose(None, Some(&snapshot(sasl)), true, &dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("virtual_clusters[0].upstream.sasl.password_file: cannot read"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// `group`, failed over from kafka-east to kafka-west at `generation`,
    /// as the snapshot's orders-dr.
    fn failed_over_to_west(
        snap: &mut EdgeSnapshot,
        group: &mut strait_control_client::FollowedGroup,
        generation: u64,
    ) {
        group.status = Some(
            serde_json::from_value(serde_json::json!({
                "active": "kafka-west", "generation": generation, "previous": "kafka-east",
                "by": "spiffe://east.example/admin/ops", "at_unix_ms": 1
            }))
            .unwrap(),
        );
        snap.failover_groups
            .insert("orders-dr".into(), group.clone());
    }

    fn plain_snapshot() -> EdgeSnapshot {
        let mut snap = snapshot(UpstreamSasl {
            mechanism: SaslMechanism::Plain,
            username: Some("edge".into()),
            username_file: None,
            username_env: Some("HOME".into()),
            password_file: None,
            password_env: Some("HOME".into()),
        });
        snap.kafka_clusters.get_mut("kafka-east").unwrap().sasl = None;
        snap
    }

    fn ca(dir: &std::path::Path, name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        (rcgen::Issuer::new(params, key), cert.pem())
    }

    fn with_tls(snap: &mut EdgeSnapshot, dir: &std::path::Path, bundles: &[&str]) {
        let (issuer, _) = ca(dir, "server-ca");
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        snap.virtual_clusters.get_mut("orders").unwrap().tls = Some(ListenerTls {
            identity: None,
            cert_file: dir.join("server.pem").display().to_string(),
            key_file: dir.join("server.key").display().to_string(),
            client_trust_bundles: bundles.iter().map(|b| b.to_string()).collect(),
        });
    }

    #[test]
    fn virtual_cluster_tls_without_client_trust_bundle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        with_tls(&mut snap, dir.path(), &[]);
        let err = compose(None, Some(&snap), true, dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(
                "VirtualCluster orders: tls.client_trust_bundles is empty; a virtual cluster with tls must verify client certificates"
            ),
            "{err}"
        );
        with_tls(&mut snap, dir.path(), &["missing"]);
        let err = compose(None, Some(&snap), true, dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("VirtualCluster orders: TrustBundle 'missing' is not known"),
            "{err}"
        );
    }

    #[test]
    fn trust_bundles_are_bound_to_their_trust_domains() {
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        let (_, east_old) = ca(dir.path(), "east-old");
        let (_, east_new) = ca(dir.path(), "east-new");
        let (_, partner) = ca(dir.path(), "partner");
        for (name, domain, pem) in [
            ("east-old", "east.example", &east_old),
            ("east-new", "east.example", &east_new),
            ("partner", "partner.example", &partner),
        ] {
            snap.trust_bundles.insert(
                name.into(),
                TrustBundleSpec {
                    trust_domain: domain.into(),
                    pem: pem.clone(),
                },
            );
        }
        with_tls(&mut snap, dir.path(), &["east-old", "east-new", "partner"]);
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let tls = config.virtual_clusters[0].tls.as_ref().unwrap();
        assert_eq!(tls.server.client_auth, strait_tls::ClientAuth::Required);
        assert_eq!(tls.server.client_ca, None);
        let bundles: Vec<(&str, String)> = tls
            .server
            .client_trust_bundles
            .iter()
            .map(|b| {
                let strait_tls::BundleSource::File(path) = &b.source else {
                    panic!("bundles are written to files")
                };
                (
                    b.trust_domain.as_str(),
                    std::fs::read_to_string(path).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            bundles,
            vec![
                ("east.example", format!("{east_old}\n{east_new}\n")),
                ("partner.example", format!("{partner}\n")),
            ]
        );
    }

    #[test]
    fn emptied_authorization_policy_denies_and_no_policy_means_no_authorization() {
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        assert_eq!(config.virtual_clusters[0].authorization, None);

        snap.authorization_policies.insert(
            "orders".into(),
            AuthorizationPolicySpec {
                virtual_clusters: vec!["orders".into()],
                rules: vec![],
            },
        );
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let authorization = config.virtual_clusters[0].authorization.as_ref().unwrap();
        assert_eq!(authorization.mode, strait_authz::AuthorizationMode::Rules);
        assert!(authorization.rules.is_empty());
    }

    #[test]
    fn encryption_policy_without_unresolved_key_policy_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring");
        let mut snap = plain_snapshot();
        snap.kms_realms.insert(
            "dev".into(),
            KmsRealmSpec {
                provider: KmsProvider::Local,
                endpoints: vec![],
                credentials_ref: Some(keyring.display().to_string()),
                region: None,
                vault_mount: None,
                backend: None,
                site: None,
                server_name: None,
            },
        );
        let policy: EncryptionPolicySpec = serde_json::from_value(serde_json::json!({
            "rules": [{"topics": ["payments-*"], "kms": "dev", "kek_template": "KEK-$(topicName)"}]
        }))
        .unwrap();
        assert_eq!(
            policy.rules,
            vec![EncryptionRule {
                topics: vec!["payments-*".into()],
                kms: "dev".into(),
                kek_template: "KEK-$(topicName)".into(),
                also_wrap_for: vec![],
            }]
        );
        snap.encryption_policies.insert("payments".into(), policy);
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let encryption = config.virtual_clusters[0].encryption.as_ref().unwrap();
        assert_eq!(
            serde_json::to_value(encryption).unwrap()["on_missing_key"],
            "reject"
        );
    }

    #[test]
    fn federation_keys_and_shreds_reach_the_edges_encryption_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        for name in ["vault-east", "aws-west"] {
            snap.kms_realms.insert(
                name.into(),
                KmsRealmSpec {
                    provider: KmsProvider::Local,
                    endpoints: vec![],
                    credentials_ref: Some(dir.path().join(name).display().to_string()),
                    region: None,
                    vault_mount: None,
                    backend: None,
                    site: Some(name.split('-').nth(1).unwrap().into()),
                    server_name: None,
                },
            );
        }
        let policy: EncryptionPolicySpec = serde_json::from_value(serde_json::json!({
            "rules": [{"topics": ["secret-*"], "kms": "vault-east", "kek_template": "kek-$(topicName)",
                       "also_wrap_for": [{"kms": "aws-west", "kek_template": "alias/kek-$(topicName)"}]}],
            "keys_topic": {"also_read": ["west.strait.keys"]}
        }))
        .unwrap();
        snap.encryption_policies.insert("secrets".into(), policy);
        snap.kek_shreds.insert(
            "kek-secret-old".into(),
            serde_json::from_value(
                serde_json::json!({"kek": "kek-secret-old", "reason": "breach"}),
            )
            .unwrap(),
        );
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let encryption = config.virtual_clusters[0].encryption.as_ref().unwrap();
        let rule = &encryption.rules[0];
        assert_eq!(rule.kms, "vault-east");
        assert_eq!(rule.kek, "kek-$(topic)");
        assert_eq!(rule.also_wrap_for.len(), 1);
        assert_eq!(rule.also_wrap_for[0].kms, "aws-west");
        assert_eq!(rule.also_wrap_for[0].kek, "alias/kek-$(topic)");
        let keys = encryption.keys_topic.as_ref().unwrap();
        assert_eq!(keys.name, "strait.keys");
        assert_eq!(keys.also_read, vec!["west.strait.keys".to_string()]);
        assert_eq!(encryption.shredded_keks, vec!["kek-secret-old".to_string()]);
        let names: Vec<&str> = config.kms.iter().map(|k| k.name.as_str()).collect();
        assert!(
            names.contains(&"vault-east") && names.contains(&"aws-west"),
            "{names:?}"
        );
    }

    #[test]
    fn a_virtual_cluster_behind_a_failover_group_is_served_from_its_active_cluster() {
        use strait_control_client::state::spec::{AppliedFailover, UpstreamTls};
        use strait_control_client::FollowedGroup;
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        let (_, west_ca) = ca(dir.path(), "west-ca");
        snap.kafka_clusters.insert(
            "kafka-west".into(),
            KafkaClusterSpec {
                bootstrap_servers: vec!["10.0.1.1:9093".into(), "10.0.1.2:9093".into()],
                tls: Some(UpstreamTls {
                    ca_pem: Some(west_ca.clone()),
                    server_name: Some("kafka.west".into()),
                    ..UpstreamTls::default()
                }),
                sasl: Some(UpstreamSasl {
                    mechanism: SaslMechanism::ScramSha256,
                    username: Some("edge".into()),
                    username_file: None,
                    username_env: None,
                    password_file: None,
                    password_env: Some("HOME".into()),
                }),
            },
        );
        let vc = snap.virtual_clusters.get_mut("orders").unwrap();
        vc.cluster = String::new();
        vc.failover_group = Some("orders-dr".into());
        // The group is not known yet: fail closed, naming it.
        let err = compose(None, Some(&snap), true, dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VirtualCluster orders: FailoverGroup 'orders-dr' is not known"
        );
        let mut group = FollowedGroup {
            spec: serde_json::from_value(serde_json::json!({
                "primary": "kafka-east", "standby": ["kafka-west"]
            }))
            .unwrap(),
            status: None,
        };
        snap.failover_groups
            .insert("orders-dr".into(), group.clone());
        // Before any failover: the primary, at generation 0.
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let upstream = &config.virtual_clusters[0].upstream;
        assert_eq!(upstream.bootstrap_servers[0].to_string(), "127.0.0.1:9092");
        assert_eq!(upstream.tls, None);
        assert_eq!(
            upstream.failover,
            Some(strait_edge_config::FailoverState {
                group: "orders-dr".into(),
                cluster: "kafka-east".into(),
                generation: 0,
                fence: None,
                checkpoints_topic: None,
                offset_reset: None,
            })
        );
        // Failed over: the standby's servers, TLS and SASL, as a `cluster:`
        // virtual cluster of kafka-west would get them.
        failed_over_to_west(&mut snap, &mut group, 3);
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let upstream = &config.virtual_clusters[0].upstream;
        let servers: Vec<String> = upstream
            .bootstrap_servers
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(servers, vec!["10.0.1.1:9093", "10.0.1.2:9093"]);
        let tls = upstream.tls.as_ref().unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("kafka.west"));
        assert_eq!(std::fs::read_to_string(&tls.ca).unwrap(), west_ca);
        let sasl = upstream.sasl.as_ref().unwrap();
        assert_eq!(
            sasl.mechanism,
            strait_edge_config::SaslMechanism::ScramSha256
        );
        assert_eq!(
            upstream
                .failover
                .as_ref()
                .map(|f| (f.cluster.as_str(), f.generation)),
            Some(("kafka-west", 3))
        );
        let mut direct = snap.clone();
        let vc = direct.virtual_clusters.get_mut("orders").unwrap();
        vc.failover_group = None;
        vc.cluster = "kafka-west".into();
        let direct = compose(None, Some(&direct), true, dir.path()).unwrap();
        let mut expected = direct.virtual_clusters[0].upstream.clone();
        expected.failover = upstream.failover.clone();
        assert_eq!(upstream, &expected);
        // What the heartbeat reports.
        assert_eq!(
            super::applied_failover(&config),
            vec![AppliedFailover {
                virtual_cluster: "orders".into(),
                group: "orders-dr".into(),
                cluster: "kafka-west".into(),
                generation: 3,
                fenced: false,
            }]
        );
        assert_eq!(super::applied_failover(&direct), vec![]);
        // A planned switch in preparation: fenced, with what the lag check
        // needs (MM2's default policy prefixes the remote topics).
        let mut fenced = snap.clone();
        let g = fenced.failover_groups.get_mut("orders-dr").unwrap();
        g.spec.replication = Some(
            serde_json::from_value(serde_json::json!({
                "kind": "mirrormaker2", "source_alias": "west", "topics": ["orders-*"]
            }))
            .unwrap(),
        );
        g.status.as_mut().unwrap().fence = Some(strait_control_client::state::spec::Fence {
            to: "kafka-east".into(),
            by: "spiffe://east.example/admin/ops".into(),
            at_unix_ms: 2,
        });
        let fenced = compose(None, Some(&fenced), true, dir.path()).unwrap();
        assert_eq!(
            fenced.virtual_clusters[0]
                .upstream
                .failover
                .as_ref()
                .unwrap()
                .fence,
            Some(strait_edge_config::FenceState {
                to: "kafka-east".into(),
                topics: vec!["orders-*".into()],
                remote_prefix: Some("west.".into()),
            })
        );
        assert!(super::applied_failover(&fenced)[0].fenced);
        // On the standby (kafka-west is active), MM2's checkpoints translate
        // offsets; the fence's target is the primary, which has none.
        assert_eq!(
            fenced.virtual_clusters[0]
                .upstream
                .failover
                .as_ref()
                .unwrap()
                .checkpoints_topic
                .as_deref(),
            Some("west.checkpoints.internal")
        );
        // Without a reset policy the client's auto.offset.reset decides; the
        // time-bound one is anchored at the switch (at_unix_ms of the status).
        let at = |snap: &EdgeSnapshot| {
            compose(None, Some(snap), true, dir.path())
                .unwrap()
                .virtual_clusters[0]
                .upstream
                .failover
                .as_ref()
                .unwrap()
                .offset_reset
        };
        let mut reset = snap.clone();
        let g = reset.failover_groups.get_mut("orders-dr").unwrap();
        g.spec.replication = Some(
            serde_json::from_value(serde_json::json!({
                "kind": "mirrormaker2", "source_alias": "west"
            }))
            .unwrap(),
        );
        g.status.as_mut().unwrap().at_unix_ms = 1_000_000;
        assert_eq!(at(&reset), None);
        for (spec, edge) in [
            (
                serde_json::json!("earliest"),
                strait_edge_config::OffsetReset::Earliest,
            ),
            (
                serde_json::json!("latest"),
                strait_edge_config::OffsetReset::Latest,
            ),
            (
                serde_json::json!({ "before_switch_ms": 60_000 }),
                strait_edge_config::OffsetReset::TimestampMs(940_000),
            ),
        ] {
            let g = reset.failover_groups.get_mut("orders-dr").unwrap();
            g.spec.replication.as_mut().unwrap().offset_reset =
                serde_json::from_value(spec).unwrap();
            assert_eq!(at(&reset), Some(edge));
        }
        // Back on the primary there is nothing to place.
        let g = reset.failover_groups.get_mut("orders-dr").unwrap();
        g.status.as_mut().unwrap().active = "kafka-east".into();
        assert_eq!(at(&reset), None);
        // Every member is probed through its own upstream, at the group's
        // policy (the defaults here), for the control plane's evidence.
        let probes: Vec<(&str, &str, u128, String)> = config
            .health_probes
            .iter()
            .map(|p| {
                (
                    p.group.as_str(),
                    p.cluster.as_str(),
                    p.interval.as_millis(),
                    p.upstream.bootstrap_servers[0].to_string(),
                )
            })
            .collect();
        assert_eq!(
            probes,
            vec![
                (
                    "orders-dr",
                    "kafka-east",
                    1000,
                    "127.0.0.1:9092".to_string()
                ),
                ("orders-dr", "kafka-west", 1000, "10.0.1.1:9093".to_string()),
            ]
        );
        assert_eq!(config.health_probes[1].upstream.tls, expected.tls);
        assert!(direct.health_probes.is_empty());
        // An active cluster the edge was not given: fail closed too.
        snap.kafka_clusters.remove("kafka-west");
        let err = compose(None, Some(&snap), true, dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VirtualCluster orders: FailoverGroup 'orders-dr' is at generation 3 on KafkaCluster 'kafka-west', which is not known"
        );
    }

    #[test]
    fn broker_realm_becomes_a_kms_broker_client_on_the_edges_svid() {
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        snap.kms_realms.insert(
            "mesh".into(),
            KmsRealmSpec {
                provider: KmsProvider::Broker,
                endpoints: vec!["https://kms-1:7443".into(), "https://kms-2:7443".into()],
                credentials_ref: None,
                region: None,
                vault_mount: None,
                backend: Some("vault-east".into()),
                site: None,
                // The endpoints are local mesh forwards to east's broker.
                server_name: Some("kms.east.example".into()),
            },
        );
        let policy: EncryptionPolicySpec = serde_json::from_value(serde_json::json!({
            "rules": [{"topics": ["payments-*"], "kms": "mesh", "kek_template": "k"}]
        }))
        .unwrap();
        snap.encryption_policies.insert("payments".into(), policy);
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        assert_eq!(
            serde_json::to_value(&config.kms).unwrap(),
            serde_json::json!([{
                "name": "mesh",
                "broker": {
                    "endpoints": ["https://kms-1:7443", "https://kms-2:7443"],
                    "identity": "svid",
                    "backend": "vault-east",
                    "server_name": "kms.east.example",
                },
                "retry": {"attempts": 3, "max_backoff": "5s", "min_backoff": "500ms", "timeout": "10s"},
            }])
        );
    }

    #[test]
    fn mesh_peers_and_remote_clusters_become_the_mesh_section() {
        use strait_control_client::state::spec::{
            EdgeMeshSpec, MeshForwardSpec, MeshPeerSpec, MeshServiceSpec, RemoteSpec,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        snap.edge_mesh = Some(EdgeMeshSpec {
            listen: Some("127.0.0.1:7443".into()),
            listen_tcp: None,
            services: vec![MeshServiceSpec {
                name: "kms".into(),
                address: "127.0.0.1:7600".into(),
            }],
            forwards: vec![MeshForwardSpec {
                listen: "127.0.0.1:7601".into(),
                peer: "edge-west".into(),
                service: "kms-west".into(),
            }],
        });
        snap.mesh_peers.insert(
            "edge-west".into(),
            MeshPeerSpec {
                edge: "edge-east".into(),
                peer: None,
                addresses: vec!["127.0.0.1:7444".into()],
                spiffe_id: "spiffe://west.example/edge/edge-west".into(),
                transport: Some("tls-tcp".into()),
                may_assert: vec!["spiffe://west.example/*".into()],
                exports: vec!["orders".into()],
                export_services: vec!["kms".into()],
            },
        );
        let mut remote = snap.virtual_clusters["orders"].clone();
        remote.cluster = String::new();
        remote.bootstrap = "127.0.0.1:29092".into();
        remote.brokers.port_range = "29100-29199".into();
        remote.remote = Some(RemoteSpec {
            peer: "edge-west".into(),
            virtual_cluster: "west-orders".into(),
        });
        snap.virtual_clusters.insert("west-orders".into(), remote);
        // No bundle of the peer's domain: the translation fails, naming it.
        let err = compose(None, Some(&snap), true, dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MeshPeer: no TrustBundle of trust domain 'west.example', which a peer's SPIFFE ID names"
        );
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        snap.trust_bundles.insert(
            "west".into(),
            TrustBundleSpec {
                trust_domain: "west.example".into(),
                pem: ca.clone(),
            },
        );
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let mesh = config.mesh.unwrap();
        assert_eq!(mesh.listen, Some("127.0.0.1:7443".parse().unwrap()));
        assert_eq!(mesh.identity, strait_tls::ServedCertificate::Svid);
        assert_eq!(mesh.peers.len(), 1);
        assert_eq!(
            mesh.peers[0].transport,
            strait_edge_config::MeshTransport::TlsTcp
        );
        assert_eq!(mesh.peers[0].exports, vec!["orders".to_owned()]);
        assert_eq!(mesh.peers[0].export_services, vec!["kms".to_owned()]);
        assert_eq!(
            mesh.services,
            vec![strait_edge_config::MeshService {
                name: "kms".into(),
                address: strait_edge_config::HostPort {
                    host: "127.0.0.1".into(),
                    port: 7600
                },
            }]
        );
        assert_eq!(
            mesh.forwards,
            vec![strait_edge_config::MeshForward {
                listen: "127.0.0.1:7601".parse().unwrap(),
                peer: "edge-west".into(),
                service: "kms-west".into(),
            }]
        );
        assert_eq!(mesh.trust_bundles[0].trust_domain, "west.example");
        let remote = config
            .virtual_clusters
            .iter()
            .find(|vc| vc.name == "west-orders")
            .unwrap();
        assert_eq!(
            remote.upstream.remote,
            Some(strait_edge_config::Remote {
                peer: "edge-west".into(),
                virtual_cluster: "west-orders".into(),
            })
        );
        // A mesh written in the edge's file wins over the control plane's.
        let file = format!(
            "mesh:\n  identity: {{ cert: c.pem, key: k.pem }}\n  trust_bundles: [{{ trust_domain: west.example, pem: \"{}\" }}]\n  peers: [{{ name: edge-west, address: \"127.0.0.1:1\", spiffe_id: \"spiffe://west.example/edge/x\" }}]\n",
            dir.path().join("pem/mesh-west.example.pem").display()
        );
        let config = compose(Some(&file), Some(&snap), true, dir.path()).unwrap();
        assert!(matches!(
            config.mesh.unwrap().identity,
            strait_tls::ServedCertificate::Files { .. }
        ));
    }

    #[test]
    fn a_standby_behind_a_peer_edge_is_served_and_probed_through_the_tunnel() {
        use strait_control_client::state::spec::{EdgeMeshSpec, MeshPeerSpec, RemoteSpec};
        use strait_control_client::FollowedGroup;
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        snap.edge_mesh = Some(EdgeMeshSpec::default());
        snap.mesh_peers.insert(
            "edge-west".into(),
            MeshPeerSpec {
                edge: "edge-east".into(),
                peer: None,
                addresses: vec!["127.0.0.1:7444".into()],
                spiffe_id: "spiffe://east.example/edge/edge-west".into(),
                transport: None,
                may_assert: vec![],
                exports: vec![],
                export_services: vec![],
            },
        );
        snap.trust_bundles.insert(
            "east".into(),
            TrustBundleSpec {
                trust_domain: "east.example".into(),
                pem: rcgen::CertificateParams::new(Vec::<String>::new())
                    .unwrap()
                    .self_signed(&rcgen::KeyPair::generate().unwrap())
                    .unwrap()
                    .pem(),
            },
        );
        let vc = snap.virtual_clusters.get_mut("orders").unwrap();
        vc.cluster = String::new();
        vc.failover_group = Some("orders-dr".into());
        vc.remote_members.insert(
            "kafka-west".into(),
            RemoteSpec {
                peer: "edge-west".into(),
                virtual_cluster: "orders-standby".into(),
            },
        );
        let mut group = FollowedGroup {
            spec: serde_json::from_value(serde_json::json!({
                "primary": "kafka-east", "standby": ["kafka-west"]
            }))
            .unwrap(),
            status: None,
        };
        snap.failover_groups
            .insert("orders-dr".into(), group.clone());
        // No KafkaCluster kafka-west on this edge: the peer fronts it.
        assert!(!snap.kafka_clusters.contains_key("kafka-west"));
        let through_west = Some(strait_edge_config::Remote {
            peer: "edge-west".into(),
            virtual_cluster: "orders-standby".into(),
        });
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let upstream = &config.virtual_clusters[0].upstream;
        assert_eq!(upstream.remote, None);
        assert_eq!(upstream.bootstrap_servers[0].to_string(), "127.0.0.1:9092");
        let probes: Vec<(&str, &Option<strait_edge_config::Remote>)> = config
            .health_probes
            .iter()
            .map(|p| (p.cluster.as_str(), &p.upstream.remote))
            .collect();
        assert_eq!(
            probes,
            vec![("kafka-east", &None), ("kafka-west", &through_west)]
        );

        failed_over_to_west(&mut snap, &mut group, 1);
        let config = compose(None, Some(&snap), true, dir.path()).unwrap();
        let upstream = &config.virtual_clusters[0].upstream;
        assert_eq!(upstream.remote, through_west);
        assert!(upstream.bootstrap_servers.is_empty());
        assert_eq!(
            upstream
                .failover
                .as_ref()
                .map(|f| (f.cluster.as_str(), f.generation)),
            Some(("kafka-west", 1))
        );

        // A remote member that is not in the group is a mistake: refused.
        let vc = snap.virtual_clusters.get_mut("orders").unwrap();
        vc.remote_members.insert(
            "kafka-north".into(),
            RemoteSpec {
                peer: "edge-west".into(),
                virtual_cluster: "x".into(),
            },
        );
        let err = compose(None, Some(&snap), true, dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VirtualCluster orders: remote_members names 'kafka-north', which is not a member of FailoverGroup 'orders-dr'"
        );
    }

    #[test]
    fn deny_lists_become_deny_identities_merged_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut snap = plain_snapshot();
        snap.deny_lists.insert(
            "leaked".into(),
            DenyListSpec {
                spiffe_ids: vec![
                    "spiffe://east.example/ns/shop/sa/orders".into(),
                    "spiffe://east.example/ns/shop/sa/billing".into(),
                ],
                reason: Some("key leaked".into()),
            },
        );
        let file =
            "deny_identities: [\"spiffe://east.example/ns/shop/sa/orders\", \"CN=legacy\"]\n";
        let config = compose(Some(file), Some(&snap), true, dir.path()).unwrap();
        assert_eq!(
            config.deny_identities,
            vec![
                "CN=legacy".to_owned(),
                "spiffe://east.example/ns/shop/sa/billing".to_owned(),
                "spiffe://east.example/ns/shop/sa/orders".to_owned(),
            ]
        );
    }
}

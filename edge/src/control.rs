//! Configuration from the control plane.
//!
//! A control-plane snapshot is translated into the same raw configuration a
//! file holds, merged with the file (the file's virtual clusters and settings
//! come first), and validated by the same code, so a bad resource is reported
//! with a path just like a bad file. Trust bundles arrive as PEM text; they
//! are written under the cache directory and referred to by path. SASL
//! credentials arrive only as references (a file path or an environment
//! variable name on this host), which the edge's validation then reads.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Map, Value};
use strait_control_client::state::spec::{KmsProvider, Operation, UpstreamSasl};
use strait_control_client::EdgeSnapshot;
use strait_edge_config::Config;

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
        let (clusters, kms) = translate(snapshot, cache_dir)?;
        append(object, "virtual_clusters", clusters);
        append(object, "kms", kms);
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
        let kafka = snapshot.kafka_clusters.get(&vc.cluster).with_context(|| {
            format!(
                "VirtualCluster {name}: KafkaCluster '{}' is not known",
                vc.cluster
            )
        })?;
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
                            vc.cluster
                        )
                    })?,
                (None, Some(pem)) => pem.clone(),
                (None, None) => anyhow::bail!(
                    "KafkaCluster {}: tls needs trust_bundle or ca_pem",
                    vc.cluster
                ),
            };
            let ca = write_pem(&pem_dir, &format!("upstream-{}", vc.cluster), &ca_pem)?;
            let mut tls_value = json!({ "ca": ca });
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
        let mut cluster = json!({
            "name": name,
            "bootstrap": vc.bootstrap,
            "brokers": { "advertised_host": vc.brokers.advertised_host, "port_range": vc.brokers.port_range },
            "upstream": upstream,
        });
        if let Some(tls) = &vc.tls {
            let mut value =
                json!({ "cert": tls.cert_file, "key": tls.key_file, "client_auth": "none" });
            if !tls.client_trust_bundles.is_empty() {
                let mut bundle = String::new();
                for name in &tls.client_trust_bundles {
                    let trust = snapshot
                        .trust_bundles
                        .get(name)
                        .with_context(|| format!("TrustBundle '{name}' is not known"))?;
                    bundle.push_str(&trust.pem);
                    bundle.push('\n');
                }
                value["client_ca"] =
                    json!(write_pem(&pem_dir, &format!("clients-{name}"), &bundle)?);
                value["client_auth"] = json!("required");
            }
            cluster["tls"] = value;
        }

        let applies = |targets: &[String]| targets.is_empty() || targets.iter().any(|t| t == name);
        let mut rules = Vec::new();
        for policy in snapshot.authorization_policies.values() {
            if !applies(&policy.virtual_clusters) {
                continue;
            }
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
        if !rules.is_empty() {
            cluster["authorization"] = json!({ "rules": rules });
        }

        let mut encryption_rules = Vec::new();
        let mut reject = false;
        for policy in snapshot.encryption_policies.values() {
            if !applies(&policy.virtual_clusters) {
                continue;
            }
            reject |= matches!(
                policy.unresolved_key_policy,
                strait_control_client::state::spec::UnresolvedKeyPolicy::Reject
            );
            for rule in &policy.rules {
                realms_used.insert(rule.kms.clone());
                for topic in &rule.topics {
                    encryption_rules.push(json!({
                        "topic": topic,
                        "kms": rule.kms,
                        "kek": rule.kek_template.replace("$(topicName)", "$(topic)"),
                    }));
                }
            }
        }
        if !encryption_rules.is_empty() {
            cluster["encryption"] = json!({
                "rules": encryption_rules,
                "on_missing_key": if reject { "reject" } else { "passthrough" },
            });
        }
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
            KmsProvider::Broker => anyhow::bail!(
                "KmsRealm '{name}': provider broker needs edge client certificates; configure it in the edge's file"
            ),
        };
        kms.push(entry);
    }
    Ok((clusters, kms))
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
        BrokerAddressing, KafkaClusterSpec, SaslMechanism, UpstreamSasl, VirtualClusterSpec,
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
}

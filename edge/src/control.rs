//! Configuration from the control plane.
//!
//! A control-plane snapshot is translated into the same raw configuration a
//! file holds, merged with the file (the file's virtual clusters and settings
//! come first), and validated by the same code, so a bad resource is reported
//! with a path just like a bad file. Trust bundles arrive as PEM text; they
//! are written under the cache directory and referred to by path.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Map, Value};
use strait_control_client::state::spec::{KmsProvider, Operation};
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

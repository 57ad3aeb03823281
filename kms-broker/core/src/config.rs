//! The `kms:` config contract shared by the edge and the broker.
//!
//! ```yaml
//! kms:
//!   - name: vault
//!     vault: { address: "http://127.0.0.1:8200", token_env: VAULT_TOKEN, mount: transit }
//!   - name: aws
//!     aws_kms: { endpoint: "http://127.0.0.1:5000", region: us-east-1 }
//!   - name: dev
//!     local: { path: keys.json }
//!   - name: broker
//!     broker: { endpoints: ["https://127.0.0.1:7443"], ca: ca.pem, cert: edge.pem, key: edge.key }
//!   - name: mesh-broker
//!     broker: { endpoints: ["https://kms.example.org:7443"], identity: svid }
//! ```
//! Exactly one provider key per entry. `vault.addresses` / `aws_kms.endpoints`
//! list several endpoints of one KMS for failover. A broker client presents
//! either the `cert`/`key` files or, with `identity: svid`, the process's own
//! SVID from the control plane's CA (then `ca` is optional: without it the
//! broker is verified against the trust domain's bundle and must be a
//! `spiffe://<domain>/kms-broker/...` identity).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RetryPolicy;

mod broker;
pub use broker::{BrokerClientConfig, IdentitySource};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_kms: Option<AwsKmsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerClientConfig>,
    /// Retries, backoff and per-call timeout for this KMS.
    #[serde(default)]
    pub retry: RetryPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// One Vault/OpenBao address, e.g. `http://127.0.0.1:8200`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Several addresses of one Vault cluster, tried in order (failover).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Environment variable holding the Vault token.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Mount path of the transit secrets engine.
    #[serde(default = "default_mount")]
    pub mount: String,
}

fn default_token_env() -> String {
    "VAULT_TOKEN".into()
}
fn default_mount() -> String {
    "transit".into()
}

impl VaultConfig {
    pub fn all_addresses(&self) -> Vec<String> {
        self.address
            .iter()
            .chain(self.addresses.iter())
            .cloned()
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsKmsConfig {
    /// Endpoint override (moto, LocalStack, a VPC endpoint). Absent: the AWS default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Several endpoints, tried in order (failover).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub region: String,
}

impl AwsKmsConfig {
    /// Every endpoint override; empty means "the SDK's default endpoint".
    pub fn all_endpoints(&self) -> Vec<String> {
        self.endpoint
            .iter()
            .chain(self.endpoints.iter())
            .cloned()
            .collect()
    }
}

/// DEVELOPMENT ONLY keyring file, see [`crate::local`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub path: PathBuf,
}

/// One config problem, with the path of the offending key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found, one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn err(errors: &mut Vec<ConfigError>, path: impl Into<String>, message: impl Into<String>) {
    errors.push(ConfigError {
        path: path.into(),
        message: message.into(),
    });
}

fn check_url(errors: &mut Vec<ConfigError>, path: String, url: &str, schemes: &[&str]) {
    if url.trim().is_empty() {
        err(errors, path, "must not be empty");
    } else if !schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
        err(
            errors,
            path,
            format!("must start with {}://", schemes.join(":// or ")),
        );
    }
}

impl KmsConfig {
    /// Append every problem of this entry to `errors`; `path` is its location,
    /// e.g. `kms[1]`.
    pub fn validate_into(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if self.name.trim().is_empty() {
            err(errors, format!("{path}.name"), "must not be empty");
        }
        let set = [
            self.vault.is_some(),
            self.aws_kms.is_some(),
            self.local.is_some(),
            self.broker.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            err(
                errors,
                path,
                format!("exactly one of vault, aws_kms, local, broker must be set (found {set})"),
            );
        }
        if let Some(v) = &self.vault {
            let addrs = v.all_addresses();
            if addrs.is_empty() {
                err(
                    errors,
                    format!("{path}.vault.address"),
                    "an address (or addresses) is required",
                );
            }
            if let Some(a) = &v.address {
                check_url(
                    errors,
                    format!("{path}.vault.address"),
                    a,
                    &["http", "https"],
                );
            }
            for (i, a) in v.addresses.iter().enumerate() {
                check_url(
                    errors,
                    format!("{path}.vault.addresses[{i}]"),
                    a,
                    &["http", "https"],
                );
            }
            if v.token_env.trim().is_empty() {
                err(
                    errors,
                    format!("{path}.vault.token_env"),
                    "must not be empty",
                );
            }
            if v.mount.trim().is_empty() || v.mount.contains("..") {
                err(
                    errors,
                    format!("{path}.vault.mount"),
                    "must be a mount path such as transit",
                );
            }
        }
        if let Some(a) = &self.aws_kms {
            if a.region.trim().is_empty() {
                err(
                    errors,
                    format!("{path}.aws_kms.region"),
                    "must not be empty",
                );
            }
            if let Some(e) = &a.endpoint {
                check_url(
                    errors,
                    format!("{path}.aws_kms.endpoint"),
                    e,
                    &["http", "https"],
                );
            }
            for (i, e) in a.endpoints.iter().enumerate() {
                check_url(
                    errors,
                    format!("{path}.aws_kms.endpoints[{i}]"),
                    e,
                    &["http", "https"],
                );
            }
        }
        if let Some(l) = &self.local {
            if l.path.as_os_str().is_empty() {
                err(errors, format!("{path}.local.path"), "must not be empty");
            }
        }
        if let Some(b) = &self.broker {
            if b.endpoints.is_empty() {
                err(
                    errors,
                    format!("{path}.broker.endpoints"),
                    "at least one endpoint is required",
                );
            }
            for (i, e) in b.endpoints.iter().enumerate() {
                check_url(
                    errors,
                    format!("{path}.broker.endpoints[{i}]"),
                    e,
                    &["https"],
                );
            }
            b.validate_identity(&format!("{path}.broker"), errors);
        }
        if self.retry.attempts == 0 {
            err(
                errors,
                format!("{path}.retry.attempts"),
                "must be at least 1",
            );
        }
        if self.retry.min_backoff > self.retry.max_backoff {
            err(
                errors,
                format!("{path}.retry.min_backoff"),
                "must not exceed max_backoff",
            );
        }
        if self.retry.timeout.is_zero() {
            err(errors, format!("{path}.retry.timeout"), "must be positive");
        }
    }

    /// Make relative file paths relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(l) = &mut self.local {
            fix(&mut l.path);
        }
        if let Some(b) = &mut self.broker {
            for p in [&mut b.ca, &mut b.cert, &mut b.key].into_iter().flatten() {
                fix(p);
            }
        }
    }
}

/// Validate a whole `kms:` list (found under `prefix`, normally `kms`):
/// every entry, plus unique names. Returns every error with its path.
pub fn validate_kms_list(prefix: &str, list: &[KmsConfig]) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, k) in list.iter().enumerate() {
        let path = format!("{prefix}[{i}]");
        k.validate_into(&path, &mut errors);
        if !seen.insert(k.name.as_str()) {
            err(
                &mut errors,
                format!("{path}.name"),
                format!("duplicate KMS name {:?}", k.name),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Root {
        kms: Vec<KmsConfig>,
    }

    #[test]
    fn contract_parses() {
        let y = r#"
kms:
  - name: vault
    vault: { address: "http://127.0.0.1:8200", token_env: VAULT_TOKEN, mount: transit }
  - name: aws
    aws_kms: { endpoint: "http://127.0.0.1:5000", region: us-east-1 }
  - name: dev
    local: { path: keys.json }
  - name: broker
    broker: { endpoints: ["https://127.0.0.1:7443"], ca: ca.pem, cert: edge.pem, key: edge.key }
  - name: ha
    vault: { addresses: ["http://127.0.0.1:1", "http://127.0.0.1:2"] }
    retry: { attempts: 5, min_backoff: 100ms, max_backoff: 1s, timeout: 2s }
  - name: mesh
    broker: { endpoints: ["https://127.0.0.1:7443"], identity: svid }
  - name: mesh-own-ca
    broker: { endpoints: ["https://127.0.0.1:7443"], identity: svid, ca: ca.pem }
  - name: files
    broker: { endpoints: ["https://127.0.0.1:7443"], identity: files, ca: ca.pem, cert: e.pem, key: e.key }
"#;
        let root: Root = serde_yaml_ng::from_str(y).unwrap();
        validate_kms_list("kms", &root.kms).unwrap();
        assert!(!root.kms[3].broker.as_ref().unwrap().uses_svid());
        let mesh = root.kms[5].broker.as_ref().unwrap();
        assert!(mesh.uses_svid());
        assert_eq!((&mesh.ca, &mesh.cert, &mesh.key), (&None, &None, &None));
        let mut own_ca = root.kms[6].clone();
        own_ca.resolve_paths(Path::new("/etc/strait"));
        assert_eq!(
            own_ca.broker.unwrap().ca.as_deref(),
            Some(Path::new("/etc/strait/ca.pem"))
        );
        assert_eq!(root.kms[4].vault.as_ref().unwrap().all_addresses().len(), 2);
        assert_eq!(root.kms[4].vault.as_ref().unwrap().mount, "transit");
        assert_eq!(root.kms[4].retry.attempts, 5);
    }

    #[test]
    fn every_error_with_its_path() {
        let y = r#"
kms:
  - name: a
    vault: { address: "127.0.0.1:8200" }
  - name: aws
    aws_kms: { endpoint: "http://127.0.0.1:5000", region: "" }
  - name: a
    local: { path: k.json }
    broker: { endpoints: [], ca: c, cert: c, key: k }
"#;
        let root: Root = serde_yaml_ng::from_str(y).unwrap();
        let errs = validate_kms_list("kms", &root.kms).unwrap_err().to_string();
        for want in [
            "kms[0].vault.address: must start with http:// or https://",
            "kms[1].aws_kms.region: must not be empty",
            "kms[2]: exactly one of vault, aws_kms, local, broker must be set (found 2)",
            "kms[2].broker.endpoints: at least one endpoint is required",
            "kms[2].name: duplicate KMS name \"a\"",
        ] {
            assert!(errs.contains(want), "missing {want:?} in\n{errs}");
        }
    }

    #[test]
    fn unknown_fields_rejected() {
        let y = "kms:\n  - name: x\n    local: { path: k, colour: red }\n";
        assert!(serde_yaml_ng::from_str::<Root>(y).is_err());
    }
}

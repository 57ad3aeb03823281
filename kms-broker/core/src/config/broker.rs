//! The `broker:` entry of the `kms:` contract: a KMS used through
//! strait-kms-broker, with certificate files or the process's own SVID.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{err, ConfigError};

/// Where a TLS certificate comes from: `files` (`cert` and `key`, the
/// default) or `svid` (the process's own certificate from the control
/// plane's CA, joined with `--join-token`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    #[default]
    Files,
    Svid,
}

/// Use a KMS through the strait-kms-broker service (mTLS gRPC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerClientConfig {
    /// `https://host:port` of each broker replica, tried in order (failover).
    pub endpoints: Vec<String>,
    /// CA that signed the broker's server certificate. Optional with
    /// `identity: svid`: then the trust domain's bundle from the SVID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// `files` (`cert` and `key`) or `svid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySource>,
    /// This process's client certificate and key (PEM), with `identity: files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Name of the backend KMS on the broker (`kms[].name` in the broker's
    /// config). Absent: the broker's only backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// TLS server name to verify; absent: the endpoint's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl BrokerClientConfig {
    /// Whether the client presents the process's own SVID.
    pub fn uses_svid(&self) -> bool {
        self.identity == Some(IdentitySource::Svid)
    }

    /// `cert`/`key` against `identity` (exactly one of the two forms) and
    /// `ca` (required unless the SVID's bundle verifies the broker).
    pub(super) fn validate_identity(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let files = [("cert", &self.cert), ("key", &self.key)];
        if self.uses_svid() {
            for (field, value) in files {
                if value.is_some() {
                    err(
                        errors,
                        format!("{path}.{field}"),
                        "not with identity: svid (the process presents its own SVID); remove it or use identity: files",
                    );
                }
            }
        } else {
            for (field, value) in files {
                if value.is_none() {
                    err(
                        errors,
                        format!("{path}.{field}"),
                        "required (or identity: svid to present this process's certificate from the control plane's CA)",
                    );
                }
            }
            if self.ca.is_none() {
                err(
                    errors,
                    format!("{path}.ca"),
                    "required (or identity: svid to verify the broker against the trust domain's bundle)",
                );
            }
        }
        let paths = [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)];
        for (field, value) in paths {
            if value.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                err(errors, format!("{path}.{field}"), "must not be empty");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{validate_kms_list, KmsConfig};
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Root {
        kms: Vec<KmsConfig>,
    }

    #[test]
    fn broker_identity_is_files_or_svid_never_both() {
        let y = r#"
kms:
  - name: both
    broker: { endpoints: ["https://h:1"], identity: svid, cert: c.pem, key: k.pem }
  - name: neither
    broker: { endpoints: ["https://h:1"] }
  - name: half
    broker: { endpoints: ["https://h:1"], identity: files, ca: ca.pem, cert: c.pem }
  - name: empty
    broker: { endpoints: ["https://h:1"], identity: svid, ca: "" }
"#;
        let root: Root = serde_yaml_ng::from_str(y).unwrap();
        let errs: Vec<String> = validate_kms_list("kms", &root.kms)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errs,
            [
                "kms[0].broker.cert: not with identity: svid (the process presents its own SVID); remove it or use identity: files",
                "kms[0].broker.key: not with identity: svid (the process presents its own SVID); remove it or use identity: files",
                "kms[1].broker.cert: required (or identity: svid to present this process's certificate from the control plane's CA)",
                "kms[1].broker.key: required (or identity: svid to present this process's certificate from the control plane's CA)",
                "kms[1].broker.ca: required (or identity: svid to verify the broker against the trust domain's bundle)",
                "kms[2].broker.key: required (or identity: svid to present this process's certificate from the control plane's CA)",
                "kms[3].broker.ca: must not be empty",
            ]
        );
        let bad =
            "kms:\n  - name: x\n    broker: { endpoints: [\"https://h:1\"], identity: spire }\n";
        let e = serde_yaml_ng::from_str::<Root>(bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant `spire`, expected `files` or `svid`"),
            "{e}"
        );
    }
}

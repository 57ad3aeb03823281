//! The broker's configuration file (`strait-kms-broker --config FILE`):
//! parsing, every error with its path, file paths made absolute.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_kms_core::config::{
    validate_kms_list, ConfigError, ConfigErrors, IdentitySource, KmsConfig,
};

use crate::grants::{Grant, GrantConfig};
use crate::tls::{Bundles, TlsError};

/// `strait-kms-broker --config FILE`:
/// ```yaml
/// listen: 127.0.0.1:7443
/// trust_domain: example.org
/// callers: ["spiffe://example.org/edge/*"]        # the default
/// grants:                                         # absent: all but shred
///   - { callers: ["spiffe://example.org/edge/*"], kms: ["*"], operations: [generate, unwrap, wrap, resolve] }
/// tls:
///   cert: broker.pem                              # or identity: svid (no files)
///   key: broker.key
///   client_ca: ca.pem                             # roots of trust_domain
///   client_trust_bundles: [{ trust_domain: partner.org, pem_file: partner.pem }]
/// alias_cache_ttl: 10m
/// kms:
///   - name: vault
///     vault: { addresses: ["http://10.0.0.1:8200", "http://10.0.0.2:8200"] }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub listen: String,
    /// The broker's own trust domain; its identity is
    /// `spiffe://<trust_domain>/kms-broker/<name>`.
    pub trust_domain: String,
    /// SPIFFE ID globs of the identities that may call (`*` one path
    /// segment, `**` any depth). Absent: the edges of `trust_domain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callers: Option<Vec<String>>,
    /// What each caller may do ([`crate::grants`]). Absent: every caller
    /// may do everything but `shred`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<Vec<GrantConfig>>,
    pub tls: BrokerTls,
    pub kms: Vec<KmsConfig>,
    #[serde(default = "default_alias_ttl", with = "humantime_serde")]
    pub alias_cache_ttl: Duration,
    /// Optional `ip:port` serving Prometheus metrics at `/metrics` (plain HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

fn default_alias_ttl() -> Duration {
    Duration::from_secs(600)
}

fn default_reload() -> Duration {
    Duration::from_secs(1)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// `files` (`cert` and `key`, the default) or `svid`: the broker's own
    /// certificate from the control plane's CA (`--join-token`), renewed
    /// at half-life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySource>,
    /// The broker's certificate chain and key (PEM), re-read every
    /// `reload_interval`: a replaced pair is used by the next handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Roots of `trust_domain` (PEM). Optional when following a control
    /// plane, whose TrustBundles then supply them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Roots of other trust domains, each bound to its domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_trust_bundles: Vec<FileBundle>,
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl BrokerTls {
    /// Whether the broker serves its own SVID.
    pub fn uses_svid(&self) -> bool {
        self.identity == Some(IdentitySource::Svid)
    }

    /// `cert`/`key` against `identity`: the files, or the SVID, never both.
    fn validate_identity(&self, push: &mut impl FnMut(&str, &str)) {
        for (field, value) in [("cert", &self.cert), ("key", &self.key)] {
            let path = format!("tls.{field}");
            match (self.uses_svid(), value) {
                (true, Some(_)) => push(
                    &path,
                    "not with identity: svid (the broker serves its own SVID); remove it or use identity: files",
                ),
                (false, None) => push(
                    &path,
                    "required (or identity: svid to serve the broker's certificate from the control plane's CA)",
                ),
                (false, Some(p)) if p.as_os_str().is_empty() => push(&path, "must not be empty"),
                _ => {}
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBundle {
    pub trust_domain: String,
    pub pem_file: PathBuf,
}

impl BrokerConfig {
    /// Parse YAML, check every field (all errors with paths), and make file
    /// paths relative to `base`.
    pub fn from_yaml(text: &str, base: &Path) -> Result<Self, ConfigErrors> {
        let mut cfg: BrokerConfig = serde_yaml_ng::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: e
                    .location()
                    .map(|l| format!("line {} column {}", l.line(), l.column()))
                    .unwrap_or_else(|| "config".into()),
                message: e.to_string(),
            }])
        })?;
        cfg.validate()?;
        for k in &mut cfg.kms {
            k.resolve_paths(base);
        }
        let tls = &mut cfg.tls;
        let paths = [&mut tls.cert, &mut tls.key, &mut tls.client_ca]
            .into_iter()
            .flatten()
            .chain(tls.client_trust_bundles.iter_mut().map(|b| &mut b.pem_file));
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// The caller globs in force (the default when none are configured).
    pub fn callers(&self) -> Vec<String> {
        self.callers
            .clone()
            .unwrap_or_else(|| vec![format!("spiffe://{}/edge/*", self.trust_domain)])
    }

    /// The file's grants, compiled (`None` without `grants:`). Call on a
    /// validated config.
    pub fn grants(&self) -> Option<Vec<Grant>> {
        self.grants.as_ref().map(|list| {
            list.iter()
                .enumerate()
                .map(|(i, g)| g.compile(format!("grants[{i}]")))
                .collect()
        })
    }

    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = match validate_kms_list("kms", &self.kms) {
            Ok(()) => Vec::new(),
            Err(e) => e.0,
        };
        let mut push = |p: &str, m: &str| {
            errors.push(ConfigError {
                path: p.into(),
                message: m.into(),
            })
        };
        if self.listen.parse::<SocketAddr>().is_err() {
            push("listen", "must be an ip:port socket address");
        }
        if !strait_tls::is_trust_domain(&self.trust_domain) {
            push(
                "trust_domain",
                "must be a trust domain name such as example.org (lower case, no scheme)",
            );
        }
        if let Some(callers) = &self.callers {
            for (i, g) in callers.iter().enumerate() {
                if let Err(e) = strait_control_client::state::spec::check_spiffe_glob(g) {
                    push(&format!("callers[{i}]"), &e);
                }
            }
        }
        let mut domains = std::collections::HashSet::new();
        if self.tls.client_ca.is_some() {
            domains.insert(self.trust_domain.as_str());
        }
        for (i, b) in self.tls.client_trust_bundles.iter().enumerate() {
            let path = format!("tls.client_trust_bundles[{i}].trust_domain");
            if !strait_tls::is_trust_domain(&b.trust_domain) {
                push(&path, "must be a trust domain name such as example.org");
            } else if !domains.insert(b.trust_domain.as_str()) {
                push(
                    &path,
                    "this trust domain already has a bundle (tls.client_ca is the bundle of trust_domain)",
                );
            }
        }
        self.tls.validate_identity(&mut push);
        if self.tls.reload_interval.is_zero() {
            push("tls.reload_interval", "must be positive");
        }
        if let Some(m) = &self.metrics_listen {
            if m.parse::<SocketAddr>().is_err() {
                push("metrics_listen", "must be an ip:port socket address");
            }
        }
        if self.kms.is_empty() {
            push("kms", "at least one backend KMS is required");
        }
        // A `broker:` backend is fine: this broker forwards to that one
        // (federation), presenting its own identity there.
        if let Some(grants) = &self.grants {
            if grants.is_empty() {
                errors.push(ConfigError {
                    path: "grants".into(),
                    message: "must not be empty (leave grants out to let every caller do everything but shred)".into(),
                });
            }
            let names: Vec<&str> = self.kms.iter().map(|k| k.name.as_str()).collect();
            for (i, g) in grants.iter().enumerate() {
                g.validate_into(&format!("grants[{i}]"), Some(&names), &mut errors);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The bundles of the config file, read now.
    pub fn file_bundles(&self) -> Result<Bundles, ServeError> {
        let mut out = Bundles::new();
        let files = self
            .tls
            .client_ca
            .iter()
            .map(|p| (self.trust_domain.clone(), p))
            .chain(
                self.tls
                    .client_trust_bundles
                    .iter()
                    .map(|b| (b.trust_domain.clone(), &b.pem_file)),
            );
        for (domain, path) in files {
            let certs = crate::tls::certificates(&path.display().to_string(), &read(path)?)?;
            out.entry(domain).or_default().extend(certs);
        }
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_config_errors_have_paths_and_paths_resolve() {
        let bad = r#"
listen: "nowhere"
trust_domain: "Example.org"
callers: ["edge/*"]
tls: { cert: s.pem, key: s.key, client_ca: ca.pem, client_trust_bundles: [{ trust_domain: "Example.org", pem_file: x.pem }] }
kms:
  - name: b
    broker: { endpoints: ["https://127.0.0.1:1"], ca: c, cert: c }
  - name: aws
    aws_kms: { region: "" }
grants:
  - { callers: ["spiffe://example.org/edge/*"], kms: [b, vault], keks: [""], operations: [unwrap, rewrap] }
"#;
        let errs = BrokerConfig::from_yaml(bad, Path::new("/etc/strait"))
            .unwrap_err()
            .to_string();
        for want in [
            "listen: must be an ip:port socket address",
            "trust_domain: must be a trust domain name",
            "callers[0]: 'edge/*' must start with spiffe://",
            "tls.client_trust_bundles[0].trust_domain: must be a trust domain name",
            "kms[1].aws_kms.region: must not be empty",
            "kms[0].broker.key: required",
            "grants[0].kms[1]: no backend named \"vault\" (this broker has b, aws; or \"*\")",
            "grants[0].keks[0]: must not be empty",
            "grants[0].operations[1]: unknown operation \"rewrap\"",
        ] {
            assert!(errs.contains(want), "missing {want:?} in\n{errs}");
        }
        let good = r#"
listen: "127.0.0.1:7443"
trust_domain: example.org
tls: { cert: s.pem, key: s.key, client_ca: /abs/ca.pem, client_trust_bundles: [{ trust_domain: partner.org, pem_file: p.pem }] }
kms:
  - name: dev
    local: { path: keys.json }
"#;
        let cfg = BrokerConfig::from_yaml(good, Path::new("/etc/strait")).unwrap();
        assert_eq!(
            cfg.tls.cert.as_deref(),
            Some(Path::new("/etc/strait/s.pem"))
        );
        assert!(!cfg.tls.uses_svid());
        assert_eq!(cfg.tls.client_ca.as_deref(), Some(Path::new("/abs/ca.pem")));
        assert_eq!(
            cfg.tls.client_trust_bundles[0].pem_file,
            Path::new("/etc/strait/p.pem")
        );
        assert_eq!(
            cfg.callers(),
            vec!["spiffe://example.org/edge/*".to_string()]
        );
        assert_eq!(cfg.tls.reload_interval, Duration::from_secs(1));
        assert_eq!(
            cfg.kms[0].local.as_ref().unwrap().path,
            Path::new("/etc/strait/keys.json")
        );
        assert_eq!(cfg.alias_cache_ttl, Duration::from_secs(600));
        assert!(cfg.grants().is_none());
        assert!(BrokerConfig::from_yaml("listen: x\nbogus: 1\n", Path::new(".")).is_err());
        let with_grants = format!(
            "{good}grants:\n  - {{ callers: [\"spiffe://partner.org/kms-broker/*\"], kms: [dev], operations: [wrap, unwrap] }}\n"
        );
        let cfg = BrokerConfig::from_yaml(&with_grants, Path::new("/etc/strait")).unwrap();
        let grants = cfg.grants().unwrap();
        assert_eq!(grants[0].source, "grants[0]");
        assert!(grants[0].allows(
            "spiffe://partner.org/kms-broker/east",
            crate::grants::GrantOp::Wrap,
            "dev",
            "kek-a"
        ));
        let empty = format!("{good}grants: []\n");
        let errs = BrokerConfig::from_yaml(&empty, Path::new("/etc/strait"))
            .unwrap_err()
            .to_string();
        assert!(errs.starts_with("grants: must not be empty"), "{errs}");
    }

    #[test]
    fn a_broker_backend_forwards_to_another_broker() {
        let y = r#"
listen: "127.0.0.1:7443"
trust_domain: east.example
tls: { cert: s.pem, key: s.key, client_ca: ca.pem }
kms:
  - name: vault-east
    vault: { address: "http://127.0.0.1:8200" }
  - name: aws-west
    broker: { endpoints: ["https://west:7443"], ca: west-ca.pem, cert: east-broker.pem, key: east-broker.key, backend: aws-west }
"#;
        let cfg = BrokerConfig::from_yaml(y, Path::new("/etc/strait")).unwrap();
        let b = cfg.kms[1].broker.as_ref().unwrap();
        assert_eq!(
            b.cert.as_deref(),
            Some(Path::new("/etc/strait/east-broker.pem"))
        );
    }

    #[test]
    fn serving_identity_is_files_or_svid_never_both() {
        let with_tls = |tls: &str| {
            format!("listen: \"127.0.0.1:7443\"\ntrust_domain: example.org\ntls: {tls}\nkms:\n  - name: dev\n    local: {{ path: k.json }}\n")
        };
        let errors = |tls: &str| {
            BrokerConfig::from_yaml(&with_tls(tls), Path::new("/etc/strait"))
                .unwrap_err()
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            errors("{ identity: svid, cert: s.pem, key: s.key }"),
            [
                "tls.cert: not with identity: svid (the broker serves its own SVID); remove it or use identity: files",
                "tls.key: not with identity: svid (the broker serves its own SVID); remove it or use identity: files",
            ]
        );
        assert_eq!(
            errors("{ client_ca: ca.pem }"),
            [
                "tls.cert: required (or identity: svid to serve the broker's certificate from the control plane's CA)",
                "tls.key: required (or identity: svid to serve the broker's certificate from the control plane's CA)",
            ]
        );
        assert_eq!(
            errors("{ identity: files, cert: s.pem }"),
            ["tls.key: required (or identity: svid to serve the broker's certificate from the control plane's CA)"]
        );
        let e = errors("{ identity: spire }");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("unknown variant `spire`, expected `files` or `svid`"),
            "{e:?}"
        );
        let svid =
            BrokerConfig::from_yaml(&with_tls("{ identity: svid }"), Path::new("/etc/strait"))
                .unwrap();
        assert!(svid.tls.uses_svid());
        assert_eq!((&svid.tls.cert, &svid.tls.key), (&None, &None));
    }
}

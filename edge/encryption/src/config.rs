//! The `encryption:` block of a virtual cluster.

use std::time::Duration;

use serde::{Deserialize, Serialize};
pub use strait_kms_core::config::{ConfigError, ConfigErrors};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// Checked in order; the first rule whose `topic` matches wins.
    pub rules: Vec<TopicRule>,
    #[serde(default)]
    pub on_missing_key: OnMissingKey,
    #[serde(default)]
    pub on_plaintext_fetch: OnPlaintextFetch,
    /// Also encrypt header values (header keys stay readable).
    #[serde(default)]
    pub encrypt_headers: bool,
    #[serde(default)]
    pub dek: DekConfig,
    /// Where the wraps of federated DEKs live in this virtual cluster's
    /// upstream cluster (see FORMAT.md, "Federation").
    #[serde(default)]
    pub keys_topic: KeysTopicConfig,
    /// KEK names crypto-shredded everywhere (`straitctl kek shred`): never
    /// used to generate, never unwrapped, cached DEKs under them dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shredded_keks: Vec<String>,
}

/// The compacted topic holding every realm's wrap of every federated DEK,
/// once per DEK and realm (not per record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysTopicConfig {
    /// The topic this edge writes (created compacted if missing) and reads.
    pub name: String,
    /// More keys topics to read: the keys topics of other sites as a
    /// replication tool renamed them here (`east.strait.keys`).
    pub also_read: Vec<String>,
    /// How long a decryption waits for the keys topics to be read up to
    /// their end before falling back to a remote unwrap.
    #[serde(with = "humantime_serde")]
    pub catch_up_timeout: Duration,
}

impl Default for KeysTopicConfig {
    fn default() -> Self {
        Self {
            name: "strait.keys".into(),
            also_read: Vec::new(),
            catch_up_timeout: Duration::from_secs(10),
        }
    }
}

/// `topic`: an exact name, or a glob (`secret-*`, `orders.?`, `[ab]-*`).
/// `kek`: a key name, optionally templated with `$(topic)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    pub topic: String,
    /// The realm (a `kms[].name`) that makes this topic's DEKs; at a site
    /// that only reads the topic, the realm it unwraps with.
    pub kms: String,
    pub kek: String,
    /// Federation: every DEK is also wrapped for these realms (in the
    /// background; produce never waits for them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_wrap_for: Vec<RealmKek>,
}

/// A realm and the KEK (name or `$(topic)` template) to wrap under there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealmKek {
    pub kms: String,
    pub kek: String,
}

/// What to do when a rule matches but its KEK does not exist in the KMS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissingKey {
    /// Fail the partition (POLICY_VIOLATION); plaintext is never forwarded.
    #[default]
    Reject,
    /// Forward the records unencrypted (logged and counted).
    Passthrough,
}

/// What to do with a plaintext record found in a topic that has a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPlaintextFetch {
    #[default]
    Pass,
    Reject,
}

/// DEK lifecycle. Defaults follow Kroxylicious (5,000,000 encryptions, 1 h,
/// 1000 cached decryption DEKs idle-expired after 1 h, alias cache 10 min).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DekConfig {
    pub max_encryptions: u64,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Start generating the next DEK in the background once this fraction
    /// (percent) of either limit is used.
    pub refresh_ahead_percent: u8,
    pub cache_size: usize,
    #[serde(with = "humantime_serde")]
    pub cache_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub alias_ttl: Duration,
}

impl Default for DekConfig {
    fn default() -> Self {
        Self {
            max_encryptions: 5_000_000,
            max_age: Duration::from_secs(3600),
            refresh_ahead_percent: 80,
            cache_size: 1000,
            cache_idle: Duration::from_secs(3600),
            alias_ttl: Duration::from_secs(600),
        }
    }
}

impl EncryptionConfig {
    /// Every problem with its path below `path` (e.g.
    /// `virtual_clusters[0].encryption`). `known_kms` are the configured
    /// `kms[].name`s.
    pub fn validate_into(&self, path: &str, known_kms: &[&str], errors: &mut Vec<ConfigError>) {
        let mut push = |p: String, m: String| {
            errors.push(ConfigError {
                path: p,
                message: m,
            })
        };
        for (i, r) in self.rules.iter().enumerate() {
            let p = format!("{path}.rules[{i}]");
            if r.topic.trim().is_empty() {
                push(format!("{p}.topic"), "must not be empty".into());
            } else if let Err(e) = globset::Glob::new(&r.topic) {
                push(format!("{p}.topic"), format!("invalid glob: {e}"));
            }
            if !known_kms.contains(&r.kms.as_str()) {
                push(
                    format!("{p}.kms"),
                    format!(
                        "unknown KMS {:?} (configured: {})",
                        r.kms,
                        known_kms.join(", ")
                    ),
                );
            }
            if r.kek.trim().is_empty() {
                push(format!("{p}.kek"), "must not be empty".into());
            } else if r.kek.replace("$(topic)", "").contains("$(") {
                push(
                    format!("{p}.kek"),
                    "only the $(topic) placeholder is supported".into(),
                );
            }
        }
        let d = &self.dek;
        if d.max_encryptions == 0 {
            push(
                format!("{path}.dek.max_encryptions"),
                "must be positive".into(),
            );
        }
        if d.max_encryptions > 1 << 32 {
            push(
                format!("{path}.dek.max_encryptions"),
                "must not exceed 2^32 (AES-GCM limit per key)".into(),
            );
        }
        if d.max_age.is_zero() {
            push(format!("{path}.dek.max_age"), "must be positive".into());
        }
        if !(1..=100).contains(&d.refresh_ahead_percent) {
            push(
                format!("{path}.dek.refresh_ahead_percent"),
                "must be 1..=100".into(),
            );
        }
        if d.cache_size == 0 {
            push(format!("{path}.dek.cache_size"), "must be positive".into());
        }
    }

    pub fn validate(&self, path: &str, known_kms: &[&str]) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        self.validate_into(path, known_kms, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_parses_and_validates() {
        let y = r#"
rules:
  - topic: "secret-*"
    kms: vault
    kek: "kek-$(topic)"
on_missing_key: reject
on_plaintext_fetch: pass
"#;
        let c: EncryptionConfig = serde_yaml_ng::from_str(y).unwrap();
        c.validate("encryption", &["vault"]).unwrap();
        assert_eq!(c.dek, DekConfig::default());
        let errs = c
            .validate("vc[0].encryption", &["aws"])
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("vc[0].encryption.rules[0].kms: unknown KMS \"vault\""),
            "{errs}"
        );
        let bad =
            "rules: [{topic: 'a', kms: v, kek: 'x-$(partition)'}]\ndek: {max_encryptions: 0}\n";
        let c: EncryptionConfig = serde_yaml_ng::from_str(bad).unwrap();
        let errs = c.validate("e", &["v"]).unwrap_err().to_string();
        assert!(errs.contains("e.rules[0].kek: only the $(topic)"), "{errs}");
        assert!(
            errs.contains("e.dek.max_encryptions: must be positive"),
            "{errs}"
        );
        assert!(serde_yaml_ng::from_str::<EncryptionConfig>("rules: []\nfoo: 1\n").is_err());
    }
}

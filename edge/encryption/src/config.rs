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
    /// upstream cluster (see FORMAT.md, "Federation"). Absent: the default
    /// topic, used only when a rule has `also_wrap_for`; present (even `{}`):
    /// read (and written) whatever the rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_topic: Option<KeysTopicConfig>,
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
    /// The longest an unwrapped DEK is kept however busy it is: after a KEK
    /// is shredded (or access to it revoked) at its KMS, no edge decrypts
    /// with it for longer than this.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
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
            cache_ttl: Duration::from_secs(3600),
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
            let mut seen = Vec::new();
            for (j, a) in r.also_wrap_for.iter().enumerate() {
                let q = format!("{p}.also_wrap_for[{j}]");
                if !known_kms.contains(&a.kms.as_str()) {
                    push(
                        format!("{q}.kms"),
                        format!(
                            "unknown KMS {:?} (configured: {})",
                            a.kms,
                            known_kms.join(", ")
                        ),
                    );
                }
                if a.kms == r.kms {
                    push(
                        format!("{q}.kms"),
                        format!("{:?} is the rule's own realm", a.kms),
                    );
                }
                if seen.contains(&a.kms.as_str()) {
                    push(format!("{q}.kms"), format!("{:?} is listed twice", a.kms));
                }
                seen.push(a.kms.as_str());
                if a.kek.trim().is_empty() {
                    push(format!("{q}.kek"), "must not be empty".into());
                } else if a.kek.replace("$(topic)", "").contains("$(") {
                    push(
                        format!("{q}.kek"),
                        "only the $(topic) placeholder is supported".into(),
                    );
                }
            }
        }
        let kt = self.keys_topic.clone().unwrap_or_default();
        for (i, name) in std::iter::once(&kt.name)
            .chain(kt.also_read.iter())
            .enumerate()
        {
            let q = if i == 0 {
                format!("{path}.keys_topic.name")
            } else {
                format!("{path}.keys_topic.also_read[{}]", i - 1)
            };
            let valid = !name.is_empty()
                && name.len() <= 249
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                push(
                    q,
                    format!("{name:?} is not a Kafka topic name (1-249 of [a-zA-Z0-9._-])"),
                );
            }
        }
        for (i, k) in self.shredded_keks.iter().enumerate() {
            if k.trim().is_empty() {
                push(
                    format!("{path}.shredded_keks[{i}]"),
                    "must not be empty".into(),
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
        if d.cache_ttl.is_zero() {
            push(format!("{path}.dek.cache_ttl"), "must be positive".into());
        }
        if d.cache_size == 0 {
            push(format!("{path}.dek.cache_size"), "must be positive".into());
        }
    }

    /// Whether this virtual cluster uses a keys topic: a rule wraps for
    /// other realms, or `keys_topic` is given.
    pub fn federated(&self) -> bool {
        self.keys_topic.is_some() || self.rules.iter().any(|r| !r.also_wrap_for.is_empty())
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

    #[test]
    fn federation_keys_are_validated_with_paths() {
        let y = r#"
rules:
  - topic: "secret-*"
    kms: vault-east
    kek: "kek-$(topic)"
    also_wrap_for:
      - { kms: aws-west, kek: "alias/kek-$(topic)" }
keys_topic: { name: strait.keys, also_read: [west.strait.keys] }
"#;
        let c: EncryptionConfig = serde_yaml_ng::from_str(y).unwrap();
        c.validate("e", &["vault-east", "aws-west"]).unwrap();
        assert_eq!(
            c.keys_topic.as_ref().unwrap().catch_up_timeout,
            Duration::from_secs(10)
        );
        assert!(c.federated());
        let bad = r#"
rules:
  - topic: "a"
    kms: v
    kek: k
    also_wrap_for: [{kms: v, kek: k}, {kms: w, kek: ""}, {kms: w, kek: "x-$(p)"}, {kms: nope, kek: k}]
keys_topic: { name: "bad name", also_read: [""] }
shredded_keks: [" "]
"#;
        let c: EncryptionConfig = serde_yaml_ng::from_str(bad).unwrap();
        let errs = c.validate("e", &["v", "w"]).unwrap_err().to_string();
        for want in [
            "e.rules[0].also_wrap_for[0].kms: \"v\" is the rule's own realm",
            "e.rules[0].also_wrap_for[1].kek: must not be empty",
            "e.rules[0].also_wrap_for[2].kms: \"w\" is listed twice",
            "e.rules[0].also_wrap_for[2].kek: only the $(topic)",
            "e.rules[0].also_wrap_for[3].kms: unknown KMS \"nope\"",
            "e.keys_topic.name: \"bad name\" is not a Kafka topic name",
            "e.keys_topic.also_read[0]: \"\" is not a Kafka topic name",
            "e.shredded_keks[0]: must not be empty",
        ] {
            assert!(errs.contains(want), "missing {want:?} in {errs}");
        }
    }
}

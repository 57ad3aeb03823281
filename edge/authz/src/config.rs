//! The `authorization:` and `audit:` blocks of a virtual cluster, as written
//! in YAML, and their validation.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Kafka's ACL operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
    ClusterAction,
    DescribeConfigs,
    AlterConfigs,
    IdempotentWrite,
    All,
}

impl Operation {
    pub const EVERY: [Operation; 11] = [
        Operation::Read,
        Operation::Write,
        Operation::Create,
        Operation::Delete,
        Operation::Alter,
        Operation::Describe,
        Operation::ClusterAction,
        Operation::DescribeConfigs,
        Operation::AlterConfigs,
        Operation::IdempotentWrite,
        Operation::All,
    ];

    pub(crate) fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// The operations a grant of `self` allows, with Kafka's implications:
    /// Read, Write, Delete and Alter imply Describe; AlterConfigs implies
    /// DescribeConfigs; All implies everything.
    pub(crate) fn implied_bits(self) -> u16 {
        match self {
            Operation::All => u16::MAX,
            Operation::Read | Operation::Write | Operation::Delete | Operation::Alter => {
                self.bit() | Operation::Describe.bit()
            }
            Operation::AlterConfigs => self.bit() | Operation::DescribeConfigs.bit(),
            _ => self.bit(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "Read",
            Operation::Write => "Write",
            Operation::Create => "Create",
            Operation::Delete => "Delete",
            Operation::Alter => "Alter",
            Operation::Describe => "Describe",
            Operation::ClusterAction => "ClusterAction",
            Operation::DescribeConfigs => "DescribeConfigs",
            Operation::AlterConfigs => "AlterConfigs",
            Operation::IdempotentWrite => "IdempotentWrite",
            Operation::All => "All",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kafka's resource types that rules can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResourceType {
    Topic,
    Group,
    TransactionalId,
    Cluster,
}

impl ResourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Topic => "Topic",
            ResourceType::Group => "Group",
            ResourceType::TransactionalId => "TransactionalId",
            ResourceType::Cluster => "Cluster",
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name Kafka gives the single cluster resource.
pub const CLUSTER_RESOURCE_NAME: &str = "kafka-cluster";

/// What to do with API keys that name no resource the filter knows how to
/// check (share groups, delegation tokens, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownApiKeys {
    /// Fail closed: the connection is closed (default).
    #[default]
    Deny,
    /// Forward them unchecked. Only for migrations; logs every such request.
    Allow,
}

/// How a virtual cluster with an `authorization:` block decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationMode {
    /// Only what a rule allows; no rule at all denies everything (fail closed).
    #[default]
    Rules,
    /// Everything is allowed; written out so that allowing all is a choice,
    /// never the result of a missing or emptied rule list. Takes no rules.
    AllowAll,
}

/// The `authorization:` block of a virtual cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    #[serde(default)]
    pub mode: AuthorizationMode,
    /// Allow rules: everything not allowed is denied, and an empty list denies everything.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    #[serde(default)]
    pub unknown_api_keys: UnknownApiKeys,
}

/// One allow rule: `principal` may perform `allow` on one resource pattern,
/// optionally only within `[not_before, not_after)`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Principal pattern: a literal (`spiffe://example.org/ns/shop/sa/orders`),
    /// a glob (`spiffe://example.org/ns/shop/sa/*`; `*` stays within one
    /// `/`-separated segment, `**` crosses segments), or `*` for anyone,
    /// including anonymous clients.
    pub principal: String,
    pub allow: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<bool>,
    /// RFC 3339 instant before which the rule does not apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// RFC 3339 instant from which the rule no longer applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

fn default_sample() -> f64 {
    1.0
}

/// The `audit:` block of a virtual cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File to append JSON lines to, or `-` for stdout.
    pub path: String,
    /// Fraction (0.0 to 1.0) of allow decisions written; denies are always written.
    #[serde(default = "default_sample")]
    pub sample_allows: f64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: "-".into(),
            sample_allows: 1.0,
        }
    }
}

/// One configuration error and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// E.g. `authorization.rules[2].not_after`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every error found in a configuration block, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl AuthorizationConfig {
    /// Checks every rule; paths start with `authorization.`. Use
    /// [`crate::RuleSet::compile`] to get the validated form in the same step.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        crate::rules::RuleSet::compile(self).map(|_| ())
    }

    /// Parses a rules document: either the block itself (`rules:`,
    /// `unknown_api_keys:`) or a document with a top-level `authorization:` key.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|err| err.to_string())?;
        let inner = match value.get("authorization") {
            Some(inner) => inner.clone(),
            None => value,
        };
        if inner.is_null() {
            return Ok(AuthorizationConfig::default());
        }
        serde_yaml_ng::from_value(inner).map_err(|err| err.to_string())
    }
}

impl AuditConfig {
    /// Checks the block; paths start with `audit.`.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        if self.path.trim().is_empty() {
            errors.push(FieldError {
                path: "audit.path".into(),
                message: "must be a file path or \"-\" for stdout".into(),
            });
        }
        if !(0.0..=1.0).contains(&self.sample_allows) {
            errors.push(FieldError {
                path: "audit.sample_allows".into(),
                message: format!("must be between 0.0 and 1.0, got {}", self.sample_allows),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

//! Compiled rules and the live-swappable [`Authorizer`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use globset::{GlobBuilder, GlobMatcher};
use strait_filter::Principal;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::{
    AuthorizationConfig, FieldError, Operation, ResourceType, UnknownApiKeys, ValidationErrors,
};
use crate::metrics::AuthzMetrics;

/// A name pattern, specialised so the common shapes avoid the glob engine.
#[derive(Debug, Clone)]
enum Pattern {
    Any,
    Literal(Box<str>),
    /// `prefix*`; with `segment` the rest may not contain `/`.
    Prefix {
        prefix: Box<str>,
        segment: bool,
    },
    Glob(GlobMatcher),
}

const GLOB_META: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

impl Pattern {
    /// `segment`: `*` does not cross `/` (used for principals, which are URIs).
    fn compile(text: &str, segment: bool) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        if text == "*" {
            return Ok(Pattern::Any);
        }
        if !text.contains(GLOB_META) {
            return Ok(Pattern::Literal(text.into()));
        }
        if let Some(prefix) = text.strip_suffix('*') {
            if !prefix.contains(GLOB_META) {
                return Ok(Pattern::Prefix {
                    prefix: prefix.into(),
                    segment,
                });
            }
        }
        let glob = GlobBuilder::new(text)
            .literal_separator(segment)
            .build()
            .map_err(|err| format!("invalid glob: {err}"))?;
        Ok(Pattern::Glob(glob.compile_matcher()))
    }

    #[inline]
    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Literal(literal) => **literal == *name,
            Pattern::Prefix { prefix, segment } => {
                name.len() >= prefix.len()
                    && name.starts_with(&**prefix)
                    && !(*segment && name[prefix.len()..].contains('/'))
            }
            Pattern::Glob(glob) => glob.is_match(name),
        }
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    principal_text: Arc<str>,
    principal: Pattern,
    resource: ResourceType,
    name: Pattern,
    operations: u16,
    not_before: Option<SystemTime>,
    not_after: Option<SystemTime>,
}

impl CompiledRule {
    #[inline]
    fn active(&self, now: SystemTime) -> bool {
        self.not_before.is_none_or(|t| now >= t) && self.not_after.is_none_or(|t| now < t)
    }
}

/// The rule that allowed a decision: its index in `rules` and its principal
/// pattern. `None` in a [`Decision`] means the default deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchedRule {
    pub index: usize,
    pub principal: Arc<str>,
    /// When the rule's lease ends, if it is leased: an answer the broker may
    /// hold back (a Fetch long-poll) must come before this.
    pub not_after: Option<SystemTime>,
}

/// The outcome of one authorization check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Option<MatchedRule>,
}

/// A validated, compiled set of rules. Immutable: a reload builds a new one.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<CompiledRule>,
    unknown_api_keys: UnknownApiKeys,
}

fn parse_instant(text: &str) -> Result<SystemTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|err| format!("not an RFC 3339 timestamp ({err}): {text:?}"))
}

impl RuleSet {
    /// Validates and compiles a configuration block, reporting every error
    /// with its path (`authorization.rules[2].not_after: ...`).
    pub fn compile(config: &AuthorizationConfig) -> Result<RuleSet, ValidationErrors> {
        let mut errors = Vec::new();
        if config.mode == crate::config::AuthorizationMode::AllowAll && !config.rules.is_empty() {
            errors.push(FieldError {
                path: "authorization.mode".into(),
                message: "allow_all takes no rules: remove the rules or the mode".into(),
            });
        }
        let mut rules = Vec::with_capacity(config.rules.len());
        for (index, rule) in config.rules.iter().enumerate() {
            let base = format!("authorization.rules[{index}]");
            let mut error = |field: &str, message: String| {
                errors.push(FieldError {
                    path: if field.is_empty() {
                        base.clone()
                    } else {
                        format!("{base}.{field}")
                    },
                    message,
                })
            };
            let principal = Pattern::compile(&rule.principal, true)
                .map_err(|message| error("principal", message))
                .ok();
            if rule.allow.is_empty() {
                error("allow", "must name at least one operation".into());
            }
            let operations = rule
                .allow
                .iter()
                .fold(0u16, |acc, op| acc | op.implied_bits());
            let mut resources = Vec::new();
            if let Some(topic) = &rule.topic {
                resources.push((ResourceType::Topic, "topic", topic.as_str()));
            }
            if let Some(group) = &rule.group {
                resources.push((ResourceType::Group, "group", group.as_str()));
            }
            if let Some(id) = &rule.transactional_id {
                resources.push((ResourceType::TransactionalId, "transactional_id", id));
            }
            match rule.cluster {
                Some(true) => resources.push((
                    ResourceType::Cluster,
                    "cluster",
                    crate::config::CLUSTER_RESOURCE_NAME,
                )),
                Some(false) => error(
                    "cluster",
                    "`cluster: false` names no resource; use `cluster: true` or omit it".into(),
                ),
                None => {}
            }
            let resource = match resources.as_slice() {
                [one] => Some(*one),
                [] => {
                    error(
                        "",
                        "needs exactly one of topic, group, transactional_id, cluster".into(),
                    );
                    None
                }
                _ => {
                    error(
                        "",
                        format!(
                            "needs exactly one of topic, group, transactional_id, cluster, found {}",
                            resources
                                .iter()
                                .map(|(_, field, _)| *field)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    None
                }
            };
            let name = resource.and_then(|(_, field, text)| {
                Pattern::compile(text, false)
                    .map_err(|message| error(field, message))
                    .ok()
            });
            let not_before = rule.not_before.as_deref().and_then(|text| {
                parse_instant(text)
                    .map_err(|message| error("not_before", message))
                    .ok()
            });
            let not_after = rule.not_after.as_deref().and_then(|text| {
                parse_instant(text)
                    .map_err(|message| error("not_after", message))
                    .ok()
            });
            if let (Some(start), Some(end)) = (not_before, not_after) {
                if start >= end {
                    error(
                        "not_after",
                        "must be later than not_before (the grant would never apply)".into(),
                    );
                }
            }
            if let (Some(principal), Some((resource, _, _)), Some(name)) =
                (principal, resource, name)
            {
                rules.push(CompiledRule {
                    principal_text: rule.principal.as_str().into(),
                    principal,
                    resource,
                    name,
                    operations,
                    not_before,
                    not_after,
                });
            }
        }
        if errors.is_empty() {
            Ok(RuleSet {
                rules,
                unknown_api_keys: config.unknown_api_keys,
            })
        } else {
            Err(ValidationErrors(errors))
        }
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn unknown_api_keys(&self) -> UnknownApiKeys {
        self.unknown_api_keys
    }

    /// The indices of the rules whose principal pattern matches. A
    /// connection's principal is fixed, so the filter computes this once per
    /// rule set and only scans these rules per decision.
    pub fn rules_for(&self, principal: &Principal) -> Vec<u32> {
        let name = principal.as_str();
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.principal.matches(name))
            .map(|(index, _)| index as u32)
            .collect()
    }

    fn matched(&self, index: usize) -> MatchedRule {
        MatchedRule {
            index,
            principal: self.rules[index].principal_text.clone(),
            not_after: self.rules[index].not_after,
        }
    }

    /// Decides among the rules `candidates` (from [`RuleSet::rules_for`]).
    pub fn decide_among(
        &self,
        candidates: &[u32],
        resource: ResourceType,
        name: &str,
        operation: Operation,
        now: SystemTime,
    ) -> Decision {
        let bit = operation.bit();
        for &index in candidates {
            let rule = &self.rules[index as usize];
            if rule.resource == resource
                && rule.operations & bit != 0
                && rule.active(now)
                && rule.name.matches(name)
            {
                return Decision {
                    allowed: true,
                    rule: Some(self.matched(index as usize)),
                };
            }
        }
        Decision {
            allowed: false,
            rule: None,
        }
    }

    /// Decides for a principal (scans every rule).
    pub fn decide(
        &self,
        principal: &Principal,
        resource: ResourceType,
        name: &str,
        operation: Operation,
        now: SystemTime,
    ) -> Decision {
        self.decide_among(&self.rules_for(principal), resource, name, operation, now)
    }

    /// The first active candidate rule granting Write on some topic: Kafka ≥ 3.0
    /// lets such principals use idempotent producers without IdempotentWrite.
    pub fn any_topic_write(&self, candidates: &[u32], now: SystemTime) -> Option<MatchedRule> {
        let bit = Operation::Write.bit();
        candidates
            .iter()
            .map(|&i| i as usize)
            .find(|&i| {
                let rule = &self.rules[i];
                rule.resource == ResourceType::Topic
                    && rule.operations & bit != 0
                    && rule.active(now)
            })
            .map(|i| self.matched(i))
    }
}

/// Why a reload failed. The old rules stay in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid rules in {path}: {errors}")]
    Invalid {
        path: PathBuf,
        errors: ValidationErrors,
    },
}

/// Holds the current [`RuleSet`] and swaps it atomically on reload. Filters
/// load the current set on every request, so a reload applies to open
/// connections from their next request on.
#[derive(Debug)]
pub struct Authorizer {
    current: ArcSwap<RuleSet>,
}

impl Authorizer {
    pub fn new(config: &AuthorizationConfig) -> Result<Authorizer, ValidationErrors> {
        Ok(Authorizer {
            current: ArcSwap::from_pointee(RuleSet::compile(config)?),
        })
    }

    /// Loads the rules from a YAML file (see [`Authorizer::reload_from_file`]).
    pub fn from_file(path: &Path) -> Result<Authorizer, ReloadError> {
        let authorizer = Authorizer::new(&AuthorizationConfig::default()).map_err(|errors| {
            ReloadError::Invalid {
                path: path.to_owned(),
                errors,
            }
        })?;
        authorizer.reload_from_file(path)?;
        Ok(authorizer)
    }

    /// The rules in force now.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    /// Replaces the rules if `config` is valid; otherwise keeps the old ones.
    pub fn reload(&self, config: &AuthorizationConfig) -> Result<(), ValidationErrors> {
        let rules = RuleSet::compile(config)?;
        tracing::info!(rules = rules.len(), "authorization rules loaded");
        self.current.store(Arc::new(rules));
        Ok(())
    }

    /// Reloads from a YAML file holding the `authorization:` block (or a
    /// document with a top-level `authorization:` key).
    pub fn reload_from_file(&self, path: &Path) -> Result<(), ReloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReloadError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.reload_from_text(path, &text)
    }

    fn reload_from_text(&self, path: &Path, text: &str) -> Result<(), ReloadError> {
        let config =
            AuthorizationConfig::from_yaml(text).map_err(|message| ReloadError::Parse {
                path: path.to_owned(),
                message,
            })?;
        self.reload(&config).map_err(|errors| ReloadError::Invalid {
            path: path.to_owned(),
            errors,
        })
    }

    /// Polls `path` every `interval` and reloads when its content changes. A
    /// broken file is logged (and counted in `metrics`) and the old rules stay.
    /// Content, not mtime, is compared, so two edits within the file system's
    /// timestamp granularity are not missed. Runs until the task is aborted.
    pub fn watch_file(
        self: Arc<Self>,
        path: PathBuf,
        interval: Duration,
        metrics: Option<AuthzMetrics>,
    ) -> tokio::task::JoinHandle<()> {
        // Read before spawning: a change made right after this call returns
        // must be seen as a change, not as the baseline.
        let mut last: Option<Vec<u8>> = std::fs::read(&path).ok();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let content = match tokio::fs::read(&path).await {
                    Ok(content) => content,
                    Err(err) => {
                        // Editors replace files by rename; a missing file is
                        // usually transient. Keep the rules and try again.
                        tracing::warn!(path = %path.display(), error = %err, "cannot read authorization rules; keeping the current rules");
                        continue;
                    }
                };
                if last.as_deref() == Some(content.as_slice()) {
                    continue;
                }
                let outcome = match std::str::from_utf8(&content) {
                    Ok(text) => self.reload_from_text(&path, text),
                    Err(err) => Err(ReloadError::Parse {
                        path: path.clone(),
                        message: err.to_string(),
                    }),
                };
                match outcome {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "authorization rules reloaded");
                        if let Some(metrics) = &metrics {
                            metrics.reload(true);
                        }
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "authorization rules not reloaded; keeping the current rules");
                        if let Some(metrics) = &metrics {
                            metrics.reload(false);
                        }
                    }
                }
                last = Some(content);
            }
        })
    }
}

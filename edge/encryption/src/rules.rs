//! Topic -> (KMS, KEK name) selection.

use globset::{Glob, GlobMatcher};

use crate::config::{RealmKek, TopicRule};
use crate::keys::Wanted;

enum Pattern {
    Exact(String),
    Glob(GlobMatcher),
}

struct Compiled {
    pattern: Pattern,
    kms: String,
    kek: String,
    also: Vec<RealmKek>,
}

/// Compiled rules; first match wins.
pub struct Rules {
    rules: Vec<Compiled>,
}

/// Which KEK a topic's records are encrypted under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekSelection {
    pub kms: String,
    pub kek: String,
    /// The other realms each DEK is also wrapped for, KEK names resolved.
    pub also: Vec<Wanted>,
    /// The topic the selection was made for.
    pub topic: String,
}

impl Rules {
    pub fn new(rules: &[TopicRule]) -> Result<Self, globset::Error> {
        let rules = rules
            .iter()
            .map(|r| {
                let is_glob = r.topic.contains(['*', '?', '[', '{']);
                let pattern = if is_glob {
                    Pattern::Glob(Glob::new(&r.topic)?.compile_matcher())
                } else {
                    Pattern::Exact(r.topic.clone())
                };
                Ok(Compiled {
                    pattern,
                    kms: r.kms.clone(),
                    kek: r.kek.clone(),
                    also: r.also_wrap_for.clone(),
                })
            })
            .collect::<Result<_, globset::Error>>()?;
        Ok(Self { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn find(&self, topic: &str) -> Option<&Compiled> {
        self.rules.iter().find(|r| match &r.pattern {
            Pattern::Exact(t) => t == topic,
            Pattern::Glob(g) => g.is_match(topic),
        })
    }

    pub fn select(&self, topic: &str) -> Option<KekSelection> {
        self.find(topic).map(|r| KekSelection {
            kms: r.kms.clone(),
            kek: r.kek.replace("$(topic)", topic),
            also: r
                .also
                .iter()
                .map(|a| Wanted {
                    realm: a.kms.clone(),
                    kek: a.kek.replace("$(topic)", topic),
                })
                .collect(),
            topic: topic.to_string(),
        })
    }

    /// The realms this edge unwraps `topic`'s DEKs with: its rule's realm,
    /// then the rule's `also_wrap_for` realms.
    pub fn realms_for(&self, topic: &str) -> Vec<String> {
        self.find(topic)
            .map(|r| {
                std::iter::once(r.kms.clone())
                    .chain(r.also.iter().map(|a| a.kms.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.rules.iter().any(|r| match &r.pattern {
            Pattern::Exact(t) => t == topic,
            Pattern::Glob(g) => g.is_match(topic),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(topic: &str, kek: &str) -> TopicRule {
        TopicRule {
            topic: topic.into(),
            kms: "k".into(),
            kek: kek.into(),
            also_wrap_for: Vec::new(),
        }
    }

    #[test]
    fn exact_glob_template_first_match() {
        let r = Rules::new(&[
            rule("secret-fixed", "fixed"),
            rule("secret-*", "kek-$(topic)"),
            rule("pay.[ab]", "pay"),
        ])
        .unwrap();
        assert_eq!(r.select("secret-fixed").unwrap().kek, "fixed");
        assert_eq!(r.select("secret-x").unwrap().kek, "kek-secret-x");
        assert_eq!(r.select("pay.a").unwrap().kek, "pay");
        assert!(r.select("pay.c").is_none());
        assert!(r.select("public").is_none());
        assert!(!r.matches("other"));
    }
}

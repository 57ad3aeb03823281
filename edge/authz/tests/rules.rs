//! Rule semantics: tables of rules × principals × resources × times, and
//! configuration validation.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use strait_authz::{
    AuditConfig, AuthorizationConfig, Authorizer, Operation, ResourceType, RuleSet, UnknownApiKeys,
};
use strait_filter::Principal;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const RULES: &str = r#"
authorization:
  rules:
    - principal: "spiffe://example.org/ns/shop/sa/orders"
      allow: [Write, Describe]
      topic: "orders-*"
    - principal: "spiffe://example.org/ns/shop/sa/*"
      allow: [Read, Describe]
      topic: "orders-*"
      not_after: "2026-12-01T00:00:00Z"
    - principal: "spiffe://example.org/ns/shop/sa/*"
      allow: [Read]
      group: "shop-*"
    - principal: "*"
      allow: [Describe]
      cluster: true
    - principal: "spiffe://example.org/ns/ops/sa/admin"
      allow: [All]
      topic: "*"
    - principal: "spiffe://example.org/**"
      allow: [AlterConfigs]
      topic: "audit.{a,b}"
      not_before: "2026-11-01T00:00:00Z"
    - principal: "spiffe://example.org/ns/shop/sa/orders"
      allow: [Write]
      transactional_id: "orders-tx"
  unknown_api_keys: deny
"#;

fn at(text: &str) -> SystemTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap().into()
}

fn named(name: &str) -> Principal {
    Principal::Named(Arc::from(name))
}

const ORDERS: &str = "spiffe://example.org/ns/shop/sa/orders";
const BILLING: &str = "spiffe://example.org/ns/shop/sa/billing";
const ADMIN: &str = "spiffe://example.org/ns/ops/sa/admin";
const OTHER_DOMAIN: &str = "spiffe://evil.org/ns/shop/sa/orders";
const NESTED: &str = "spiffe://example.org/ns/shop/sa/orders/extra";

/// (principal, resource, name, operation, time, expected rule index)
type Case = (
    &'static str,
    ResourceType,
    &'static str,
    Operation,
    SystemTime,
    Option<usize>,
);

#[test]
fn decision_table() {
    let config = AuthorizationConfig::from_yaml(RULES).unwrap();
    let rules = RuleSet::compile(&config).unwrap();
    assert_eq!(rules.len(), 7);
    assert_eq!(rules.unknown_api_keys(), UnknownApiKeys::Deny);
    let before = at("2026-11-22T08:00:00Z");
    let after = at("2026-12-01T00:00:00Z"); // not_after is exclusive
    let early = at("2026-10-01T00:00:00Z");
    use Operation::*;
    use ResourceType::*;
    // (principal, resource, name, operation, time, expected rule index or None)
    let cases: &[Case] = &[
        (ORDERS, Topic, "orders-eu", Write, before, Some(0)),
        (ORDERS, Topic, "orders-eu", Describe, before, Some(0)),
        (ORDERS, Topic, "orders-eu", Read, before, Some(1)),
        (ORDERS, Topic, "orders-eu", Read, after, None),
        (ORDERS, Topic, "orders-eu", Describe, after, Some(0)),
        (ORDERS, Topic, "payments", Write, before, None),
        (ORDERS, Topic, "orders-eu", Delete, before, None),
        (BILLING, Topic, "orders-eu", Read, before, Some(1)),
        (BILLING, Topic, "orders-eu", Write, before, None),
        (BILLING, Topic, "orders-eu", Describe, before, Some(1)),
        (BILLING, Topic, "orders-eu", Describe, after, None),
        (BILLING, Group, "shop-billing", Read, before, Some(2)),
        // Read implies Describe on groups as on topics.
        (BILLING, Group, "shop-billing", Describe, before, Some(2)),
        (BILLING, Group, "shop-billing", Delete, before, None),
        (BILLING, Group, "other", Read, before, None),
        (BILLING, Cluster, "kafka-cluster", Describe, before, Some(3)),
        (BILLING, Cluster, "kafka-cluster", Alter, before, None),
        (OTHER_DOMAIN, Topic, "orders-eu", Read, before, None),
        (
            OTHER_DOMAIN,
            Cluster,
            "kafka-cluster",
            Describe,
            before,
            Some(3),
        ),
        // `*` inside a principal pattern does not cross `/`.
        (NESTED, Topic, "orders-eu", Read, before, None),
        (ADMIN, Topic, "anything", Delete, before, Some(4)),
        (ADMIN, Topic, "anything", IdempotentWrite, before, Some(4)),
        (ADMIN, Group, "anything", Read, before, None),
        // AlterConfigs implies DescribeConfigs; brace globs; not_before.
        (BILLING, Topic, "audit.a", DescribeConfigs, before, Some(5)),
        (BILLING, Topic, "audit.c", DescribeConfigs, before, None),
        (BILLING, Topic, "audit.b", AlterConfigs, early, None),
        (ORDERS, TransactionalId, "orders-tx", Write, before, Some(6)),
        // Write implies Describe on every resource type, as in Kafka.
        (
            ORDERS,
            TransactionalId,
            "orders-tx",
            Describe,
            before,
            Some(6),
        ),
        (ORDERS, TransactionalId, "orders-tx", Read, before, None),
        (ORDERS, TransactionalId, "orders-tx-2", Write, before, None),
    ];
    for (i, (principal, resource, name, operation, now, expected)) in cases.iter().enumerate() {
        let decision = rules.decide(&named(principal), *resource, name, *operation, *now);
        assert_eq!(
            decision.rule.as_ref().map(|r| r.index),
            *expected,
            "case {i}: {principal} {operation} {resource}:{name}"
        );
        assert_eq!(decision.allowed, expected.is_some(), "case {i}");
        if let Some(rule) = &decision.rule {
            assert_eq!(&*rule.principal, config.rules[rule.index].principal);
        }
    }
    // Anonymous clients are matched only by `*`.
    let anonymous = Principal::Anonymous;
    assert!(
        rules
            .decide(&anonymous, Cluster, "kafka-cluster", Describe, before)
            .allowed
    );
    assert!(
        !rules
            .decide(&anonymous, Topic, "orders-eu", Read, before)
            .allowed
    );
}

#[test]
fn lease_expires_between_two_decisions() {
    let config = AuthorizationConfig::from_yaml(RULES).unwrap();
    let authorizer = Authorizer::new(&config).unwrap();
    let expiry = at("2026-12-01T00:00:00Z");
    let principal = named(BILLING);
    let rules = authorizer.rules();
    let first = rules.decide(
        &principal,
        ResourceType::Topic,
        "orders-1",
        Operation::Read,
        expiry - Duration::from_millis(1),
    );
    let second = rules.decide(
        &principal,
        ResourceType::Topic,
        "orders-1",
        Operation::Read,
        expiry,
    );
    assert!(first.allowed);
    assert!(!second.allowed);
    assert_eq!(second.rule, None);
}

#[test]
fn validation_reports_every_error_with_its_path() {
    let text = r#"
rules:
  - principal: ""
    allow: []
    topic: "a"
  - principal: "x"
    allow: [Read]
    topic: "a"
    group: "b"
  - principal: "x"
    allow: [Read]
    topic: "a"
    not_after: "tomorrow"
  - principal: "x"
    allow: [Read]
  - principal: "x"
    allow: [Read]
    topic: "[unclosed"
    not_before: "2026-12-01T00:00:00Z"
    not_after: "2026-11-01T00:00:00Z"
  - principal: "x"
    allow: [Describe]
    cluster: false
"#;
    let config = AuthorizationConfig::from_yaml(text).unwrap();
    let errors = config.validate().unwrap_err();
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "authorization.rules[0].principal",
            "authorization.rules[0].allow",
            "authorization.rules[1]",
            "authorization.rules[2].not_after",
            "authorization.rules[3]",
            "authorization.rules[4].topic",
            "authorization.rules[4].not_after",
            "authorization.rules[5].cluster",
            "authorization.rules[5]",
        ],
        "{errors}"
    );
    assert!(errors.to_string().contains("tomorrow"));
}

#[test]
fn unknown_fields_and_operations_are_rejected() {
    assert!(AuthorizationConfig::from_yaml("rules: []\nextra: 1\n").is_err());
    assert!(AuthorizationConfig::from_yaml(
        "rules:\n  - principal: x\n    allow: [Fly]\n    topic: a\n"
    )
    .is_err());
    assert!(AuthorizationConfig::from_yaml(
        "rules:\n  - principal: x\n    allow: [Read]\n    topic: a\n    topc: b\n"
    )
    .is_err());
    let config = AuthorizationConfig::from_yaml("unknown_api_keys: allow\n").unwrap();
    assert_eq!(config.unknown_api_keys, UnknownApiKeys::Allow);
}

#[test]
fn audit_config_validation() {
    let parsed: AuditConfig = serde_yaml_ng::from_str("path: audit.jsonl\n").unwrap();
    assert_eq!(parsed.sample_allows, 1.0);
    assert!(parsed.validate().is_ok());
    let bad = AuditConfig {
        path: " ".into(),
        sample_allows: 1.5,
    };
    let errors = bad.validate().unwrap_err();
    assert_eq!(errors.0.len(), 2);
    assert_eq!(errors.0[0].path, "audit.path");
    assert_eq!(errors.0[1].path, "audit.sample_allows");
    assert!(serde_yaml_ng::from_str::<AuditConfig>("path: a\nsample: 1\n").is_err());
}

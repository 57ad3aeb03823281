//! Authorization and audit for the Strait edge.
//!
//! * [`AuthorizationConfig`] / [`AuditConfig`]: the `authorization:` and
//!   `audit:` blocks of a virtual cluster (serde, `deny_unknown_fields`).
//! * [`Authorizer`]: the compiled rules, swapped atomically on reload
//!   ([`Authorizer::reload`], [`Authorizer::reload_from_file`],
//!   [`Authorizer::watch_file`]); open connections use the new rules from
//!   their next request.
//! * [`AuthorizationFilterFactory`]: a [`strait_filter::FilterFactory`]
//!   building one [`AuthorizationFilter`] per connection.
//! * [`AuditSink`]: JSON lines written by a background task.
//! * [`AuthzMetrics`]: the Prometheus metrics, registered into a registry
//!   passed in.
//!
//! Install the filter whenever a virtual cluster has an `authorization:`
//! block in `mode: rules` (the default): everything not allowed is denied,
//! and zero rules deny everything. `mode: allow_all` is the explicit way to
//! allow all (no filter).
//!
//! See `README.md` for the rule reference and the API key mapping table.

#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod filter;
pub mod metrics;
pub mod responses;
pub mod rules;

pub use audit::{AuditRecord, AuditSink};
pub use config::{
    AuditConfig, AuthorizationConfig, AuthorizationMode, FieldError, Operation, ResourceType,
    RuleConfig, UnknownApiKeys, ValidationErrors,
};
pub use filter::{AuthorizationFilter, AuthorizationFilterFactory};
pub use metrics::AuthzMetrics;
pub use rules::{Authorizer, Decision, MatchedRule, ReloadError, RuleSet};

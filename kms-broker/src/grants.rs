//! Grants: which caller may do which operation on which backend and KEK.
//!
//! ```yaml
//! grants:
//!   - callers: ["spiffe://west.example/edge/*"]   # SPIFFE ID globs, as `callers`
//!     kms: ["vault-east"]                         # backend names, or "*"
//!     keks: ["kek-*"]                             # KEK key_id globs; default ["*"]
//!     operations: [unwrap]                        # generate, unwrap, wrap, resolve, shred
//! ```
//! The same entry arrives from the control plane as a `KmsGrant` resource
//! (spec JSON with the same four keys). A grant only ever adds: a call is
//! allowed when some grant matches its caller, backend, KEK and operation.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use strait_control_client::state::spec::{check_spiffe_glob, spiffe_glob_matches};
use strait_kms_core::config::ConfigError;

/// What a grant may allow, by the names `operations` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GrantOp {
    Generate,
    Unwrap,
    Wrap,
    Resolve,
    Shred,
}

impl GrantOp {
    pub const ALL: [GrantOp; 5] = [
        GrantOp::Generate,
        GrantOp::Unwrap,
        GrantOp::Wrap,
        GrantOp::Resolve,
        GrantOp::Shred,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GrantOp::Generate => "generate",
            GrantOp::Unwrap => "unwrap",
            GrantOp::Wrap => "wrap",
            GrantOp::Resolve => "resolve",
            GrantOp::Shred => "shred",
        }
    }

    pub fn parse(s: &str) -> Option<GrantOp> {
        GrantOp::ALL.into_iter().find(|op| op.as_str() == s)
    }
}

impl fmt::Display for GrantOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn any() -> Vec<String> {
    vec!["*".into()]
}

/// One `grants:` entry (or `KmsGrant` spec) as written. Lists are checked
/// by [`GrantConfig::validate_into`], which reports every problem with its
/// path; operations are strings so that an unknown one is reported there
/// too, beside the others, instead of stopping the parse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    #[serde(default)]
    pub callers: Vec<String>,
    #[serde(default)]
    pub kms: Vec<String>,
    #[serde(default = "any")]
    pub keks: Vec<String>,
    #[serde(default)]
    pub operations: Vec<String>,
}

/// `None` when `glob` is a usable KEK glob, else why not. `*` matches any
/// run of characters (`/` included: AWS names keys `alias/...` or by ARN);
/// everything else is literal.
pub fn check_kek_glob(glob: &str) -> Option<&'static str> {
    if glob.is_empty() {
        Some("must not be empty")
    } else if glob.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace or control characters")
    } else {
        None
    }
}

/// Whether `glob` (see [`check_kek_glob`]) matches all of `name`.
pub fn kek_glob_matches(glob: &str, name: &str) -> bool {
    let (g, n) = (glob.as_bytes(), name.as_bytes());
    // Greedy wildcard matching with one backtrack point: the last `*`.
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ni));
            gi += 1;
        } else if gi < g.len() && g[gi] == n[ni] {
            gi += 1;
            ni += 1;
        } else if let Some((sg, sn)) = star {
            gi = sg + 1;
            ni = sn + 1;
            star = Some((sg, sn + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

/// The names a KEK goes by: its key_id, and for an AWS alias
/// (`alias/<name>`, `arn:...:alias/<name>`) the bare name too, since rules
/// and KekShreds name AWS keys by bare name as well.
pub fn kek_names(key_id: &str) -> impl Iterator<Item = &str> {
    let alias = key_id
        .strip_prefix("alias/")
        .or_else(|| {
            key_id
                .starts_with("arn:")
                .then(|| key_id.split_once(":alias/").map(|(_, n)| n))
                .flatten()
        })
        .filter(|n| !n.is_empty());
    std::iter::once(key_id).chain(alias)
}

impl GrantConfig {
    /// Appends every problem of this grant to `errors`. `backends`: the
    /// broker's backend names, which `kms` must name (or `*`); `None` for
    /// a control-plane `KmsGrant`, which every broker reads and which may
    /// name the backends of other brokers.
    pub fn validate_into(
        &self,
        path: &str,
        backends: Option<&[&str]>,
        errors: &mut Vec<ConfigError>,
    ) {
        let mut push = |p: String, m: String| {
            errors.push(ConfigError {
                path: p,
                message: m,
            })
        };
        let lists = [
            (
                "callers",
                &self.callers,
                "at least one SPIFFE ID glob is required",
            ),
            (
                "kms",
                &self.kms,
                "at least one backend name (or \"*\") is required",
            ),
            (
                "keks",
                &self.keks,
                "at least one KEK glob is required (or leave keks out: every KEK)",
            ),
            (
                "operations",
                &self.operations,
                "at least one of generate, unwrap, wrap, resolve, shred is required",
            ),
        ];
        for (field, list, empty) in lists {
            if list.is_empty() {
                push(format!("{path}.{field}"), empty.into());
            }
        }
        for (i, g) in self.callers.iter().enumerate() {
            if let Err(e) = check_spiffe_glob(g) {
                push(format!("{path}.callers[{i}]"), e);
            }
        }
        for (i, k) in self.kms.iter().enumerate() {
            if k == "*" {
                continue;
            }
            match backends {
                _ if k.trim().is_empty() => {
                    push(format!("{path}.kms[{i}]"), "must not be empty".into())
                }
                Some(names) if !names.contains(&k.as_str()) => push(
                    format!("{path}.kms[{i}]"),
                    format!(
                        "no backend named {k:?} (this broker has {}; or \"*\")",
                        names.join(", ")
                    ),
                ),
                _ => {}
            }
        }
        for (i, g) in self.keks.iter().enumerate() {
            if let Some(e) = check_kek_glob(g) {
                push(format!("{path}.keks[{i}]"), e.into());
            }
        }
        for (i, op) in self.operations.iter().enumerate() {
            if GrantOp::parse(op).is_none() {
                push(
                    format!("{path}.operations[{i}]"),
                    format!("unknown operation {op:?} (expected generate, unwrap, wrap, resolve or shred)"),
                );
            }
        }
    }

    /// The grant in force; `source` names it in logs (`grants[1]`,
    /// `KmsGrant/west-unwrap`). Call after [`GrantConfig::validate_into`]
    /// found nothing: an unknown operation is dropped here (grants less).
    pub fn compile(&self, source: impl Into<String>) -> Grant {
        Grant {
            source: source.into(),
            callers: self.callers.clone(),
            kms: (!self.kms.iter().any(|k| k == "*")).then(|| self.kms.iter().cloned().collect()),
            keks: self.keks.clone(),
            operations: self
                .operations
                .iter()
                .filter_map(|o| GrantOp::parse(o))
                .collect(),
        }
    }
}

/// A validated grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub source: String,
    callers: Vec<String>,
    /// `None`: every backend (`*`).
    kms: Option<BTreeSet<String>>,
    keks: Vec<String>,
    operations: BTreeSet<GrantOp>,
}

impl Grant {
    /// Whether this grant allows `caller` to do `op` on `backend`'s `kek`
    /// (for `resolve`, the alias asked for).
    pub fn allows(&self, caller: &str, op: GrantOp, backend: &str, kek: &str) -> bool {
        self.operations.contains(&op)
            && self
                .kms
                .as_ref()
                .is_none_or(|names| names.contains(backend))
            && self
                .keks
                .iter()
                .any(|g| kek_names(kek).any(|name| kek_glob_matches(g, name)))
            && self.callers.iter().any(|g| spiffe_glob_matches(g, caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(yaml: &str) -> GrantConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn kek_globs() {
        for (g, n, want) in [
            ("*", "anything/at:all", true),
            ("kek-*", "kek-orders", true),
            ("kek-*", "kek-", true),
            ("kek-*", "xkek-orders", false),
            ("*-orders", "kek-secret-orders", true),
            ("kek-*-orders", "kek-a-b-orders", true),
            ("kek-*-orders", "kek-orders", false),
            ("kek-a", "kek-a", true),
            ("kek-a", "kek-ab", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
        ] {
            assert_eq!(kek_glob_matches(g, n), want, "{g} vs {n}");
        }
        let names = |k: &str| kek_names(k).map(str::to_string).collect::<Vec<_>>();
        assert_eq!(names("alias/kek-a"), ["alias/kek-a", "kek-a"]);
        assert_eq!(
            names("arn:aws:kms:eu-west-1:1:alias/kek-a"),
            ["arn:aws:kms:eu-west-1:1:alias/kek-a", "kek-a"]
        );
        assert_eq!(names("kek-a"), ["kek-a"]);
        assert_eq!(names("alias/"), ["alias/"]);
    }

    #[test]
    fn matching() {
        let g = grant(
            r#"{ callers: ["spiffe://west.example/edge/*"], kms: [vault-east], keks: ["kek-*"], operations: [unwrap] }"#,
        )
        .compile("grants[0]");
        let west = "spiffe://west.example/edge/w1";
        assert!(g.allows(west, GrantOp::Unwrap, "vault-east", "kek-orders"));
        assert!(g.allows(west, GrantOp::Unwrap, "vault-east", "alias/kek-orders"));
        assert!(!g.allows(west, GrantOp::Wrap, "vault-east", "kek-orders"));
        assert!(!g.allows(west, GrantOp::Unwrap, "aws-west", "kek-orders"));
        assert!(!g.allows(west, GrantOp::Unwrap, "vault-east", "other"));
        assert!(!g.allows(
            "spiffe://east.example/edge/e1",
            GrantOp::Unwrap,
            "vault-east",
            "kek-orders"
        ));
        let every =
            grant(r#"{ callers: ["spiffe://a.example/**"], kms: ["*"], operations: [shred] }"#)
                .compile("KmsGrant/admin");
        assert!(every.allows(
            "spiffe://a.example/admin/x/y",
            GrantOp::Shred,
            "any",
            "any/key"
        ));
    }

    #[test]
    fn every_problem_with_its_path() {
        let g = grant(
            r#"{ callers: ["edge/*"], kms: [vault, nope, ""], keks: ["", "a b"], operations: [unwrap, delete] }"#,
        );
        let mut errors = Vec::new();
        g.validate_into("grants[2]", Some(&["vault", "aws"]), &mut errors);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "grants[2].callers[0]: 'edge/*' must start with spiffe://",
                "grants[2].kms[1]: no backend named \"nope\" (this broker has vault, aws; or \"*\")",
                "grants[2].kms[2]: must not be empty",
                "grants[2].keks[0]: must not be empty",
                "grants[2].keks[1]: must not contain whitespace or control characters",
                "grants[2].operations[1]: unknown operation \"delete\" (expected generate, unwrap, wrap, resolve or shred)",
            ]
        );
        let mut errors = Vec::new();
        grant("{ keks: [] }").validate_into("KmsGrant/x", None, &mut errors);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "KmsGrant/x.callers: at least one SPIFFE ID glob is required",
                "KmsGrant/x.kms: at least one backend name (or \"*\") is required",
                "KmsGrant/x.keks: at least one KEK glob is required (or leave keks out: every KEK)",
                "KmsGrant/x.operations: at least one of generate, unwrap, wrap, resolve, shred is required",
            ]
        );
        // A KmsGrant may name another broker's backend.
        let mut errors = Vec::new();
        grant(
            r#"{ callers: ["spiffe://a.example/edge/*"], kms: [elsewhere], operations: [wrap] }"#,
        )
        .validate_into("KmsGrant/y", None, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(serde_yaml_ng::from_str::<GrantConfig>("{ callers: [], colour: red }").is_err());
    }
}

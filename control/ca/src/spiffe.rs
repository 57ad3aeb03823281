//! The one identity scheme of the mesh (see docs/security.md):
//!
//! ```text
//! spiffe://<trust-domain>/edge/<name>
//! spiffe://<trust-domain>/kms-broker/<name>
//! spiffe://<trust-domain>/control/<id>
//! spiffe://<trust-domain>/admin/<name>
//! spiffe://<trust-domain>/ns/<ns>/sa/<sa>
//! ```
//! The CA signs nothing else.

use std::fmt;
use std::time::Duration;

/// What an identity is, by the path of its SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Edge,
    KmsBroker,
    Control,
    Admin,
    Workload,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::KmsBroker => "kms-broker",
            Role::Control => "control",
            Role::Admin => "admin",
            Role::Workload => "workload",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("'{0}' is not a SPIFFE ID (expected spiffe://<trust-domain>/<path>)")]
    NotSpiffe(String),
    #[error("trust domain '{0}' is invalid (1-255 of a-z, 0-9, '.', '-', '_')")]
    BadTrustDomain(String),
    #[error("'{id}' is outside the trust domain {expected}")]
    OtherDomain { id: String, expected: String },
    #[error(
        "'{0}' does not follow the identity scheme (/edge/<name>, /kms-broker/<name>, \
         /control/<id>, /admin/<name>, /ns/<ns>/sa/<sa>; segments of a-z, A-Z, 0-9, '.', '-', '_')"
    )]
    Scheme(String),
}

/// A parsed, scheme-conforming SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
    role: Role,
}

/// Checks a trust domain name as SPIFFE defines it (lowercase letters,
/// digits, dots, dashes, underscores).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::BadTrustDomain(td.to_string()))
    }
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    /// Parses `s` and checks it against the scheme (any trust domain).
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::NotSpiffe(s.to_string()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeError::NotSpiffe(s.to_string()))?;
        validate_trust_domain(td)?;
        let segs: Vec<&str> = path.split('/').collect();
        if !segs.iter().all(|s| segment_ok(s)) {
            return Err(SpiffeError::Scheme(s.to_string()));
        }
        let role = match segs.as_slice() {
            ["edge", _] => Role::Edge,
            ["kms-broker", _] => Role::KmsBroker,
            ["control", _] => Role::Control,
            ["admin", _] => Role::Admin,
            ["ns", _, "sa", _] => Role::Workload,
            _ => return Err(SpiffeError::Scheme(s.to_string())),
        };
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            path: format!("/{path}"),
            role,
        })
    }

    /// Parses `s` and requires it to be in `trust_domain`.
    pub fn parse_in(s: &str, trust_domain: &str) -> Result<SpiffeId, SpiffeError> {
        let id = SpiffeId::parse(s)?;
        if id.trust_domain != trust_domain {
            return Err(SpiffeError::OtherDomain {
                id: s.to_string(),
                expected: trust_domain.to_string(),
            });
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn role(&self) -> Role {
        self.role
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

/// The shortest certificate the CA signs.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);

/// Certificate lifetime per role: the default when a request names none, and
/// the maximum a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub workload: Duration,
    pub edge: Duration,
    pub kms_broker: Duration,
    pub control: Duration,
    pub admin: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        let h = Duration::from_secs(3600);
        Self {
            workload: h,
            edge: 24 * h,
            kms_broker: 24 * h,
            control: 24 * h,
            admin: h,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifetimeError {
    #[error("lifetime of {role} certificates must be at least {}s (got {}s)", MIN_LIFETIME.as_secs(), .got.as_secs())]
    TooShort { role: Role, got: Duration },
    #[error("{role} certificates live at most {}s (asked {}s)", .max.as_secs(), .asked.as_secs())]
    TooLong {
        role: Role,
        asked: Duration,
        max: Duration,
    },
}

impl Lifetimes {
    pub fn max_for(&self, role: Role) -> Duration {
        match role {
            Role::Workload => self.workload,
            Role::Edge => self.edge,
            Role::KmsBroker => self.kms_broker,
            Role::Control => self.control,
            Role::Admin => self.admin,
        }
    }

    /// The longest lifetime of any role: how long a CA generation must stay
    /// in bundles after it signed its last certificate.
    pub fn longest(&self) -> Duration {
        [
            self.workload,
            self.edge,
            self.kms_broker,
            self.control,
            self.admin,
        ]
        .into_iter()
        .max()
        .unwrap_or(MIN_LIFETIME)
    }

    /// Every configured lifetime is at least [`MIN_LIFETIME`].
    pub fn validate(&self) -> Result<(), LifetimeError> {
        for role in [
            Role::Workload,
            Role::Edge,
            Role::KmsBroker,
            Role::Control,
            Role::Admin,
        ] {
            let got = self.max_for(role);
            if got < MIN_LIFETIME {
                return Err(LifetimeError::TooShort { role, got });
            }
        }
        Ok(())
    }

    /// The lifetime a request gets: `asked` (None = the role's default),
    /// within [MIN_LIFETIME, the role's maximum].
    pub fn resolve(&self, role: Role, asked: Option<Duration>) -> Result<Duration, LifetimeError> {
        let max = self.max_for(role);
        match asked {
            None => Ok(max),
            Some(a) if a < MIN_LIFETIME => Err(LifetimeError::TooShort { role, got: a }),
            Some(a) if a > max => Err(LifetimeError::TooLong {
                role,
                asked: a,
                max,
            }),
            Some(a) => Ok(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_accepts_exactly_the_five_shapes() {
        let cases = [
            ("spiffe://example.org/edge/e1", Some(Role::Edge)),
            ("spiffe://example.org/kms-broker/b", Some(Role::KmsBroker)),
            ("spiffe://example.org/control/1", Some(Role::Control)),
            ("spiffe://example.org/admin/alice", Some(Role::Admin)),
            (
                "spiffe://example.org/ns/payments/sa/api",
                Some(Role::Workload),
            ),
            ("spiffe://example.org/edge", None),
            ("spiffe://example.org/edge/e1/x", None),
            ("spiffe://example.org/ns/a/sa", None),
            ("spiffe://example.org/ns/a/role/b", None),
            ("spiffe://example.org/other/x", None),
            ("spiffe://example.org/edge/", None),
            ("spiffe://example.org/edge/..", None),
            ("spiffe://example.org/edge/a b", None),
            ("spiffe://Example.org/edge/e1", None),
            ("spiffe://example.org", None),
            ("https://example.org/edge/e1", None),
        ];
        for (s, want) in cases {
            let got = SpiffeId::parse(s).ok().map(|i| i.role());
            assert_eq!(got, want, "{s}");
        }
        let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/a/sa/b");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/a/sa/b");
    }

    #[test]
    fn other_trust_domain_is_refused() {
        let e = SpiffeId::parse_in("spiffe://evil.org/edge/e1", "example.org").unwrap_err();
        assert_eq!(
            e.to_string(),
            "'spiffe://evil.org/edge/e1' is outside the trust domain example.org"
        );
    }

    #[test]
    fn lifetimes_default_bound_and_minimum() {
        let l = Lifetimes::default();
        let h = Duration::from_secs(3600);
        assert_eq!(l.resolve(Role::Workload, None), Ok(h));
        assert_eq!(l.resolve(Role::Edge, None), Ok(24 * h));
        assert_eq!(l.resolve(Role::KmsBroker, None), Ok(24 * h));
        assert_eq!(l.resolve(Role::Control, None), Ok(24 * h));
        assert_eq!(l.resolve(Role::Admin, None), Ok(h));
        assert_eq!(
            l.resolve(Role::Workload, Some(Duration::from_secs(60))),
            Ok(Duration::from_secs(60))
        );
        assert!(matches!(
            l.resolve(Role::Workload, Some(Duration::from_secs(59))),
            Err(LifetimeError::TooShort { .. })
        ));
        assert!(matches!(
            l.resolve(Role::Admin, Some(2 * h)),
            Err(LifetimeError::TooLong { .. })
        ));
        assert_eq!(l.longest(), 24 * h);
        let bad = Lifetimes {
            admin: Duration::from_secs(30),
            ..l
        };
        assert!(bad.validate().is_err());
    }
}

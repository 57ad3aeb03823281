//! Join tokens: one-time (or few-time) credentials that let a node without a
//! certificate get its first one.
//!
//! Token string: `strait-join.<id>.<secret>.<pin>`
//! - `id`: 16 hex chars, the name of the stored JoinToken record;
//! - `secret`: 32 hex chars (128 bits); only its SHA-256 is stored;
//! - `pin`: SHA-256 (hex) of the root that verifies the control plane's
//!   server certificate, so a joiner holding nothing but the token can
//!   authenticate the control plane (as kubeadm's discovery hash does).

use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::authority::hex;
use crate::spiffe::{validate_trust_domain, Role, SpiffeId};

pub const PREFIX: &str = "strait-join";
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MIN_TTL: Duration = Duration::from_secs(60);
pub const MAX_USES: u32 = 1000;

/// What the store keeps (the JoinToken resource spec, minus names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub spiffe_id_pattern: String,
    pub expires_at_unix: i64,
    pub uses_left: u32,
}

/// A token string, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
    pub pin: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed join token (expected {PREFIX}.<id>.<secret>.<pin>)")]
    Malformed,
    #[error("unknown join token {0}")]
    Unknown(String),
    #[error("join token {0}: wrong secret")]
    BadSecret(String),
    #[error("join token {id} expired at {expired_at} (now {now})")]
    Expired {
        id: String,
        expired_at: i64,
        now: i64,
    },
    #[error("join token {0} has no uses left")]
    Exhausted(String),
    #[error("join token {id} is for '{pattern}', not '{requested}'")]
    PatternMismatch {
        id: String,
        pattern: String,
        requested: String,
    },
    #[error("join tokens never grant admin identities ('{0}')")]
    AdminRefused(String),
    #[error("invalid token request: {0}")]
    Invalid(String),
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Token {
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        match parts.as_slice() {
            [p, id, secret, pin]
                if *p == PREFIX && is_hex(id, 16) && is_hex(secret, 32) && is_hex(pin, 64) =>
            {
                Ok(Token {
                    id: id.to_string(),
                    secret: secret.to_string(),
                    pin: pin.to_string(),
                })
            }
            _ => Err(TokenError::Malformed),
        }
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.pin)
    }
}

fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// Compiles a SPIFFE ID glob: `*` stays within one path segment, `**`
/// crosses segments.
pub fn compile_pattern(pattern: &str) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("'{pattern}' is not a valid glob: {e}"))
}

/// Checks a token's pattern: a glob inside `trust_domain`, and never one
/// that could name an admin (admins get certificates from an admin, not
/// from a token that might leak).
pub fn validate_pattern(pattern: &str, trust_domain: &str) -> Result<(), String> {
    validate_trust_domain(trust_domain).map_err(|e| e.to_string())?;
    let prefix = format!("spiffe://{trust_domain}/");
    let Some(path) = pattern.strip_prefix(&prefix) else {
        return Err(format!("pattern '{pattern}' must start with {prefix}"));
    };
    if path.is_empty() {
        return Err(format!("pattern '{pattern}' has no path"));
    }
    compile_pattern(pattern)?;
    let first = path.split('/').next().unwrap_or("");
    if first != "edge" && first != "kms-broker" && first != "control" && first != "ns" {
        return Err(format!(
            "pattern '{pattern}' must start with one of /edge/, /kms-broker/, /control/, /ns/ \
             (the first path segment is literal; admin identities are never granted by a token)"
        ));
    }
    Ok(())
}

/// Creates a token: the string to hand out (once) and the record to store.
pub fn create(
    trust_domain: &str,
    pattern: &str,
    ttl: Duration,
    uses: u32,
    root_pin: &str,
    now_unix: i64,
) -> Result<(Token, TokenRecord), TokenError> {
    validate_pattern(pattern, trust_domain).map_err(TokenError::Invalid)?;
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(TokenError::Invalid(format!(
            "ttl must be between {}s and {}s (got {}s)",
            MIN_TTL.as_secs(),
            MAX_TTL.as_secs(),
            ttl.as_secs()
        )));
    }
    if uses == 0 || uses > MAX_USES {
        return Err(TokenError::Invalid(format!(
            "uses must be between 1 and {MAX_USES} (got {uses})"
        )));
    }
    if !is_hex(root_pin, 64) {
        return Err(TokenError::Invalid("root pin must be 64 hex chars".into()));
    }
    let id: [u8; 8] = rand::random();
    let secret: [u8; 16] = rand::random();
    let token = Token {
        id: hex(&id),
        secret: hex(&secret),
        pin: root_pin.to_string(),
    };
    let record = TokenRecord {
        id: token.id.clone(),
        secret_sha256: sha256_hex(&token.secret),
        spiffe_id_pattern: pattern.to_string(),
        expires_at_unix: now_unix + ttl.as_secs() as i64,
        uses_left: uses,
    };
    Ok((token, record))
}

/// Redeems `token` for `requested_id` against its stored record (None when
/// the store has no record of that id). On success returns the record with
/// one use fewer, to be written back with compare-and-set so that two
/// concurrent joins cannot both spend the last use.
pub fn redeem(
    record: Option<&TokenRecord>,
    token: &Token,
    requested_id: &str,
    now_unix: i64,
) -> Result<TokenRecord, TokenError> {
    let Some(rec) = record else {
        return Err(TokenError::Unknown(token.id.clone()));
    };
    let presented = sha256_hex(&token.secret);
    // Constant time: the comparison must not tell how much of a guess was right.
    if !bool::from(presented.as_bytes().ct_eq(rec.secret_sha256.as_bytes())) {
        return Err(TokenError::BadSecret(rec.id.clone()));
    }
    if now_unix >= rec.expires_at_unix {
        return Err(TokenError::Expired {
            id: rec.id.clone(),
            expired_at: rec.expires_at_unix,
            now: now_unix,
        });
    }
    if rec.uses_left == 0 {
        return Err(TokenError::Exhausted(rec.id.clone()));
    }
    if let Ok(id) = SpiffeId::parse(requested_id) {
        if id.role() == Role::Admin {
            return Err(TokenError::AdminRefused(requested_id.to_string()));
        }
    }
    let matcher = compile_pattern(&rec.spiffe_id_pattern).map_err(TokenError::Invalid)?;
    if !matcher.is_match(requested_id) {
        return Err(TokenError::PatternMismatch {
            id: rec.id.clone(),
            pattern: rec.spiffe_id_pattern.clone(),
            requested: requested_id.to_string(),
        });
    }
    Ok(TokenRecord {
        uses_left: rec.uses_left - 1,
        ..rec.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    const TD: &str = "example.org";

    fn make(pattern: &str, uses: u32) -> (Token, TokenRecord) {
        create(TD, pattern, Duration::from_secs(600), uses, PIN, 1000).unwrap()
    }

    #[test]
    fn token_string_round_trips_and_the_secret_is_not_stored() {
        let (t, rec) = make("spiffe://example.org/edge/*", 1);
        let s = t.to_string();
        assert!(s.starts_with("strait-join."));
        assert_eq!(Token::parse(&s).unwrap(), t);
        assert_eq!(rec.id, t.id);
        assert_ne!(rec.secret_sha256, t.secret);
        assert!(!rec.secret_sha256.contains(&t.secret));
        assert_eq!(rec.expires_at_unix, 1600);
        for bad in [
            "",
            "strait-join.x.y.z",
            &s.replace("strait-join", "other"),
            &s[..s.len() - 1],
            &s.to_uppercase(),
        ] {
            assert_eq!(Token::parse(bad), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn redeem_outcomes() {
        let (t, rec) = make("spiffe://example.org/edge/*", 1);
        let ok = redeem(Some(&rec), &t, "spiffe://example.org/edge/e1", 1599).unwrap();
        assert_eq!(ok.uses_left, 0);
        // Reuse: the stored record now has no uses left.
        assert_eq!(
            redeem(Some(&ok), &t, "spiffe://example.org/edge/e1", 1599),
            Err(TokenError::Exhausted(t.id.clone()))
        );
        assert_eq!(
            redeem(None, &t, "spiffe://example.org/edge/e1", 1599),
            Err(TokenError::Unknown(t.id.clone()))
        );
        assert!(matches!(
            redeem(Some(&rec), &t, "spiffe://example.org/edge/e1", 1600),
            Err(TokenError::Expired {
                expired_at: 1600,
                now: 1600,
                ..
            })
        ));
        // `*` does not cross a path segment.
        assert!(matches!(
            redeem(Some(&rec), &t, "spiffe://example.org/edge/e1/x", 1000),
            Err(TokenError::PatternMismatch { .. })
        ));
        assert!(matches!(
            redeem(Some(&rec), &t, "spiffe://example.org/kms-broker/b", 1000),
            Err(TokenError::PatternMismatch { .. })
        ));
        let stolen = Token {
            secret: "0123456789abcdef0123456789abcdef".into(),
            ..t.clone()
        };
        assert_eq!(
            redeem(Some(&rec), &stolen, "spiffe://example.org/edge/e1", 1000),
            Err(TokenError::BadSecret(t.id.clone()))
        );
    }

    #[test]
    fn patterns_bounds_and_admin() {
        for bad in [
            "spiffe://other.org/edge/*",
            "spiffe://example.org/",
            "spiffe://example.org/admin/*",
            "spiffe://example.org/*",
            "spiffe://example.org/**",
            "spiffe://example.org/edge/[",
        ] {
            assert!(
                matches!(
                    create(TD, bad, Duration::from_secs(600), 1, PIN, 0),
                    Err(TokenError::Invalid(_))
                ),
                "{bad}"
            );
        }
        let p = "spiffe://example.org/ns/*/sa/*";
        for (ttl, uses) in [(59, 1), (24 * 3600 + 1, 1), (600, 0), (600, MAX_USES + 1)] {
            assert!(matches!(
                create(TD, p, Duration::from_secs(ttl), uses, PIN, 0),
                Err(TokenError::Invalid(_))
            ));
        }
        let (t, rec) = make("spiffe://example.org/ns/**", 3);
        assert!(redeem(Some(&rec), &t, "spiffe://example.org/ns/a/sa/b", 0).is_ok());
        // Even a pattern that would match cannot yield an admin identity.
        let rec2 = TokenRecord {
            spiffe_id_pattern: "spiffe://example.org/**".into(),
            ..rec
        };
        assert_eq!(
            redeem(Some(&rec2), &t, "spiffe://example.org/admin/root", 0),
            Err(TokenError::AdminRefused(
                "spiffe://example.org/admin/root".into()
            ))
        );
    }
}

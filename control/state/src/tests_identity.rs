//! The identity kinds (JoinToken, IssuedCertificate, CertificateAuthority).

use super::*;
use serde_json::json;

fn apply(kind: Kind, name: &str, spec: Value, expected: Option<u64>) -> Command {
    Command::Apply {
        kind,
        name: name.into(),
        labels: BTreeMap::new(),
        spec,
        expected_revision: expected,
    }
}

fn errors(cmd: &Command) -> Vec<String> {
    match validate_command(cmd) {
        Ok(()) => vec![],
        Err(CommandError::Invalid { errors, .. }) => errors.into_iter().map(|e| e.path).collect(),
        Err(e) => panic!("unexpected {e}"),
    }
}

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn token(uses: u32) -> Value {
    json!({
        "id": "0123456789abcdef",
        "secret_sha256": SHA,
        "spiffe_id_pattern": "spiffe://example.org/edge/*",
        "expires_at_unix": 1_800_000_000,
        "uses_left": uses,
    })
}

fn ca(state: &str) -> Value {
    json!({
        "trust_domain": "example.org",
        "generation": 1,
        "cert_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "sealed_key": "eyJ2IjoxfQ==",
        "sealer": "file",
        "state": state,
        "not_after_unix": 1_900_000_000,
    })
}

#[test]
fn identity_specs_validate_with_paths() {
    let cases: Vec<(Kind, Value, Vec<&str>)> = vec![
        (Kind::JoinToken, token(1), vec![]),
        (
            Kind::JoinToken,
            json!({
                "id": "XYZ",
                "secret_sha256": "the-secret",
                "spiffe_id_pattern": "edge/*",
                "expires_at_unix": 0,
                "uses_left": 1,
            }),
            vec![
                "spec.id",
                "spec.secret_sha256",
                "spec.spiffe_id_pattern",
                "spec.expires_at_unix",
            ],
        ),
        (
            Kind::JoinToken,
            json!({"id": "0123456789abcdef", "secret": "x"}),
            vec!["spec.secret"],
        ),
        (
            Kind::IssuedCertificate,
            json!({
                "serial": "0a1b",
                "spiffe_id": "spiffe://example.org/edge/e1",
                "not_after_unix": 1_800_000_000,
                "ca_generation": 1,
            }),
            vec![],
        ),
        (
            Kind::IssuedCertificate,
            json!({
                "serial": "0A:1B",
                "spiffe_id": "example.org/edge/e1",
                "not_after_unix": 1,
                "ca_generation": 0,
            }),
            vec!["spec.serial", "spec.spiffe_id", "spec.ca_generation"],
        ),
        (Kind::CertificateAuthority, ca("active"), vec![]),
        (
            Kind::CertificateAuthority,
            ca("prepared"),
            vec!["spec.activate_at_unix"],
        ),
        (
            Kind::CertificateAuthority,
            ca("retiring"),
            vec!["spec.retire_after_unix"],
        ),
        (
            Kind::CertificateAuthority,
            ca("unknown"),
            vec!["spec.state"],
        ),
        (
            Kind::CertificateAuthority,
            {
                let mut v = ca("active");
                v["sealed_key"] = json!("-----BEGIN PRIVATE KEY-----\nMIG\n");
                v["sealer"] = json!("plain");
                v["generation"] = json!(0);
                v
            },
            vec!["spec.generation", "spec.sealed_key", "spec.sealer"],
        ),
        (
            Kind::CertificateAuthority,
            {
                let mut v = ca("active");
                v["key_pem"] = json!("x");
                v
            },
            vec!["spec.key_pem"],
        ),
    ];
    for (kind, spec, want) in cases {
        let cmd = apply(kind, "x1", spec.clone(), None);
        let got = errors(&cmd);
        assert_eq!(got, want, "{kind} {spec}");
    }
}

#[test]
fn token_redemption_is_compare_and_set() {
    let mut s = State::new(10);
    let (out, _) = s.apply(&apply(
        Kind::JoinToken,
        "0123456789abcdef",
        token(1),
        Some(0),
    ));
    let rev = match out.unwrap() {
        Outcome::Applied { resource, .. } => resource.revision,
        o => panic!("{o:?}"),
    };
    // Two joins read revision `rev`; the first spends the use, the second conflicts.
    let (first, _) = s.apply(&apply(
        Kind::JoinToken,
        "0123456789abcdef",
        token(0),
        Some(rev),
    ));
    assert!(first.is_ok());
    let (second, _) = s.apply(&apply(
        Kind::JoinToken,
        "0123456789abcdef",
        token(0),
        Some(rev),
    ));
    assert!(
        matches!(second, Err(CommandError::Conflict { .. })),
        "{second:?}"
    );
}

#[test]
fn identity_kind_names() {
    for (s, k) in [
        ("JoinToken", Kind::JoinToken),
        ("jointokens", Kind::JoinToken),
        ("token", Kind::JoinToken),
        ("IssuedCertificate", Kind::IssuedCertificate),
        ("certs", Kind::IssuedCertificate),
        ("CertificateAuthority", Kind::CertificateAuthority),
        ("certificateauthorities", Kind::CertificateAuthority),
        ("ca", Kind::CertificateAuthority),
    ] {
        assert_eq!(Kind::parse(s).unwrap(), k, "{s}");
        assert_eq!(Kind::parse(k.as_str()).unwrap(), k);
    }
}

use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};

use super::*;

const TD: &str = "example.org";
const NOW: i64 = 1_800_000_000;

fn ca(generation: u64) -> (GeneratedRoot, Signer) {
    let root = generate_root(TD, generation, NOW, Duration::from_secs(30 * 86400)).unwrap();
    let signer = Signer::new(TD, generation, &root.cert_pem, &root.key_der).unwrap();
    (root, signer)
}

fn req(id: &str, ttl: Option<u64>) -> (Zeroizing<String>, SignRequest) {
    let (key, csr) = new_key_and_csr().unwrap();
    (
        key,
        SignRequest {
            csr_pem: csr,
            spiffe_id: id.into(),
            dns_names: vec![],
            ips: vec![],
            ttl: ttl.map(Duration::from_secs),
        },
    )
}

/// Verifies `leaf` against `root` with webpki, as rustls does, at `at`.
fn verify(root_pem: &str, leaf_pem: &str, at: i64) -> Result<(), webpki::Error> {
    let root_der = CertificateDer::from(pem_to_der(root_pem).unwrap());
    let leaf_der = CertificateDer::from(pem_to_der(leaf_pem).unwrap());
    let anchor = webpki::anchor_from_trusted_cert(&root_der).unwrap();
    let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            std::slice::from_ref(&anchor),
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(at as u64)),
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

#[test]
fn signs_a_workload_svid_that_chains_to_the_root() {
    let (root, signer) = ca(1);
    let (_key, r) = req("spiffe://example.org/ns/payments/sa/api", Some(60));
    let issued = signer.sign(&r, &Lifetimes::default(), NOW).unwrap();
    assert_eq!(issued.ca_generation, 1);
    assert_eq!(issued.not_after_unix, NOW + 60);
    assert_eq!(issued.serial_hex.len(), 32);
    verify(&root.cert_pem, &issued.cert_pem, NOW + 30).unwrap();
    let expired = verify(&root.cert_pem, &issued.cert_pem, NOW + 61).unwrap_err();
    assert!(
        matches!(expired, webpki::Error::CertExpired { .. }),
        "{expired:?}"
    );
    let der = pem_to_der(&issued.cert_pem).unwrap();
    assert_eq!(
        spiffe_id_of(&der).as_deref(),
        Some("spiffe://example.org/ns/payments/sa/api")
    );
    assert_eq!(not_after_of(&der), Some(NOW + 60));
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(!cert.is_ca());
    assert_eq!(cert.subject().iter().count(), 0);
    // Another CA's root does not verify it.
    let (other, _) = ca(2);
    assert!(verify(&other.cert_pem, &issued.cert_pem, NOW + 30).is_err());
}

#[test]
fn default_lifetimes_and_listener_names() {
    let (root, signer) = ca(1);
    let (_k, mut r) = req("spiffe://example.org/edge/e1", None);
    r.dns_names = vec!["edge-1.example.org".into(), "localhost".into()];
    r.ips = vec!["127.0.0.1".parse().unwrap()];
    let issued = signer.sign(&r, &Lifetimes::default(), NOW).unwrap();
    assert_eq!(issued.not_after_unix, NOW + 24 * 3600);
    let der = pem_to_der(&issued.cert_pem).unwrap();
    let leaf = CertificateDer::from(der.clone());
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    for name in ["edge-1.example.org", "localhost", "127.0.0.1"] {
        let n = rustls_pki_types::ServerName::try_from(name).unwrap();
        ee.verify_is_valid_for_subject_name(&n).unwrap();
    }
    verify(&root.cert_pem, &issued.cert_pem, NOW).unwrap();
    let (_k, r) = req("spiffe://example.org/ns/a/sa/b", None);
    assert_eq!(
        signer
            .sign(&r, &Lifetimes::default(), NOW)
            .unwrap()
            .not_after_unix,
        NOW + 3600
    );
    // The CA never signs beyond its own expiry.
    let late = NOW + 30 * 86400 - 600;
    let (_k, r) = req("spiffe://example.org/edge/e1", None);
    assert_eq!(
        signer
            .sign(&r, &Lifetimes::default(), late)
            .unwrap()
            .not_after_unix,
        NOW + 30 * 86400
    );
    let (_k, r) = req("spiffe://example.org/edge/e1", None);
    assert!(matches!(
        signer.sign(&r, &Lifetimes::default(), NOW + 30 * 86400),
        Err(CaError::Expired { .. })
    ));
}

#[test]
fn refusals() {
    let (_, signer) = ca(1);
    let l = Lifetimes::default();
    let cases: Vec<(SignRequest, &str)> = vec![
        (
            req("spiffe://other.org/edge/e1", None).1,
            "outside the trust domain",
        ),
        (
            req("spiffe://example.org/db/x", None).1,
            "does not follow the identity scheme",
        ),
        (
            req("spiffe://example.org/edge/e1", Some(30)).1,
            "at least 60s",
        ),
        (
            req("spiffe://example.org/admin/a", Some(7200)).1,
            "at most 3600s",
        ),
        (
            SignRequest {
                csr_pem: "garbage".into(),
                ..req("spiffe://example.org/edge/e1", None).1
            },
            "CSR is invalid",
        ),
        (
            SignRequest {
                dns_names: vec!["bad_name!".into()],
                ..req("spiffe://example.org/edge/e1", None).1
            },
            "not a valid DNS name",
        ),
    ];
    for (r, want) in cases {
        let e = signer.sign(&r, &l, NOW).unwrap_err().to_string();
        assert!(e.contains(want), "{}: {e}", r.spiffe_id);
    }
    // A CSR that names another SPIFFE ID than the request.
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org/edge/other"
            .to_string()
            .try_into()
            .unwrap(),
    )];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let r = SignRequest {
        csr_pem: csr,
        ..req("spiffe://example.org/edge/e1", None).1
    };
    assert!(matches!(
        signer.sign(&r, &l, NOW),
        Err(CaError::CsrIdentityMismatch { .. })
    ));
}

#[test]
fn signer_refuses_a_key_of_another_root_and_pins_are_stable() {
    let (a, _) = ca(1);
    let (b, _) = ca(2);
    let e = Signer::new(TD, 1, &a.cert_pem, &b.key_der).unwrap_err();
    assert!(
        e.to_string().contains("does not match its certificate"),
        "{e}"
    );
    let pin = root_pin(&a.cert_pem).unwrap();
    assert_eq!(pin.len(), 64);
    assert_eq!(pin, root_pin(&a.cert_pem).unwrap());
    assert_ne!(pin, root_pin(&b.cert_pem).unwrap());
    assert_eq!(
        not_after_of(&pem_to_der(&a.cert_pem).unwrap()),
        Some(a.not_after_unix)
    );
}

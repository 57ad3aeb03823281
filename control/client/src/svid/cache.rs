//! `<cache-dir>/svid/`: the certificate, its key, the trust domain's bundle
//! and the control plane's server root, each file 0600, so a restart renews
//! with the still-valid certificate instead of needing a new token.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{Role, SvidError};
use crate::identity::{now_unix, write_atomic, Svid};

/// Where the SVID of one role is kept between runs.
pub struct SvidCache {
    dir: PathBuf,
    role: Role,
}

pub(crate) const CERT: &str = "cert.pem";
pub(crate) const KEY: &str = "key.pem";
pub(crate) const BUNDLE: &str = "bundle.pem";
pub(crate) const SERVER_CA: &str = "server-ca.pem";

impl SvidCache {
    pub fn new(cache_dir: &Path, role: Role) -> Self {
        SvidCache {
            dir: cache_dir.join("svid"),
            role,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached certificate and the control plane's root, if both are
    /// there, parse, name `/<role>/<name>` and the certificate has not expired.
    pub fn load(&self, name: &str) -> Option<(Svid, String)> {
        let read = |file: &str| std::fs::read_to_string(self.dir.join(file)).ok();
        let (cert, key, bundle, server_ca) =
            (read(CERT)?, read(KEY)?, read(BUNDLE)?, read(SERVER_CA)?);
        let key = Zeroizing::new(key);
        let (spiffe_id, serial, not_after) = match describe(&cert) {
            Ok(d) => d,
            Err(err) => {
                tracing::warn!(dir = %self.dir.display(), %err, "ignoring an unreadable cached SVID");
                return None;
            }
        };
        let suffix = format!("/{}/{name}", self.role.path());
        if !spiffe_id.ends_with(&suffix) {
            tracing::warn!(dir = %self.dir.display(), %spiffe_id, "ignoring a cached SVID of another {}", self.role.path());
            return None;
        }
        if not_after <= now_unix() {
            tracing::info!(dir = %self.dir.display(), %spiffe_id, %serial, "the cached SVID has expired");
            return None;
        }
        Some((
            Svid {
                cert_pem: cert,
                key_pem: key,
                bundle_pem: bundle,
                spiffe_id,
                serial,
                not_after_unix: not_after,
                received_unix: now_unix(),
            },
            server_ca,
        ))
    }

    /// Key first, every file 0600, each written atomically.
    pub fn store(&self, svid: &Svid, server_ca: &str) -> Result<(), SvidError> {
        let io = |error: std::io::Error| SvidError::Cache {
            path: self.dir.display().to_string(),
            error: error.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io)?;
        }
        write_atomic(&self.dir, KEY, svid.key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.dir, CERT, svid.cert_pem.as_bytes(), 0o600)?;
        write_atomic(&self.dir, BUNDLE, svid.bundle_pem.as_bytes(), 0o600)?;
        write_atomic(&self.dir, SERVER_CA, server_ca.as_bytes(), 0o600)?;
        Ok(())
    }
}

/// (SPIFFE ID, serial in lowercase hex, notAfter) of a PEM certificate.
pub(crate) fn describe(cert_pem: &str) -> Result<(String, String, i64), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("not PEM: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| format!("not X.509: {e}"))?;
    let spiffe_id = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                    Some(u.to_string())
                }
                _ => None,
            })
        })
        .ok_or("no SPIFFE ID in the certificate")?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok((spiffe_id, serial, cert.validity().not_after.timestamp()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn cert(id: &str, secs: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = time::OffsetDateTime::from_unix_timestamp(now_unix() + secs).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        (c.pem(), key.serialize_pem())
    }

    pub(crate) fn svid(id: &str, secs: i64) -> Svid {
        let (cert, key) = cert(id, secs);
        Svid {
            cert_pem: cert,
            key_pem: Zeroizing::new(key),
            bundle_pem: "bundle".into(),
            spiffe_id: id.into(),
            serial: "01".into(),
            not_after_unix: now_unix() + secs,
            received_unix: now_unix(),
        }
    }

    #[test]
    fn cache_keeps_a_valid_svid_private_and_drops_an_expired_one() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvidCache::new(dir.path(), Role::Edge);
        let id = "spiffe://example.org/edge/e1";
        cache.store(&svid(id, 600), "server-ca").unwrap();
        let (back, ca) = cache.load("e1").expect("a valid cached SVID loads");
        assert_eq!(back.spiffe_id, id);
        assert_eq!(back.bundle_pem, "bundle");
        assert_eq!(ca, "server-ca");
        assert!((back.not_after_unix - (now_unix() + 600)).abs() <= 1);
        assert!(
            cache.load("e2").is_none(),
            "another edge's SVID is not used"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for name in [CERT, KEY, BUNDLE, SERVER_CA] {
                let mode = std::fs::metadata(dir.path().join("svid").join(name))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{name}");
            }
            let mode = std::fs::metadata(dir.path().join("svid"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        cache.store(&svid(id, -5), "server-ca").unwrap();
        assert!(cache.load("e1").is_none(), "an expired SVID is not used");
    }

    #[test]
    fn cache_of_one_role_ignores_the_other_roles_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let edge = SvidCache::new(dir.path(), Role::Edge);
        let broker = SvidCache::new(dir.path(), Role::KmsBroker);
        edge.store(&svid("spiffe://example.org/edge/k1", 600), "ca")
            .unwrap();
        assert!(
            broker.load("k1").is_none(),
            "an edge named k1 is not kms-broker k1"
        );
        broker
            .store(&svid("spiffe://example.org/kms-broker/k1", 600), "ca")
            .unwrap();
        let (back, _) = broker.load("k1").expect("the broker's own SVID loads");
        assert_eq!(back.spiffe_id, "spiffe://example.org/kms-broker/k1");
        assert!(edge.load("k1").is_none());
        // A name is a whole path segment: "1" is not "k1".
        assert!(broker.load("1").is_none());
    }

    #[test]
    fn describe_reads_id_serial_and_expiry() {
        let (pem, _) = cert("spiffe://example.org/kms-broker/b", 100);
        let (id, serial, not_after) = describe(&pem).unwrap();
        assert_eq!(id, "spiffe://example.org/kms-broker/b");
        assert!(!serial.is_empty() && serial.chars().all(|c| c.is_ascii_hexdigit()));
        assert!((not_after - (now_unix() + 100)).abs() <= 1);
        assert!(describe("junk").unwrap_err().starts_with("not PEM"));
    }
}

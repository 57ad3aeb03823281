//! Throwaway certificates for the mTLS tests: a CA, and leaves carrying a
//! SPIFFE ID in their URI SAN (the identity the control plane authorizes).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

pub struct Pki {
    pub dir: PathBuf,
    prefix: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// A CA whose certificate is written to `<dir>/<prefix>ca.pem`.
    pub fn new(dir: &Path, prefix: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{prefix}ca.pem")), ca.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            ca,
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(format!("{}ca.pem", self.prefix))
    }

    /// Writes `<name>.pem` and `<name>.key`: a leaf with the given DNS/IP
    /// names and, when given, a `spiffe://` URI SAN.
    pub fn issue(&self, name: &str, names: &[&str], spiffe_id: Option<&str>) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some(id) = spiffe_id {
            params
                .subject_alt_names
                .push(SanType::URI(id.try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

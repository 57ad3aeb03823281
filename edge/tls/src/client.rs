//! TLS from the edge to the brokers.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::server::TlsError;

/// Validated upstream TLS settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientTlsSettings {
    /// Trust bundle for the brokers' certificates.
    pub ca: PathBuf,
    /// Client certificate and key, when brokers require mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name to verify brokers against instead of the host they advertise.
    pub server_name: Option<String>,
}

pub struct ClientTls;

impl ClientTls {
    pub fn load(settings: &ClientTlsSettings) -> Result<Arc<ClientConfig>, TlsError> {
        let pem_error = |path: &PathBuf| {
            let path = path.clone();
            move |err: rustls_pki_types::pem::Error| TlsError::Pem {
                path: path.clone(),
                what: err.to_string(),
            }
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&settings.ca).map_err(pem_error(&settings.ca))? {
            roots
                .add(cert.map_err(pem_error(&settings.ca))?)
                .map_err(|err| TlsError::Pem {
                    path: settings.ca.clone(),
                    what: err.to_string(),
                })?;
        }
        if roots.is_empty() {
            return Err(TlsError::Pem {
                path: settings.ca.clone(),
                what: "no certificate found in the trust bundle".into(),
            });
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_root_certificates(roots);
        let mut config = match &settings.identity {
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .map_err(pem_error(cert))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(pem_error(cert))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key))?;
                builder.with_client_auth_cert(certs, key)?
            }
            None => builder.with_no_client_auth(),
        };
        // Session resumption saves little on long-lived broker connections,
        // and OpenSSL servers that verify clients without a session id
        // context (socat, some appliances) abort resumed handshakes.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

//! TLS from the edge to the brokers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, RootCertStore};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::credentials::{
    certified_key, CredentialLabel, CredentialReceiver, FileCredentials, WatchedCertifiedKey,
};
use crate::metrics::TlsMetrics;
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
    /// Reads the files and builds a configuration with the certificate as it
    /// is now, to check them.
    pub fn load(settings: &ClientTlsSettings) -> Result<Arc<ClientConfig>, TlsError> {
        let credentials = match &settings.identity {
            Some((cert, key)) => {
                let certified = certified_key(&read(cert)?, &read(key)?, cert, key)?;
                // No sender: the configuration keeps this certificate.
                Some(watch::channel(Arc::new(certified)).1)
            }
            None => None,
        };
        Ok(Arc::new(client_config(&settings.ca, credentials)?))
    }

    /// A configuration whose client certificate (if any) is re-read from its
    /// files every `interval` until `stop` and swapped live: new connections
    /// present the newest one.
    pub fn start(
        settings: &ClientTlsSettings,
        label: CredentialLabel,
        metrics: Option<TlsMetrics>,
        interval: Duration,
        stop: CancellationToken,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let credentials = match &settings.identity {
            Some((cert, key)) => Some(FileCredentials::start(
                cert.clone(),
                key.clone(),
                label,
                metrics,
                interval,
                stop,
            )?),
            None => None,
        };
        Ok(Arc::new(client_config(&settings.ca, credentials)?))
    }
}

/// A client configuration trusting the PEM bundle at `ca` and presenting
/// whatever `credentials` holds at each handshake (no client certificate
/// without it).
pub fn client_config(
    ca: &Path,
    credentials: Option<CredentialReceiver>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in crate::bundle::certificates(&read(ca)?, ca)? {
        roots.add(cert).map_err(|err| TlsError::Pem {
            path: ca.to_owned(),
            what: err.to_string(),
        })?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots);
    let mut config = match credentials {
        Some(credentials) => {
            builder.with_client_cert_resolver(WatchedCertifiedKey::new(credentials))
        }
        None => builder.with_no_client_auth(),
    };
    // Session resumption saves little on long-lived broker connections,
    // and OpenSSL servers that verify clients without a session id
    // context (socat, some appliances) abort resumed handshakes.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

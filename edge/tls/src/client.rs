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
    /// What the edge presents when brokers require mTLS (none otherwise).
    pub identity: Option<ClientIdentity>,
    /// Name to verify brokers against instead of the host they advertise.
    pub server_name: Option<String>,
}

/// The client certificate towards the brokers.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientIdentity {
    /// A certificate and key re-read from these files.
    Files { cert: PathBuf, key: PathBuf },
    /// The edge's own SVID from the control plane's CA (`--join-token`),
    /// renewed by the edge.
    Svid,
}

pub struct ClientTls;

impl ClientTls {
    /// Reads the files and builds a configuration with the certificate as it
    /// is now, to check them.
    pub fn load(settings: &ClientTlsSettings) -> Result<Arc<ClientConfig>, TlsError> {
        let credentials = match &settings.identity {
            Some(ClientIdentity::Files { cert, key }) => {
                let certified = certified_key(&read(cert)?, &read(key)?, cert, key)?;
                // No sender: the configuration keeps this certificate.
                Some(watch::channel(Arc::new(certified)).1)
            }
            // The SVID exists only in a running edge; the roots are checked.
            Some(ClientIdentity::Svid) | None => None,
        };
        Ok(Arc::new(client_config(&settings.ca, credentials)?))
    }

    /// A configuration whose client certificate (if any) is re-read from its
    /// files every `interval` until `stop`, or is the edge's `svid`, and is
    /// swapped live: new connections present the newest one. Asking for the
    /// SVID of an edge that has none is an error, never a connection
    /// without a client certificate.
    pub fn start(
        settings: &ClientTlsSettings,
        label: CredentialLabel,
        metrics: Option<TlsMetrics>,
        interval: Duration,
        stop: CancellationToken,
        svid: Option<&CredentialReceiver>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let credentials = match &settings.identity {
            Some(ClientIdentity::Svid) => Some(svid.cloned().ok_or(TlsError::NoSvid)?),
            Some(ClientIdentity::Files { cert, key }) => Some(FileCredentials::start(
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

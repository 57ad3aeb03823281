//! Live credentials: a `watch` channel of [`CertifiedKey`]s that rustls
//! resolvers read at every handshake, so a rotated certificate reaches new
//! handshakes without rebuilding any configuration, and open connections
//! keep the session they negotiated.
//!
//! Today files feed the channel ([`FileCredentials`]); an SVID issued by the
//! control plane's CA publishes into the same kind of channel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::TlsMetrics;
use crate::server::{seconds_until_expiry, TlsError};

/// The current certificate and key; the sender side belongs to a credential source.
pub type CredentialReceiver = watch::Receiver<Arc<CertifiedKey>>;

/// A rustls resolver that answers every handshake with the newest
/// [`CertifiedKey`] of its channel.
#[derive(Debug, Clone)]
pub struct WatchedCertifiedKey(CredentialReceiver);

impl WatchedCertifiedKey {
    pub fn new(credentials: CredentialReceiver) -> Arc<Self> {
        Arc::new(WatchedCertifiedKey(credentials))
    }
}

impl WatchedCertifiedKey {
    /// The current credentials, unless their certificate has expired: an
    /// expired certificate is never presented (fail closed), and the
    /// handshake fails with a WARN (at most one per 10 s) saying why.
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let key = self.0.borrow().clone();
        match key.cert.first().and_then(seconds_until_expiry) {
            Some(left) if left < 0 => {
                let now = crate::server::now_unix();
                let last = LAST_EXPIRED_WARNING.load(Ordering::Relaxed);
                if now - last >= 10
                    && LAST_EXPIRED_WARNING
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        expired_seconds_ago = -left,
                        "certificate expired; refusing TLS handshakes that need it (fail closed) until a new one arrives"
                    );
                }
                None
            }
            _ => Some(key),
        }
    }
}

static LAST_EXPIRED_WARNING: AtomicI64 = AtomicI64::new(0);

impl ResolvesServerCert for WatchedCertifiedKey {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for WatchedCertifiedKey {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A certificate chain and key from PEM bytes; the key must match the certificate.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|err| TlsError::Pem {
            path: cert_path.to_owned(),
            what: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path.to_owned(),
            what: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|err| TlsError::Pem {
        path: key_path.to_owned(),
        what: err.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    Ok(CertifiedKey::from_der(certs, key, &provider)?)
}

/// What a credential is, for logs and metrics.
#[derive(Debug, Clone)]
pub struct CredentialLabel {
    /// The virtual cluster (or `kms:<name>`) that uses it.
    pub owner: String,
    /// `server`, `upstream_client`, `kms_client`.
    pub certificate: &'static str,
}

/// A certificate and key file pair, polled for changes.
pub struct FileCredentials;

impl FileCredentials {
    /// Loads the pair (failing if it is invalid: nothing starts without its
    /// certificate) and re-reads it every `interval` until `stop`. A changed
    /// pair that does not load (often a rotation caught between writing the
    /// certificate and the key) is reported once and the current one stays.
    pub fn start(
        cert: PathBuf,
        key: PathBuf,
        label: CredentialLabel,
        metrics: Option<TlsMetrics>,
        interval: Duration,
        stop: CancellationToken,
    ) -> Result<CredentialReceiver, TlsError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })
        };
        let mut current = (read(&cert)?, read(&key)?);
        let loaded = Arc::new(certified_key(&current.0, &current.1, &cert, &key)?);
        record_expiry(&metrics, &label, &loaded);
        let (tx, rx) = watch::channel(loaded);
        tokio::spawn(async move {
            let mut rejected: Option<(Vec<u8>, Vec<u8>)> = None;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let material = match (read(&cert), read(&key)) {
                    (Ok(c), Ok(k)) => (c, k),
                    (Err(err), _) | (_, Err(err)) => {
                        tracing::warn!(owner = %label.owner, certificate = label.certificate, %err, "cannot read credential files; keeping the current credentials");
                        continue;
                    }
                };
                if material == current || rejected.as_ref() == Some(&material) {
                    continue;
                }
                match certified_key(&material.0, &material.1, &cert, &key) {
                    Ok(loaded) => {
                        let loaded = Arc::new(loaded);
                        record_expiry(&metrics, &label, &loaded);
                        if let Some(metrics) = &metrics {
                            metrics.reload(&label.owner, true);
                        }
                        tracing::info!(owner = %label.owner, certificate = label.certificate, "certificate reloaded; new handshakes use it");
                        tx.send_replace(loaded);
                        current = material;
                        rejected = None;
                    }
                    Err(err) => {
                        if let Some(metrics) = &metrics {
                            metrics.reload(&label.owner, false);
                        }
                        tracing::warn!(owner = %label.owner, certificate = label.certificate, %err, "new credentials rejected; keeping the current ones");
                        rejected = Some(material);
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn record_expiry(metrics: &Option<TlsMetrics>, label: &CredentialLabel, key: &CertifiedKey) {
    if let (Some(metrics), Some(cert)) = (metrics, key.cert.first()) {
        metrics.expiry(
            &label.owner,
            label.certificate,
            seconds_until_expiry(cert).unwrap_or(0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_valid_until(not_after: (i32, u8, u8)) -> Arc<CertifiedKey> {
        let mut params = rcgen::CertificateParams::new(vec!["edge.example".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = std::path::Path::new("test");
        Arc::new(
            certified_key(
                cert.pem().as_bytes(),
                key.serialize_pem().as_bytes(),
                path,
                path,
            )
            .unwrap(),
        )
    }

    #[test]
    fn an_expired_certificate_is_never_presented() {
        let (tx, rx) = watch::channel(key_valid_until((2099, 1, 1)));
        let resolver = WatchedCertifiedKey::new(rx);
        assert!(ResolvesClientCert::resolve(&*resolver, &[], &[]).is_some());
        tx.send_replace(key_valid_until((2021, 1, 1)));
        assert!(
            ResolvesClientCert::resolve(&*resolver, &[], &[]).is_none(),
            "expired: fail closed"
        );
        assert!(resolver.current().is_none());
        tx.send_replace(key_valid_until((2099, 1, 1)));
        assert!(
            resolver.current().is_some(),
            "a renewed certificate is served again"
        );
    }
}

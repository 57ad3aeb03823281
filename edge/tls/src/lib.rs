//! TLS for the edge.
//!
//! * [`ServerTls`] builds rustls server configurations from PEM files: TLS 1.3
//!   and 1.2 with rustls' AEAD-only suites, and client certificates verified
//!   when `client_auth` is `required` or `optional`: a certificate with a
//!   SPIFFE ID only against the bundle of its trust domain
//!   ([`SpiffeClientVerifier`]), one without against the plain `client_ca`.
//! * Certificates are swapped live: [`FileCredentials`] polls a certificate
//!   and key and publishes [`CertifiedKey`](rustls::sign::CertifiedKey)s on a
//!   `watch` channel that [`WatchedCertifiedKey`] (a rustls server and client
//!   resolver) reads at every handshake. New handshakes use the newest
//!   certificate; open connections keep theirs. A broken file is rejected
//!   with a log line and the previous certificate stays.
//! * [`CredentialWatcher`] publishes a virtual cluster's server configuration
//!   and a new one when its trust bundles change.
//! * [`LiveClientVerifier`] is a client verifier whose roots are replaced
//!   live (bundles pushed by the control plane), and [`tls_incoming`] the
//!   accept loop for a tonic server behind such a verifier
//!   (`serve_with_incoming`); the kms-broker and the control nodes use both.
//! * [`HintingVerifier`] verifies servers against a root store and names
//!   those roots in `certificate_authorities`, so a server holding several
//!   certificates (a control node) can serve one the client verifies.
//! * [`principal_of`] turns a client certificate into a [`Principal`]: its
//!   SPIFFE ID by default.

#![forbid(unsafe_code)]

mod accept;
mod bundle;
mod client;
mod credentials;
mod hints;
mod identity;
mod live;
mod metrics;
mod server;
mod trust;

pub use accept::{tls_incoming, TlsIncoming};
pub use bundle::{BundleSource, TrustBundleSettings};
pub use client::{client_config, ClientIdentity, ClientTls, ClientTlsSettings};
pub use credentials::{
    certified_key, CredentialLabel, CredentialReceiver, FileCredentials, WatchedCertifiedKey,
};
pub use hints::HintingVerifier;
pub use identity::{principal_of, PrincipalSource};
pub use live::LiveClientVerifier;
pub use metrics::TlsMetrics;
pub use server::{
    handshake_failure_reason, seconds_until_expiry, trust_domain_refusal, ClientAuth,
    CredentialWatcher, ServedCertificate, ServerTls, ServerTlsSettings, TlsError,
};
pub use tokio_rustls;
pub use trust::{
    is_trust_domain, spiffe_ids, trust_domain_of, SpiffeClientVerifier, TrustDomainError,
};

/// Bytes read from the socket at once beneath a TLS session.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// Wraps a transport for use beneath rustls. rustls reads at most about 4 KiB
/// per call; unbuffered, a TLS connection moving 1 KB records costs 16 times
/// the `recv` calls of a plaintext one reading 64 KiB, and those syscalls (not
/// AES-GCM) dominated the edge's CPU profile under mTLS load. Writes pass
/// straight through.
pub fn buffered<S: tokio::io::AsyncRead>(io: S) -> tokio::io::BufReader<S> {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, io)
}

//! TLS for the edge.
//!
//! * [`ServerTls`] builds rustls server configurations from PEM files: TLS 1.3
//!   and 1.2 with rustls' AEAD-only suites, and client certificates verified
//!   against a trust bundle when `client_auth` is `required` or `optional`.
//! * [`CredentialWatcher`] re-reads the files and publishes a new
//!   configuration on a `watch` channel when they change. New handshakes use
//!   the newest configuration; open connections keep theirs. A broken file is
//!   rejected with a log line and the previous configuration stays.
//! * [`principal_of`] turns a client certificate into a [`Principal`]: its
//!   SPIFFE ID by default.

#![forbid(unsafe_code)]

mod client;
mod identity;
mod metrics;
mod server;

pub use client::{ClientTls, ClientTlsSettings};
pub use identity::{principal_of, PrincipalSource};
pub use metrics::TlsMetrics;
pub use server::{
    handshake_failure_reason, ClientAuth, CredentialWatcher, ServerTls, ServerTlsSettings, TlsError,
};
pub use tokio_rustls;

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

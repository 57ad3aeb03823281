//! A process's own identity from the control plane's CA (`--join-token`),
//! shared by `strait-edge` (`spiffe://<domain>/edge/<name>`) and
//! `strait-kms-broker` (`spiffe://<domain>/kms-broker/<name>`).
//!
//! The key is generated in memory; only a CSR leaves. The first certificate
//! comes through `Identity/Join` (the token's pin authenticates the control
//! plane), later ones through `Identity/Renew` at half-life, authenticated
//! by the current certificate. Each one is published on a credential channel
//! that listeners with `tls.identity: svid`, the control-plane connections
//! and KMS-broker clients with `identity: svid` read at every handshake, and
//! kept in `<cache-dir>/svid/` (mode 0600) so a restart renews with it
//! instead of needing a new token. With the control plane unreachable, the
//! current certificate is served until it expires; an expired one is never
//! presented (the resolver refuses it, see `strait_tls::WatchedCertifiedKey`).

mod cache;
mod run;

use std::time::Duration;

use tokio::sync::watch;

use crate::identity::{now_unix, IdentityError, SvidRequest};
use crate::{ControlConnectionArgs, SvidArgs};

pub use cache::SvidCache;
pub use run::start;

/// Which kind of node the identity is for: the first path segment of its
/// SPIFFE ID (the control plane's CA issues each with its own lifetime,
/// `--cert-ttl-edge` / `--cert-ttl-kms-broker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Edge,
    KmsBroker,
}

impl Role {
    pub fn path(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::KmsBroker => "kms-broker",
        }
    }

    pub fn spiffe_id(self, trust_domain: &str, name: &str) -> String {
        format!("spiffe://{trust_domain}/{}/{name}", self.path())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("cannot reach a control-plane member matching the join token's pin: {0}")]
    Discover(IdentityError),
    #[error("join as {spiffe_id} refused: {error}")]
    Join {
        spiffe_id: String,
        error: IdentityError,
    },
    #[error("the control plane refused to renew the cached certificate: {0}")]
    Renew(IdentityError),
    #[error("no valid certificate in {0}: --join-token is needed to join")]
    NoToken(String),
    #[error("the SVID from the control plane does not load: {0}")]
    Load(strait_tls::TlsError),
    #[error("cannot cache the SVID in {path}: {error}")]
    Cache { path: String, error: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// What the identity looks like now, for the status and the logs.
#[derive(Debug, Clone, PartialEq)]
pub struct SvidState {
    pub spiffe_id: String,
    pub serial: String,
    pub not_after_unix: i64,
    /// The last renewal's error, until one succeeds.
    pub renewal_error: Option<String>,
}

impl SvidState {
    fn of(svid: &crate::identity::Svid) -> Self {
        SvidState {
            spiffe_id: svid.spiffe_id.clone(),
            serial: svid.serial.clone(),
            not_after_unix: svid.not_after_unix,
            renewal_error: None,
        }
    }

    /// A line for the status message while renewal fails or after expiry.
    pub fn message(&self) -> Option<String> {
        let left = self.not_after_unix - now_unix();
        if left <= 0 {
            return Some(format!(
                "SVID {} (serial {}) expired {}s ago; listeners with tls.identity: svid refuse handshakes",
                self.spiffe_id, self.serial, -left
            ));
        }
        self.renewal_error.as_ref().map(|err| {
            format!(
                "SVID {} (serial {}) expires in {left}s and could not be renewed: {err}",
                self.spiffe_id, self.serial
            )
        })
    }

    /// The trust domain of the SPIFFE ID (`spiffe://<domain>/...`).
    pub fn trust_domain(&self) -> &str {
        self.spiffe_id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
    }
}

pub struct SvidOptions {
    pub endpoints: Vec<String>,
    pub role: Role,
    pub name: String,
    pub token: Option<String>,
    pub cache: SvidCache,
    /// How long one Identity call may take, retries across members included.
    pub timeout: Duration,
}

/// The running identity: channels that follow each new certificate.
pub struct RunningSvid {
    /// The current certificate and key, for rustls resolvers.
    pub credentials: strait_tls::CredentialReceiver,
    /// PEM of the root that verifies the control plane's server certificates.
    pub control_roots: watch::Receiver<String>,
    /// PEM of the trust domain's bundle (the CA's roots, the new one beside
    /// the old during a rotation): what verifies peers the CA issued.
    pub bundle: watch::Receiver<String>,
    pub state: watch::Receiver<SvidState>,
    /// The names the current certificate was issued for.
    pub issued_for: watch::Receiver<SvidRequest>,
}

impl RunningSvid {
    /// Waits up to `within` until the certificate names every host of
    /// `wanted` (a renewal for new names is asked for as soon as they are
    /// sent to the renewal task), so that a listener does not start on a
    /// certificate its clients would refuse for the host name. False on
    /// timeout: the caller goes on with the current certificate.
    pub async fn wait_until_it_names(&self, wanted: &SvidRequest, within: Duration) -> bool {
        let mut issued = self.issued_for.clone();
        let covers = |have: &SvidRequest| {
            wanted.dns_names.iter().all(|n| have.dns_names.contains(n))
                && wanted.ips.iter().all(|ip| have.ips.contains(ip))
        };
        tokio::time::timeout(within, issued.wait_for(covers))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// The process's name when it gets its certificate from the control plane's
/// CA: with `--join-token`, or without other control-plane credentials when
/// a certificate is cached from an earlier join.
pub fn svid_mode<'a>(
    control: &'a ControlConnectionArgs,
    svid: &SvidArgs,
    cache: &SvidCache,
) -> Option<&'a str> {
    let name = control.name.as_deref()?;
    if control.control.is_empty() || control.control_ca.is_some() || control.insecure_plaintext {
        return None;
    }
    (svid.join_token.is_some() || cache.load(name).is_some()).then_some(name)
}

/// `send_if_modified` helper: replaces and reports whether it changed.
pub fn update_request(current: &mut SvidRequest, new: SvidRequest) -> bool {
    let changed = *current != new;
    if changed {
        *current = new;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_message_reports_failing_renewal_and_expiry() {
        let mut s = SvidState {
            spiffe_id: "spiffe://example.org/edge/e1".into(),
            serial: "ab".into(),
            not_after_unix: now_unix() + 100,
            renewal_error: None,
        };
        assert_eq!(s.message(), None);
        assert_eq!(s.trust_domain(), "example.org");
        s.renewal_error = Some("unavailable".into());
        let m = s.message().unwrap();
        assert!(m.contains("could not be renewed: unavailable"), "{m}");
        s.not_after_unix = now_unix() - 3;
        let m = s.message().unwrap();
        assert!(
            m.contains("expired") && m.contains("refuse handshakes"),
            "{m}"
        );
    }

    #[test]
    fn roles_name_their_path() {
        assert_eq!(
            Role::KmsBroker.spiffe_id("example.org", "k1"),
            "spiffe://example.org/kms-broker/k1"
        );
        assert_eq!(
            Role::Edge.spiffe_id("example.org", "e1"),
            "spiffe://example.org/edge/e1"
        );
    }

    #[test]
    fn svid_mode_needs_a_token_or_a_cached_certificate_and_no_files() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            control: ControlConnectionArgs,
            #[command(flatten)]
            svid: SvidArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = SvidCache::new(dir.path(), Role::KmsBroker);
        let parse = |args: &[&str]| Cli::try_parse_from([&["x"], args].concat()).unwrap();
        let joining = parse(&["--control", "a:1", "--name", "k1", "--join-token", "T"]);
        assert_eq!(
            svid_mode(&joining.control, &joining.svid, &cache),
            Some("k1")
        );
        let bare = parse(&["--control", "a:1", "--name", "k1"]);
        assert_eq!(svid_mode(&bare.control, &bare.svid, &cache), None);
        cache
            .store(
                &cache::tests::svid("spiffe://example.org/kms-broker/k1", 600),
                "ca",
            )
            .unwrap();
        assert_eq!(
            svid_mode(&bare.control, &bare.svid, &cache),
            Some("k1"),
            "a cached certificate is enough"
        );
        let files = parse(&[
            "--control",
            "a:1",
            "--name",
            "k1",
            "--control-ca",
            "ca",
            "--control-cert",
            "c",
            "--control-key",
            "k",
        ]);
        assert_eq!(svid_mode(&files.control, &files.svid, &cache), None);
    }
}

//! The node's own certificate from the CA it runs: requested as soon as the
//! CA has an active generation, renewed at half-life, published on the
//! node's credential channel (read by its TLS listener and its Raft
//! client). When issuance fails (no quorum to record it, the CA key cannot
//! be unsealed) the node keeps its last certificate and retries.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use strait_control_ca::new_key_and_csr;
use tokio::sync::watch;

use super::{now_unix, IdentityService};

/// What the node asks for: its SPIFFE ID and the names clients dial.
#[derive(Debug, Clone)]
pub struct NodeCertRequest {
    pub spiffe_id: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// Retry pause after a failed issuance: short, so a node that just saw
/// the CA appear (or a leader return) gets its certificate quickly.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// When to renew a certificate valid until `not_after`, received at `now`.
pub fn renew_at(now: i64, not_after: i64) -> i64 {
    now + (not_after - now).max(0) / 2
}

async fn issue_once(
    svc: &IdentityService,
    req: &NodeCertRequest,
) -> Result<(Arc<CertifiedKey>, String, i64), String> {
    let (key, csr) = new_key_and_csr().map_err(|e| e.to_string())?;
    let resp = svc
        .issue_own(csr, &req.spiffe_id, req.dns_names.clone(), req.ips.clone())
        .await
        .map_err(|s| s.message().to_string())?;
    let loaded = strait_tls::certified_key(
        resp.cert_pem.as_bytes(),
        key.as_bytes(),
        Path::new("<issued node certificate>"),
        Path::new("<in-memory key>"),
    )
    .map_err(|e| e.to_string())?;
    Ok((Arc::new(loaded), resp.serial, resp.not_after_unix))
}

/// Keeps `tx` holding a current CA-issued certificate for `req`.
pub fn spawn_node_certificate(
    svc: IdentityService,
    req: NodeCertRequest,
    tx: watch::Sender<Arc<CertifiedKey>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut retry = RETRY_MIN;
        // Expiry of the certificate on the channel (None: the bootstrap one).
        let mut current_not_after: Option<i64> = None;
        loop {
            match issue_once(&svc, &req).await {
                Ok((key, serial, not_after)) => {
                    tx.send_replace(key);
                    let now = now_unix();
                    current_not_after = Some(not_after);
                    retry = RETRY_MIN;
                    tracing::info!(
                        spiffe_id = %req.spiffe_id,
                        serial = %serial,
                        not_after_unix = not_after,
                        "node certificate issued by the CA; new handshakes use it"
                    );
                    let wait = (renew_at(now, not_after) - now).max(1) as u64;
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                Err(e) => {
                    match current_not_after {
                        None => {
                            tracing::debug!(error = %e, "no node certificate from the CA yet; serving the bootstrap certificate")
                        }
                        Some(t) => tracing::warn!(
                            error = %e,
                            expires_in_seconds = t - now_unix(),
                            "renewing the node certificate failed; keeping the current one"
                        ),
                    }
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::renew_at;

    #[test]
    fn renewal_at_half_life() {
        assert_eq!(renew_at(1000, 1060), 1030);
        assert_eq!(renew_at(1000, 900), 1000);
    }
}

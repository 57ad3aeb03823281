//! The broker's gRPC service: routes each call to a configured backend KMS
//! (already wrapped in failover + retries), caching alias resolution.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_kms_core::config::{validate_kms_list, ConfigError, ConfigErrors, KmsConfig};
use strait_kms_core::{AliasCache, KekRef, Kms, KmsError, KmsSet};
use strait_proto::kms as pb;
use strait_proto::kms::kms_broker_server::{KmsBroker, KmsBrokerServer};
use tonic::transport::Server;

use crate::callers::{Callers, Operation};
use crate::tls::{Bundles, TlsError, TrustDomainVerifier};
use tonic::{Request, Response, Status};

/// `strait-kms-broker --config FILE`:
/// ```yaml
/// listen: 127.0.0.1:7443
/// trust_domain: example.org
/// callers: ["spiffe://example.org/edge/*"]        # the default
/// tls:
///   cert: broker.pem
///   key: broker.key
///   client_ca: ca.pem                             # roots of trust_domain
///   client_trust_bundles: [{ trust_domain: partner.org, pem_file: partner.pem }]
/// alias_cache_ttl: 10m
/// kms:
///   - name: vault
///     vault: { addresses: ["http://10.0.0.1:8200", "http://10.0.0.2:8200"] }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub listen: String,
    /// The broker's own trust domain; its identity is
    /// `spiffe://<trust_domain>/kms-broker/<name>`.
    pub trust_domain: String,
    /// SPIFFE ID globs of the identities that may call (`*` one path
    /// segment, `**` any depth). Absent: the edges of `trust_domain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callers: Option<Vec<String>>,
    pub tls: BrokerTls,
    pub kms: Vec<KmsConfig>,
    #[serde(default = "default_alias_ttl", with = "humantime_serde")]
    pub alias_cache_ttl: Duration,
    /// Optional `ip:port` serving Prometheus metrics at `/metrics` (plain HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

fn default_alias_ttl() -> Duration {
    Duration::from_secs(600)
}

fn default_reload() -> Duration {
    Duration::from_secs(1)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// The broker's certificate chain and key (PEM), re-read every
    /// `reload_interval`: a replaced pair is used by the next handshake.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Roots of `trust_domain` (PEM). Optional when following a control
    /// plane, whose TrustBundles then supply them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Roots of other trust domains, each bound to its domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_trust_bundles: Vec<FileBundle>,
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBundle {
    pub trust_domain: String,
    pub pem_file: PathBuf,
}

impl BrokerConfig {
    /// Parse YAML, check every field (all errors with paths), and make file
    /// paths relative to `base`.
    pub fn from_yaml(text: &str, base: &Path) -> Result<Self, ConfigErrors> {
        let mut cfg: BrokerConfig = serde_yaml_ng::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: e
                    .location()
                    .map(|l| format!("line {} column {}", l.line(), l.column()))
                    .unwrap_or_else(|| "config".into()),
                message: e.to_string(),
            }])
        })?;
        cfg.validate()?;
        for k in &mut cfg.kms {
            k.resolve_paths(base);
        }
        let tls = &mut cfg.tls;
        let paths = [&mut tls.cert, &mut tls.key]
            .into_iter()
            .chain(tls.client_ca.as_mut())
            .chain(tls.client_trust_bundles.iter_mut().map(|b| &mut b.pem_file));
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// The caller globs in force (the default when none are configured).
    pub fn callers(&self) -> Vec<String> {
        self.callers
            .clone()
            .unwrap_or_else(|| vec![format!("spiffe://{}/edge/*", self.trust_domain)])
    }

    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = match validate_kms_list("kms", &self.kms) {
            Ok(()) => Vec::new(),
            Err(e) => e.0,
        };
        let mut push = |p: &str, m: &str| {
            errors.push(ConfigError {
                path: p.into(),
                message: m.into(),
            })
        };
        if self.listen.parse::<SocketAddr>().is_err() {
            push("listen", "must be an ip:port socket address");
        }
        if !strait_tls::is_trust_domain(&self.trust_domain) {
            push(
                "trust_domain",
                "must be a trust domain name such as example.org (lower case, no scheme)",
            );
        }
        if let Some(callers) = &self.callers {
            for (i, g) in callers.iter().enumerate() {
                if let Err(e) = strait_control_client::state::spec::check_spiffe_glob(g) {
                    push(&format!("callers[{i}]"), &e);
                }
            }
        }
        let mut domains = std::collections::HashSet::new();
        if self.tls.client_ca.is_some() {
            domains.insert(self.trust_domain.as_str());
        }
        for (i, b) in self.tls.client_trust_bundles.iter().enumerate() {
            let path = format!("tls.client_trust_bundles[{i}].trust_domain");
            if !strait_tls::is_trust_domain(&b.trust_domain) {
                push(&path, "must be a trust domain name such as example.org");
            } else if !domains.insert(b.trust_domain.as_str()) {
                push(
                    &path,
                    "this trust domain already has a bundle (tls.client_ca is the bundle of trust_domain)",
                );
            }
        }
        if self.tls.reload_interval.is_zero() {
            push("tls.reload_interval", "must be positive");
        }
        if let Some(m) = &self.metrics_listen {
            if m.parse::<SocketAddr>().is_err() {
                push("metrics_listen", "must be an ip:port socket address");
            }
        }
        if self.kms.is_empty() {
            push("kms", "at least one backend KMS is required");
        }
        for (i, k) in self.kms.iter().enumerate() {
            if k.broker.is_some() {
                errors.push(ConfigError {
                    path: format!("kms[{i}].broker"),
                    message: "a broker cannot use another broker as backend".into(),
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The bundles of the config file, read now.
    pub fn file_bundles(&self) -> Result<Bundles, ServeError> {
        let mut out = Bundles::new();
        let files = self
            .tls
            .client_ca
            .iter()
            .map(|p| (self.trust_domain.clone(), p))
            .chain(
                self.tls
                    .client_trust_bundles
                    .iter()
                    .map(|b| (b.trust_domain.clone(), &b.pem_file)),
            );
        for (domain, path) in files {
            let certs = crate::tls::certificates(&path.display().to_string(), &read(path)?)?;
            out.entry(domain).or_default().extend(certs);
        }
        Ok(out)
    }
}

struct Backend {
    kms: Arc<dyn Kms>,
    aliases: AliasCache,
}

/// The gRPC service over a set of backend KMSs.
pub struct BrokerService {
    backends: BTreeMap<String, Backend>,
    callers: Arc<Callers>,
}

pub fn error_to_status(e: KmsError) -> Status {
    match e {
        KmsError::NotFound(m) => Status::not_found(m),
        KmsError::Unavailable(m) => Status::unavailable(m),
        KmsError::Denied(m) => Status::permission_denied(m),
        KmsError::Invalid(m) => Status::invalid_argument(m),
    }
}

fn kek_from(k: Option<pb::KekRef>) -> Result<KekRef, Status> {
    let k = k.ok_or_else(|| Status::invalid_argument("kek is required"))?;
    if k.key_id.is_empty() {
        return Err(Status::invalid_argument("kek.key_id is required"));
    }
    Ok(KekRef {
        key_id: k.key_id,
        version: (!k.version.is_empty()).then_some(k.version),
    })
}

fn kek_to(k: KekRef) -> pb::KekRef {
    pb::KekRef {
        key_id: k.key_id,
        version: k.version.unwrap_or_default(),
    }
}

impl BrokerService {
    pub fn new(kms: &KmsSet, alias_ttl: Duration, callers: Arc<Callers>) -> Self {
        let backends = kms
            .names()
            .filter_map(|n| {
                kms.get(n).map(|k| {
                    (
                        n.to_string(),
                        Backend {
                            kms: k.clone(),
                            aliases: AliasCache::new(
                                alias_ttl,
                                Duration::from_secs(30).min(alias_ttl),
                            ),
                        },
                    )
                })
            })
            .collect();
        Self { backends, callers }
    }

    fn backend(&self, name: &str) -> Result<&Backend, Status> {
        if name.is_empty() {
            if self.backends.len() == 1 {
                if let Some(b) = self.backends.values().next() {
                    return Ok(b);
                }
            }
            return Err(Status::invalid_argument(
                "kms name required: this broker serves several backends",
            ));
        }
        self.backends
            .get(name)
            .ok_or_else(|| Status::not_found(format!("no backend KMS named {name:?}")))
    }

    pub fn into_server(self) -> KmsBrokerServer<Self> {
        KmsBrokerServer::new(self)
    }
}

#[tonic::async_trait]
impl KmsBroker for BrokerService {
    async fn generate_dek(
        &self,
        req: Request<pb::GenerateDekRequest>,
    ) -> Result<Response<pb::GenerateDekResponse>, Status> {
        self.callers.check(&req, Operation::GenerateDek)?;
        let req = req.into_inner();
        let b = self.backend(&req.kms)?;
        let kek = kek_from(req.kek)?;
        let pair = b.kms.generate_dek(&kek).await.map_err(error_to_status)?;
        Ok(Response::new(pb::GenerateDekResponse {
            plaintext: pair.plaintext.to_vec(),
            wrapped: pair.wrapped,
            kek: Some(kek_to(pair.kek)),
        }))
    }

    async fn unwrap_dek(
        &self,
        req: Request<pb::UnwrapDekRequest>,
    ) -> Result<Response<pb::UnwrapDekResponse>, Status> {
        self.callers.check(&req, Operation::UnwrapDek)?;
        let req = req.into_inner();
        let b = self.backend(&req.kms)?;
        let kek = kek_from(req.kek)?;
        let dek = b
            .kms
            .unwrap_dek(&kek, &req.wrapped)
            .await
            .map_err(error_to_status)?;
        Ok(Response::new(pb::UnwrapDekResponse {
            plaintext: dek.to_vec(),
        }))
    }

    async fn resolve_alias(
        &self,
        req: Request<pb::ResolveAliasRequest>,
    ) -> Result<Response<pb::ResolveAliasResponse>, Status> {
        self.callers.check(&req, Operation::ResolveAlias)?;
        let req = req.into_inner();
        let b = self.backend(&req.kms)?;
        if req.alias.is_empty() {
            return Err(Status::invalid_argument("alias is required"));
        }
        let kek = b
            .aliases
            .resolve(b.kms.as_ref(), &req.alias)
            .await
            .map_err(error_to_status)?;
        Ok(Response::new(pb::ResolveAliasResponse {
            kek: Some(kek_to(kek)),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Serve `service` on `listener` with mTLS until `shutdown` resolves: the
/// serving certificate is re-read from `tls.cert`/`tls.key` every
/// `tls.reload_interval`, client certificates are verified by `verifier`
/// (per trust domain), and each call is checked by the service's callers.
pub async fn serve(
    service: BrokerService,
    tls: &BrokerTls,
    verifier: Arc<TrustDomainVerifier>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    crate::kms::ensure_crypto_provider();
    let stop = tokio_util::sync::CancellationToken::new();
    // Stops re-reading the certificate files when serving ends.
    let _stop = stop.clone().drop_guard();
    let cert = crate::tls::serving_certificate(
        tls.cert.clone(),
        tls.key.clone(),
        tls.reload_interval,
        stop,
    )?;
    let acceptor = crate::tls::acceptor(cert, verifier)?;
    Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(crate::tls::incoming(listener, acceptor), shutdown)
        .await?;
    Ok(())
}

/// Serve `registry` in the Prometheus text format at `/metrics`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Arc<prometheus_client::registry::Registry>,
) -> std::io::Result<()> {
    use axum::response::IntoResponse;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(_) => "metrics encoding failed".into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_config_errors_have_paths_and_paths_resolve() {
        let bad = r#"
listen: "nowhere"
trust_domain: "Example.org"
callers: ["edge/*"]
tls: { cert: s.pem, key: s.key, client_ca: ca.pem, client_trust_bundles: [{ trust_domain: "Example.org", pem_file: x.pem }] }
kms:
  - name: b
    broker: { endpoints: ["https://127.0.0.1:1"], ca: c, cert: c, key: k }
  - name: aws
    aws_kms: { region: "" }
"#;
        let errs = BrokerConfig::from_yaml(bad, Path::new("/etc/strait"))
            .unwrap_err()
            .to_string();
        for want in [
            "listen: must be an ip:port socket address",
            "trust_domain: must be a trust domain name",
            "callers[0]: 'edge/*' must start with spiffe://",
            "tls.client_trust_bundles[0].trust_domain: must be a trust domain name",
            "kms[0].broker: a broker cannot use another broker as backend",
            "kms[1].aws_kms.region: must not be empty",
        ] {
            assert!(errs.contains(want), "missing {want:?} in\n{errs}");
        }
        let good = r#"
listen: "127.0.0.1:7443"
trust_domain: example.org
tls: { cert: s.pem, key: s.key, client_ca: /abs/ca.pem, client_trust_bundles: [{ trust_domain: partner.org, pem_file: p.pem }] }
kms:
  - name: dev
    local: { path: keys.json }
"#;
        let cfg = BrokerConfig::from_yaml(good, Path::new("/etc/strait")).unwrap();
        assert_eq!(cfg.tls.cert, Path::new("/etc/strait/s.pem"));
        assert_eq!(cfg.tls.client_ca.as_deref(), Some(Path::new("/abs/ca.pem")));
        assert_eq!(
            cfg.tls.client_trust_bundles[0].pem_file,
            Path::new("/etc/strait/p.pem")
        );
        assert_eq!(
            cfg.callers(),
            vec!["spiffe://example.org/edge/*".to_string()]
        );
        assert_eq!(cfg.tls.reload_interval, Duration::from_secs(1));
        assert_eq!(
            cfg.kms[0].local.as_ref().unwrap().path,
            Path::new("/etc/strait/keys.json")
        );
        assert_eq!(cfg.alias_cache_ttl, Duration::from_secs(600));
        assert!(BrokerConfig::from_yaml("listen: x\nbogus: 1\n", Path::new(".")).is_err());
    }
}

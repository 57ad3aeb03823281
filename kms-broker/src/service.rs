//! The broker's gRPC service: checks each call against the [`Policy`]
//! (callers, deny lists, shredded KEKs, grants), then routes it to a
//! configured backend KMS (already wrapped in failover + retries; possibly
//! another broker), caching alias resolution.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use strait_kms_core::{dek_from_slice, AliasCache, KekRef, Kms, KmsError, KmsSet};
use strait_proto::kms as pb;
use strait_proto::kms::kms_broker_server::{KmsBroker, KmsBrokerServer};
use strait_tls::CredentialReceiver;
use tonic::transport::Server;

use crate::callers::Operation;
use crate::policy::Policy;
use crate::tls::TrustDomainVerifier;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

pub use crate::config::{BrokerConfig, BrokerTls, FileBundle, ServeError};

struct Backend {
    kms: Arc<dyn Kms>,
    aliases: AliasCache,
}

/// The gRPC service over a set of backend KMSs.
pub struct BrokerService {
    backends: BTreeMap<String, Backend>,
    policy: Arc<Policy>,
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

/// The key_id a request names, for the policy (checked before the request
/// is validated, so that a caller that may not call learns nothing more).
fn kek_name(k: &Option<pb::KekRef>) -> &str {
    k.as_ref().map_or("", |k| k.key_id.as_str())
}

fn kek_to(k: KekRef) -> pb::KekRef {
    pb::KekRef {
        key_id: k.key_id,
        version: k.version.unwrap_or_default(),
    }
}

impl BrokerService {
    pub fn new(kms: &KmsSet, alias_ttl: Duration, policy: Arc<Policy>) -> Self {
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
        Self { backends, policy }
    }

    /// The backend a request names: empty means the only one.
    fn backend_name(&self, name: &str) -> String {
        match (name.is_empty(), self.backends.keys().next()) {
            (true, Some(only)) if self.backends.len() == 1 => only.clone(),
            _ => name.to_string(),
        }
    }

    /// The backend named `name` (already through [`Self::backend_name`]).
    fn backend(&self, name: &str) -> Result<&Backend, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "kms name required: this broker serves several backends",
            ));
        }
        self.backends
            .get(name)
            .ok_or_else(|| Status::not_found(format!("no backend KMS named {name:?}")))
    }

    /// The policy's decision for `req` (before its backend is looked up, so
    /// that a caller that may not call learns nothing about the backends),
    /// then the backend's name and the backend.
    #[allow(clippy::result_large_err)]
    fn route<T>(
        &self,
        req: &Request<T>,
        op: Operation,
        kms: &str,
        kek: &str,
    ) -> Result<(String, &Backend), Status> {
        let name = self.backend_name(kms);
        self.policy.check(req, op, &name, kek)?;
        let backend = self.backend(&name)?;
        Ok((name, backend))
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
        let r = req.get_ref();
        let (_, b) = self.route(&req, Operation::GenerateDek, &r.kms, kek_name(&r.kek))?;
        let kek = kek_from(r.kek.clone())?;
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
        let r = req.get_ref();
        let (_, b) = self.route(&req, Operation::UnwrapDek, &r.kms, kek_name(&r.kek))?;
        let kek = kek_from(r.kek.clone())?;
        let dek = b
            .kms
            .unwrap_dek(&kek, &r.wrapped)
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
        let r = req.get_ref();
        let (_, b) = self.route(&req, Operation::ResolveAlias, &r.kms, &r.alias)?;
        if r.alias.is_empty() {
            return Err(Status::invalid_argument("alias is required"));
        }
        let kek = b
            .aliases
            .resolve(b.kms.as_ref(), &r.alias)
            .await
            .map_err(error_to_status)?;
        Ok(Response::new(pb::ResolveAliasResponse {
            kek: Some(kek_to(kek)),
        }))
    }

    async fn wrap_dek(
        &self,
        req: Request<pb::WrapDekRequest>,
    ) -> Result<Response<pb::WrapDekResponse>, Status> {
        let (_, b) = {
            let r = req.get_ref();
            self.route(&req, Operation::WrapDek, &r.kms, kek_name(&r.kek))?
        };
        let r = req.into_inner();
        let kek = kek_from(r.kek)?;
        let plaintext = Zeroizing::new(r.plaintext);
        let dek = dek_from_slice(&plaintext).map_err(error_to_status)?;
        let w = b.kms.wrap_dek(&kek, &dek).await.map_err(error_to_status)?;
        Ok(Response::new(pb::WrapDekResponse {
            wrapped: w.wrapped,
            kek: Some(kek_to(w.kek)),
        }))
    }

    async fn shred_kek(
        &self,
        req: Request<pb::ShredKekRequest>,
    ) -> Result<Response<pb::ShredKekResponse>, Status> {
        let r = req.get_ref();
        let (name, b) = self.route(&req, Operation::ShredKek, &r.kms, kek_name(&r.kek))?;
        let kek = kek_from(r.kek.clone())?;
        let result = b.kms.shred_kek(&kek).await;
        // A cached resolution must not outlive the key.
        b.aliases.invalidate(&kek.key_id);
        let outcome = match &result {
            Ok(()) => "shredded".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(target: "strait::audit", operation = "shred", kms = %name, kek = %kek, %outcome, "KEK shred requested over the API");
        result.map_err(error_to_status)?;
        Ok(Response::new(pb::ShredKekResponse {}))
    }
}

/// Serve `service` on `listener` with mTLS until `shutdown` resolves: the
/// serving certificate is the newest of `cert` at each handshake (files
/// polled by [`crate::tls::serving_certificate`], or the broker's SVID),
/// client certificates are verified by `verifier` (per trust domain), and
/// each call is checked by the service's callers.
pub async fn serve(
    service: BrokerService,
    cert: CredentialReceiver,
    verifier: Arc<TrustDomainVerifier>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    crate::kms::ensure_crypto_provider();
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

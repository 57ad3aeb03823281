//! The `Identity` gRPC service: the mesh's certificate authority on the
//! control plane. Every node signs (it unseals the active CA key in memory
//! from the replicated, sealed CertificateAuthority resource); every write
//! (token use, issuance record, CA generation) goes through Raft.
//!
//! Refusals and issuances are audited on the tracing target
//! `strait_control::audit`.

mod manager;
mod node_cert;
pub mod rate;
pub mod store;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use strait_control_ca::authority::CaError;
use strait_control_ca::issued::IssuedRecord;
use strait_control_ca::token::{self, Token, TokenError};
use strait_control_ca::{
    bundle, root_pin, signer, Lifetimes, RotationPolicy, SealContext, Sealer, SignRequest, Signer,
    SpiffeId,
};
use strait_control_raft::Node;
use strait_control_state::spec::IssuedCertificateSpec;
use strait_control_state::Kind;
use strait_proto::control as pb;
use strait_proto::control::identity_server::{Identity, IdentityServer};
use tokio::sync::Mutex;
use tonic::{Code, Request, Response, Status};

pub use manager::spawn_manager;
pub use node_cert::{spawn_node_certificate, NodeCertRequest};

use crate::access::{Access, Authorizer, Caller, IdentityMethod, Operation};

pub const AUDIT: &str = "strait_control::audit";

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub struct IdentityConfig {
    pub trust_domain: String,
    pub lifetimes: Lifetimes,
    pub rotation: RotationPolicy,
    pub sealer: Arc<dyn Sealer>,
    /// Who may call which method (the control plane's access policy).
    pub authz: Authorizer,
    /// PEM of the root that verifies this node's server certificate; join
    /// tokens carry its SHA-256.
    pub server_ca_pem: String,
    /// Per-source bound on Identity/Join (unauthenticated).
    pub join_limit: rate::JoinLimit,
}

struct Inner {
    node: Node,
    cfg: IdentityConfig,
    /// Unsealed signers by generation (with the root they belong to).
    signers: Mutex<BTreeMap<u64, (String, Arc<Signer>)>>,
    joins: rate::JoinLimiter,
}

#[derive(Clone)]
pub struct IdentityService {
    inner: Arc<Inner>,
}

fn audit_refusal(method: &str, caller: &str, s: &Status) {
    tracing::warn!(
        target: AUDIT,
        method,
        caller,
        code = ?s.code(),
        reason = s.message(),
        "identity request refused"
    );
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::Identity(_)
        | CaError::Lifetime(_)
        | CaError::BadCsr(_)
        | CaError::CsrIdentityMismatch { .. }
        | CaError::BadDnsName(_) => Status::invalid_argument(e.to_string()),
        CaError::Expired { .. } => Status::unavailable(e.to_string()),
        CaError::Key(_) => Status::internal(e.to_string()),
    }
}

fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::PatternMismatch { .. } | TokenError::AdminRefused(_) => {
            Status::permission_denied(e.to_string())
        }
        TokenError::Invalid(_) => Status::invalid_argument(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

fn parse_ips(ips: &[String]) -> Result<Vec<IpAddr>, Status> {
    ips.iter()
        .map(|s| {
            s.parse()
                .map_err(|_| Status::invalid_argument(format!("'{s}' is not an IP address")))
        })
        .collect()
}

fn ttl(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

impl IdentityService {
    pub fn new(node: Node, cfg: IdentityConfig) -> IdentityService {
        IdentityService {
            inner: Arc::new(Inner {
                node,
                joins: rate::JoinLimiter::new(cfg.join_limit),
                cfg,
                signers: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    pub fn into_server(self) -> IdentityServer<IdentityService> {
        IdentityServer::new(self)
    }

    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    pub fn config(&self) -> &IdentityConfig {
        &self.inner.cfg
    }

    /// Roots to trust at `now` (concatenated PEM; empty before the CA exists).
    pub fn bundle_pem(&self, now: i64) -> String {
        let gens: Vec<_> = store::cas(&self.inner.node, &self.inner.cfg.trust_domain)
            .iter()
            .map(|c| c.generation())
            .collect();
        bundle(&gens, now)
            .into_iter()
            .map(|g| g.cert_pem.as_str())
            .collect::<Vec<_>>()
            .join("")
    }

    /// The signer of the generation active at `now`, unsealed once per node.
    async fn active_signer(&self, now: i64) -> Result<Arc<Signer>, Status> {
        let td = &self.inner.cfg.trust_domain;
        let stored = store::cas(&self.inner.node, td);
        let gens: Vec<_> = stored.iter().map(|c| c.generation()).collect();
        let Some(active) = signer(&gens, now) else {
            return Err(Status::unavailable(format!(
                "the CA of {td} has no active generation yet; retry"
            )));
        };
        let spec = &stored
            .iter()
            .find(|c| c.spec.generation == active.generation)
            .expect("signer comes from stored")
            .spec;
        let mut cache = self.inner.signers.lock().await;
        if let Some((pem, s)) = cache.get(&spec.generation) {
            if *pem == spec.cert_pem {
                return Ok(s.clone());
            }
        }
        let ctx = SealContext {
            trust_domain: td.clone(),
            generation: spec.generation,
        };
        let key = self
            .inner
            .cfg
            .sealer
            .unseal(&spec.sealed_key, &ctx)
            .await
            .map_err(|e| {
                tracing::error!(generation = spec.generation, error = %e, "cannot unseal the CA key");
                Status::unavailable(format!(
                    "this node cannot unseal CA generation {}: {e}",
                    spec.generation
                ))
            })?;
        let s =
            Arc::new(Signer::new(td, spec.generation, &spec.cert_pem, &key).map_err(ca_status)?);
        cache.insert(spec.generation, (spec.cert_pem.clone(), s.clone()));
        Ok(s)
    }

    /// Signs `req`, unless its identity is on a DenyList: a revoked
    /// identity gets no new certificate, by token, renewal or an admin.
    fn sign_with(
        &self,
        signer: &Signer,
        req: &SignRequest,
        now: i64,
    ) -> Result<strait_control_ca::Issued, Status> {
        if let Some((list, reason)) = store::denied(&self.inner.node, &req.spiffe_id) {
            return Err(Status::permission_denied(format!(
                "{} is on the deny list {list}{}",
                req.spiffe_id,
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            )));
        }
        signer
            .sign(req, &self.inner.cfg.lifetimes, now)
            .map_err(ca_status)
    }

    /// Records the issuance through Raft and builds the answer.
    async fn record(
        &self,
        method: &str,
        caller: &str,
        issued: strait_control_ca::Issued,
        now: i64,
    ) -> Result<pb::CertificateResponse, Status> {
        let spec = IssuedCertificateSpec {
            serial: issued.serial_hex.clone(),
            spiffe_id: issued.spiffe_id.clone(),
            not_after_unix: issued.not_after_unix,
            ca_generation: issued.ca_generation,
        };
        store::put(
            &self.inner.node,
            Kind::IssuedCertificate,
            &issued.serial_hex,
            serde_json::to_value(spec).expect("spec serializes"),
            Some(0),
        )
        .await?;
        tracing::info!(
            target: AUDIT,
            method,
            caller,
            spiffe_id = %issued.spiffe_id,
            serial = %issued.serial_hex,
            not_after_unix = issued.not_after_unix,
            ca_generation = issued.ca_generation,
            "certificate issued"
        );
        Ok(pb::CertificateResponse {
            cert_pem: issued.cert_pem,
            bundle_pem: self.bundle_pem(now),
            serial: issued.serial_hex,
            spiffe_id: issued.spiffe_id,
            not_after_unix: issued.not_after_unix,
            ca_generation: issued.ca_generation,
        })
    }

    async fn join(&self, req: pb::JoinRequest) -> Result<pb::CertificateResponse, Status> {
        let tok = Token::parse(&req.token).map_err(token_status)?;
        let now = now_unix();
        let signer = self.active_signer(now).await?;
        let sign_req = SignRequest {
            csr_pem: req.csr_pem.clone(),
            spiffe_id: req.spiffe_id.clone(),
            dns_names: req.dns_names.clone(),
            ips: parse_ips(&req.ips)?,
            ttl: ttl(req.ttl_seconds),
        };
        let caller = format!("join token {}", tok.id);
        // Compare-and-set on the token's revision: of two joins spending the
        // last use at once, one commits and the other sees a conflict, then
        // re-reads an exhausted token.
        for _ in 0..5 {
            self.inner
                .node
                .read_barrier()
                .await
                .map_err(crate::status_of)?;
            let stored = store::token(&self.inner.node, &tok.id);
            let next = token::redeem(stored.as_ref().map(|s| &s.0), &tok, &req.spiffe_id, now)
                .map_err(token_status)?;
            let revision = stored.map(|s| s.1).unwrap_or(0);
            let issued = self.sign_with(&signer, &sign_req, now)?;
            match store::put(
                &self.inner.node,
                Kind::JoinToken,
                &tok.id,
                store::token_spec(&next),
                Some(revision),
            )
            .await
            {
                Ok(_) => return self.record("Identity/Join", &caller, issued, now).await,
                Err(s) if s.code() == Code::Aborted => continue,
                Err(s) => return Err(s),
            }
        }
        Err(Status::aborted(format!(
            "join token {} is being redeemed concurrently; retry",
            tok.id
        )))
    }

    async fn create_token(
        &self,
        req: pb::CreateJoinTokenRequest,
    ) -> Result<pb::CreateJoinTokenResponse, Status> {
        let now = now_unix();
        let pin = root_pin(&self.inner.cfg.server_ca_pem)
            .map_err(|e| Status::failed_precondition(format!("server CA: {e}")))?;
        let (tok, rec) = token::create(
            &self.inner.cfg.trust_domain,
            &req.spiffe_id_pattern,
            Duration::from_secs(req.ttl_seconds),
            req.uses,
            &pin,
            now,
        )
        .map_err(token_status)?;
        store::put(
            &self.inner.node,
            Kind::JoinToken,
            &rec.id,
            store::token_spec(&rec),
            Some(0),
        )
        .await?;
        Ok(pb::CreateJoinTokenResponse {
            token: tok.to_string(),
            id: rec.id,
            expires_at_unix: rec.expires_at_unix,
        })
    }

    /// A certificate for this node itself (`spiffe://D/control/<id>`),
    /// signed here and recorded through Raft like any other.
    pub async fn issue_own(
        &self,
        csr_pem: String,
        spiffe_id: &str,
        dns_names: Vec<String>,
        ips: Vec<IpAddr>,
    ) -> Result<pb::CertificateResponse, Status> {
        let now = now_unix();
        let signer = self.active_signer(now).await?;
        let issued = self.sign_with(
            &signer,
            &SignRequest {
                csr_pem,
                spiffe_id: spiffe_id.to_string(),
                dns_names,
                ips,
                ttl: None,
            },
            now,
        )?;
        self.record("node certificate", "this node", issued, now)
            .await
    }

    /// Issuance records, for rotation.
    pub fn issued(&self) -> Vec<IssuedRecord> {
        store::issued(&self.inner.node)
    }
}

impl IdentityService {
    /// Authorizes `method` for the caller of `req` (a refusal is audited by
    /// the authorizer and returned).
    #[allow(clippy::result_large_err)]
    fn authorize<T>(&self, req: &Request<T>, method: IdentityMethod) -> Result<Caller, Status> {
        let authz = &self.inner.cfg.authz;
        let caller = authz.caller(req);
        authz.check(&caller, Operation::Identity(method))?;
        Ok(caller)
    }

    /// Audits the outcome of an authorized write through the authorizer
    /// (and a refusal on this module's audit target with its reason).
    fn audited<T>(
        &self,
        caller: &Caller,
        method: IdentityMethod,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let access: Access<'_> = Operation::Identity(method).into();
        self.inner.cfg.authz.audit_write(caller, &access, &result);
        if let Err(s) = &result {
            audit_refusal(Operation::Identity(method).as_str(), &caller.to_string(), s);
        }
        result
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let caller = self.authorize(&req, IdentityMethod::Join)?;
        // Before anything costly (token lookup, signing, a Raft write).
        let source = req
            .remote_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        if let Err(r) = self.inner.joins.check(source, std::time::Instant::now()) {
            let s = Status::resource_exhausted(format!(
                "too many Identity/Join requests from {source}{}; retry in {:.1} s",
                if r.overflow {
                    " (shared overflow bucket: too many sources)"
                } else {
                    ""
                },
                r.retry_after.as_secs_f64()
            ));
            audit_refusal("Identity/Join", &format!("source {source}"), &s);
            let access: Access<'_> = Operation::Identity(IdentityMethod::Join).into();
            self.inner
                .cfg
                .authz
                .audit_write::<()>(&caller, &access, &Err(s.clone()));
            return Err(s);
        }
        let r = req.into_inner();
        let who = Token::parse(&r.token)
            .map(|t| format!("join token {}", t.id))
            .unwrap_or_else(|_| "malformed join token".into());
        match IdentityService::join(self, r).await {
            Ok(v) => Ok(Response::new(v)),
            Err(s) => {
                audit_refusal("Identity/Join", &who, &s);
                let access: Access<'_> = Operation::Identity(IdentityMethod::Join).into();
                self.inner
                    .cfg
                    .authz
                    .audit_write::<()>(&caller, &access, &Err(s.clone()));
                Err(s)
            }
        }
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let op = "Identity/Renew";
        let caller = self.authorize(&req, IdentityMethod::Renew)?;
        let r = req.into_inner();
        let res = async {
            let Some(id) = caller.spiffe() else {
                return Err(Status::unauthenticated(format!(
                    "{op} needs a client certificate with a SPIFFE ID"
                )));
            };
            let id = id.as_str().to_string();
            SpiffeId::parse_in(&id, &self.inner.cfg.trust_domain)
                .map_err(|e| Status::permission_denied(format!("{id} may not {op}: {e}")))?;
            let now = now_unix();
            let signer = self.active_signer(now).await?;
            let issued = self.sign_with(
                &signer,
                &SignRequest {
                    csr_pem: r.csr_pem,
                    spiffe_id: id.clone(),
                    dns_names: r.dns_names,
                    ips: parse_ips(&r.ips)?,
                    ttl: ttl(r.ttl_seconds),
                },
                now,
            )?;
            self.record(op, &id, issued, now).await
        }
        .await;
        self.audited(&caller, IdentityMethod::Renew, res)
            .map(Response::new)
    }

    async fn issue(
        &self,
        req: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let op = "Identity/Issue";
        let caller = self.authorize(&req, IdentityMethod::Issue)?;
        let r = req.into_inner();
        let res = async {
            let now = now_unix();
            let signer = self.active_signer(now).await?;
            let issued = self.sign_with(
                &signer,
                &SignRequest {
                    csr_pem: r.csr_pem,
                    spiffe_id: r.spiffe_id,
                    dns_names: r.dns_names,
                    ips: parse_ips(&r.ips)?,
                    ttl: ttl(r.ttl_seconds),
                },
                now,
            )?;
            self.record(op, &caller.to_string(), issued, now).await
        }
        .await;
        self.audited(&caller, IdentityMethod::Issue, res)
            .map(Response::new)
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let op = "Identity/CreateJoinToken";
        let caller = self.authorize(&req, IdentityMethod::CreateJoinToken)?;
        let r = req.into_inner();
        let pattern = r.spiffe_id_pattern.clone();
        let res = self.create_token(r).await;
        if let Ok(v) = &res {
            tracing::info!(
                target: AUDIT,
                method = op,
                caller = %caller,
                token_id = %v.id,
                pattern = %pattern,
                expires_at_unix = v.expires_at_unix,
                "join token created"
            );
        }
        self.audited(&caller, IdentityMethod::CreateJoinToken, res)
            .map(Response::new)
    }

    async fn rotate_ca(
        &self,
        req: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::RotateCaResponse>, Status> {
        let op = "Identity/RotateCa";
        let caller = self.authorize(&req, IdentityMethod::RotateCa)?;
        let res = manager::rotate_now(self, now_unix()).await;
        if let Ok((generation, activate_at_unix)) = &res {
            tracing::info!(
                target: AUDIT,
                method = op,
                caller = %caller,
                generation,
                activate_at_unix,
                "CA rotation started"
            );
        }
        self.audited(&caller, IdentityMethod::RotateCa, res).map(
            |(generation, activate_at_unix)| {
                Response::new(pb::RotateCaResponse {
                    generation,
                    activate_at_unix,
                })
            },
        )
    }

    async fn trust_bundle(
        &self,
        req: Request<pb::TrustBundleRequest>,
    ) -> Result<Response<pb::TrustBundleResponse>, Status> {
        self.authorize(&req, IdentityMethod::TrustBundle)?;
        let now = now_unix();
        let gens: Vec<_> = store::cas(&self.inner.node, &self.inner.cfg.trust_domain)
            .iter()
            .map(|c| c.generation())
            .collect();
        Ok(Response::new(pb::TrustBundleResponse {
            trust_domain: self.inner.cfg.trust_domain.clone(),
            bundle_pem: self.bundle_pem(now),
            server_ca_pem: self.inner.cfg.server_ca_pem.clone(),
            active_generation: signer(&gens, now).map(|g| g.generation).unwrap_or(0),
        }))
    }
}

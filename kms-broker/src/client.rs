//! A [`Kms`] implemented over the broker's gRPC API (mTLS).

use std::time::Duration;

use async_trait::async_trait;
use strait_kms_core::config::BrokerClientConfig;
use strait_kms_core::{dek_from_slice, DekPair, KekRef, Kms, KmsError, Result, DEK_LEN};
use strait_proto::kms as pb;
use strait_proto::kms::kms_broker_client::KmsBrokerClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Status};
use zeroize::Zeroizing;

/// One broker endpoint. Combine several with [`strait_kms_core::FailoverKms`]
/// (done by [`crate::kms::build_kms`]).
#[derive(Clone)]
pub struct BrokerClient {
    client: KmsBrokerClient<Channel>,
    backend: String,
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| KmsError::Invalid(format!("reading {what} {}: {e}", path.display())))
}

impl BrokerClient {
    /// A lazily connecting client per configured endpoint, labelled by URL.
    pub fn connect_all(
        cfg: &BrokerClientConfig,
        timeout: Duration,
    ) -> Result<Vec<(String, BrokerClient)>> {
        crate::kms::ensure_crypto_provider();
        let ca = Certificate::from_pem(read(&cfg.ca, "CA")?);
        let identity = Identity::from_pem(read(&cfg.cert, "certificate")?, read(&cfg.key, "key")?);
        cfg.endpoints
            .iter()
            .map(|ep| {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(ca.clone())
                    .identity(identity.clone());
                if let Some(sn) = &cfg.server_name {
                    tls = tls.domain_name(sn.clone());
                }
                let channel = Channel::from_shared(ep.clone())
                    .map_err(|e| KmsError::Invalid(format!("broker endpoint {ep}: {e}")))?
                    .tls_config(tls)
                    .map_err(|e| KmsError::Invalid(format!("broker TLS for {ep}: {e}")))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_lazy();
                Ok((
                    ep.clone(),
                    BrokerClient {
                        client: KmsBrokerClient::new(channel),
                        backend: cfg.backend.clone().unwrap_or_default(),
                    },
                ))
            })
            .collect()
    }
}

/// gRPC status -> KMS error, the inverse of the server's mapping.
pub fn status_to_error(s: Status) -> KmsError {
    let msg = format!("broker: {}", s.message());
    match s.code() {
        Code::NotFound => KmsError::NotFound(msg),
        Code::PermissionDenied | Code::Unauthenticated => KmsError::Denied(msg),
        Code::InvalidArgument | Code::FailedPrecondition => KmsError::Invalid(msg),
        // Transport failures (refused, TLS, reset) surface as Unavailable or
        // Unknown; timeouts as Cancelled/DeadlineExceeded.
        _ => KmsError::Unavailable(format!("{msg} ({:?})", s.code())),
    }
}

fn to_pb(k: &KekRef) -> pb::KekRef {
    pb::KekRef {
        key_id: k.key_id.clone(),
        version: k.version.clone().unwrap_or_default(),
    }
}

fn from_pb(k: Option<pb::KekRef>) -> Result<KekRef> {
    let k = k.ok_or_else(|| KmsError::Invalid("broker response without KEK".into()))?;
    Ok(KekRef {
        key_id: k.key_id,
        version: (!k.version.is_empty()).then_some(k.version),
    })
}

#[async_trait]
impl Kms for BrokerClient {
    async fn generate_dek(&self, kek: &KekRef) -> Result<DekPair> {
        let resp = self
            .client
            .clone()
            .generate_dek(pb::GenerateDekRequest {
                kms: self.backend.clone(),
                kek: Some(to_pb(kek)),
            })
            .await
            .map_err(status_to_error)?
            .into_inner();
        let plaintext = Zeroizing::new(resp.plaintext);
        Ok(DekPair {
            plaintext: dek_from_slice(&plaintext)?,
            wrapped: resp.wrapped,
            kek: from_pb(resp.kek)?,
        })
    }

    async fn unwrap_dek(&self, kek: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
        let resp = self
            .client
            .clone()
            .unwrap_dek(pb::UnwrapDekRequest {
                kms: self.backend.clone(),
                kek: Some(to_pb(kek)),
                wrapped: wrapped.to_vec(),
            })
            .await
            .map_err(status_to_error)?
            .into_inner();
        let plaintext = Zeroizing::new(resp.plaintext);
        dek_from_slice(&plaintext)
    }

    async fn resolve_alias(&self, alias: &str) -> Result<KekRef> {
        let resp = self
            .client
            .clone()
            .resolve_alias(pb::ResolveAliasRequest {
                kms: self.backend.clone(),
                alias: alias.to_string(),
            })
            .await
            .map_err(status_to_error)?
            .into_inner();
        from_pb(resp.kek)
    }
}

//! A [`Kms`] implemented over the broker's gRPC API (mTLS).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use strait_kms_core::config::BrokerClientConfig;
use strait_kms_core::{
    dek_from_slice, DekPair, KekRef, Kms, KmsError, Result, WrappedDek, DEK_LEN,
};
use strait_proto::kms as pb;
use strait_proto::kms::kms_broker_client::KmsBrokerClient;
use strait_tls::tokio_rustls::{self, rustls::pki_types::ServerName, TlsConnector};
use strait_tls::{client_config, CredentialLabel, FileCredentials};

pub use crate::svid_tls::OwnIdentity;
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::codegen::http::Uri;
use tonic::codegen::Service;
use tonic::transport::Channel;
use tonic::{Code, Status};
use zeroize::Zeroizing;

/// One broker endpoint. Combine several with [`strait_kms_core::FailoverKms`]
/// (done by [`crate::kms::build_kms`]).
#[derive(Clone)]
pub struct BrokerClient {
    client: KmsBrokerClient<Channel>,
    backend: String,
    /// Stops re-reading the client certificate files once the last clone
    /// is gone (none with an SVID).
    _credentials: Option<Arc<DropGuard>>,
}

impl BrokerClient {
    /// A lazily connecting client per configured endpoint, labelled by URL.
    /// The client certificate is swapped live: re-read every second from
    /// its files, or the newest SVID of `identity` with `identity: svid`
    /// (refused without one: fail closed). New connections to the broker
    /// present the newest certificate, open ones keep theirs.
    pub fn connect_all(
        cfg: &BrokerClientConfig,
        timeout: Duration,
        identity: Option<&OwnIdentity>,
    ) -> Result<Vec<(String, BrokerClient)>> {
        crate::kms::ensure_crypto_provider();
        let invalid = |e: &dyn std::fmt::Display| KmsError::Invalid(format!("broker TLS: {e}"));
        let (mut config, guard) = if cfg.uses_svid() {
            let identity = identity.ok_or_else(|| KmsError::Invalid(NO_SVID.into()))?;
            let config = crate::svid_tls::svid_client_config(identity, cfg.ca.as_deref())
                .map_err(|e| invalid(&e))?;
            (config, None)
        } else {
            let (Some(ca), Some(cert), Some(key)) = (&cfg.ca, &cfg.cert, &cfg.key) else {
                return Err(KmsError::Invalid(
                    "broker TLS: ca, cert and key are required without identity: svid".into(),
                ));
            };
            let stop = CancellationToken::new();
            let credentials = FileCredentials::start(
                cert.clone(),
                key.clone(),
                CredentialLabel {
                    owner: format!("kms-broker {}", cfg.endpoints.join(",")),
                    certificate: "kms_client",
                },
                None,
                CREDENTIAL_INTERVAL,
                stop.clone(),
            )
            .map_err(|e| invalid(&e))?;
            let guard = Arc::new(stop.drop_guard());
            let config = client_config(ca, Some(credentials)).map_err(|e| invalid(&e))?;
            (config, Some(guard))
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        cfg.endpoints
            .iter()
            .map(|ep| {
                let invalid_endpoint = |e: &dyn std::fmt::Display| {
                    KmsError::Invalid(format!("broker endpoint {ep}: {e}"))
                };
                let uri: Uri = ep.parse().map_err(|e| invalid_endpoint(&e))?;
                let host = uri
                    .host()
                    .ok_or_else(|| invalid_endpoint(&"no host"))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let port = uri.port_u16().unwrap_or(443);
                let name = cfg.server_name.clone().unwrap_or_else(|| host.clone());
                let server_name = ServerName::try_from(name.clone())
                    .map_err(|e| KmsError::Invalid(format!("broker server name {name}: {e}")))?;
                // TLS is the connector's, so tonic is handed a plain http URI.
                let authority = uri.authority().map_or(ep.as_str(), |a| a.as_str());
                let channel = Channel::from_shared(format!("http://{authority}"))
                    .map_err(|e| invalid_endpoint(&e))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_with_connector_lazy(RustlsConnector {
                        connector: TlsConnector::from(config.clone()),
                        host,
                        port,
                        server_name,
                    });
                Ok((
                    ep.clone(),
                    BrokerClient {
                        client: KmsBrokerClient::new(channel),
                        backend: cfg.backend.clone().unwrap_or_default(),
                        _credentials: guard.clone(),
                    },
                ))
            })
            .collect()
    }
}

/// Why a broker entry with `identity: svid` cannot be used by this process.
pub const NO_SVID: &str = "broker identity: svid, but this process has no SVID of its own (strait-edge gets one with --control, --name and --join-token)";

/// How often the client certificate files are re-read.
const CREDENTIAL_INTERVAL: Duration = Duration::from_secs(1);

/// TCP and TLS to one broker with the resolver-backed configuration (tonic's
/// own TLS reads the certificate once).
#[derive(Clone)]
struct RustlsConnector {
    connector: TlsConnector,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Service<Uri> for RustlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((this.host.as_str(), this.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = this.connector.connect(this.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
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

    async fn wrap_dek(&self, kek: &KekRef, plaintext: &[u8; DEK_LEN]) -> Result<WrappedDek> {
        let resp = self
            .client
            .clone()
            .wrap_dek(pb::WrapDekRequest {
                kms: self.backend.clone(),
                kek: Some(to_pb(kek)),
                plaintext: plaintext.to_vec(),
            })
            .await
            .map_err(status_to_error)?
            .into_inner();
        Ok(WrappedDek {
            wrapped: resp.wrapped,
            kek: from_pb(resp.kek)?,
        })
    }

    async fn shred_kek(&self, kek: &KekRef) -> Result<()> {
        self.client
            .clone()
            .shred_kek(pb::ShredKekRequest {
                kms: self.backend.clone(),
                kek: Some(to_pb(kek)),
            })
            .await
            .map_err(status_to_error)?;
        Ok(())
    }
}

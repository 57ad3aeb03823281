//! Client SASL on a virtual cluster whose upstream connections the edge
//! authenticates itself.
//!
//! The edge identifies clients by their TLS certificate, and the broker
//! connection a client is relayed to is already authenticated as the edge.
//! A client's own SaslHandshake or SaslAuthenticate must not reach that
//! connection (the broker would see a second handshake on an authenticated
//! session), so on such clusters:
//!
//! * ApiVersions answers no longer list SaslHandshake and SaslAuthenticate:
//!   the edge offers no SASL to clients;
//! * a SaslHandshake is answered by the edge with UNSUPPORTED_SASL_MECHANISM
//!   and an empty list of enabled mechanisms, which clients report plainly
//!   ("mechanism PLAIN not enabled in the server, enabled mechanisms are []");
//! * a SaslAuthenticate (without a handshake) is answered with
//!   ILLEGAL_SASL_STATE.
//!
//! The connection stays open: the client decides (Kafka clients close).
//! Without `upstream.sasl` this filter is not installed and client SASL
//! passes through to the broker unchanged, so clients may authenticate end
//! to end.

use async_trait::async_trait;
use strait_filter::{
    ApiKeySet, Filter, FilterContext, RequestFrame, RequestVerdict, ResponseFrame, ResponseVerdict,
};
use strait_kafka::kafka_protocol::messages::{
    ApiKey, RequestKind, ResponseKind, SaslAuthenticateResponse, SaslHandshakeResponse,
};
use strait_kafka::kafka_protocol::protocol::StrBytes;

/// UNSUPPORTED_SASL_MECHANISM.
pub const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
/// ILLEGAL_SASL_STATE.
pub const ILLEGAL_SASL_STATE: i16 = 34;

const NOT_OFFERED: &str =
    "this edge authenticates clients by their TLS certificate and offers no SASL mechanism";

/// Keeps client SASL away from an upstream connection the edge authenticated.
pub struct ClientSaslFilter;

#[async_trait]
impl Filter for ClientSaslFilter {
    fn name(&self) -> &'static str {
        "client-sasl"
    }

    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::SaslHandshake, ApiKey::SaslAuthenticate])
    }

    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::ApiVersions])
    }

    async fn on_request(
        &mut self,
        ctx: &FilterContext<'_>,
        frame: &mut RequestFrame,
    ) -> RequestVerdict {
        tracing::info!(
            principal = %ctx.connection.principal,
            api_key = ?frame.api_key(),
            "client SASL refused: the edge authenticates upstream itself"
        );
        match frame.body() {
            RequestKind::SaslHandshake(_) => {
                RequestVerdict::Respond(Box::new(ResponseKind::SaslHandshake(
                    SaslHandshakeResponse::default()
                        .with_error_code(UNSUPPORTED_SASL_MECHANISM)
                        .with_mechanisms(Vec::new()),
                )))
            }
            _ => RequestVerdict::Respond(Box::new(ResponseKind::SaslAuthenticate(
                SaslAuthenticateResponse::default()
                    .with_error_code(ILLEGAL_SASL_STATE)
                    .with_error_message(Some(StrBytes::from_static_str(NOT_OFFERED))),
            ))),
        }
    }

    async fn on_response(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        let offers_sasl = matches!(frame.body(), ResponseKind::ApiVersions(answer)
            if answer.api_keys.iter().any(|k| is_sasl(k.api_key)));
        // Only touch the body when something changes: an untouched frame keeps its bytes.
        if offers_sasl {
            if let ResponseKind::ApiVersions(answer) = frame.body_mut() {
                answer.api_keys.retain(|k| !is_sasl(k.api_key));
            }
        }
        ResponseVerdict::Forward
    }
}

fn is_sasl(api_key: i16) -> bool {
    api_key == ApiKey::SaslHandshake as i16 || api_key == ApiKey::SaslAuthenticate as i16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use strait_filter::{ConnectionInfo, Endpoint, Principal};
    use strait_kafka::kafka_protocol::messages::api_versions_response::ApiVersion;
    use strait_kafka::kafka_protocol::messages::{
        ApiVersionsResponse, RequestHeader, SaslAuthenticateRequest, SaslHandshakeRequest,
    };

    fn info() -> ConnectionInfo {
        ConnectionInfo {
            via_peer: None,
            virtual_cluster: "vc".into(),
            client_addr: "127.0.0.1:1".parse().unwrap(),
            endpoint: Endpoint::Bootstrap,
            principal: Principal::Named("spiffe://example.org/ns/a/sa/b".into()),
        }
    }

    fn request(key: ApiKey, version: i16, body: RequestKind) -> RequestFrame {
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(9);
        RequestFrame::new(header, body).unwrap()
    }

    #[tokio::test]
    async fn handshake_and_authenticate_are_answered_by_the_edge() {
        let info = info();
        let ctx = FilterContext {
            connection: &info,
            now: SystemTime::now(),
        };
        let mut handshake = request(
            ApiKey::SaslHandshake,
            1,
            RequestKind::SaslHandshake(
                SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
            ),
        );
        let RequestVerdict::Respond(answer) =
            ClientSaslFilter.on_request(&ctx, &mut handshake).await
        else {
            panic!("the handshake must not be forwarded")
        };
        let ResponseKind::SaslHandshake(answer) = *answer else {
            panic!()
        };
        assert_eq!(answer.error_code, UNSUPPORTED_SASL_MECHANISM);
        assert!(answer.mechanisms.is_empty());

        let mut authenticate = request(
            ApiKey::SaslAuthenticate,
            2,
            RequestKind::SaslAuthenticate(SaslAuthenticateRequest::default()),
        );
        let RequestVerdict::Respond(answer) =
            ClientSaslFilter.on_request(&ctx, &mut authenticate).await
        else {
            panic!("SaslAuthenticate must not be forwarded")
        };
        let ResponseKind::SaslAuthenticate(answer) = *answer else {
            panic!()
        };
        assert_eq!(answer.error_code, ILLEGAL_SASL_STATE);
    }

    #[tokio::test]
    async fn api_versions_no_longer_offer_sasl() {
        let info = info();
        let ctx = FilterContext {
            connection: &info,
            now: SystemTime::now(),
        };
        let req = request(
            ApiKey::ApiVersions,
            3,
            RequestKind::ApiVersions(Default::default()),
        );
        let keys = [
            ApiKey::Produce,
            ApiKey::SaslHandshake,
            ApiKey::Metadata,
            ApiKey::SaslAuthenticate,
        ];
        let mut frame = ResponseFrame::answering(
            &req,
            ResponseKind::ApiVersions(
                ApiVersionsResponse::default().with_api_keys(
                    keys.iter()
                        .map(|k| {
                            ApiVersion::default()
                                .with_api_key(*k as i16)
                                .with_max_version(1)
                        })
                        .collect(),
                ),
            ),
        );
        ClientSaslFilter.on_response(&ctx, &mut frame).await;
        let ResponseKind::ApiVersions(answer) = frame.body() else {
            panic!()
        };
        let left: Vec<i16> = answer.api_keys.iter().map(|k| k.api_key).collect();
        assert_eq!(left, vec![ApiKey::Produce as i16, ApiKey::Metadata as i16]);
    }
}

//! The built-in filters every connection has: version negotiation and broker
//! address rewriting. They run first on requests and last on responses, so
//! nothing a client receives carries an upstream address.

use std::sync::Arc;

use async_trait::async_trait;
use strait_edge_config::HostPort;
use strait_filter::{ApiKeySet, Filter, FilterContext, ResponseFrame, ResponseVerdict};
use strait_kafka::kafka_protocol::messages::{ApiKey, ResponseKind};
use strait_kafka::kafka_protocol::protocol::StrBytes;

use crate::brokers::BrokerMap;

/// Narrows the broker's ApiVersions answer to what the edge can decode, so a
/// client never picks a version a filter (or the rewriter) cannot read.
pub struct ApiVersionsFilter;

/// The version range the edge can decode for an API key, if it knows the key.
pub fn edge_versions(api_key: i16) -> Option<(i16, i16)> {
    let key = ApiKey::try_from(api_key).ok()?;
    let range = key.valid_versions();
    Some((range.min, range.max))
}

#[async_trait]
impl Filter for ApiVersionsFilter {
    fn name(&self) -> &'static str {
        "api-versions"
    }

    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::EMPTY
    }

    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::ApiVersions])
    }

    async fn on_response(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        if let ResponseKind::ApiVersions(response) = frame.body_mut() {
            response.api_keys.retain_mut(|entry| {
                let Some((min, max)) = edge_versions(entry.api_key) else {
                    return false;
                };
                entry.min_version = entry.min_version.max(min);
                entry.max_version = entry.max_version.min(max);
                entry.min_version <= entry.max_version
            });
        }
        ResponseVerdict::Forward
    }
}

/// Replaces every broker address in Metadata, FindCoordinator and
/// DescribeCluster responses with the edge's address for that broker, and
/// removes controller addresses from DescribeQuorum (clients cannot reach
/// controllers through the edge).
pub struct AddressRewriteFilter {
    brokers: Arc<BrokerMap>,
}

impl AddressRewriteFilter {
    pub fn new(brokers: Arc<BrokerMap>) -> Self {
        AddressRewriteFilter { brokers }
    }

    fn rewrite(&self, node_id: i32, host: &mut StrBytes, port: &mut i32) -> Result<(), String> {
        if node_id < 0 {
            // "No broker" answers (e.g. coordinator not available) must not
            // carry an upstream address either.
            *host = StrBytes::default();
            *port = -1;
            return Ok(());
        }
        let Ok(upstream_port) = u16::try_from(*port) else {
            return Err(format!("broker {node_id} advertised invalid port {port}"));
        };
        let upstream = HostPort {
            host: host.as_str().to_owned(),
            port: upstream_port,
        };
        let (edge_host, edge_port) = self
            .brokers
            .advertise(node_id, upstream)
            .map_err(|err| err.to_string())?;
        *host = StrBytes::from_string(edge_host.to_string());
        *port = i32::from(edge_port);
        Ok(())
    }

    fn rewrite_response(&self, body: &mut ResponseKind) -> Result<(), String> {
        match body {
            ResponseKind::Metadata(response) => {
                for broker in &mut response.brokers {
                    self.rewrite(broker.node_id.0, &mut broker.host, &mut broker.port)?;
                }
            }
            ResponseKind::FindCoordinator(response) => {
                if response.coordinators.is_empty() {
                    self.rewrite(response.node_id.0, &mut response.host, &mut response.port)?;
                }
                for coordinator in &mut response.coordinators {
                    self.rewrite(
                        coordinator.node_id.0,
                        &mut coordinator.host,
                        &mut coordinator.port,
                    )?;
                }
            }
            ResponseKind::DescribeCluster(response) => {
                for broker in &mut response.brokers {
                    self.rewrite(broker.broker_id.0, &mut broker.host, &mut broker.port)?;
                }
            }
            ResponseKind::DescribeQuorum(response) => {
                for node in &mut response.nodes {
                    node.listeners.clear();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[async_trait]
impl Filter for AddressRewriteFilter {
    fn name(&self) -> &'static str {
        "address-rewrite"
    }

    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::EMPTY
    }

    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[
            ApiKey::Metadata,
            ApiKey::FindCoordinator,
            ApiKey::DescribeCluster,
            ApiKey::DescribeQuorum,
        ])
    }

    async fn on_response(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        match self.rewrite_response(frame.body_mut()) {
            Ok(()) => ResponseVerdict::Forward,
            Err(reason) => {
                tracing::error!(%reason, "cannot rewrite broker addresses; closing the connection");
                ResponseVerdict::Close(reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::gauge::Gauge;
    use std::time::SystemTime;
    use strait_filter::{ConnectionInfo, Endpoint, Principal, RequestFrame};
    use strait_kafka::kafka_protocol::messages::api_versions_response::ApiVersion;
    use strait_kafka::kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
    use strait_kafka::kafka_protocol::messages::find_coordinator_response::Coordinator;
    use strait_kafka::kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use strait_kafka::kafka_protocol::messages::{
        ApiVersionsResponse, BrokerId, DescribeClusterResponse, FindCoordinatorResponse,
        MetadataRequest, MetadataResponse, RequestHeader, RequestKind,
    };

    fn connection() -> ConnectionInfo {
        ConnectionInfo {
            virtual_cluster: "vc".into(),
            client_addr: "127.0.0.1:1".parse().unwrap(),
            endpoint: Endpoint::Bootstrap,
            principal: Principal::Anonymous,
        }
    }

    fn request(key: ApiKey, version: i16) -> RequestFrame {
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(1);
        // The body only matters for its key; Metadata stands in for all.
        let mut frame =
            RequestFrame::new(header, RequestKind::Metadata(MetadataRequest::default())).unwrap();
        let _ = frame.body_mut();
        frame
    }

    fn broker_map() -> (Arc<BrokerMap>, u16) {
        // Find a free block of ports by binding an ephemeral one and using the range after it.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe
            .local_addr()
            .unwrap()
            .port()
            .saturating_add(1)
            .min(65000);
        drop(probe);
        let (map, _rx) = BrokerMap::new(
            "edge.example.com",
            base..=base + 30,
            "127.0.0.1".parse().unwrap(),
            Gauge::default(),
        );
        (map, base)
    }

    /// A decoded Metadata fixture for a three-broker cluster: every address
    /// the client receives must be the edge's, with one distinct port each.
    #[tokio::test]
    async fn metadata_multi_broker_rewritten_for_every_version() {
        let (map, base) = broker_map();
        let mut filter = AddressRewriteFilter::new(map.clone());
        let connection = connection();
        let ctx = FilterContext {
            connection: &connection,
            now: SystemTime::now(),
        };
        for version in 0..=13 {
            let upstream = MetadataResponse::default().with_brokers(
                [1, 2, 3]
                    .into_iter()
                    .map(|id| {
                        MetadataResponseBroker::default()
                            .with_node_id(BrokerId(id))
                            .with_host(StrBytes::from_string(format!("kafka-{id}.internal")))
                            .with_port(9092)
                    })
                    .collect(),
            );
            let bytes = strait_kafka::codec::encode_response(
                ApiKey::Metadata,
                version,
                &Default::default(),
                &ResponseKind::Metadata(upstream),
            )
            .unwrap();
            let mut frame = ResponseFrame::decode(ApiKey::Metadata, version, bytes).unwrap();
            assert!(matches!(
                filter.on_response(&ctx, &mut frame).await,
                ResponseVerdict::Forward
            ));
            let bytes = frame.into_bytes().unwrap();
            let (_, decoded) =
                strait_kafka::codec::decode_response(ApiKey::Metadata, version, bytes).unwrap();
            let ResponseKind::Metadata(decoded) = decoded else {
                panic!()
            };
            let mut ports = Vec::new();
            for broker in &decoded.brokers {
                assert_eq!(broker.host.as_str(), "edge.example.com");
                assert!((base..=base + 30).contains(&(broker.port as u16)));
                ports.push(broker.port);
            }
            ports.sort();
            ports.dedup();
            assert_eq!(ports.len(), 3, "v{version}: one port per broker");
        }
        assert_eq!(map.upstream_of(2).unwrap().host, "kafka-2.internal");
    }

    #[tokio::test]
    async fn find_coordinator_batched_and_legacy_and_describe_cluster() {
        let (map, _) = broker_map();
        let mut filter = AddressRewriteFilter::new(map);
        let connection = connection();
        let ctx = FilterContext {
            connection: &connection,
            now: SystemTime::now(),
        };
        let req = request(ApiKey::FindCoordinator, 4);
        let mut batched = ResponseFrame::answering(
            &req,
            ResponseKind::FindCoordinator(FindCoordinatorResponse::default().with_coordinators(
                vec![
                Coordinator::default()
                    .with_key(StrBytes::from_static_str("group-a"))
                    .with_node_id(BrokerId(7))
                    .with_host(StrBytes::from_static_str("kafka-7.internal"))
                    .with_port(9093),
                Coordinator::default()
                    .with_key(StrBytes::from_static_str("group-b"))
                    .with_node_id(BrokerId(-1))
                    .with_host(StrBytes::from_static_str("kafka-7.internal"))
                    .with_port(9093)
                    .with_error_code(15),
            ],
            )),
        );
        filter.on_response(&ctx, &mut batched).await;
        let ResponseKind::FindCoordinator(resp) = batched.body() else {
            panic!()
        };
        assert_eq!(resp.coordinators[0].host.as_str(), "edge.example.com");
        assert_eq!(resp.coordinators[1].host.as_str(), "");
        assert_eq!(resp.coordinators[1].port, -1);

        let req = request(ApiKey::FindCoordinator, 3);
        let mut legacy = ResponseFrame::answering(
            &req,
            ResponseKind::FindCoordinator(
                FindCoordinatorResponse::default()
                    .with_node_id(BrokerId(7))
                    .with_host(StrBytes::from_static_str("kafka-7.internal"))
                    .with_port(9093),
            ),
        );
        filter.on_response(&ctx, &mut legacy).await;
        let ResponseKind::FindCoordinator(resp) = legacy.body() else {
            panic!()
        };
        assert_eq!(resp.host.as_str(), "edge.example.com");

        let req = request(ApiKey::DescribeCluster, 1);
        let mut describe = ResponseFrame::answering(
            &req,
            ResponseKind::DescribeCluster(DescribeClusterResponse::default().with_brokers(vec![
                DescribeClusterBroker::default()
                    .with_broker_id(BrokerId(7))
                    .with_host(StrBytes::from_static_str("kafka-7.internal"))
                    .with_port(9093),
            ])),
        );
        filter.on_response(&ctx, &mut describe).await;
        let ResponseKind::DescribeCluster(resp) = describe.body() else {
            panic!()
        };
        assert_eq!(resp.brokers[0].host.as_str(), "edge.example.com");
    }

    #[tokio::test]
    async fn api_versions_intersected_with_what_the_edge_decodes() {
        let connection = connection();
        let ctx = FilterContext {
            connection: &connection,
            now: SystemTime::now(),
        };
        let req = request(ApiKey::ApiVersions, 3);
        let mut frame = ResponseFrame::answering(
            &req,
            ResponseKind::ApiVersions(ApiVersionsResponse::default().with_api_keys(vec![
                ApiVersion::default()
                    .with_api_key(ApiKey::Produce as i16)
                    .with_min_version(0)
                    .with_max_version(99),
                ApiVersion::default()
                    .with_api_key(ApiKey::Metadata as i16)
                    .with_min_version(0)
                    .with_max_version(4),
                ApiVersion::default()
                    .with_api_key(9999)
                    .with_min_version(0)
                    .with_max_version(1),
            ])),
        );
        ApiVersionsFilter.on_response(&ctx, &mut frame).await;
        let ResponseKind::ApiVersions(resp) = frame.body() else {
            panic!()
        };
        assert_eq!(resp.api_keys.len(), 2, "unknown key dropped");
        let produce = ApiKey::Produce.valid_versions();
        assert_eq!(resp.api_keys[0].min_version, produce.min);
        assert_eq!(resp.api_keys[0].max_version, produce.max);
        assert_eq!(resp.api_keys[1].max_version, 4);
    }
}

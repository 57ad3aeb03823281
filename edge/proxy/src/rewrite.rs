//! The built-in filters every connection has: version negotiation and broker
//! address rewriting (and, on connections to an upstream whose broker ids
//! are not the edge's, node-id translation: `node_ids`). They run first on
//! requests and last on responses, so nothing a client receives carries an
//! upstream address or an upstream's own broker id. Which API keys and
//! versions may reach a client at all is decided per key in [`policy`].

mod node_ids;
pub mod policy;

use std::sync::Arc;

use async_trait::async_trait;
use strait_edge_config::HostPort;
use strait_filter::{
    ApiKeySet, Filter, FilterContext, RequestFrame, RequestVerdict, ResponseFrame, ResponseVerdict,
};
use strait_kafka::kafka_protocol::messages::describe_configs_response::DescribeConfigsResourceResult;
use strait_kafka::kafka_protocol::messages::{
    ApiKey, DescribeConfigsResponse, RequestKind, ResponseKind,
};
use strait_kafka::kafka_protocol::protocol::StrBytes;

use crate::brokers::{BrokerMap, Discovery};
pub use node_ids::{Carries, KEYS_WITH_NODE_IDS};
use policy::{VersionLimits, FETCH_NODE_ENDPOINTS, FETCH_NODE_IDS, PRODUCE_NODE_ENDPOINTS};

/// The edge's own filters for a connection, to go first in its chain, given
/// the filters configured for it. Fetch v16+ (whose responses name brokers)
/// is offered only when a configured filter decodes those responses anyway,
/// and then the rewriter rewrites them too; otherwise Fetch stays at v15 and
/// its responses keep streaming undecoded.
///
/// On a connection to an upstream whose node ids differ from the edge's
/// (after a switch; see [`crate::brokers::node_ids`]), the rewriter also
/// translates every broker id, which takes Fetch v11+ answers (and the few
/// requests that name brokers) off the raw path; since Fetch is decoded
/// then anyway, v16+ is offered too. Connections to the first upstream, or
/// to one whose ids turned out equal, are as before.
pub fn edge_filters(
    brokers: Arc<BrokerMap>,
    configured: &[Box<dyn Filter>],
) -> [Box<dyn Filter>; 2] {
    let discovery = brokers.discovery();
    edge_filters_for(brokers, discovery, configured)
}

/// [`edge_filters`] for a connection to the upstream whose brokers
/// `discovery` records (the one current when the connection opened).
pub fn edge_filters_for(
    brokers: Arc<BrokerMap>,
    discovery: Arc<Discovery>,
    configured: &[Box<dyn Filter>],
) -> [Box<dyn Filter>; 2] {
    let maps_node_ids = discovery.maps_node_ids();
    let fetch_decoded = maps_node_ids
        || configured.iter().any(|filter| {
            filter.response_keys().contains(ApiKey::Fetch as i16)
                && filter.min_response_version(ApiKey::Fetch) <= FETCH_NODE_ENDPOINTS
        });
    let mut rewrite = AddressRewriteFilter::new(brokers);
    rewrite.discovery = discovery;
    if fetch_decoded {
        rewrite = rewrite.with_fetch();
    }
    if maps_node_ids {
        rewrite = rewrite.with_node_ids();
    }
    [
        Box::new(ApiVersionsFilter::new(VersionLimits::get(fetch_decoded))),
        Box::new(rewrite),
    ]
}

/// Narrows the broker's ApiVersions answer to what the edge can decode and
/// may offer (see [`policy`]), so a client never picks a version a filter (or
/// the rewriter) cannot read, or whose responses would carry a broker address
/// past the rewriter.
pub struct ApiVersionsFilter {
    limits: &'static VersionLimits,
}

impl ApiVersionsFilter {
    pub fn new(limits: &'static VersionLimits) -> Self {
        ApiVersionsFilter { limits }
    }
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
                let Some((min, max)) = self.limits.range(entry.api_key) else {
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

/// Replaces every broker address in Metadata, FindCoordinator,
/// DescribeCluster and Produce v10+ responses (and Fetch v16+, with
/// [`Self::with_fetch`]) with the edge's address for that broker, removes
/// controller addresses from DescribeQuorum (clients cannot reach controllers
/// through the edge), and redacts broker configs that are addresses from
/// DescribeConfigs.
///
/// Produce and Fetch responses and DescribeConfigs answers that name no
/// broker leave with their original bytes: most of them name none, and every
/// produce is answered.
///
/// With [`Self::with_node_ids`], it also translates broker node ids in both
/// directions (see `node_ids`).
pub struct AddressRewriteFilter {
    brokers: Arc<BrokerMap>,
    /// Where the brokers of this connection's upstream are recorded: an
    /// answer of a replaced upstream never lands in the new one's.
    discovery: Arc<Discovery>,
    fetch: bool,
    /// This upstream's node ids are not (known to be) the edge's.
    node_ids: bool,
}

impl AddressRewriteFilter {
    pub fn new(brokers: Arc<BrokerMap>) -> Self {
        AddressRewriteFilter {
            discovery: brokers.discovery(),
            brokers,
            fetch: false,
            node_ids: false,
        }
    }

    /// Also translates broker node ids, requests edge → upstream and
    /// responses upstream → edge, while the mapping of this connection's
    /// upstream is not the identity.
    pub fn with_node_ids(mut self) -> Self {
        self.node_ids = true;
        self
    }

    /// Translates the ids of an answer; whether it changed.
    fn translate_response(&self, frame: &mut ResponseFrame) -> bool {
        let version = frame.version();
        self.brokers.with_node_ids(&self.discovery, |ids| {
            // Checked on every answer: a pending mapping may have turned
            // out to be the identity since the connection opened.
            if ids.is_identity() || !node_ids::hot_answer_changes(frame.body(), ids) {
                return false;
            }
            node_ids::response(frame.body_mut(), version, ids);
            true
        })
    }

    /// Also rewrites Fetch v16+ `node_endpoints`. Only for connections whose
    /// Fetch responses are decoded anyway: asking for them here would
    /// otherwise take every fetch off the streaming path.
    pub fn with_fetch(mut self) -> Self {
        self.fetch = true;
        self
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
            .advertise_in(&self.discovery, node_id, upstream)
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
            // KIP-951: where the new leaders of partitions that answered
            // NOT_LEADER_OR_FOLLOWER are. Going through the map also teaches
            // it a leader it has not seen in Metadata yet, so the edge port it
            // hands out reaches that broker.
            ResponseKind::Produce(response) => {
                for node in &mut response.node_endpoints {
                    self.rewrite(node.node_id.0, &mut node.host, &mut node.port)?;
                }
            }
            ResponseKind::Fetch(response) => {
                for node in &mut response.node_endpoints {
                    self.rewrite(node.node_id.0, &mut node.host, &mut node.port)?;
                }
            }
            ResponseKind::DescribeConfigs(response) => redact_broker_addresses(response),
            _ => {}
        }
        Ok(())
    }
}

/// Whether a response of a key this filter reads on every call (rather than
/// always rewriting) names a broker, so that one that does not keeps its bytes.
fn names_brokers(body: &ResponseKind) -> bool {
    match body {
        ResponseKind::Produce(response) => !response.node_endpoints.is_empty(),
        ResponseKind::Fetch(response) => !response.node_endpoints.is_empty(),
        ResponseKind::DescribeConfigs(response) => response.results.iter().any(|result| {
            is_broker(result.resource_type) && result.configs.iter().any(exposes_address)
        }),
        // Read only for their node ids.
        ResponseKind::DescribeTopicPartitions(_)
        | ResponseKind::ListPartitionReassignments(_)
        | ResponseKind::AlterConfigs(_)
        | ResponseKind::IncrementalAlterConfigs(_) => false,
        _ => true,
    }
}

/// DescribeConfigs resource type BROKER. Topic, group, client-metrics and
/// broker-logger configs name no broker.
fn is_broker(resource_type: i8) -> bool {
    resource_type == 4
}

/// Blanks the value (and its synonyms' values) of every broker config that
/// names an address, and marks it sensitive, which is how brokers answer for
/// passwords: clients and admin tools show such a config as hidden.
fn redact_broker_addresses(response: &mut DescribeConfigsResponse) {
    for result in &mut response.results {
        if !is_broker(result.resource_type) {
            continue;
        }
        for config in &mut result.configs {
            if exposes_address(config) {
                config.value = None;
                config.is_sensitive = true;
                for synonym in &mut config.synonyms {
                    synonym.value = None;
                }
            }
        }
    }
}

fn exposes_address(config: &DescribeConfigsResourceResult) -> bool {
    is_address_config(config.name.as_str(), config.value.as_deref())
        || config
            .synonyms
            .iter()
            .any(|synonym| is_address_config(synonym.name.as_str(), synonym.value.as_deref()))
}

/// A broker config that names brokers, controllers or ZooKeeper. Known names
/// first (`listeners`, `advertised.listeners`, `controller.quorum.voters`,
/// `controller.quorum.bootstrap.servers`, ...), then, failing closed for
/// names this list does not know (plugins' `*.bootstrap.servers` and the
/// like), any value holding a `:port`.
fn is_address_config(name: &str, value: Option<&str>) -> bool {
    const NAME_ENDINGS: [&str; 5] = [
        "listeners",
        "bootstrap.servers",
        "quorum.voters",
        "host.name",
        "zookeeper.connect",
    ];
    NAME_ENDINGS.iter().any(|ending| name.ends_with(ending)) || value.is_some_and(has_port)
}

/// Whether `value` holds `:` and 1-5 digits ending the value or followed by
/// a separator: `host:9092`, `1@host:9093`, `[::1]:9092`, `SSL://:9093`,
/// `zk:2181/kafka`.
fn has_port(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.iter().enumerate().any(|(at, byte)| {
        if *byte != b':' {
            return false;
        }
        let rest = bytes.get(at + 1..).unwrap_or_default();
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        (1..=5).contains(&digits)
            && matches!(
                rest.get(digits),
                None | Some(b',' | b' ' | b';' | b'/' | b'\t' | b'\n')
            )
    })
}

#[async_trait]
impl Filter for AddressRewriteFilter {
    fn name(&self) -> &'static str {
        "address-rewrite"
    }

    fn request_keys(&self) -> ApiKeySet {
        if !self.node_ids {
            return ApiKeySet::EMPTY;
        }
        let mut keys = ApiKeySet::EMPTY;
        for (key, carries, _) in KEYS_WITH_NODE_IDS {
            if *carries != Carries::Response {
                keys.insert(*key as i16);
            }
        }
        keys
    }

    async fn on_request(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut RequestFrame,
    ) -> RequestVerdict {
        // A consumer's replica id (-1) is the only id most of these carry:
        // such a request keeps its bytes.
        let names_broker = match frame.body() {
            RequestKind::Fetch(r) => r.replica_id.0 >= 0 || r.replica_state.replica_id.0 >= 0,
            RequestKind::ListOffsets(r) => r.replica_id.0 >= 0,
            RequestKind::OffsetForLeaderEpoch(r) => r.replica_id.0 >= 0,
            _ => true,
        };
        if names_broker {
            self.brokers.with_node_ids(&self.discovery, |ids| {
                if !ids.is_identity() {
                    node_ids::request(frame.body_mut(), ids);
                }
            });
        }
        RequestVerdict::Forward
    }

    fn response_keys(&self) -> ApiKeySet {
        let mut keys = ApiKeySet::of(&[
            ApiKey::Metadata,
            ApiKey::FindCoordinator,
            ApiKey::DescribeCluster,
            ApiKey::DescribeQuorum,
            ApiKey::DescribeConfigs,
            ApiKey::Produce,
        ]);
        if self.fetch {
            keys.insert(ApiKey::Fetch as i16);
        }
        if self.node_ids {
            for (key, carries, _) in KEYS_WITH_NODE_IDS {
                if *carries != Carries::Request {
                    keys.insert(*key as i16);
                }
            }
        }
        keys
    }

    /// Produce before v10 and Fetch before v16 cannot name a broker, nor
    /// Fetch before v11 a broker id: they stay on the raw path.
    fn min_response_version(&self, api_key: ApiKey) -> i16 {
        match api_key {
            ApiKey::Produce => PRODUCE_NODE_ENDPOINTS,
            ApiKey::Fetch if self.node_ids => FETCH_NODE_IDS,
            ApiKey::Fetch => FETCH_NODE_ENDPOINTS,
            _ => 0,
        }
    }

    async fn on_response(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        // Ids first: the addresses are recorded under the edge's ids.
        let translated = self.node_ids && self.translate_response(frame);
        // Reading is free; `body_mut` would re-encode the frame.
        if !translated && !names_brokers(frame.body()) {
            return ResponseVerdict::Forward;
        }
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
    use bytes::{Bytes, BytesMut};
    use prometheus_client::metrics::gauge::Gauge;
    use std::time::SystemTime;
    use strait_filter::FilterChain;
    use strait_filter::{ConnectionInfo, Endpoint, Principal, RequestFrame};
    use strait_kafka::kafka_protocol::messages::api_versions_response::ApiVersion;
    use strait_kafka::kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
    use strait_kafka::kafka_protocol::messages::describe_configs_response::{
        DescribeConfigsResult, DescribeConfigsSynonym,
    };
    use strait_kafka::kafka_protocol::messages::fetch_response::{
        self, FetchableTopicResponse, PartitionData,
    };
    use strait_kafka::kafka_protocol::messages::find_coordinator_response::Coordinator;
    use strait_kafka::kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use strait_kafka::kafka_protocol::messages::produce_response::{
        LeaderIdAndEpoch, NodeEndpoint, PartitionProduceResponse, TopicProduceResponse,
    };
    use strait_kafka::kafka_protocol::messages::{
        ApiVersionsResponse, BrokerId, DescribeClusterResponse, FetchResponse,
        FindCoordinatorResponse, MetadataRequest, MetadataResponse, ProduceResponse, RequestHeader,
        RequestKind, ResponseHeader, TopicName,
    };

    fn connection() -> ConnectionInfo {
        ConnectionInfo {
            via_peer: None,
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

    fn api_version(key: i16, min: i16, max: i16) -> ApiVersion {
        ApiVersion::default()
            .with_api_key(key)
            .with_min_version(min)
            .with_max_version(max)
    }

    async fn narrowed(
        limits: &'static VersionLimits,
        offered: Vec<ApiVersion>,
    ) -> Vec<(i16, i16, i16)> {
        let connection = connection();
        let ctx = FilterContext {
            connection: &connection,
            now: SystemTime::now(),
        };
        let req = request(ApiKey::ApiVersions, 3);
        let mut frame = ResponseFrame::answering(
            &req,
            ResponseKind::ApiVersions(ApiVersionsResponse::default().with_api_keys(offered)),
        );
        ApiVersionsFilter::new(limits)
            .on_response(&ctx, &mut frame)
            .await;
        let ResponseKind::ApiVersions(resp) = frame.body() else {
            panic!()
        };
        resp.api_keys
            .iter()
            .map(|k| (k.api_key, k.min_version, k.max_version))
            .collect()
    }

    #[tokio::test]
    async fn api_versions_intersected_with_what_the_edge_decodes() {
        let got = narrowed(
            VersionLimits::get(false),
            vec![
                api_version(ApiKey::Produce as i16, 0, 99),
                api_version(ApiKey::Metadata as i16, 0, 4),
                api_version(9999, 0, 1),
            ],
        )
        .await;
        let produce = ApiKey::Produce.valid_versions();
        assert_eq!(
            got,
            vec![
                (ApiKey::Produce as i16, produce.min, produce.max),
                (ApiKey::Metadata as i16, 0, 4),
            ],
            "unknown key dropped"
        );
    }

    /// What an Apache Kafka 4.1 broker offers for the keys the policy caps
    /// or drops.
    fn kafka_4_offer() -> Vec<ApiVersion> {
        vec![
            api_version(ApiKey::Produce as i16, 3, 12),
            api_version(ApiKey::Fetch as i16, 4, 17),
            api_version(ApiKey::ShareFetch as i16, 1, 1),
            api_version(ApiKey::ShareAcknowledge as i16, 1, 1),
            api_version(ApiKey::WriteTxnMarkers as i16, 1, 1),
            api_version(ApiKey::Vote as i16, 0, 2),
            api_version(ApiKey::FetchSnapshot as i16, 0, 1),
            api_version(ApiKey::Envelope as i16, 0, 0),
            api_version(ApiKey::ReadShareGroupState as i16, 0, 0),
            api_version(ApiKey::DescribeQuorum as i16, 0, 2),
            api_version(ApiKey::ShareGroupHeartbeat as i16, 1, 1),
        ]
    }

    #[tokio::test]
    async fn api_versions_cap_fetch_and_drop_address_carrying_keys() {
        let got = narrowed(VersionLimits::get(false), kafka_4_offer()).await;
        assert_eq!(
            got,
            vec![
                (ApiKey::Produce as i16, 3, 12),
                (ApiKey::Fetch as i16, 4, 15),
                (ApiKey::DescribeQuorum as i16, 0, 2),
                (ApiKey::ShareGroupHeartbeat as i16, 1, 1),
            ]
        );
        // Where Fetch responses are decoded anyway, Fetch keeps its versions
        // (and the rewriter reads their node endpoints); the rest stays dropped.
        let got = narrowed(VersionLimits::get(true), kafka_4_offer()).await;
        assert_eq!(got[1], (ApiKey::Fetch as i16, 4, 17));
        assert_eq!(got.len(), 4);
    }

    /// A filter that decodes every Fetch response, as the encryption filter does.
    struct DecodesFetch;

    #[async_trait]
    impl Filter for DecodesFetch {
        fn name(&self) -> &'static str {
            "decodes-fetch"
        }
        fn request_keys(&self) -> ApiKeySet {
            ApiKeySet::EMPTY
        }
        fn response_keys(&self) -> ApiKeySet {
            ApiKeySet::of(&[ApiKey::Fetch])
        }
    }

    #[tokio::test]
    async fn edge_filters_keep_fetch_streaming_unless_it_is_decoded_anyway() {
        let (map, _) = broker_map();
        let plain = FilterChain::new(Vec::from(edge_filters(map.clone(), &[])));
        let fetch = ApiKey::Fetch as i16;
        let produce = ApiKey::Produce as i16;
        for version in 4..=18 {
            assert!(
                !plain.wants_response(fetch, version),
                "Fetch v{version} decoded"
            );
        }
        assert!(!plain.wants_response(produce, 9));
        assert!(plain.wants_response(produce, 10));
        assert!(plain.wants_response(produce, 13));
        assert_eq!(VersionLimits::for_chain(&plain), VersionLimits::get(false));

        let configured: Vec<Box<dyn Filter>> = vec![Box::new(DecodesFetch)];
        let mut filters = Vec::from(edge_filters(map, &configured));
        filters.extend(configured);
        let decoding = FilterChain::new(filters);
        assert!(decoding.wants_response(fetch, 16));
        assert_eq!(
            VersionLimits::for_chain(&decoding),
            VersionLimits::get(true)
        );
    }

    fn learning_broker_map() -> (
        Arc<BrokerMap>,
        std::ops::RangeInclusive<u16>,
        tokio::sync::mpsc::UnboundedReceiver<crate::brokers::NewBrokerListener>,
    ) {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe
            .local_addr()
            .unwrap()
            .port()
            .saturating_add(1)
            .min(65000);
        drop(probe);
        let (map, rx) = BrokerMap::new(
            "edge.example.com",
            base..=base + 30,
            "127.0.0.1".parse().unwrap(),
            Gauge::default(),
        );
        (map, base..=base + 30, rx)
    }

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    /// A Produce answer as Kafka 4 sends it after a leader change: partition 0
    /// refused with NOT_LEADER_OR_FOLLOWER, its new leader in current_leader,
    /// and that leader's address (and one more) in node_endpoints.
    fn produce_response(node_endpoints: &[(i32, &str, i32)]) -> ProduceResponse {
        let partition = |index, error_code, leader| {
            PartitionProduceResponse::default()
                .with_index(index)
                .with_error_code(error_code)
                .with_base_offset(if error_code == 0 { 42 } else { -1 })
                .with_current_leader(
                    LeaderIdAndEpoch::default()
                        .with_leader_id(BrokerId(leader))
                        .with_leader_epoch(7),
                )
        };
        ProduceResponse::default()
            .with_responses(vec![TopicProduceResponse::default()
                .with_name(TopicName(StrBytes::from_static_str("orders")))
                .with_partition_responses(vec![
                    partition(0, 6, 3),
                    partition(1, 0, -1),
                ])])
            .with_node_endpoints(
                node_endpoints
                    .iter()
                    .map(|(id, host, port)| {
                        NodeEndpoint::default()
                            .with_node_id(BrokerId(*id))
                            .with_host(StrBytes::from_string((*host).to_owned()))
                            .with_port(*port)
                            .with_rack(Some(StrBytes::from_static_str("rack-a")))
                    })
                    .collect(),
            )
    }

    fn encode(key: ApiKey, version: i16, body: ResponseKind) -> Bytes {
        let header = ResponseHeader::default().with_correlation_id(17);
        strait_kafka::codec::encode_response(key, version, &header, &body).unwrap()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack
            .windows(needle.len())
            .any(|window| window == needle)
    }

    async fn filter_frame(filter: &mut AddressRewriteFilter, mut frame: ResponseFrame) -> Bytes {
        let connection = connection();
        let ctx = FilterContext {
            connection: &connection,
            now: SystemTime::now(),
        };
        assert!(matches!(
            filter.on_response(&ctx, &mut frame).await,
            ResponseVerdict::Forward
        ));
        frame.into_bytes().unwrap()
    }

    #[tokio::test]
    async fn produce_node_endpoints_rewritten_v10_to_v13() {
        let (map, range, mut new_listeners) = learning_broker_map();
        // Broker 1 came from Metadata; broker 3 is new to the edge.
        let (_, port_1) = map.advertise(1, hp("kafka-1.internal", 9092)).unwrap();
        let known = new_listeners.recv().await.unwrap();
        assert_eq!(known.node_id, 1);
        let mut filter = AddressRewriteFilter::new(map.clone());
        let mut port_3 = None;
        for version in 10..=13 {
            let upstream = encode(
                ApiKey::Produce,
                version,
                ResponseKind::Produce(produce_response(&[
                    (3, "kafka-3.internal", 9094),
                    (1, "kafka-1.internal", 9092),
                ])),
            );
            assert!(
                contains(&upstream, b"kafka-3.internal"),
                "fixture carries the address"
            );
            let frame = ResponseFrame::decode(ApiKey::Produce, version, upstream).unwrap();
            let sent = filter_frame(&mut filter, frame).await;
            assert!(
                !contains(&sent, b"internal"),
                "v{version}: an upstream host reached the client"
            );
            let (header, body) =
                strait_kafka::codec::decode_response(ApiKey::Produce, version, sent).unwrap();
            assert_eq!(header.correlation_id, 17);
            let ResponseKind::Produce(body) = body else {
                panic!()
            };
            let endpoints: Vec<_> = body
                .node_endpoints
                .iter()
                .map(|e| {
                    (
                        e.node_id.0,
                        e.host.as_str().to_owned(),
                        e.port,
                        e.rack.clone(),
                    )
                })
                .collect();
            let edge_port_3 = endpoints[0].2;
            assert!(
                range.contains(&(edge_port_3 as u16)),
                "v{version}: {endpoints:?}"
            );
            assert_ne!(edge_port_3, i32::from(port_1));
            assert_eq!(
                endpoints,
                vec![
                    (
                        3,
                        "edge.example.com".into(),
                        edge_port_3,
                        Some(StrBytes::from_static_str("rack-a"))
                    ),
                    (
                        1,
                        "edge.example.com".into(),
                        i32::from(port_1),
                        Some(StrBytes::from_static_str("rack-a"))
                    ),
                ]
            );
            // The same broker keeps the same edge port across answers.
            assert_eq!(*port_3.get_or_insert(edge_port_3), edge_port_3);
            // Everything else is as the broker sent it.
            let partitions = &body.responses[0].partition_responses;
            assert_eq!(partitions[0].error_code, 6);
            assert_eq!(partitions[0].current_leader.leader_id, BrokerId(3));
            assert_eq!(partitions[1].base_offset, 42);
        }
        // The map learned broker 3 from the produce answer alone: its edge port
        // is bound and handed to the accept loop, and a connection to it is
        // relayed to the address the broker sent (ClusterRuntime::serve
        // connects Endpoint::Broker(3) to upstream_of(3)).
        let learned = new_listeners.recv().await.unwrap();
        assert_eq!(learned.node_id, 3);
        assert_eq!(
            i32::from(learned.listener.local_addr().unwrap().port()),
            port_3.unwrap()
        );
        assert_eq!(map.upstream_of(3), Some(hp("kafka-3.internal", 9094)));
        // A broker that moved is followed.
        let moved = encode(
            ApiKey::Produce,
            11,
            ResponseKind::Produce(produce_response(&[(3, "kafka-3b.internal", 9095)])),
        );
        let frame = ResponseFrame::decode(ApiKey::Produce, 11, moved).unwrap();
        filter_frame(&mut filter, frame).await;
        assert_eq!(map.upstream_of(3), Some(hp("kafka-3b.internal", 9095)));
        assert!(
            new_listeners.try_recv().is_err(),
            "no second port for a known broker"
        );
    }

    #[tokio::test]
    async fn produce_without_node_endpoints_keeps_its_bytes() {
        let (map, _) = broker_map();
        let mut filter = AddressRewriteFilter::new(map);
        for version in 10..=13 {
            let upstream = encode(
                ApiKey::Produce,
                version,
                ResponseKind::Produce(produce_response(&[])),
            );
            let frame = ResponseFrame::decode(ApiKey::Produce, version, upstream.clone()).unwrap();
            let sent = filter_frame(&mut filter, frame).await;
            assert_eq!(
                sent, upstream,
                "v{version}: re-encoded although nothing changed"
            );
        }
    }

    #[tokio::test]
    async fn produce_node_endpoints_without_a_broker_are_blanked() {
        let (map, _) = broker_map();
        let mut filter = AddressRewriteFilter::new(map);
        let upstream = encode(
            ApiKey::Produce,
            12,
            ResponseKind::Produce(produce_response(&[(-1, "kafka-9.internal", 9092)])),
        );
        let frame = ResponseFrame::decode(ApiKey::Produce, 12, upstream).unwrap();
        let sent = filter_frame(&mut filter, frame).await;
        assert!(!contains(&sent, b"internal"));
    }

    /// A node_endpoints field the decoder cannot read is dropped with the
    /// other trailing tags (see `codec::decode_response_frame`); the client
    /// then gets the bytes that were decoded, never the unread field.
    #[tokio::test]
    async fn unreadable_node_endpoints_never_reach_the_client() {
        let (map, _) = broker_map();
        let mut filter = AddressRewriteFilter::new(map);
        let clean = encode(
            ApiKey::Produce,
            10,
            ResponseKind::Produce(produce_response(&[])),
        );
        // Replace the empty top-level tag section with tag 0 holding garbage
        // that names a broker.
        let garbage = b"kafka-1.internal:9092";
        let mut dirty = BytesMut::from(&clean[..clean.len() - 1]);
        dirty.extend_from_slice(&[1, 0, garbage.len() as u8]);
        dirty.extend_from_slice(garbage);
        let size = (dirty.len() - 4) as i32;
        dirty[..4].copy_from_slice(&size.to_be_bytes());
        let frame = ResponseFrame::decode(ApiKey::Produce, 10, dirty.freeze()).unwrap();
        let sent = filter_frame(&mut filter, frame).await;
        assert!(!contains(&sent, b"internal"));
        assert_eq!(sent, clean);
    }

    fn fetch_response(node_endpoints: &[(i32, &str, i32)]) -> FetchResponse {
        FetchResponse::default()
            .with_session_id(5)
            .with_responses(vec![FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_static_str("orders")))
                .with_partitions(vec![PartitionData::default()
                    .with_partition_index(0)
                    .with_error_code(6)
                    .with_current_leader(
                        fetch_response::LeaderIdAndEpoch::default()
                            .with_leader_id(BrokerId(2))
                            .with_leader_epoch(3),
                    )])])
            .with_node_endpoints(
                node_endpoints
                    .iter()
                    .map(|(id, host, port)| {
                        fetch_response::NodeEndpoint::default()
                            .with_node_id(BrokerId(*id))
                            .with_host(StrBytes::from_string((*host).to_owned()))
                            .with_port(*port)
                    })
                    .collect(),
            )
    }

    #[tokio::test]
    async fn fetch_node_endpoints_rewritten_where_fetch_is_decoded() {
        let (map, base) = broker_map();
        let range = base..=base + 30;
        let mut filter = AddressRewriteFilter::new(map.clone()).with_fetch();
        assert_eq!(filter.min_response_version(ApiKey::Fetch), 16);
        for version in 16..=18 {
            let upstream = encode(
                ApiKey::Fetch,
                version,
                ResponseKind::Fetch(fetch_response(&[(2, "kafka-2.internal", 9092)])),
            );
            let frame = ResponseFrame::decode(ApiKey::Fetch, version, upstream).unwrap();
            let sent = filter_frame(&mut filter, frame).await;
            assert!(!contains(&sent, b"internal"), "v{version}");
            let (_, body) =
                strait_kafka::codec::decode_response(ApiKey::Fetch, version, sent).unwrap();
            let ResponseKind::Fetch(body) = body else {
                panic!()
            };
            assert_eq!(body.node_endpoints[0].host.as_str(), "edge.example.com");
            assert!(range.contains(&(body.node_endpoints[0].port as u16)));

            let upstream = encode(
                ApiKey::Fetch,
                version,
                ResponseKind::Fetch(fetch_response(&[])),
            );
            let frame = ResponseFrame::decode(ApiKey::Fetch, version, upstream.clone()).unwrap();
            assert_eq!(filter_frame(&mut filter, frame).await, upstream);
        }
        assert_eq!(map.upstream_of(2), Some(hp("kafka-2.internal", 9092)));
    }

    fn config(name: &str, value: &str) -> DescribeConfigsResourceResult {
        DescribeConfigsResourceResult::default()
            .with_name(StrBytes::from_string(name.to_owned()))
            .with_value(Some(StrBytes::from_string(value.to_owned())))
            .with_synonyms(vec![DescribeConfigsSynonym::default()
                .with_name(StrBytes::from_string(name.to_owned()))
                .with_value(Some(StrBytes::from_string(value.to_owned())))
                .with_source(4)])
    }

    fn describe_configs(
        resource_type: i8,
        configs: Vec<DescribeConfigsResourceResult>,
    ) -> DescribeConfigsResult {
        DescribeConfigsResult::default()
            .with_resource_type(resource_type)
            .with_resource_name(StrBytes::from_static_str("1"))
            .with_configs(configs)
    }

    #[tokio::test]
    async fn describe_configs_redacts_broker_addresses() {
        let (map, _) = broker_map();
        let mut filter = AddressRewriteFilter::new(map);
        let broker = describe_configs(
            4,
            vec![
                config(
                    "listeners",
                    "PLAINTEXT://kafka-1.internal:9092,CONTROLLER://:9093",
                ),
                config("advertised.listeners", "PLAINTEXT://kafka-1.internal:9092"),
                config("controller.quorum.voters", "1@ctl-1.internal:9093"),
                config("controller.quorum.bootstrap.servers", "ctl-1.internal:9093"),
                config("confluent.metrics.reporter.bootstrap.servers", ""),
                config("some.plugin.endpoint", "https://metrics.internal:8443/v1"),
                config("num.network.threads", "3"),
                config("log.dirs", "/var/lib/kafka"),
                config(
                    "listener.security.protocol.map",
                    "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                ),
            ],
        );
        // Topic configs name no broker ("0:1" is partition:replica).
        let topic = describe_configs(
            2,
            vec![config("leader.replication.throttled.replicas", "0:1")],
        );
        for version in 1..=4 {
            let upstream = encode(
                ApiKey::DescribeConfigs,
                version,
                ResponseKind::DescribeConfigs(
                    DescribeConfigsResponse::default()
                        .with_results(vec![broker.clone(), topic.clone()]),
                ),
            );
            let frame = ResponseFrame::decode(ApiKey::DescribeConfigs, version, upstream).unwrap();
            let sent = filter_frame(&mut filter, frame).await;
            assert!(!contains(&sent, b"internal"), "v{version}");
            let (_, body) =
                strait_kafka::codec::decode_response(ApiKey::DescribeConfigs, version, sent)
                    .unwrap();
            let ResponseKind::DescribeConfigs(body) = body else {
                panic!()
            };
            let values: Vec<_> = body.results[0]
                .configs
                .iter()
                .map(|c| {
                    (
                        c.value.as_ref().map(|v| v.as_str().to_owned()),
                        c.is_sensitive,
                    )
                })
                .collect();
            let hidden = (None, true);
            let shown = |v: &str| (Some(v.to_owned()), false);
            assert_eq!(
                values,
                vec![
                    hidden.clone(),
                    hidden.clone(),
                    hidden.clone(),
                    hidden.clone(),
                    hidden.clone(),
                    hidden.clone(),
                    shown("3"),
                    shown("/var/lib/kafka"),
                    shown("PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"),
                ],
                "v{version}"
            );
            if version >= 1 {
                assert!(body.results[0].configs[0]
                    .synonyms
                    .iter()
                    .all(|s| s.value.is_none()));
            }
            assert_eq!(
                body.results[1].configs[0]
                    .value
                    .as_ref()
                    .map(|v| v.as_str()),
                Some("0:1")
            );
        }
        // Without a broker address, the answer keeps its bytes.
        let upstream = encode(
            ApiKey::DescribeConfigs,
            4,
            ResponseKind::DescribeConfigs(
                DescribeConfigsResponse::default().with_results(vec![topic]),
            ),
        );
        let frame = ResponseFrame::decode(ApiKey::DescribeConfigs, 4, upstream.clone()).unwrap();
        assert_eq!(filter_frame(&mut filter, frame).await, upstream);
    }

    #[test]
    fn ports_in_config_values() {
        for value in [
            "kafka:9092",
            "PLAINTEXT://kafka:9092,SSL://kafka:9093",
            "1@ctl:9093",
            "[::1]:9092",
            "SSL://:9093",
            "zk1:2181,zk2:2181/kafka",
            "a:1 b",
        ] {
            assert!(has_port(value), "{value}");
        }
        for value in [
            "",
            "3",
            "/var/lib/kafka",
            "PLAINTEXT:PLAINTEXT",
            "RULE:[1:$1@$0]",
            "x:123456",
            "a:1b",
            ":",
        ] {
            assert!(!has_port(value), "{value}");
        }
    }

    /// What deciding on a Produce answer costs: decode, look for node
    /// endpoints, forward the original bytes. Prints; asserts nothing about
    /// time. Numbers in the README come from
    /// `cargo test --release -p strait-proxy produce_response_decode_cost -- --nocapture`.
    #[tokio::test]
    async fn produce_response_decode_cost() {
        let (map, _) = broker_map();
        let mut filter = AddressRewriteFilter::new(map);
        let connection = connection();
        let ctx = FilterContext {
            connection: &connection,
            now: SystemTime::now(),
        };
        let partitions = |count: i32| {
            ProduceResponse::default().with_responses(vec![TopicProduceResponse::default()
                .with_name(TopicName(StrBytes::from_static_str("orders")))
                .with_partition_responses(
                    (0..count)
                        .map(|index| {
                            PartitionProduceResponse::default()
                                .with_index(index)
                                .with_base_offset(1_000_000 + i64::from(index))
                                .with_log_append_time_ms(-1)
                                .with_log_start_offset(0)
                        })
                        .collect(),
                )])
        };
        let iterations = if cfg!(debug_assertions) {
            2_000
        } else {
            200_000
        };
        for (what, body) in [
            ("1 partition", partitions(1)),
            ("10 partitions", partitions(10)),
            ("1 partition + 2 node endpoints", {
                let mut body = produce_response(&[
                    (3, "kafka-3.internal", 9094),
                    (1, "kafka-1.internal", 9092),
                ]);
                body.responses[0].partition_responses.truncate(1);
                body
            }),
        ] {
            let bytes = encode(ApiKey::Produce, 11, ResponseKind::Produce(body));
            let started = std::time::Instant::now();
            for _ in 0..iterations {
                let mut frame = ResponseFrame::decode(ApiKey::Produce, 11, bytes.clone()).unwrap();
                let _ = filter.on_response(&ctx, &mut frame).await;
                std::hint::black_box(frame.into_bytes().unwrap());
            }
            let per = started.elapsed() / iterations;
            println!(
                "Produce v11 response, {what} ({} bytes): {per:?} per response (decode, check, forward)",
                bytes.len()
            );
        }
    }
}

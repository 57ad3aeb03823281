//! Node-id translation through the address rewriter, on real encoded
//! messages: an edge whose clients were given brokers 1, 2, 3 (the primary)
//! now serves a standby with brokers 4, 5, 6.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use strait_edge_config::HostPort;
use strait_filter::{
    ConnectionInfo, Endpoint, Filter, FilterChain, FilterContext, Principal, RequestFrame,
    ResponseFrame,
};
use strait_kafka::codec;
use strait_kafka::kafka_protocol::messages::*;
use strait_kafka::kafka_protocol::protocol::StrBytes;

use crate::brokers::{BrokerMap, Discovery};
use crate::rewrite::policy::VersionLimits;
use crate::rewrite::{edge_filters_for, AddressRewriteFilter};

fn hp(host: &str) -> HostPort {
    HostPort {
        host: host.into(),
        port: 9092,
    }
}

fn ids(list: &[i32]) -> Vec<BrokerId> {
    list.iter().map(|id| BrokerId(*id)).collect()
}

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_owned())
}

/// A map whose clients hold 1, 2, 3 from the primary, switched to a new
/// upstream (pending until its broker list is seen).
fn switched() -> (Arc<BrokerMap>, Arc<Discovery>) {
    let map = BrokerMap::sni("b-$(node_id).edge.example", 9443, Gauge::default());
    for id in [1, 2, 3] {
        map.advertise(id, hp(&format!("east-{id}"))).unwrap();
    }
    let west = map.reset_discovery();
    (map, west)
}

/// Settles the switched map's mapping: 4, 5, 6 → 1, 2, 3.
fn settled() -> (Arc<BrokerMap>, Arc<Discovery>) {
    let (map, west) = switched();
    map.with_node_ids(&west, |ids| ids.settle([4, 5, 6]));
    (map, west)
}

fn filter(map: &Arc<BrokerMap>) -> AddressRewriteFilter {
    AddressRewriteFilter::new(map.clone()).with_node_ids()
}

fn connection() -> ConnectionInfo {
    ConnectionInfo {
        via_peer: None,
        virtual_cluster: "vc".into(),
        client_addr: "127.0.0.1:1".parse().unwrap(),
        endpoint: Endpoint::Bootstrap,
        principal: Principal::Anonymous,
    }
}

fn encode(key: ApiKey, version: i16, body: ResponseKind) -> Bytes {
    let header = ResponseHeader::default().with_correlation_id(7);
    codec::encode_response(key, version, &header, &body).unwrap()
}

/// Encodes `body` as the broker would, runs it through `filter`, and
/// returns the bytes the client gets and their decoding.
async fn answer(
    filter: &mut AddressRewriteFilter,
    key: ApiKey,
    version: i16,
    body: ResponseKind,
) -> (Bytes, Bytes, ResponseKind) {
    let upstream = encode(key, version, body);
    let mut frame = ResponseFrame::decode(key, version, upstream.clone()).unwrap();
    let info = connection();
    let ctx = FilterContext {
        connection: &info,
        now: SystemTime::now(),
    };
    let _ = filter.on_response(&ctx, &mut frame).await;
    let sent = frame.into_bytes().unwrap();
    let (_, decoded) = codec::decode_response(key, version, sent.clone()).unwrap();
    (upstream, sent, decoded)
}

async fn ask(filter: &mut AddressRewriteFilter, version: i16, body: RequestKind) -> RequestKind {
    let key = request_key(&body);
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(3);
    let bytes = codec::encode_request(&header, &body).unwrap();
    let mut frame = RequestFrame::decode(bytes).unwrap();
    let info = connection();
    let ctx = FilterContext {
        connection: &info,
        now: SystemTime::now(),
    };
    let _ = filter.on_request(&ctx, &mut frame).await;
    let (_, _, decoded) = codec::decode_request(frame.into_bytes().unwrap()).unwrap();
    decoded
}

fn request_key(body: &RequestKind) -> ApiKey {
    match body {
        RequestKind::Fetch(_) => ApiKey::Fetch,
        RequestKind::ListOffsets(_) => ApiKey::ListOffsets,
        RequestKind::AlterPartitionReassignments(_) => ApiKey::AlterPartitionReassignments,
        RequestKind::CreateTopics(_) => ApiKey::CreateTopics,
        RequestKind::CreatePartitions(_) => ApiKey::CreatePartitions,
        RequestKind::UnregisterBroker(_) => ApiKey::UnregisterBroker,
        RequestKind::DescribeConfigs(_) => ApiKey::DescribeConfigs,
        RequestKind::AlterConfigs(_) => ApiKey::AlterConfigs,
        RequestKind::IncrementalAlterConfigs(_) => ApiKey::IncrementalAlterConfigs,
        RequestKind::OffsetForLeaderEpoch(_) => ApiKey::OffsetForLeaderEpoch,
        _ => unreachable!("not used in these tests"),
    }
}

fn standby_metadata() -> MetadataResponse {
    use metadata_response::*;
    MetadataResponse::default()
        .with_brokers(
            [6, 4, 5]
                .map(|id| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(id))
                        .with_host(s(&format!("west-{id}")))
                        .with_port(9092)
                })
                .to_vec(),
        )
        .with_controller_id(BrokerId(5))
        .with_topics(vec![MetadataResponseTopic::default()
            .with_name(Some(TopicName(s("orders"))))
            .with_partitions(vec![
                MetadataResponsePartition::default()
                    .with_partition_index(0)
                    .with_leader_id(BrokerId(6))
                    .with_replica_nodes(ids(&[6, 4, 9]))
                    .with_isr_nodes(ids(&[6, 4]))
                    .with_offline_replicas(ids(&[9])),
                MetadataResponsePartition::default()
                    .with_partition_index(1)
                    .with_leader_id(BrokerId(-1))
                    .with_replica_nodes(ids(&[5])),
            ])])
}

#[tokio::test]
async fn metadata_settles_the_mapping_and_translates_every_id() {
    let (map, west) = switched();
    let mut filter = filter(&map);
    for version in [1, 9, 12, 13] {
        let (_, _, body) = answer(
            &mut filter,
            ApiKey::Metadata,
            version,
            ResponseKind::Metadata(standby_metadata()),
        )
        .await;
        let ResponseKind::Metadata(body) = body else {
            panic!()
        };
        let brokers: Vec<_> = body
            .brokers
            .iter()
            .map(|b| (b.node_id.0, b.host.as_str().to_owned(), b.port))
            .collect();
        assert_eq!(
            brokers,
            [3, 1, 2]
                .map(|id| (id, format!("b-{id}.edge.example"), 9443))
                .to_vec(),
            "v{version}"
        );
        assert_eq!(body.controller_id, BrokerId(2));
        let p = &body.topics[0].partitions;
        assert_eq!(p[0].leader_id, BrokerId(3));
        // 9 is an offline replica no list named: above every id handed out
        // (3), it keeps its own.
        assert_eq!(p[0].replica_nodes, ids(&[3, 1, 9]));
        assert_eq!(p[0].isr_nodes, ids(&[3, 1]));
        if version >= 5 {
            assert_eq!(p[0].offline_replicas, ids(&[9]));
        }
        assert_eq!(p[1].leader_id, BrokerId(-1));
        assert_eq!(p[1].replica_nodes, ids(&[2]));
    }
    // Routing by edge id reaches the standby's broker, under its own id.
    assert_eq!(west.route(1), Some((4, hp("west-4"))));
    assert_eq!(west.route(3), Some((6, hp("west-6"))));
    assert_eq!(map.node_for_host("b-3.edge.example"), Some(3));
}

#[tokio::test]
async fn find_coordinator_both_forms_and_pending() {
    use find_coordinator_response::Coordinator;
    let (map, _) = switched();
    let mut filter = filter(&map);
    // Before any broker list: the coordinator cannot be named.
    let pending = FindCoordinatorResponse::default()
        .with_node_id(BrokerId(5))
        .with_host(s("west-5"))
        .with_port(9092);
    let (_, _, body) = answer(
        &mut filter,
        ApiKey::FindCoordinator,
        3,
        ResponseKind::FindCoordinator(pending.clone()),
    )
    .await;
    let ResponseKind::FindCoordinator(body) = body else {
        panic!()
    };
    assert_eq!(
        (
            body.error_code,
            body.node_id.0,
            body.host.as_str(),
            body.port
        ),
        (15, -1, "", -1)
    );
    map.with_node_ids(&map.discovery(), |ids| ids.settle([4, 5, 6]));
    let (_, _, body) = answer(
        &mut filter,
        ApiKey::FindCoordinator,
        3,
        ResponseKind::FindCoordinator(pending),
    )
    .await;
    let ResponseKind::FindCoordinator(body) = body else {
        panic!()
    };
    assert_eq!(
        (
            body.error_code,
            body.node_id.0,
            body.host.as_str(),
            body.port
        ),
        (0, 2, "b-2.edge.example", 9443)
    );
    let v4 = FindCoordinatorResponse::default().with_coordinators(vec![
        Coordinator::default()
            .with_key(s("group-a"))
            .with_node_id(BrokerId(6))
            .with_host(s("west-6"))
            .with_port(9092),
        Coordinator::default()
            .with_key(s("group-b"))
            .with_node_id(BrokerId(-1))
            .with_error_code(15),
    ]);
    for version in [4, 6] {
        let (_, _, body) = answer(
            &mut filter,
            ApiKey::FindCoordinator,
            version,
            ResponseKind::FindCoordinator(v4.clone()),
        )
        .await;
        let ResponseKind::FindCoordinator(body) = body else {
            panic!()
        };
        let got: Vec<_> = body
            .coordinators
            .iter()
            .map(|c| (c.node_id.0, c.error_code, c.host.as_str().to_owned()))
            .collect();
        assert_eq!(
            got,
            vec![
                (3, 0, "b-3.edge.example".to_owned()),
                (-1, 15, String::new())
            ]
        );
    }
}

#[tokio::test]
async fn describe_cluster_settles_and_translates() {
    use describe_cluster_response::DescribeClusterBroker;
    let (map, west) = switched();
    let mut filter = filter(&map);
    let upstream = DescribeClusterResponse::default()
        .with_controller_id(BrokerId(4))
        .with_brokers(
            [5, 4, 6, 8]
                .map(|id| {
                    DescribeClusterBroker::default()
                        .with_broker_id(BrokerId(id))
                        .with_host(s(&format!("west-{id}")))
                        .with_port(9092)
                })
                .to_vec(),
        );
    let (_, _, body) = answer(
        &mut filter,
        ApiKey::DescribeCluster,
        1,
        ResponseKind::DescribeCluster(upstream),
    )
    .await;
    let ResponseKind::DescribeCluster(body) = body else {
        panic!()
    };
    // Four brokers, three ids handed out: the fourth gets a fresh one (8,
    // above everything, keeps its own).
    let got: Vec<_> = body.brokers.iter().map(|b| b.broker_id.0).collect();
    assert_eq!(got, [2, 1, 3, 8]);
    assert_eq!(body.controller_id, BrokerId(1));
    assert_eq!(west.route(8), Some((8, hp("west-8"))));
}

fn produce(leader: i32, endpoints: &[i32]) -> ProduceResponse {
    use produce_response::*;
    ProduceResponse::default()
        .with_responses(vec![TopicProduceResponse::default()
            .with_name(TopicName(s("orders")))
            .with_partition_responses(vec![
                PartitionProduceResponse::default()
                    .with_index(0)
                    .with_error_code(6)
                    .with_current_leader(
                        LeaderIdAndEpoch::default()
                            .with_leader_id(BrokerId(leader))
                            .with_leader_epoch(4),
                    ),
                PartitionProduceResponse::default()
                    .with_index(1)
                    .with_base_offset(42),
            ])])
        .with_node_endpoints(
            endpoints
                .iter()
                .map(|id| {
                    NodeEndpoint::default()
                        .with_node_id(BrokerId(*id))
                        .with_host(s(&format!("west-{id}")))
                        .with_port(9092)
                })
                .collect(),
        )
}

#[tokio::test]
async fn produce_leader_hints_are_withheld() {
    let (map, _) = switched();
    let mut filter = filter(&map);
    // The new cluster's leader epochs may be no newer than those clients
    // hold from the old one, so its hints are withheld, pending or settled:
    // the leader is unknown (the client refreshes metadata), no endpoints.
    let (_, _, body) = answer(
        &mut filter,
        ApiKey::Produce,
        11,
        ResponseKind::Produce(produce(5, &[5])),
    )
    .await;
    let ResponseKind::Produce(body) = body else {
        panic!()
    };
    let p = &body.responses[0].partition_responses[0];
    assert_eq!(
        (p.current_leader.leader_id.0, p.current_leader.leader_epoch),
        (-1, -1)
    );
    assert!(body.node_endpoints.is_empty());
    map.with_node_ids(&map.discovery(), |ids| ids.settle([4, 5, 6]));
    for version in 10..=13 {
        let (_, _, body) = answer(
            &mut filter,
            ApiKey::Produce,
            version,
            ResponseKind::Produce(produce(5, &[5])),
        )
        .await;
        let ResponseKind::Produce(body) = body else {
            panic!()
        };
        let leader = &body.responses[0].partition_responses[0].current_leader;
        assert_eq!(
            (leader.leader_id.0, leader.leader_epoch),
            (-1, -1),
            "v{version}"
        );
        assert!(body.node_endpoints.is_empty(), "v{version}");
        assert_eq!(body.responses[0].partition_responses[1].base_offset, 42);
    }
    // A produce answer with no broker in it keeps its bytes.
    let (upstream, sent, _) = answer(
        &mut filter,
        ApiKey::Produce,
        11,
        ResponseKind::Produce(produce(-1, &[])),
    )
    .await;
    assert_eq!(upstream, sent);
}

fn fetch(leader: i32, preferred: i32, endpoints: &[i32]) -> FetchResponse {
    use fetch_response::*;
    FetchResponse::default()
        .with_session_id(5)
        .with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName(s("orders")))
            .with_partitions(vec![PartitionData::default()
                .with_partition_index(0)
                .with_high_watermark(100)
                .with_preferred_read_replica(BrokerId(preferred))
                .with_current_leader(
                    LeaderIdAndEpoch::default()
                        .with_leader_id(BrokerId(leader))
                        .with_leader_epoch(2),
                )
                .with_records(Some(Bytes::from_static(b"opaque record batches")))])])
        .with_node_endpoints(
            endpoints
                .iter()
                .map(|id| {
                    NodeEndpoint::default()
                        .with_node_id(BrokerId(*id))
                        .with_host(s(&format!("west-{id}")))
                        .with_port(9092)
                })
                .collect(),
        )
}

#[tokio::test]
async fn fetch_preferred_read_replica_translated_leader_hints_withheld() {
    let (map, _) = settled();
    let mut filter = filter(&map);
    assert_eq!(filter.min_response_version(ApiKey::Fetch), 11);
    assert!(filter.response_keys().contains(ApiKey::Fetch as i16));
    let (_, _, body) = answer(
        &mut filter,
        ApiKey::Fetch,
        11,
        ResponseKind::Fetch(fetch(-1, 6, &[])),
    )
    .await;
    let ResponseKind::Fetch(body) = body else {
        panic!()
    };
    assert_eq!(
        body.responses[0].partitions[0].preferred_read_replica,
        BrokerId(3)
    );
    for version in [12, 15, 16, 17] {
        let endpoints: &[i32] = if version >= 16 { &[4] } else { &[] };
        let (_, _, body) = answer(
            &mut filter,
            ApiKey::Fetch,
            version,
            ResponseKind::Fetch(fetch(4, 5, endpoints)),
        )
        .await;
        let ResponseKind::Fetch(body) = body else {
            panic!()
        };
        let p = &body.responses[0].partitions[0];
        // The leader hint is withheld (see the Produce test); the preferred
        // read replica, which carries no epoch, is translated.
        assert_eq!(
            (p.current_leader.leader_id.0, p.current_leader.leader_epoch),
            (-1, -1),
            "v{version}"
        );
        assert_eq!(p.preferred_read_replica, BrokerId(2));
        assert_eq!(p.records.as_deref(), Some(&b"opaque record batches"[..]));
        assert!(body.node_endpoints.is_empty(), "v{version}");
    }
    // The usual fetch answer names no broker: its bytes pass as they are.
    let (upstream, sent, _) = answer(
        &mut filter,
        ApiKey::Fetch,
        12,
        ResponseKind::Fetch(fetch(-1, -1, &[])),
    )
    .await;
    assert_eq!(upstream, sent);
    // A preferred replica the mapping cannot name (pending) is "none".
    let (pending_map, _) = switched();
    let mut pending = self::filter(&pending_map);
    let (_, _, body) = answer(
        &mut pending,
        ApiKey::Fetch,
        12,
        ResponseKind::Fetch(fetch(4, 6, &[])),
    )
    .await;
    let ResponseKind::Fetch(body) = body else {
        panic!()
    };
    let p = &body.responses[0].partitions[0];
    assert_eq!(
        (p.current_leader.leader_id.0, p.preferred_read_replica.0),
        (-1, -1)
    );
}

#[tokio::test]
async fn a_failback_to_the_first_ids_rewrites_nothing() {
    let (map, _) = switched();
    // Opened while pending, so it decodes; the mapping turns out identity.
    let mut filter = filter(&map);
    map.with_node_ids(&map.discovery(), |ids| ids.settle([1, 2, 3]));
    let (upstream, sent, _) = answer(
        &mut filter,
        ApiKey::Fetch,
        12,
        ResponseKind::Fetch(fetch(2, 3, &[])),
    )
    .await;
    assert_eq!(upstream, sent);
    let (upstream, sent, _) = answer(
        &mut filter,
        ApiKey::Produce,
        11,
        ResponseKind::Produce(produce(2, &[])),
    )
    .await;
    assert_eq!(upstream, sent);
}

#[tokio::test]
async fn describe_topic_partitions_and_reassignments() {
    let (map, _) = settled();
    let mut filter = filter(&map);
    {
        use describe_topic_partitions_response::*;
        let upstream = DescribeTopicPartitionsResponse::default().with_topics(vec![
            DescribeTopicPartitionsResponseTopic::default()
                .with_name(Some(TopicName(s("orders"))))
                .with_partitions(vec![DescribeTopicPartitionsResponsePartition::default()
                    .with_leader_id(BrokerId(5))
                    .with_replica_nodes(ids(&[5, 6, 4]))
                    .with_isr_nodes(ids(&[5, 6]))
                    .with_eligible_leader_replicas(Some(ids(&[4])))
                    .with_last_known_elr(Some(ids(&[6])))
                    .with_offline_replicas(ids(&[4]))]),
        ]);
        let (_, _, body) = answer(
            &mut filter,
            ApiKey::DescribeTopicPartitions,
            0,
            ResponseKind::DescribeTopicPartitions(upstream),
        )
        .await;
        let ResponseKind::DescribeTopicPartitions(body) = body else {
            panic!()
        };
        let p = &body.topics[0].partitions[0];
        assert_eq!(p.leader_id, BrokerId(2));
        assert_eq!(p.replica_nodes, ids(&[2, 3, 1]));
        assert_eq!(p.isr_nodes, ids(&[2, 3]));
        assert_eq!(p.eligible_leader_replicas, Some(ids(&[1])));
        assert_eq!(p.last_known_elr, Some(ids(&[3])));
        assert_eq!(p.offline_replicas, ids(&[1]));
    }
    {
        use list_partition_reassignments_response::*;
        let upstream = ListPartitionReassignmentsResponse::default().with_topics(vec![
            OngoingTopicReassignment::default()
                .with_name(TopicName(s("orders")))
                .with_partitions(vec![OngoingPartitionReassignment::default()
                    .with_replicas(ids(&[4, 5, 6]))
                    .with_adding_replicas(ids(&[6]))
                    .with_removing_replicas(ids(&[4]))]),
        ]);
        let (_, _, body) = answer(
            &mut filter,
            ApiKey::ListPartitionReassignments,
            0,
            ResponseKind::ListPartitionReassignments(upstream),
        )
        .await;
        let ResponseKind::ListPartitionReassignments(body) = body else {
            panic!()
        };
        let p = &body.topics[0].partitions[0];
        assert_eq!(
            (&p.replicas, &p.adding_replicas, &p.removing_replicas),
            (&ids(&[1, 2, 3]), &ids(&[3]), &ids(&[1]))
        );
    }
}

#[tokio::test]
async fn describe_quorum_ids() {
    use describe_quorum_response::*;
    let (map, _) = settled();
    let mut filter = filter(&map);
    let upstream = DescribeQuorumResponse::default()
        .with_topics(vec![TopicData::default()
            .with_topic_name(TopicName(s("__cluster_metadata")))
            .with_partitions(vec![PartitionData::default()
                .with_leader_id(BrokerId(4))
                .with_current_voters(vec![ReplicaState::default().with_replica_id(BrokerId(4))])
                .with_observers(vec![
                    ReplicaState::default().with_replica_id(BrokerId(6))
                ])])])
        .with_nodes(vec![Node::default().with_node_id(BrokerId(4))]);
    let (_, _, body) = answer(
        &mut filter,
        ApiKey::DescribeQuorum,
        2,
        ResponseKind::DescribeQuorum(upstream),
    )
    .await;
    let ResponseKind::DescribeQuorum(body) = body else {
        panic!()
    };
    let p = &body.topics[0].partitions[0];
    assert_eq!(p.leader_id, BrokerId(1));
    assert_eq!(p.current_voters[0].replica_id, BrokerId(1));
    assert_eq!(p.observers[0].replica_id, BrokerId(3));
    assert_eq!(body.nodes[0].node_id, BrokerId(1));
}

#[tokio::test]
async fn describe_configs_names_and_values() {
    use describe_configs_response::*;
    let (map, _) = settled();
    let mut filter = filter(&map);
    let config = |name: &str, value: &str| {
        DescribeConfigsResourceResult::default()
            .with_name(s(name))
            .with_value(Some(s(value)))
            .with_synonyms(vec![DescribeConfigsSynonym::default()
                .with_name(s(name))
                .with_value(Some(s(value)))])
    };
    let upstream = DescribeConfigsResponse::default().with_results(vec![
        DescribeConfigsResult::default()
            .with_resource_type(4)
            .with_resource_name(s("5"))
            .with_configs(vec![config("node.id", "5"), config("num.io.threads", "5")]),
        DescribeConfigsResult::default()
            .with_resource_type(8)
            .with_resource_name(s("6")),
        DescribeConfigsResult::default()
            .with_resource_type(2)
            .with_resource_name(s("5"))
            .with_configs(vec![
                config("leader.replication.throttled.replicas", "0:4, 1:6"),
                config("follower.replication.throttled.replicas", "*"),
            ]),
    ]);
    let (_, _, body) = answer(
        &mut filter,
        ApiKey::DescribeConfigs,
        4,
        ResponseKind::DescribeConfigs(upstream),
    )
    .await;
    let ResponseKind::DescribeConfigs(body) = body else {
        panic!()
    };
    let value = |r: usize, c: usize| {
        let config = &body.results[r].configs[c];
        (
            config.value.as_ref().unwrap().as_str().to_owned(),
            config.synonyms[0]
                .value
                .as_ref()
                .unwrap()
                .as_str()
                .to_owned(),
        )
    };
    assert_eq!(body.results[0].resource_name.as_str(), "2");
    assert_eq!(value(0, 0), ("2".to_owned(), "2".to_owned()));
    assert_eq!(value(0, 1).0, "5", "not a broker id");
    assert_eq!(body.results[1].resource_name.as_str(), "3");
    assert_eq!(body.results[2].resource_name.as_str(), "5", "a topic");
    assert_eq!(value(2, 0).0, "0:1,1:3");
    assert_eq!(value(2, 1).0, "*");
}

#[tokio::test]
async fn requests_name_the_upstream_brokers() {
    let (map, _) = settled();
    let mut filter = filter(&map);
    {
        use alter_partition_reassignments_request::*;
        let body = AlterPartitionReassignmentsRequest::default().with_topics(vec![
            ReassignableTopic::default()
                .with_name(TopicName(s("orders")))
                .with_partitions(vec![
                    ReassignablePartition::default().with_replicas(Some(ids(&[1, 2, 7]))),
                    ReassignablePartition::default().with_replicas(None),
                ]),
        ]);
        let RequestKind::AlterPartitionReassignments(got) = ask(
            &mut filter,
            0,
            RequestKind::AlterPartitionReassignments(body),
        )
        .await
        else {
            panic!()
        };
        let p = &got.topics[0].partitions;
        // 7 is no broker of this upstream: -1, which the broker refuses.
        assert_eq!(p[0].replicas, Some(ids(&[4, 5, -1])));
        assert_eq!(p[1].replicas, None);
    }
    {
        use create_topics_request::*;
        let body = CreateTopicsRequest::default().with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(s("orders")))
            .with_assignments(vec![CreatableReplicaAssignment::default()
                .with_partition_index(0)
                .with_broker_ids(ids(&[3, 1]))])
            .with_configs(vec![CreatableTopicConfig::default()
                .with_name(s("follower.replication.throttled.replicas"))
                .with_value(Some(s("0:3,0:1")))])]);
        let RequestKind::CreateTopics(got) =
            ask(&mut filter, 5, RequestKind::CreateTopics(body)).await
        else {
            panic!()
        };
        assert_eq!(got.topics[0].assignments[0].broker_ids, ids(&[6, 4]));
        assert_eq!(
            got.topics[0].configs[0].value.as_ref().unwrap().as_str(),
            "0:6,0:4"
        );
    }
    {
        use create_partitions_request::*;
        let body =
            CreatePartitionsRequest::default().with_topics(vec![CreatePartitionsTopic::default()
                .with_name(TopicName(s("orders")))
                .with_count(2)
                .with_assignments(Some(vec![
                    CreatePartitionsAssignment::default().with_broker_ids(ids(&[2]))
                ]))]);
        let RequestKind::CreatePartitions(got) =
            ask(&mut filter, 3, RequestKind::CreatePartitions(body)).await
        else {
            panic!()
        };
        assert_eq!(
            got.topics[0].assignments.as_ref().unwrap()[0].broker_ids,
            ids(&[5])
        );
    }
    {
        let body = UnregisterBrokerRequest::default().with_broker_id(BrokerId(3));
        let RequestKind::UnregisterBroker(got) =
            ask(&mut filter, 0, RequestKind::UnregisterBroker(body)).await
        else {
            panic!()
        };
        assert_eq!(got.broker_id, BrokerId(6));
    }
    {
        use describe_configs_request::*;
        let resource = |kind: i8, name: &str| {
            DescribeConfigsResource::default()
                .with_resource_type(kind)
                .with_resource_name(s(name))
        };
        let body = DescribeConfigsRequest::default().with_resources(vec![
            resource(4, "2"),
            resource(4, ""),
            resource(8, "1"),
            resource(4, "9"),
            resource(2, "3"),
        ]);
        let RequestKind::DescribeConfigs(got) =
            ask(&mut filter, 4, RequestKind::DescribeConfigs(body)).await
        else {
            panic!()
        };
        let names: Vec<_> = got
            .resources
            .iter()
            .map(|r| r.resource_name.as_str().to_owned())
            .collect();
        // "" is the cluster-wide default; 9 names no broker here.
        assert_eq!(names, ["5", "", "4", "-1", "3"]);
    }
    {
        use alter_configs_request::*;
        let body = AlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(4)
                .with_resource_name(s("1")),
            AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("orders"))
                .with_configs(vec![AlterableConfig::default()
                    .with_name(s("leader.replication.throttled.replicas"))
                    .with_value(Some(s("0:1,1:8")))]),
        ]);
        let RequestKind::AlterConfigs(got) =
            ask(&mut filter, 2, RequestKind::AlterConfigs(body)).await
        else {
            panic!()
        };
        assert_eq!(got.resources[0].resource_name.as_str(), "4");
        assert_eq!(
            got.resources[1].configs[0].value.as_ref().unwrap().as_str(),
            "0:4,1:-1"
        );
    }
    {
        use incremental_alter_configs_request::*;
        let body = IncrementalAlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(8)
                .with_resource_name(s("3")),
        ]);
        let RequestKind::IncrementalAlterConfigs(got) =
            ask(&mut filter, 1, RequestKind::IncrementalAlterConfigs(body)).await
        else {
            panic!()
        };
        assert_eq!(got.resources[0].resource_name.as_str(), "6");
    }
    {
        // A consumer's replica id stays -1; a follower's is translated.
        let consumer = FetchRequest::default().with_replica_id(BrokerId(-1));
        let RequestKind::Fetch(got) = ask(&mut filter, 12, RequestKind::Fetch(consumer)).await
        else {
            panic!()
        };
        assert_eq!(got.replica_id, BrokerId(-1));
        let follower = ListOffsetsRequest::default().with_replica_id(BrokerId(2));
        let RequestKind::ListOffsets(got) =
            ask(&mut filter, 7, RequestKind::ListOffsets(follower)).await
        else {
            panic!()
        };
        assert_eq!(got.replica_id, BrokerId(5));
        let follower = OffsetForLeaderEpochRequest::default().with_replica_id(BrokerId(7));
        let RequestKind::OffsetForLeaderEpoch(got) =
            ask(&mut filter, 4, RequestKind::OffsetForLeaderEpoch(follower)).await
        else {
            panic!()
        };
        assert_eq!(got.replica_id, BrokerId(-1));
    }
}

#[test]
fn identity_connections_decode_what_they_did_before() {
    let map = BrokerMap::sni("b-$(node_id).edge.example", 9443, Gauge::default());
    let [versions, rewrite] = edge_filters_for(map.clone(), map.discovery(), &[]);
    assert!(rewrite.request_keys().is_empty());
    assert!(!rewrite.response_keys().contains(ApiKey::Fetch as i16));
    let chain = FilterChain::new(vec![versions, rewrite]);
    assert!(!chain.wants_response(ApiKey::Fetch as i16, 12));
    assert!(!chain.wants_response(ApiKey::DescribeTopicPartitions as i16, 0));
    assert_eq!(VersionLimits::for_chain(&chain), VersionLimits::get(false));

    // After a switch: node-id carrying messages are decoded, and since Fetch
    // is, v16+ is offered.
    let west = map.reset_discovery();
    let [versions, rewrite] = edge_filters_for(map.clone(), west.clone(), &[]);
    assert!(rewrite
        .request_keys()
        .contains(ApiKey::AlterPartitionReassignments as i16));
    assert!(rewrite.request_keys().contains(ApiKey::Fetch as i16));
    let chain = FilterChain::new(vec![versions, rewrite]);
    assert!(chain.wants_response(ApiKey::Fetch as i16, 11));
    assert!(!chain.wants_response(ApiKey::Fetch as i16, 10));
    assert!(chain.wants_response(ApiKey::DescribeTopicPartitions as i16, 0));
    assert_eq!(VersionLimits::for_chain(&chain), VersionLimits::get(true));

    // Once the new upstream's ids turn out to be the edge's, new
    // connections are back to the identity case.
    map.with_node_ids(&west, |ids| ids.settle([1, 2, 3]));
    let [_, rewrite] = edge_filters_for(map, west, &[]);
    assert!(rewrite.request_keys().is_empty());
}

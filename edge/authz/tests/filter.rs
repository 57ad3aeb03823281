//! The filter: every covered API refused in its own response shape at every
//! version (encoded and decoded with the edge codec), partial Produce,
//! Metadata/ListGroups filtering, topic ids, live reload.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::registry::Registry;
use strait_authz::{
    AuditSink, AuthorizationConfig, AuthorizationFilter, AuthorizationFilterFactory, Authorizer,
    AuthzMetrics,
};
use strait_filter::{
    ConnectionInfo, Endpoint, Filter, FilterContext, Principal, RequestFrame, RequestVerdict,
    ResponseFrame,
};
use strait_kafka::codec;
use strait_kafka::kafka_protocol::messages::*;
use strait_kafka::kafka_protocol::protocol::StrBytes;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

const ORDERS: &str = "spiffe://example.org/ns/shop/sa/orders";
const BILLING: &str = "spiffe://example.org/ns/shop/sa/billing";
const INTRUDER: &str = "spiffe://evil.org/ns/x/sa/y";

const RULES: &str = r#"
rules:
  - principal: "spiffe://example.org/ns/shop/sa/orders"
    allow: [Write, Describe]
    topic: "orders-*"
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read, Describe]
    topic: "orders-*"
    not_after: "2026-12-01T00:00:00Z"
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read]
    group: "shop-*"
  - principal: "spiffe://example.org/**"
    allow: [Describe]
    cluster: true
  - principal: "spiffe://example.org/ns/shop/sa/orders"
    allow: [Write]
    transactional_id: "orders-tx-*"
"#;

fn now() -> SystemTime {
    OffsetDateTime::parse("2026-11-22T08:00:00Z", &Rfc3339)
        .unwrap()
        .into()
}

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_owned())
}

fn topic(text: &str) -> TopicName {
    TopicName(s(text))
}

fn group(text: &str) -> GroupId {
    GroupId(s(text))
}

fn txn(text: &str) -> TransactionalId {
    TransactionalId(s(text))
}

struct Harness {
    factory: AuthorizationFilterFactory,
    authorizer: Arc<Authorizer>,
}

impl Harness {
    fn new(rules: &str) -> Harness {
        let config = AuthorizationConfig::from_yaml(rules).unwrap();
        let authorizer = Arc::new(Authorizer::new(&config).unwrap());
        let mut registry = Registry::default();
        let metrics = AuthzMetrics::register(&mut registry);
        let factory = AuthorizationFilterFactory::new(
            authorizer.clone(),
            AuditSink::disabled(),
            &metrics,
            "secure",
        );
        Harness {
            factory,
            authorizer,
        }
    }

    fn connect(&self, principal: &str) -> (AuthorizationFilter, ConnectionInfo) {
        let info = ConnectionInfo {
            via_peer: None,
            virtual_cluster: "secure".into(),
            client_addr: "127.0.0.1:40000".parse().unwrap(),
            endpoint: Endpoint::Bootstrap,
            principal: Principal::Named(principal.into()),
        };
        (self.factory.filter_for(&info), info)
    }
}

fn frame(key: ApiKey, version: i16, body: RequestKind) -> RequestFrame {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(7);
    RequestFrame::new(header, body).unwrap()
}

async fn on_req(
    filter: &mut AuthorizationFilter,
    info: &ConnectionInfo,
    at: SystemTime,
    frame: &mut RequestFrame,
) -> RequestVerdict {
    let ctx = FilterContext {
        connection: info,
        now: at,
    };
    filter.on_request(&ctx, frame).await
}

async fn on_resp(
    filter: &mut AuthorizationFilter,
    info: &ConnectionInfo,
    at: SystemTime,
    frame: &mut ResponseFrame,
) {
    let ctx = FilterContext {
        connection: info,
        now: at,
    };
    filter.on_response(&ctx, frame).await;
}

/// Encodes the answer the way the proxy does, then decodes it as a client would.
fn round_trip(key: ApiKey, version: i16, body: ResponseKind) -> ResponseKind {
    let header = ResponseHeader::default().with_correlation_id(7);
    let bytes = codec::encode_response(key, version, &header, &body)
        .unwrap_or_else(|err| panic!("{key:?} v{version}: cannot encode the refusal: {err}"));
    let (header, body) = codec::decode_response(key, version, bytes)
        .unwrap_or_else(|err| panic!("{key:?} v{version}: cannot decode the refusal: {err}"));
    assert_eq!(header.correlation_id, 7);
    body
}

type Build = fn(i16) -> RequestKind;
type Codes = fn(&ResponseKind) -> Vec<i16>;

struct Case {
    key: ApiKey,
    build: Build,
    codes: Codes,
    expected: fn(i16) -> i16,
    /// Versions the `kafka-protocol` crate cannot encode or decode for this
    /// message (the edge never sees them either: it closes on decode errors).
    skip: &'static [i16],
}

fn topics_partitions_fetch(v: i16) -> RequestKind {
    let mut t = fetch_request::FetchTopic::default().with_partitions(vec![
        fetch_request::FetchPartition::default().with_partition(0),
        fetch_request::FetchPartition::default().with_partition(1),
    ]);
    if v >= 13 {
        t.topic_id = Uuid::from_u128(1);
    } else {
        t.topic = topic("payments");
    }
    RequestKind::Fetch(FetchRequest::default().with_topics(vec![t]))
}

fn cases() -> Vec<Case> {
    use ResponseKind as R;
    vec![
        Case {
            key: ApiKey::Produce,
            build: |v| {
                let mut t = produce_request::TopicProduceData::default().with_partition_data(vec![
                    produce_request::PartitionProduceData::default().with_index(3),
                ]);
                if v >= 13 {
                    t.topic_id = Uuid::from_u128(1);
                } else {
                    t.name = topic("payments");
                }
                RequestKind::Produce(
                    ProduceRequest::default()
                        .with_acks(-1)
                        .with_topic_data(vec![t]),
                )
            },
            codes: |r| match r {
                R::Produce(r) => r
                    .responses
                    .iter()
                    .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |v| if v >= 13 { 100 } else { 29 },
            skip: &[],
        },
        Case {
            key: ApiKey::Fetch,
            build: topics_partitions_fetch,
            codes: |r| match r {
                R::Fetch(r) => r
                    .responses
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            // Ids the edge has not seen get the retriable UNKNOWN_TOPIC_ID.
            expected: |v| if v >= 13 { 100 } else { 29 },
            skip: &[],
        },
        Case {
            key: ApiKey::ListOffsets,
            build: |_| {
                RequestKind::ListOffsets(ListOffsetsRequest::default().with_topics(vec![
                    list_offsets_request::ListOffsetsTopic::default()
                        .with_name(topic("payments"))
                        .with_partitions(vec![Default::default()]),
                ]))
            },
            codes: |r| match r {
                R::ListOffsets(r) => r
                    .topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::OffsetForLeaderEpoch,
            build: |_| {
                RequestKind::OffsetForLeaderEpoch(
                    OffsetForLeaderEpochRequest::default().with_topics(vec![
                        offset_for_leader_epoch_request::OffsetForLeaderTopic::default()
                            .with_topic(topic("payments"))
                            .with_partitions(vec![Default::default()]),
                    ]),
                )
            },
            codes: |r| match r {
                R::OffsetForLeaderEpoch(r) => r
                    .topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::OffsetCommit,
            build: |_| {
                RequestKind::OffsetCommit(
                    OffsetCommitRequest::default()
                        .with_group_id(group("other-group"))
                        .with_topics(vec![
                            offset_commit_request::OffsetCommitRequestTopic::default()
                                .with_name(topic("orders-1"))
                                .with_partitions(vec![Default::default()]),
                        ]),
                )
            },
            codes: |r| match r {
                R::OffsetCommit(r) => r
                    .topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[10],
        },
        Case {
            key: ApiKey::OffsetFetch,
            build: |v| {
                if v < 8 {
                    RequestKind::OffsetFetch(
                        OffsetFetchRequest::default()
                            .with_group_id(group("other-group"))
                            .with_topics(Some(vec![
                                offset_fetch_request::OffsetFetchRequestTopic::default()
                                    .with_name(topic("orders-1"))
                                    .with_partition_indexes(vec![0]),
                            ])),
                    )
                } else {
                    RequestKind::OffsetFetch(OffsetFetchRequest::default().with_groups(vec![
                        offset_fetch_request::OffsetFetchRequestGroup::default()
                            .with_group_id(group("other-group")),
                    ]))
                }
            },
            codes: |r| match r {
                R::OffsetFetch(r) => {
                    let mut codes: Vec<i16> = r
                        .topics
                        .iter()
                        .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                        .collect();
                    codes.extend(r.groups.iter().map(|g| g.error_code));
                    codes
                }
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[10],
        },
        Case {
            key: ApiKey::FindCoordinator,
            build: |v| {
                let mut req = FindCoordinatorRequest::default().with_key_type(1);
                if v >= 4 {
                    req.coordinator_keys = vec![s("payments-tx"), s("orders-tx-1")];
                } else {
                    req.key = s("payments-tx");
                }
                RequestKind::FindCoordinator(req)
            },
            codes: |r| match r {
                R::FindCoordinator(r) if r.coordinators.is_empty() => vec![r.error_code],
                R::FindCoordinator(r) => r.coordinators.iter().map(|c| c.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 53,
            skip: &[],
        },
        Case {
            key: ApiKey::JoinGroup,
            build: |_| {
                RequestKind::JoinGroup(JoinGroupRequest::default().with_group_id(group("other")))
            },
            codes: |r| match r {
                R::JoinGroup(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::SyncGroup,
            build: |_| {
                RequestKind::SyncGroup(SyncGroupRequest::default().with_group_id(group("other")))
            },
            codes: |r| match r {
                R::SyncGroup(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::Heartbeat,
            build: |_| {
                RequestKind::Heartbeat(HeartbeatRequest::default().with_group_id(group("other")))
            },
            codes: |r| match r {
                R::Heartbeat(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::LeaveGroup,
            build: |_| {
                RequestKind::LeaveGroup(LeaveGroupRequest::default().with_group_id(group("other")))
            },
            codes: |r| match r {
                R::LeaveGroup(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::DescribeGroups,
            build: |_| {
                RequestKind::DescribeGroups(
                    DescribeGroupsRequest::default().with_groups(vec![group("shop-a"), group("x")]),
                )
            },
            codes: |r| match r {
                R::DescribeGroups(r) => r.groups.iter().map(|g| g.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::DeleteGroups,
            build: |_| {
                RequestKind::DeleteGroups(
                    DeleteGroupsRequest::default().with_groups_names(vec![group("shop-a")]),
                )
            },
            codes: |r| match r {
                R::DeleteGroups(r) => r.results.iter().map(|g| g.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::CreateTopics,
            build: |_| {
                RequestKind::CreateTopics(CreateTopicsRequest::default().with_topics(vec![
                    create_topics_request::CreatableTopic::default().with_name(topic("orders-new")),
                ]))
            },
            codes: |r| match r {
                R::CreateTopics(r) => r.topics.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::DeleteTopics,
            build: |v| {
                let mut req = DeleteTopicsRequest::default();
                if v >= 6 {
                    req.topics = vec![delete_topics_request::DeleteTopicState::default()
                        .with_name(Some(topic("orders-1")))];
                } else {
                    req.topic_names = vec![topic("orders-1")];
                }
                RequestKind::DeleteTopics(req)
            },
            codes: |r| match r {
                R::DeleteTopics(r) => r.responses.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::DeleteRecords,
            build: |_| {
                RequestKind::DeleteRecords(DeleteRecordsRequest::default().with_topics(vec![
                    delete_records_request::DeleteRecordsTopic::default()
                        .with_name(topic("orders-1"))
                        .with_partitions(vec![Default::default()]),
                ]))
            },
            codes: |r| match r {
                R::DeleteRecords(r) => r
                    .topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::CreatePartitions,
            build: |_| {
                RequestKind::CreatePartitions(CreatePartitionsRequest::default().with_topics(vec![
                    create_partitions_request::CreatePartitionsTopic::default()
                        .with_name(topic("orders-1")),
                ]))
            },
            codes: |r| match r {
                R::CreatePartitions(r) => r.results.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::DescribeConfigs,
            build: |_| {
                RequestKind::DescribeConfigs(DescribeConfigsRequest::default().with_resources(
                    vec![
                    describe_configs_request::DescribeConfigsResource::default()
                        .with_resource_type(2)
                        .with_resource_name(s("orders-1")),
                ],
                ))
            },
            codes: |r| match r {
                R::DescribeConfigs(r) => r.results.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::AlterConfigs,
            build: |_| {
                RequestKind::AlterConfigs(AlterConfigsRequest::default().with_resources(vec![
                    alter_configs_request::AlterConfigsResource::default()
                        .with_resource_type(4)
                        .with_resource_name(s("1")),
                ]))
            },
            codes: |r| match r {
                R::AlterConfigs(r) => r.responses.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::IncrementalAlterConfigs,
            build: |_| {
                RequestKind::IncrementalAlterConfigs(
                    IncrementalAlterConfigsRequest::default().with_resources(vec![
                        incremental_alter_configs_request::AlterConfigsResource::default()
                            .with_resource_type(32)
                            .with_resource_name(s("shop-a")),
                    ]),
                )
            },
            codes: |r| match r {
                R::IncrementalAlterConfigs(r) => r.responses.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::InitProducerId,
            build: |_| {
                RequestKind::InitProducerId(
                    InitProducerIdRequest::default()
                        .with_transactional_id(Some(txn("payments-tx"))),
                )
            },
            codes: |r| match r {
                R::InitProducerId(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 53,
            skip: &[],
        },
        Case {
            key: ApiKey::AddPartitionsToTxn,
            build: |v| {
                let topics = vec![
                    add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                        .with_name(topic("orders-1"))
                        .with_partitions(vec![0, 1]),
                ];
                let mut req = AddPartitionsToTxnRequest::default();
                if v >= 4 {
                    req.transactions = vec![
                        add_partitions_to_txn_request::AddPartitionsToTxnTransaction::default()
                            .with_transactional_id(txn("payments-tx"))
                            .with_topics(topics),
                    ];
                } else {
                    req.v3_and_below_transactional_id = txn("payments-tx");
                    req.v3_and_below_topics = topics;
                }
                RequestKind::AddPartitionsToTxn(req)
            },
            codes: |r| match r {
                R::AddPartitionsToTxn(r) => r
                    .results_by_topic_v3_and_below
                    .iter()
                    .chain(
                        r.results_by_transaction
                            .iter()
                            .flat_map(|t| t.topic_results.iter()),
                    )
                    .flat_map(|t| {
                        t.results_by_partition
                            .iter()
                            .map(|p| p.partition_error_code)
                    })
                    .collect(),
                _ => panic!(),
            },
            // v4+ is broker-to-broker: ClusterAction on the cluster.
            expected: |v| if v >= 4 { 31 } else { 53 },
            skip: &[],
        },
        Case {
            key: ApiKey::AddOffsetsToTxn,
            build: |_| {
                RequestKind::AddOffsetsToTxn(
                    AddOffsetsToTxnRequest::default()
                        .with_transactional_id(txn("orders-tx-1"))
                        .with_group_id(group("other")),
                )
            },
            codes: |r| match r {
                R::AddOffsetsToTxn(r) => vec![r.error_code],
                _ => panic!(),
            },
            // The transactional id outranks the group, as in Kafka.
            expected: |_| 53,
            skip: &[],
        },
        Case {
            key: ApiKey::EndTxn,
            build: |_| {
                RequestKind::EndTxn(EndTxnRequest::default().with_transactional_id(txn("x")))
            },
            codes: |r| match r {
                R::EndTxn(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 53,
            skip: &[],
        },
        Case {
            key: ApiKey::TxnOffsetCommit,
            build: |_| {
                RequestKind::TxnOffsetCommit(
                    TxnOffsetCommitRequest::default()
                        .with_transactional_id(txn("orders-tx-1"))
                        .with_group_id(group("shop-a"))
                        .with_topics(vec![
                            txn_offset_commit_request::TxnOffsetCommitRequestTopic::default()
                                .with_name(topic("payments"))
                                .with_partitions(vec![Default::default()]),
                        ]),
                )
            },
            codes: |r| match r {
                R::TxnOffsetCommit(r) => r
                    .topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |_| 53,
            skip: &[],
        },
        Case {
            key: ApiKey::OffsetDelete,
            build: |_| {
                RequestKind::OffsetDelete(
                    OffsetDeleteRequest::default()
                        .with_group_id(group("shop-a"))
                        .with_topics(vec![
                            offset_delete_request::OffsetDeleteRequestTopic::default()
                                .with_name(topic("orders-1"))
                                .with_partitions(vec![Default::default()]),
                        ]),
                )
            },
            codes: |r| match r {
                R::OffsetDelete(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::DescribeProducers,
            build: |_| {
                RequestKind::DescribeProducers(DescribeProducersRequest::default().with_topics(
                    vec![
                    describe_producers_request::TopicRequest::default()
                        .with_name(topic("payments"))
                        .with_partition_indexes(vec![0]),
                ],
                ))
            },
            codes: |r| match r {
                R::DescribeProducers(r) => r
                    .topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::DescribeTransactions,
            build: |_| {
                RequestKind::DescribeTransactions(
                    DescribeTransactionsRequest::default()
                        .with_transactional_ids(vec![txn("payments-tx")]),
                )
            },
            codes: |r| match r {
                R::DescribeTransactions(r) => {
                    r.transaction_states.iter().map(|t| t.error_code).collect()
                }
                _ => panic!(),
            },
            expected: |_| 53,
            skip: &[],
        },
        Case {
            key: ApiKey::ConsumerGroupHeartbeat,
            build: |_| {
                RequestKind::ConsumerGroupHeartbeat(
                    ConsumerGroupHeartbeatRequest::default().with_group_id(group("other")),
                )
            },
            codes: |r| match r {
                R::ConsumerGroupHeartbeat(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::ConsumerGroupDescribe,
            build: |_| {
                RequestKind::ConsumerGroupDescribe(
                    ConsumerGroupDescribeRequest::default().with_group_ids(vec![group("other")]),
                )
            },
            codes: |r| match r {
                R::ConsumerGroupDescribe(r) => r.groups.iter().map(|g| g.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 30,
            skip: &[],
        },
        Case {
            key: ApiKey::DescribeTopicPartitions,
            build: |_| {
                RequestKind::DescribeTopicPartitions(
                    DescribeTopicPartitionsRequest::default().with_topics(vec![
                        describe_topic_partitions_request::TopicRequest::default()
                            .with_name(topic("payments")),
                    ]),
                )
            },
            codes: |r| match r {
                R::DescribeTopicPartitions(r) => r.topics.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 29,
            skip: &[],
        },
        Case {
            key: ApiKey::CreateAcls,
            build: |_| {
                RequestKind::CreateAcls(
                    CreateAclsRequest::default().with_creations(vec![Default::default()]),
                )
            },
            codes: |r| match r {
                R::CreateAcls(r) => r.results.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::DeleteAcls,
            build: |_| {
                RequestKind::DeleteAcls(
                    DeleteAclsRequest::default().with_filters(vec![Default::default()]),
                )
            },
            codes: |r| match r {
                R::DeleteAcls(r) => r.filter_results.iter().map(|t| t.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::AlterPartitionReassignments,
            build: |_| RequestKind::AlterPartitionReassignments(Default::default()),
            codes: |r| match r {
                R::AlterPartitionReassignments(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::ElectLeaders,
            build: |_| {
                RequestKind::ElectLeaders(ElectLeadersRequest::default().with_topic_partitions(
                    Some(vec![elect_leaders_request::TopicPartitions::default()
                        .with_topic(topic("orders-1"))
                        .with_partitions(vec![0])]),
                ))
            },
            codes: |r| match r {
                R::ElectLeaders(r) => r
                    .replica_election_results
                    .iter()
                    .flat_map(|t| t.partition_result.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::AlterClientQuotas,
            build: |_| {
                RequestKind::AlterClientQuotas(
                    AlterClientQuotasRequest::default().with_entries(vec![Default::default()]),
                )
            },
            codes: |r| match r {
                R::AlterClientQuotas(r) => r.entries.iter().map(|e| e.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::AlterUserScramCredentials,
            build: |_| {
                RequestKind::AlterUserScramCredentials(
                    AlterUserScramCredentialsRequest::default().with_deletions(vec![
                        alter_user_scram_credentials_request::ScramCredentialDeletion::default()
                            .with_name(s("alice")),
                    ]),
                )
            },
            codes: |r| match r {
                R::AlterUserScramCredentials(r) => r.results.iter().map(|e| e.error_code).collect(),
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        // Needs DescribeConfigs on the cluster, which Describe does not imply.
        Case {
            key: ApiKey::DescribeClientQuotas,
            build: |_| RequestKind::DescribeClientQuotas(Default::default()),
            codes: |r| match r {
                R::DescribeClientQuotas(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::UpdateFeatures,
            build: |_| RequestKind::UpdateFeatures(Default::default()),
            codes: |r| match r {
                R::UpdateFeatures(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::AlterReplicaLogDirs,
            build: |_| {
                RequestKind::AlterReplicaLogDirs(AlterReplicaLogDirsRequest::default().with_dirs(
                    vec![
                        alter_replica_log_dirs_request::AlterReplicaLogDir::default().with_topics(
                            vec![alter_replica_log_dirs_request::AlterReplicaLogDirTopic::default()
                            .with_name(topic("orders-1"))
                            .with_partitions(vec![0])],
                        ),
                    ],
                ))
            },
            codes: |r| match r {
                R::AlterReplicaLogDirs(r) => r
                    .results
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                    .collect(),
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
    ]
}

/// Cluster-level Describe APIs are refused for a principal outside the
/// trust domain (the cluster rule matches `spiffe://example.org/**` only).
fn cluster_describe_cases() -> Vec<Case> {
    use ResponseKind as R;
    vec![
        Case {
            key: ApiKey::DescribeCluster,
            build: |_| RequestKind::DescribeCluster(Default::default()),
            codes: |r| match r {
                R::DescribeCluster(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::DescribeAcls,
            build: |_| RequestKind::DescribeAcls(Default::default()),
            codes: |r| match r {
                R::DescribeAcls(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::ListPartitionReassignments,
            build: |_| RequestKind::ListPartitionReassignments(Default::default()),
            codes: |r| match r {
                R::ListPartitionReassignments(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::DescribeUserScramCredentials,
            build: |_| RequestKind::DescribeUserScramCredentials(Default::default()),
            codes: |r| match r {
                R::DescribeUserScramCredentials(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
        Case {
            key: ApiKey::DescribeQuorum,
            build: |_| RequestKind::DescribeQuorum(Default::default()),
            codes: |r| match r {
                R::DescribeQuorum(r) => vec![r.error_code],
                _ => panic!(),
            },
            expected: |_| 31,
            skip: &[],
        },
    ]
}

async fn check_refusals(principal: &str, cases: Vec<Case>) {
    let harness = Harness::new(RULES);
    let mut checked = 0;
    for case in cases {
        let range = case.key.valid_versions();
        for version in range.min..=range.max {
            if case.skip.contains(&version) {
                continue;
            }
            let (mut filter, info) = harness.connect(principal);
            let mut request = frame(case.key, version, (case.build)(version));
            let verdict = request_verdict(&mut filter, &info, &mut request).await;
            let RequestVerdict::Respond(body) = verdict else {
                panic!("{:?} v{version}: expected a local refusal", case.key)
            };
            let decoded = round_trip(case.key, version, *body);
            let codes = (case.codes)(&decoded);
            assert!(
                !codes.is_empty(),
                "{:?} v{version}: no error entries",
                case.key
            );
            assert!(
                codes.iter().all(|c| *c == (case.expected)(version)),
                "{:?} v{version}: codes {codes:?}, expected {}",
                case.key,
                (case.expected)(version)
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} (API, version) pairs checked");
}

async fn request_verdict(
    filter: &mut AuthorizationFilter,
    info: &ConnectionInfo,
    frame: &mut RequestFrame,
) -> RequestVerdict {
    on_req(filter, info, now(), frame).await
}

#[tokio::test]
async fn every_covered_api_is_refused_in_its_own_shape_at_every_version() {
    check_refusals(BILLING, cases()).await;
}

#[tokio::test]
async fn cluster_describe_apis_are_refused_outside_the_trust_domain() {
    let harness = Harness::new(RULES);
    // Inside the trust domain they are forwarded.
    for case in cluster_describe_cases() {
        let (mut filter, info) = harness.connect(BILLING);
        let version = case.key.valid_versions().max;
        let mut request = frame(case.key, version, (case.build)(version));
        assert!(matches!(
            request_verdict(&mut filter, &info, &mut request).await,
            RequestVerdict::Forward
        ));
    }
    let mut checked = 0;
    for case in cluster_describe_cases() {
        let range = case.key.valid_versions();
        for version in range.min..=range.max {
            let (mut filter, info) = harness.connect(INTRUDER);
            let mut request = frame(case.key, version, (case.build)(version));
            let RequestVerdict::Respond(body) =
                request_verdict(&mut filter, &info, &mut request).await
            else {
                panic!("{:?} v{version}: expected a refusal", case.key)
            };
            let codes = (case.codes)(&round_trip(case.key, version, *body));
            assert_eq!(
                codes,
                vec![(case.expected)(version)],
                "{:?} v{version}",
                case.key
            );
            checked += 1;
        }
    }
    assert!(checked >= 10);
}

#[tokio::test]
async fn allowed_requests_are_forwarded_unchanged() {
    let harness = Harness::new(RULES);
    let (mut filter, info) = harness.connect(ORDERS);
    let produce = RequestKind::Produce(ProduceRequest::default().with_acks(-1).with_topic_data(
        vec![produce_request::TopicProduceData::default()
            .with_name(topic("orders-eu"))
            .with_partition_data(vec![Default::default()])],
    ));
    let request = frame(ApiKey::Produce, 9, produce);
    let bytes_before = request.into_bytes().unwrap();
    let mut request = RequestFrame::decode(bytes_before.clone()).unwrap();
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    assert_eq!(request.into_bytes().unwrap(), bytes_before, "no re-encode");

    let join = RequestKind::JoinGroup(JoinGroupRequest::default().with_group_id(group("shop-1")));
    let mut request = frame(ApiKey::JoinGroup, 9, join);
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    // Transactional produce needs Write on the transactional id too.
    let txn_produce = RequestKind::Produce(
        ProduceRequest::default()
            .with_acks(-1)
            .with_transactional_id(Some(txn("orders-tx-9")))
            .with_topic_data(vec![produce_request::TopicProduceData::default()
                .with_name(topic("orders-eu"))
                .with_partition_data(vec![Default::default()])]),
    );
    let mut request = frame(ApiKey::Produce, 9, txn_produce);
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    let (mut billing, info) = harness.connect(BILLING);
    let txn_produce = RequestKind::Produce(
        ProduceRequest::default()
            .with_acks(-1)
            .with_transactional_id(Some(txn("orders-tx-9")))
            .with_topic_data(vec![produce_request::TopicProduceData::default()
                .with_name(topic("orders-eu"))
                .with_partition_data(vec![Default::default()])]),
    );
    let mut request = frame(ApiKey::Produce, 9, txn_produce);
    let RequestVerdict::Respond(body) = request_verdict(&mut billing, &info, &mut request).await
    else {
        panic!("expected refusal")
    };
    let ResponseKind::Produce(response) = round_trip(ApiKey::Produce, 9, *body) else {
        panic!()
    };
    assert_eq!(response.responses[0].partition_responses[0].error_code, 53);
}

#[tokio::test]
async fn idempotent_producer_is_allowed_by_any_topic_write() {
    let harness = Harness::new(RULES);
    let init = || RequestKind::InitProducerId(InitProducerIdRequest::default());
    let (mut orders, info) = harness.connect(ORDERS);
    let mut request = frame(ApiKey::InitProducerId, 4, init());
    assert!(matches!(
        request_verdict(&mut orders, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    let (mut billing, info) = harness.connect(BILLING);
    let mut request = frame(ApiKey::InitProducerId, 4, init());
    let RequestVerdict::Respond(body) = request_verdict(&mut billing, &info, &mut request).await
    else {
        panic!("billing has no Write anywhere")
    };
    let ResponseKind::InitProducerId(response) = round_trip(ApiKey::InitProducerId, 4, *body)
    else {
        panic!()
    };
    assert_eq!(response.error_code, 31);
}

#[tokio::test]
async fn mixed_produce_forwards_allowed_topics_and_merges_errors() {
    let harness = Harness::new(RULES);
    let (mut filter, info) = harness.connect(ORDERS);
    let body = RequestKind::Produce(
        ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![
                produce_request::TopicProduceData::default()
                    .with_name(topic("orders-eu"))
                    .with_partition_data(vec![
                        produce_request::PartitionProduceData::default().with_index(0)
                    ]),
                produce_request::TopicProduceData::default()
                    .with_name(topic("payments"))
                    .with_partition_data(vec![
                        produce_request::PartitionProduceData::default().with_index(0),
                        produce_request::PartitionProduceData::default().with_index(1),
                    ]),
            ]),
    );
    let mut request = frame(ApiKey::Produce, 9, body);
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    // What reaches the broker names only the allowed topic.
    let sent = RequestFrame::decode(frame_bytes(request)).unwrap();
    let RequestKind::Produce(sent_body) = sent.body() else {
        panic!()
    };
    assert_eq!(sent_body.topic_data.len(), 1);
    assert_eq!(sent_body.topic_data[0].name.as_str(), "orders-eu");

    // The broker answers for that topic; the filter adds the denied ones.
    let broker = ProduceResponse::default().with_responses(vec![
        produce_response::TopicProduceResponse::default()
            .with_name(topic("orders-eu"))
            .with_partition_responses(vec![produce_response::PartitionProduceResponse::default()
                .with_index(0)
                .with_base_offset(42)]),
    ]);
    let bytes = codec::encode_response(
        ApiKey::Produce,
        9,
        &ResponseHeader::default().with_correlation_id(7),
        &ResponseKind::Produce(broker),
    )
    .unwrap();
    let mut answer = ResponseFrame::decode(ApiKey::Produce, 9, bytes).unwrap();
    on_resp(&mut filter, &info, now(), &mut answer).await;
    let (_, decoded) =
        codec::decode_response(ApiKey::Produce, 9, answer.into_bytes().unwrap()).unwrap();
    let ResponseKind::Produce(merged) = decoded else {
        panic!()
    };
    let summary: Vec<(String, i32, i16)> = merged
        .responses
        .iter()
        .flat_map(|t| {
            t.partition_responses
                .iter()
                .map(|p| (t.name.to_string(), p.index, p.error_code))
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("orders-eu".into(), 0, 0),
            ("payments".into(), 0, 29),
            ("payments".into(), 1, 29),
        ]
    );

    // acks=0 cannot carry errors: the connection is closed.
    let body = RequestKind::Produce(ProduceRequest::default().with_acks(0).with_topic_data(vec![
        produce_request::TopicProduceData::default().with_name(topic("orders-eu")),
        produce_request::TopicProduceData::default().with_name(topic("payments")),
    ]));
    let mut request = frame(ApiKey::Produce, 9, body);
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Close(_)
    ));
}

fn frame_bytes(frame: RequestFrame) -> bytes::Bytes {
    frame.into_bytes().unwrap()
}

fn metadata_response(topics: &[(&str, u128)]) -> MetadataResponse {
    MetadataResponse::default().with_topics(
        topics
            .iter()
            .map(|(name, id)| {
                metadata_response::MetadataResponseTopic::default()
                    .with_name(Some(topic(name)))
                    .with_topic_id(Uuid::from_u128(*id))
                    .with_partitions(vec![Default::default()])
            })
            .collect(),
    )
}

async fn metadata_round(
    filter: &mut AuthorizationFilter,
    info: &ConnectionInfo,
    version: i16,
    requested: Option<Vec<&str>>,
    broker: MetadataResponse,
    correlation_id: i32,
) -> (MetadataRequest, MetadataResponse) {
    let body = MetadataRequest::default()
        .with_allow_auto_topic_creation(true)
        .with_topics(requested.map(|names| {
            names
                .into_iter()
                .map(|n| {
                    metadata_request::MetadataRequestTopic::default().with_name(Some(topic(n)))
                })
                .collect()
        }));
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id);
    let mut request = RequestFrame::new(header, RequestKind::Metadata(body)).unwrap();
    assert!(matches!(
        on_req(filter, info, now(), &mut request).await,
        RequestVerdict::Forward
    ));
    let RequestKind::Metadata(sent) = request.body().clone() else {
        panic!()
    };
    let mut broker = broker;
    if version < 10 {
        for t in &mut broker.topics {
            t.topic_id = Uuid::nil();
        }
    }
    let bytes = codec::encode_response(
        ApiKey::Metadata,
        version,
        &ResponseHeader::default().with_correlation_id(correlation_id),
        &ResponseKind::Metadata(broker),
    )
    .unwrap();
    let mut answer = ResponseFrame::decode(ApiKey::Metadata, version, bytes).unwrap();
    on_resp(filter, info, now(), &mut answer).await;
    let (_, decoded) =
        codec::decode_response(ApiKey::Metadata, version, answer.into_bytes().unwrap()).unwrap();
    let ResponseKind::Metadata(decoded) = decoded else {
        panic!()
    };
    (sent, decoded)
}

fn names(response: &MetadataResponse) -> Vec<(String, i16)> {
    response
        .topics
        .iter()
        .map(|t| {
            (
                t.name.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                t.error_code,
            )
        })
        .collect()
}

#[tokio::test]
async fn metadata_hides_topics_the_principal_may_not_describe() {
    let harness = Harness::new(RULES);
    let broker = || metadata_response(&[("orders-eu", 1), ("payments", 2), ("orders-us", 3)]);
    for version in [1i16, 4, 9, 12, 13] {
        let (mut filter, info) = harness.connect(BILLING);
        // All topics: undescribable ones vanish.
        let (_, listed) = metadata_round(&mut filter, &info, version, None, broker(), 1).await;
        assert_eq!(
            names(&listed),
            vec![("orders-eu".into(), 0), ("orders-us".into(), 0)],
            "v{version}"
        );
        // Named topics: undescribable ones answer TOPIC_AUTHORIZATION_FAILED,
        // and auto-creation is switched off (billing may not Create).
        let (sent, named) = metadata_round(
            &mut filter,
            &info,
            version,
            Some(vec!["orders-eu", "payments"]),
            metadata_response(&[("orders-eu", 1), ("payments", 2)]),
            2,
        )
        .await;
        if version >= 4 {
            assert!(!sent.allow_auto_topic_creation, "v{version}");
        }
        assert_eq!(
            names(&named),
            vec![("orders-eu".into(), 0), ("payments".into(), 29)],
            "v{version}"
        );
        assert!(named.topics[1].partitions.is_empty());
    }
    // After the lease ends billing sees nothing.
    let later = OffsetDateTime::parse("2026-12-02T00:00:00Z", &Rfc3339)
        .unwrap()
        .into();
    let (mut filter, info) = harness.connect(BILLING);
    let mut request = frame(
        ApiKey::Metadata,
        12,
        RequestKind::Metadata(MetadataRequest::default().with_topics(None)),
    );
    on_req(&mut filter, &info, later, &mut request).await;
    let bytes = codec::encode_response(
        ApiKey::Metadata,
        12,
        &ResponseHeader::default().with_correlation_id(7),
        &ResponseKind::Metadata(broker()),
    )
    .unwrap();
    let mut answer = ResponseFrame::decode(ApiKey::Metadata, 12, bytes).unwrap();
    on_resp(&mut filter, &info, later, &mut answer).await;
    let ResponseKind::Metadata(after) = answer.body() else {
        panic!()
    };
    assert!(after.topics.is_empty());
}

#[tokio::test]
async fn fetch_by_topic_id_uses_ids_learned_on_any_connection() {
    let harness = Harness::new(RULES);
    let (mut first, info) = harness.connect(BILLING);
    metadata_round(
        &mut first,
        &info,
        12,
        None,
        metadata_response(&[("orders-eu", 11), ("payments", 12)]),
        1,
    )
    .await;
    let fetch = |ids: &[u128]| {
        RequestKind::Fetch(
            FetchRequest::default()
                .with_session_id(5)
                .with_session_epoch(3)
                .with_topics(
                    ids.iter()
                        .map(|id| {
                            fetch_request::FetchTopic::default()
                                .with_topic_id(Uuid::from_u128(*id))
                                .with_partitions(vec![Default::default()])
                        })
                        .collect(),
                ),
        )
    };
    // A second connection (the partition leader's) knows the ids too.
    let (mut second, info) = harness.connect(BILLING);
    let mut allowed = frame(ApiKey::Fetch, 16, fetch(&[11]));
    assert!(matches!(
        request_verdict(&mut second, &info, &mut allowed).await,
        RequestVerdict::Forward
    ));
    // Fetch sessions are switched off so every fetch names what it reads.
    let RequestKind::Fetch(sent) = allowed.body() else {
        panic!()
    };
    assert_eq!((sent.session_id, sent.session_epoch), (0, -1));

    let mut denied = frame(ApiKey::Fetch, 16, fetch(&[12]));
    let RequestVerdict::Respond(body) = request_verdict(&mut second, &info, &mut denied).await
    else {
        panic!("payments is not readable")
    };
    let ResponseKind::Fetch(refusal) = round_trip(ApiKey::Fetch, 16, *body) else {
        panic!()
    };
    assert_eq!(refusal.responses[0].partitions[0].error_code, 29);
    assert_eq!(refusal.responses[0].topic_id, Uuid::from_u128(12));

    // An id never seen is refused without consulting the rules, with a
    // retriable error so the client refreshes its metadata.
    let mut unknown = frame(ApiKey::Fetch, 16, fetch(&[99]));
    let RequestVerdict::Respond(body) = request_verdict(&mut second, &info, &mut unknown).await
    else {
        panic!("unknown id must not reach the broker")
    };
    let ResponseKind::Fetch(refusal) = round_trip(ApiKey::Fetch, 16, *body) else {
        panic!()
    };
    assert_eq!(refusal.responses[0].partitions[0].error_code, 100);
}

#[tokio::test]
async fn list_groups_is_filtered_to_describable_groups() {
    let harness = Harness::new(
        r#"
rules:
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read]
    group: "shop-*"
"#,
    );
    let (mut filter, info) = harness.connect(BILLING);
    let mut request = frame(
        ApiKey::ListGroups,
        4,
        RequestKind::ListGroups(Default::default()),
    );
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    let broker = ListGroupsResponse::default().with_groups(
        ["shop-a", "billing-internal", "shop-b"]
            .iter()
            .map(|g| list_groups_response::ListedGroup::default().with_group_id(group(g)))
            .collect(),
    );
    let bytes = codec::encode_response(
        ApiKey::ListGroups,
        4,
        &ResponseHeader::default().with_correlation_id(7),
        &ResponseKind::ListGroups(broker),
    )
    .unwrap();
    let mut answer = ResponseFrame::decode(ApiKey::ListGroups, 4, bytes).unwrap();
    on_resp(&mut filter, &info, now(), &mut answer).await;
    let ResponseKind::ListGroups(filtered) = answer.body() else {
        panic!()
    };
    let listed: Vec<&str> = filtered
        .groups
        .iter()
        .map(|g| g.group_id.as_str())
        .collect();
    assert_eq!(listed, vec!["shop-a", "shop-b"]);
}

#[tokio::test]
async fn unmapped_api_keys_fail_closed_unless_allowed() {
    let harness = Harness::new(RULES);
    let (mut filter, info) = harness.connect(ORDERS);
    let mut request = frame(
        ApiKey::ShareGroupDescribe,
        1,
        RequestKind::ShareGroupDescribe(Default::default()),
    );
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Close(_)
    ));
    let open = Harness::new(&format!("{RULES}unknown_api_keys: allow\n"));
    let (mut filter, info) = open.connect(ORDERS);
    let mut request = frame(
        ApiKey::ShareGroupDescribe,
        1,
        RequestKind::ShareGroupDescribe(Default::default()),
    );
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    // Version negotiation and SASL are never decoded by this filter.
    use strait_filter::Filter as _;
    let keys = filter.request_keys();
    assert!(!keys.contains(ApiKey::ApiVersions as i16));
    assert!(!keys.contains(ApiKey::SaslAuthenticate as i16));
    assert!(keys.contains(ApiKey::Produce as i16));
    assert!(keys.contains(ApiKey::ShareFetch as i16));
}

#[tokio::test]
async fn reload_applies_to_open_connections_on_their_next_request() {
    let harness = Harness::new(RULES);
    let (mut filter, info) = harness.connect(BILLING);
    let join =
        || RequestKind::JoinGroup(JoinGroupRequest::default().with_group_id(group("shop-1")));
    let mut request = frame(ApiKey::JoinGroup, 9, join());
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    harness
        .authorizer
        .reload(
            &AuthorizationConfig::from_yaml(
                "rules:\n  - principal: nobody\n    allow: [Read]\n    group: '*'\n",
            )
            .unwrap(),
        )
        .unwrap();
    let mut request = frame(ApiKey::JoinGroup, 9, join());
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Respond(_)
    ));
}

#[tokio::test]
async fn authorized_operations_are_computed_from_the_edge_rules() {
    let harness = Harness::new(RULES);
    let (mut filter, info) = harness.connect(BILLING);
    let mut broker = metadata_response(&[("orders-eu", 1)]);
    // The broker claims everything is allowed (its view of the edge's identity).
    broker.topics[0].topic_authorized_operations = 0x0ff8;
    broker.cluster_authorized_operations = 0x1fa0;
    let (_, answer) =
        metadata_round(&mut filter, &info, 9, Some(vec!["orders-eu"]), broker, 3).await;
    // billing: Read + Describe on orders-*; Describe on the cluster.
    assert_eq!(
        answer.topics[0].topic_authorized_operations,
        (1 << 3) | (1 << 8)
    );
    assert_eq!(answer.cluster_authorized_operations, 1 << 8);
    // Not requested: left alone.
    let (_, answer) = metadata_round(
        &mut filter,
        &info,
        9,
        Some(vec!["orders-eu"]),
        metadata_response(&[("orders-eu", 1)]),
        4,
    )
    .await;
    assert_eq!(answer.topics[0].topic_authorized_operations, i32::MIN);
}

#[tokio::test]
async fn group_and_cluster_authorized_operations_are_recomputed() {
    let harness = Harness::new(RULES);
    let (mut filter, info) = harness.connect(BILLING);
    let mut request = frame(
        ApiKey::DescribeGroups,
        5,
        RequestKind::DescribeGroups(
            DescribeGroupsRequest::default()
                .with_groups(vec![group("shop-a")])
                .with_include_authorized_operations(true),
        ),
    );
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    let broker = DescribeGroupsResponse::default().with_groups(vec![
        describe_groups_response::DescribedGroup::default()
            .with_group_id(group("shop-a"))
            .with_authorized_operations(0x0ff8),
    ]);
    let bytes = codec::encode_response(
        ApiKey::DescribeGroups,
        5,
        &ResponseHeader::default().with_correlation_id(7),
        &ResponseKind::DescribeGroups(broker),
    )
    .unwrap();
    let mut answer = ResponseFrame::decode(ApiKey::DescribeGroups, 5, bytes).unwrap();
    on_resp(&mut filter, &info, now(), &mut answer).await;
    let ResponseKind::DescribeGroups(groups) = answer.body() else {
        panic!()
    };
    // billing: Read on shop-* (Read implies Describe).
    assert_eq!(groups.groups[0].authorized_operations, (1 << 3) | (1 << 8));

    let mut request = frame(
        ApiKey::DescribeCluster,
        1,
        RequestKind::DescribeCluster(
            DescribeClusterRequest::default().with_include_cluster_authorized_operations(true),
        ),
    );
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut request).await,
        RequestVerdict::Forward
    ));
    let bytes = codec::encode_response(
        ApiKey::DescribeCluster,
        1,
        &ResponseHeader::default().with_correlation_id(7),
        &ResponseKind::DescribeCluster(
            DescribeClusterResponse::default().with_cluster_authorized_operations(0x1fa0),
        ),
    )
    .unwrap();
    let mut answer = ResponseFrame::decode(ApiKey::DescribeCluster, 1, bytes).unwrap();
    on_resp(&mut filter, &info, now(), &mut answer).await;
    let ResponseKind::DescribeCluster(cluster) = answer.body() else {
        panic!()
    };
    assert_eq!(cluster.cluster_authorized_operations, 1 << 8);
}

/// A Fetch allowed shortly before its Read lease ends must not long-poll past
/// the end: the broker would answer with records written after it. It must
/// answer 250 ms before the end (the margin for the request's way there).
#[tokio::test]
async fn fetch_wait_is_capped_before_the_read_lease_end() {
    let harness = Harness::new(
        r#"
rules:
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read]
    topic: "leased"
    not_after: "2026-11-22T08:00:00.400Z"
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read]
    topic: "open"
"#,
    );
    let (mut filter, info) = harness.connect(BILLING);
    let fetch = |name: &str| {
        RequestKind::Fetch(FetchRequest::default().with_max_wait_ms(500).with_topics(
            vec![fetch_request::FetchTopic::default()
                    .with_topic(topic(name))
                    .with_partitions(vec![Default::default()])],
        ))
    };
    let max_wait = |frame: &RequestFrame| match frame.body() {
        RequestKind::Fetch(req) => req.max_wait_ms,
        _ => panic!(),
    };
    let mut leased = frame(ApiKey::Fetch, 12, fetch("leased"));
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut leased).await,
        RequestVerdict::Forward
    ));
    assert_eq!(
        max_wait(&leased),
        150,
        "the 400 ms left on the lease, less the 250 ms margin"
    );
    // A rule without a lease leaves the client's wait alone.
    let mut open = frame(ApiKey::Fetch, 12, fetch("open"));
    assert!(matches!(
        request_verdict(&mut filter, &info, &mut open).await,
        RequestVerdict::Forward
    ));
    assert_eq!(max_wait(&open), 500);
}

/// A Fetch in a lease's last 250 ms is held until the lease ends and then
/// decided again: refused, never forwarded to long-poll past the end.
#[tokio::test]
async fn fetch_in_the_last_margin_of_a_lease_waits_for_its_end_and_is_refused() {
    let start = SystemTime::now();
    let end = start + std::time::Duration::from_millis(100);
    let harness = Harness::new(&format!(
        r#"
rules:
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read]
    topic: "leased"
    not_after: "{}"
"#,
        OffsetDateTime::from(end).format(&Rfc3339).unwrap()
    ));
    let (mut filter, info) = harness.connect(BILLING);
    let mut leased = frame(
        ApiKey::Fetch,
        12,
        RequestKind::Fetch(FetchRequest::default().with_max_wait_ms(500).with_topics(
            vec![fetch_request::FetchTopic::default()
                    .with_topic(topic("leased"))
                    .with_partitions(vec![Default::default()])],
        )),
    );
    let verdict = on_req(&mut filter, &info, start, &mut leased).await;
    assert!(SystemTime::now() >= end, "answered before the lease ended");
    let RequestVerdict::Respond(response) = verdict else {
        panic!("a Fetch at the lease's end must be refused, not forwarded");
    };
    let ResponseKind::Fetch(fetch) = round_trip(ApiKey::Fetch, 12, *response) else {
        panic!()
    };
    // TOPIC_AUTHORIZATION_FAILED
    assert_eq!(fetch.responses[0].partitions[0].error_code, 29);
}

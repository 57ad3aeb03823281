//! Error answers in the exact shape of each API, built from the request so
//! every topic, partition, group or resource named gets its error code.

use std::collections::HashSet;

use strait_kafka::kafka_protocol::messages::*;
use strait_kafka::kafka_protocol::protocol::StrBytes;
use uuid::Uuid;

/// Kafka error codes used by the filter.
pub mod codes {
    pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
    pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
    pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    /// Retriable: the client refreshes its metadata (through the edge, which
    /// then learns the id) and tries again.
    pub const UNKNOWN_TOPIC_ID: i16 = 100;
}

use codes::*;

/// Config resource types of DescribeConfigs/AlterConfigs.
pub(crate) const CONFIG_TOPIC: i8 = 2;
pub(crate) const CONFIG_GROUP: i8 = 32;

pub(crate) fn config_resource_code(resource_type: i8) -> i16 {
    match resource_type {
        CONFIG_TOPIC => TOPIC_AUTHORIZATION_FAILED,
        CONFIG_GROUP => GROUP_AUTHORIZATION_FAILED,
        _ => CLUSTER_AUTHORIZATION_FAILED,
    }
}

/// Builds the answer refusing `request`: every item carries `code`, except
/// topics given by an id the edge does not know (`UNKNOWN_TOPIC_ID`) and
/// config resources (the code of their own resource type). `None` for API
/// keys without a builder; the filter then closes the connection.
pub(crate) fn refusal(
    request: &RequestKind,
    version: i16,
    code: i16,
    unknown_ids: &HashSet<Uuid>,
) -> Option<ResponseKind> {
    let topic_code = |id: &Uuid| {
        if !id.is_nil() && unknown_ids.contains(id) {
            UNKNOWN_TOPIC_ID
        } else {
            code
        }
    };
    let response = match request {
        RequestKind::Produce(req) => ResponseKind::Produce(
            ProduceResponse::default().with_responses(
                req.topic_data
                    .iter()
                    .map(|topic| produce_topic_error(topic, topic_code(&topic.topic_id)))
                    .collect(),
            ),
        ),
        RequestKind::Fetch(req) => ResponseKind::Fetch(
            FetchResponse::default().with_responses(
                req.topics
                    .iter()
                    .map(|topic| {
                        let code = topic_code(&topic.topic_id);
                        fetch_response::FetchableTopicResponse::default()
                            .with_topic(topic.topic.clone())
                            .with_topic_id(topic.topic_id)
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|p| {
                                        fetch_response::PartitionData::default()
                                            .with_partition_index(p.partition)
                                            .with_error_code(code)
                                            .with_high_watermark(-1)
                                            .with_records(Some(Default::default()))
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::ListOffsets(req) => ResponseKind::ListOffsets(
            ListOffsetsResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|topic| {
                        list_offsets_response::ListOffsetsTopicResponse::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|p| {
                                        list_offsets_response::ListOffsetsPartitionResponse::default()
                                            .with_partition_index(p.partition_index)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::OffsetForLeaderEpoch(req) => ResponseKind::OffsetForLeaderEpoch(
            OffsetForLeaderEpochResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|topic| {
                        offset_for_leader_epoch_response::OffsetForLeaderTopicResult::default()
                            .with_topic(topic.topic.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|p| {
                                        offset_for_leader_epoch_response::EpochEndOffset::default()
                                            .with_partition(p.partition)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::OffsetCommit(req) => ResponseKind::OffsetCommit(
            OffsetCommitResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|topic| {
                        let code = topic_code(&topic.topic_id);
                        offset_commit_response::OffsetCommitResponseTopic::default()
                            .with_name(topic.name.clone())
                            .with_topic_id(topic.topic_id)
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|p| {
                                        offset_commit_response::OffsetCommitResponsePartition::default()
                                            .with_partition_index(p.partition_index)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::OffsetFetch(req) => {
            let mut response = OffsetFetchResponse::default();
            if version < 8 {
                if version >= 2 {
                    response.error_code = code;
                }
                response.topics = req
                    .topics
                    .iter()
                    .flatten()
                    .map(|topic| {
                        offset_fetch_response::OffsetFetchResponseTopic::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partition_indexes
                                    .iter()
                                    .map(|&p| {
                                        offset_fetch_response::OffsetFetchResponsePartition::default()
                                            .with_partition_index(p)
                                            .with_committed_offset(-1)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
            } else {
                response.groups = req
                    .groups
                    .iter()
                    .map(|group| {
                        offset_fetch_response::OffsetFetchResponseGroup::default()
                            .with_group_id(group.group_id.clone())
                            .with_error_code(code)
                    })
                    .collect();
            }
            ResponseKind::OffsetFetch(response)
        }
        RequestKind::FindCoordinator(_) if version < 4 => ResponseKind::FindCoordinator(
            FindCoordinatorResponse::default()
                .with_error_code(code)
                .with_node_id(BrokerId(-1))
                .with_port(-1),
        ),
        RequestKind::FindCoordinator(req) => ResponseKind::FindCoordinator(
            FindCoordinatorResponse::default().with_coordinators(
                req.coordinator_keys
                    .iter()
                    .map(|key| {
                        find_coordinator_response::Coordinator::default()
                            .with_key(key.clone())
                            .with_node_id(BrokerId(-1))
                            .with_port(-1)
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::JoinGroup(_) => {
            ResponseKind::JoinGroup(JoinGroupResponse::default().with_error_code(code))
        }
        RequestKind::SyncGroup(_) => {
            ResponseKind::SyncGroup(SyncGroupResponse::default().with_error_code(code))
        }
        RequestKind::Heartbeat(_) => {
            ResponseKind::Heartbeat(HeartbeatResponse::default().with_error_code(code))
        }
        RequestKind::LeaveGroup(_) => {
            ResponseKind::LeaveGroup(LeaveGroupResponse::default().with_error_code(code))
        }
        RequestKind::DescribeGroups(req) => ResponseKind::DescribeGroups(
            DescribeGroupsResponse::default().with_groups(
                req.groups
                    .iter()
                    .map(|group| {
                        describe_groups_response::DescribedGroup::default()
                            .with_group_id(group.clone())
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::DeleteGroups(req) => ResponseKind::DeleteGroups(
            DeleteGroupsResponse::default().with_results(
                req.groups_names
                    .iter()
                    .map(|group| {
                        delete_groups_response::DeletableGroupResult::default()
                            .with_group_id(group.clone())
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::CreateTopics(req) => ResponseKind::CreateTopics(
            CreateTopicsResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|topic| {
                        create_topics_response::CreatableTopicResult::default()
                            .with_name(topic.name.clone())
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::DeleteTopics(req) => {
            let results = if version < 6 {
                req.topic_names
                    .iter()
                    .map(|name| {
                        delete_topics_response::DeletableTopicResult::default()
                            .with_name(Some(name.clone()))
                            .with_error_code(code)
                    })
                    .collect()
            } else {
                req.topics
                    .iter()
                    .map(|topic| {
                        delete_topics_response::DeletableTopicResult::default()
                            .with_name(topic.name.clone())
                            .with_topic_id(topic.topic_id)
                            .with_error_code(if topic.name.is_some() {
                                code
                            } else {
                                topic_code(&topic.topic_id)
                            })
                    })
                    .collect()
            };
            ResponseKind::DeleteTopics(DeleteTopicsResponse::default().with_responses(results))
        }
        RequestKind::DeleteRecords(req) => ResponseKind::DeleteRecords(
            DeleteRecordsResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|topic| {
                        delete_records_response::DeleteRecordsTopicResult::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|p| {
                                        delete_records_response::DeleteRecordsPartitionResult::default()
                                            .with_partition_index(p.partition_index)
                                            .with_low_watermark(-1)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::CreatePartitions(req) => ResponseKind::CreatePartitions(
            CreatePartitionsResponse::default().with_results(
                req.topics
                    .iter()
                    .map(|topic| {
                        create_partitions_response::CreatePartitionsTopicResult::default()
                            .with_name(topic.name.clone())
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::DescribeConfigs(req) => ResponseKind::DescribeConfigs(
            DescribeConfigsResponse::default().with_results(
                req.resources
                    .iter()
                    .map(|r| {
                        describe_configs_response::DescribeConfigsResult::default()
                            .with_resource_type(r.resource_type)
                            .with_resource_name(r.resource_name.clone())
                            .with_error_code(config_resource_code(r.resource_type))
                    })
                    .collect(),
            ),
        ),
        RequestKind::AlterConfigs(req) => ResponseKind::AlterConfigs(
            AlterConfigsResponse::default().with_responses(
                req.resources
                    .iter()
                    .map(|r| {
                        alter_configs_response::AlterConfigsResourceResponse::default()
                            .with_resource_type(r.resource_type)
                            .with_resource_name(r.resource_name.clone())
                            .with_error_code(config_resource_code(r.resource_type))
                    })
                    .collect(),
            ),
        ),
        RequestKind::IncrementalAlterConfigs(req) => ResponseKind::IncrementalAlterConfigs(
            IncrementalAlterConfigsResponse::default().with_responses(
                req.resources
                    .iter()
                    .map(|r| {
                        incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                            .with_resource_type(r.resource_type)
                            .with_resource_name(r.resource_name.clone())
                            .with_error_code(config_resource_code(r.resource_type))
                    })
                    .collect(),
            ),
        ),
        RequestKind::InitProducerId(_) => ResponseKind::InitProducerId(
            InitProducerIdResponse::default()
                .with_error_code(code)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        ),
        RequestKind::AddPartitionsToTxn(req) => {
            let topic_results = |topics: &[add_partitions_to_txn_request::AddPartitionsToTxnTopic]| {
                topics
                    .iter()
                    .map(|topic| {
                        add_partitions_to_txn_response::AddPartitionsToTxnTopicResult::default()
                            .with_name(topic.name.clone())
                            .with_results_by_partition(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|&p| {
                                        add_partitions_to_txn_response::AddPartitionsToTxnPartitionResult::default()
                                            .with_partition_index(p)
                                            .with_partition_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect::<Vec<_>>()
            };
            let mut response = AddPartitionsToTxnResponse::default();
            if version < 4 {
                response.results_by_topic_v3_and_below = topic_results(&req.v3_and_below_topics);
            } else {
                response.results_by_transaction = req
                    .transactions
                    .iter()
                    .map(|txn| {
                        add_partitions_to_txn_response::AddPartitionsToTxnResult::default()
                            .with_transactional_id(txn.transactional_id.clone())
                            .with_topic_results(topic_results(&txn.topics))
                    })
                    .collect();
            }
            ResponseKind::AddPartitionsToTxn(response)
        }
        RequestKind::AddOffsetsToTxn(_) => {
            ResponseKind::AddOffsetsToTxn(AddOffsetsToTxnResponse::default().with_error_code(code))
        }
        RequestKind::EndTxn(_) => ResponseKind::EndTxn(EndTxnResponse::default().with_error_code(code)),
        RequestKind::TxnOffsetCommit(req) => ResponseKind::TxnOffsetCommit(
            TxnOffsetCommitResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|topic| {
                        txn_offset_commit_response::TxnOffsetCommitResponseTopic::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|p| {
                                        txn_offset_commit_response::TxnOffsetCommitResponsePartition::default()
                                            .with_partition_index(p.partition_index)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::OffsetDelete(req) => {
            let mut response = OffsetDeleteResponse::default();
            if code == GROUP_AUTHORIZATION_FAILED {
                response.error_code = code;
            } else {
                response.topics = req
                    .topics
                    .iter()
                    .map(|topic| {
                        offset_delete_response::OffsetDeleteResponseTopic::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|p| {
                                        offset_delete_response::OffsetDeleteResponsePartition::default()
                                            .with_partition_index(p.partition_index)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
            }
            ResponseKind::OffsetDelete(response)
        }
        RequestKind::DescribeProducers(req) => ResponseKind::DescribeProducers(
            DescribeProducersResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|topic| {
                        describe_producers_response::TopicResponse::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partition_indexes
                                    .iter()
                                    .map(|&p| {
                                        describe_producers_response::PartitionResponse::default()
                                            .with_partition_index(p)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::DescribeTransactions(req) => ResponseKind::DescribeTransactions(
            DescribeTransactionsResponse::default().with_transaction_states(
                req.transactional_ids
                    .iter()
                    .map(|id| {
                        describe_transactions_response::TransactionState::default()
                            .with_transactional_id(id.clone())
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::ConsumerGroupHeartbeat(_) => ResponseKind::ConsumerGroupHeartbeat(
            ConsumerGroupHeartbeatResponse::default().with_error_code(code),
        ),
        RequestKind::ConsumerGroupDescribe(req) => ResponseKind::ConsumerGroupDescribe(
            ConsumerGroupDescribeResponse::default().with_groups(
                req.group_ids
                    .iter()
                    .map(|group| {
                        consumer_group_describe_response::DescribedGroup::default()
                            .with_group_id(group.clone())
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::DescribeTopicPartitions(req) => ResponseKind::DescribeTopicPartitions(
            DescribeTopicPartitionsResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|topic| {
                        describe_topic_partitions_response::DescribeTopicPartitionsResponseTopic::default()
                            .with_name(Some(topic.name.clone()))
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::DescribeCluster(_) => ResponseKind::DescribeCluster(
            DescribeClusterResponse::default()
                .with_error_code(code)
                .with_controller_id(BrokerId(-1)),
        ),
        RequestKind::DescribeAcls(_) => {
            ResponseKind::DescribeAcls(DescribeAclsResponse::default().with_error_code(code))
        }
        RequestKind::CreateAcls(req) => ResponseKind::CreateAcls(
            CreateAclsResponse::default().with_results(
                req.creations
                    .iter()
                    .map(|_| create_acls_response::AclCreationResult::default().with_error_code(code))
                    .collect(),
            ),
        ),
        RequestKind::DeleteAcls(req) => ResponseKind::DeleteAcls(
            DeleteAclsResponse::default().with_filter_results(
                req.filters
                    .iter()
                    .map(|_| delete_acls_response::DeleteAclsFilterResult::default().with_error_code(code))
                    .collect(),
            ),
        ),
        RequestKind::AlterPartitionReassignments(_) => ResponseKind::AlterPartitionReassignments(
            AlterPartitionReassignmentsResponse::default().with_error_code(code),
        ),
        RequestKind::ListPartitionReassignments(_) => ResponseKind::ListPartitionReassignments(
            ListPartitionReassignmentsResponse::default().with_error_code(code),
        ),
        RequestKind::ElectLeaders(req) => {
            let mut response = ElectLeadersResponse::default();
            if version >= 1 {
                response.error_code = code;
            }
            response.replica_election_results = req
                .topic_partitions
                .iter()
                .flatten()
                .map(|topic| {
                    elect_leaders_response::ReplicaElectionResult::default()
                        .with_topic(topic.topic.clone())
                        .with_partition_result(
                            topic
                                .partitions
                                .iter()
                                .map(|&p| {
                                    elect_leaders_response::PartitionResult::default()
                                        .with_partition_id(p)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
            ResponseKind::ElectLeaders(response)
        }
        RequestKind::DescribeLogDirs(_) => {
            let mut response = DescribeLogDirsResponse::default();
            if version >= 3 {
                response.error_code = code;
            }
            ResponseKind::DescribeLogDirs(response)
        }
        RequestKind::AlterReplicaLogDirs(req) => ResponseKind::AlterReplicaLogDirs(
            AlterReplicaLogDirsResponse::default().with_results(
                req.dirs
                    .iter()
                    .flat_map(|dir| dir.topics.iter())
                    .map(|topic| {
                        alter_replica_log_dirs_response::AlterReplicaLogDirTopicResult::default()
                            .with_topic_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|&p| {
                                        alter_replica_log_dirs_response::AlterReplicaLogDirPartitionResult::default()
                                            .with_partition_index(p)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::DescribeClientQuotas(_) => ResponseKind::DescribeClientQuotas(
            DescribeClientQuotasResponse::default()
                .with_error_code(code)
                .with_entries(None),
        ),
        RequestKind::AlterClientQuotas(req) => ResponseKind::AlterClientQuotas(
            AlterClientQuotasResponse::default().with_entries(
                req.entries
                    .iter()
                    .map(|entry| {
                        alter_client_quotas_response::EntryData::default()
                            .with_error_code(code)
                            .with_entity(
                                entry
                                    .entity
                                    .iter()
                                    .map(|e| {
                                        alter_client_quotas_response::EntityData::default()
                                            .with_entity_type(e.entity_type.clone())
                                            .with_entity_name(e.entity_name.clone())
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::DescribeUserScramCredentials(_) => ResponseKind::DescribeUserScramCredentials(
            DescribeUserScramCredentialsResponse::default().with_error_code(code),
        ),
        RequestKind::AlterUserScramCredentials(req) => {
            let users: Vec<StrBytes> = req
                .deletions
                .iter()
                .map(|d| d.name.clone())
                .chain(req.upsertions.iter().map(|u| u.name.clone()))
                .collect();
            ResponseKind::AlterUserScramCredentials(
                AlterUserScramCredentialsResponse::default().with_results(
                    users
                        .into_iter()
                        .map(|user| {
                            alter_user_scram_credentials_response::AlterUserScramCredentialsResult::default()
                                .with_user(user)
                                .with_error_code(code)
                        })
                        .collect(),
                ),
            )
        }
        RequestKind::UpdateFeatures(_) => {
            ResponseKind::UpdateFeatures(UpdateFeaturesResponse::default().with_error_code(code))
        }
        RequestKind::DescribeQuorum(_) => {
            ResponseKind::DescribeQuorum(DescribeQuorumResponse::default().with_error_code(code))
        }
        RequestKind::ListConfigResources(_) => ResponseKind::ListConfigResources(
            ListConfigResourcesResponse::default().with_error_code(code),
        ),
        _ => return None,
    };
    Some(response)
}

/// The error entry for one topic of a Produce request.
pub(crate) fn produce_topic_error(
    topic: &produce_request::TopicProduceData,
    code: i16,
) -> produce_response::TopicProduceResponse {
    produce_response::TopicProduceResponse::default()
        .with_name(topic.name.clone())
        .with_topic_id(topic.topic_id)
        .with_partition_responses(
            topic
                .partition_data
                .iter()
                .map(|p| {
                    produce_response::PartitionProduceResponse::default()
                        .with_index(p.index)
                        .with_error_code(code)
                        .with_base_offset(-1)
                })
                .collect(),
        )
}

//! Broker node ids in messages, translated between the upstream's ids and
//! the edge's ([`crate::brokers::node_ids`]): responses upstream → edge,
//! requests edge → upstream. Only used on connections whose upstream's ids
//! differ from the edge's (or may: a mapping still pending); elsewhere no
//! message is touched for its ids.
//!
//! An id the mapping cannot translate is never passed on as if it were
//! valid. It only happens while a new upstream's mapping is pending (before
//! its broker list was seen), or for an edge id the new upstream has no
//! broker for:
//! - a leader, controller, preferred read replica or replica state becomes
//!   -1, which clients read as "unknown, refresh metadata" (or "no
//!   preference": read from the leader);
//! - an id in a list (replicas, ISR, ELR, reassignments) is left out;
//! - a coordinator becomes COORDINATOR_NOT_AVAILABLE, which clients retry;
//! - a node endpoint is left out;
//! - in a request, a broker id becomes -1 (a broker config resource
//!   "-1"), which brokers refuse (INVALID_REPLICA_ASSIGNMENT, an unknown
//!   broker) or, for a fetch's replica id, read as a consumer.
//!
//! [`KEYS_WITH_NODE_IDS`] lists every API key the edge offers whose
//! messages carry a broker id; the policy tests check it against the
//! `kafka-protocol` sources.

use strait_kafka::kafka_protocol::messages::{ApiKey, BrokerId, RequestKind, ResponseKind};
use strait_kafka::kafka_protocol::protocol::StrBytes;

use crate::brokers::node_ids::Translator;

/// Which messages of a key carry broker ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    Request,
    Response,
    Both,
}

/// Every API key the edge offers (see [`super::policy::POLICY`]) whose
/// requests or responses carry a broker id: typed `BrokerId` in the schema,
/// or a broker id in a string (config resources, throttled-replica values).
pub const KEYS_WITH_NODE_IDS: &[(ApiKey, Carries, &str)] = &[
    (ApiKey::Produce, Carries::Response, "current_leader, node_endpoints (v10+)"),
    (ApiKey::Fetch, Carries::Both, "request replica_id; response preferred_read_replica (v11+), current_leader (v12+), node_endpoints (v16+)"),
    (ApiKey::ListOffsets, Carries::Request, "replica_id"),
    (ApiKey::Metadata, Carries::Response, "brokers, controller_id, leader_id, replica_nodes, isr_nodes, offline_replicas"),
    (ApiKey::FindCoordinator, Carries::Response, "node_id, coordinators[].node_id"),
    (ApiKey::OffsetForLeaderEpoch, Carries::Request, "replica_id"),
    (ApiKey::CreateTopics, Carries::Request, "assignments[].broker_ids, throttled-replica configs"),
    (ApiKey::DescribeConfigs, Carries::Both, "broker resource names; broker.id, node.id and throttled-replica values"),
    (ApiKey::AlterConfigs, Carries::Both, "broker resource names, throttled-replica values"),
    (ApiKey::CreatePartitions, Carries::Request, "assignments[].broker_ids"),
    (ApiKey::IncrementalAlterConfigs, Carries::Both, "broker resource names, throttled-replica values"),
    (ApiKey::AlterPartitionReassignments, Carries::Request, "replicas"),
    (ApiKey::ListPartitionReassignments, Carries::Response, "replicas, adding_replicas, removing_replicas"),
    (ApiKey::DescribeQuorum, Carries::Response, "leader_id, voters and observers, nodes"),
    (ApiKey::DescribeCluster, Carries::Response, "brokers, controller_id"),
    (ApiKey::UnregisterBroker, Carries::Request, "broker_id"),
    (ApiKey::DescribeTopicPartitions, Carries::Response, "leader_id, replica_nodes, isr_nodes, eligible_leader_replicas, last_known_elr, offline_replicas"),
];

/// Config resource types whose name is a broker id.
const BROKER: i8 = 4;
const BROKER_LOGGER: i8 = 8;
/// Topic configs whose value lists `partition:broker` pairs.
const THROTTLED_REPLICAS: [&str; 2] = [
    "leader.replication.throttled.replicas",
    "follower.replication.throttled.replicas",
];
/// Broker configs whose value is the broker's own id.
const OWN_ID: [&str; 2] = ["broker.id", "node.id"];
const COORDINATOR_NOT_AVAILABLE: i16 = 15;

/// Whether a Produce or Fetch answer (decoded for its ids alone, and the
/// bulk of the traffic) would change: only those that would are re-encoded.
pub fn hot_answer_changes(body: &ResponseKind, ids: &Translator<'_>) -> bool {
    match body {
        ResponseKind::Produce(response) => {
            !response.node_endpoints.is_empty()
                || response.responses.iter().any(|topic| {
                    topic
                        .partition_responses
                        .iter()
                        .any(|p| p.current_leader.leader_id.0 != -1)
                })
        }
        ResponseKind::Fetch(response) => {
            !response.node_endpoints.is_empty()
                || response.responses.iter().any(|topic| {
                    topic.partitions.iter().any(|p| {
                        p.current_leader.leader_id.0 != -1 || !ids.keeps(p.preferred_read_replica.0)
                    })
                })
        }
        _ => true,
    }
}

/// A single id: unknown becomes -1.
fn one(ids: &mut Translator<'_>, id: &mut BrokerId) {
    id.0 = ids.to_edge(id.0).unwrap_or(-1);
}

/// A list of ids: unknown ones are left out.
fn list(ids: &mut Translator<'_>, list: &mut Vec<BrokerId>) {
    list.retain_mut(|id| match ids.to_edge(id.0) {
        Some(edge) => {
            id.0 = edge;
            true
        }
        None => false,
    });
}

fn list_to_upstream(ids: &Translator<'_>, list: &mut [BrokerId]) {
    for id in list {
        id.0 = ids.to_upstream(id.0).unwrap_or(-1);
    }
}

/// Translates every broker id of an answer to the edge's ids. Broker lists
/// (Metadata, DescribeCluster) settle a pending mapping first.
pub fn response(body: &mut ResponseKind, version: i16, ids: &mut Translator<'_>) {
    match body {
        ResponseKind::Metadata(r) => {
            ids.settle(r.brokers.iter().map(|b| b.node_id.0));
            // A broker the mapping cannot name (only while pending) is left
            // out with its address.
            r.brokers.retain_mut(|b| match ids.to_edge(b.node_id.0) {
                Some(edge) => {
                    b.node_id.0 = edge;
                    true
                }
                None => false,
            });
            one(ids, &mut r.controller_id);
            for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                one(ids, &mut p.leader_id);
                list(ids, &mut p.replica_nodes);
                list(ids, &mut p.isr_nodes);
                list(ids, &mut p.offline_replicas);
            }
        }
        ResponseKind::DescribeCluster(r) => {
            // endpoint_type 2 lists controllers, not the broker list.
            if r.endpoint_type != 2 {
                ids.settle(r.brokers.iter().map(|b| b.broker_id.0));
            }
            r.brokers.retain_mut(|b| match ids.to_edge(b.broker_id.0) {
                Some(edge) => {
                    b.broker_id.0 = edge;
                    true
                }
                None => false,
            });
            one(ids, &mut r.controller_id);
        }
        ResponseKind::FindCoordinator(r) => {
            // v0-3 name one coordinator at the top level, v4+ a list (the
            // top-level fields are not sent, and hold defaults).
            if version < 4 && !coordinator(ids, &mut r.node_id) {
                r.error_code = COORDINATOR_NOT_AVAILABLE;
                r.error_message = None;
            }
            for c in &mut r.coordinators {
                if !coordinator(ids, &mut c.node_id) {
                    c.error_code = COORDINATOR_NOT_AVAILABLE;
                    c.error_message = None;
                }
            }
        }
        // Leader hints (KIP-951: `current_leader` and `node_endpoints`) are
        // withheld, not translated. Their leader epochs are the new
        // cluster's, which may be no newer than those a client learnt from
        // the old one, and clients ignore a leader whose epoch is not newer
        // (the Java client then retries the old leader until its delivery
        // timeout). Without a hint they refresh their metadata, which the
        // edge answers from the new cluster.
        ResponseKind::Produce(r) => {
            for p in r
                .responses
                .iter_mut()
                .flat_map(|t| t.partition_responses.iter_mut())
            {
                p.current_leader.leader_id = BrokerId(-1);
                p.current_leader.leader_epoch = -1;
            }
            r.node_endpoints.clear();
        }
        ResponseKind::Fetch(r) => {
            for p in r.responses.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                p.current_leader.leader_id = BrokerId(-1);
                p.current_leader.leader_epoch = -1;
                // -1 is "no preference": the client reads from the leader.
                one(ids, &mut p.preferred_read_replica);
            }
            r.node_endpoints.clear();
        }
        ResponseKind::DescribeTopicPartitions(r) => {
            for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                one(ids, &mut p.leader_id);
                list(ids, &mut p.replica_nodes);
                list(ids, &mut p.isr_nodes);
                list(ids, &mut p.offline_replicas);
                if let Some(elr) = &mut p.eligible_leader_replicas {
                    list(ids, elr);
                }
                if let Some(elr) = &mut p.last_known_elr {
                    list(ids, elr);
                }
            }
        }
        ResponseKind::ListPartitionReassignments(r) => {
            for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                list(ids, &mut p.replicas);
                list(ids, &mut p.adding_replicas);
                list(ids, &mut p.removing_replicas);
            }
        }
        ResponseKind::DescribeQuorum(r) => {
            for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                one(ids, &mut p.leader_id);
                for replica in p.current_voters.iter_mut().chain(&mut p.observers) {
                    one(ids, &mut replica.replica_id);
                }
            }
            for node in &mut r.nodes {
                one(ids, &mut node.node_id);
            }
        }
        ResponseKind::DescribeConfigs(r) => {
            for result in &mut r.results {
                resource_to_edge(ids, result.resource_type, &mut result.resource_name);
                for config in &mut result.configs {
                    let name = config.name.as_str().to_owned();
                    config_to_edge(ids, result.resource_type, &name, &mut config.value);
                    for synonym in &mut config.synonyms {
                        let name = synonym.name.as_str().to_owned();
                        config_to_edge(ids, result.resource_type, &name, &mut synonym.value);
                    }
                }
            }
        }
        ResponseKind::AlterConfigs(r) => {
            for result in &mut r.responses {
                resource_to_edge(ids, result.resource_type, &mut result.resource_name);
            }
        }
        ResponseKind::IncrementalAlterConfigs(r) => {
            for result in &mut r.responses {
                resource_to_edge(ids, result.resource_type, &mut result.resource_name);
            }
        }
        _ => {}
    }
}

/// Translates a coordinator's id; false (and -1) for one the mapping cannot
/// name. A negative id ("none", with its own error code) stays.
fn coordinator(ids: &mut Translator<'_>, id: &mut BrokerId) -> bool {
    match ids.to_edge(id.0) {
        Some(edge) => {
            id.0 = edge;
            true
        }
        None => {
            id.0 = -1;
            false
        }
    }
}

/// Translates every broker id of a request to the upstream's ids.
pub fn request(body: &mut RequestKind, ids: &Translator<'_>) {
    let up = |id: &mut BrokerId| id.0 = ids.to_upstream(id.0).unwrap_or(-1);
    match body {
        RequestKind::Fetch(r) => {
            up(&mut r.replica_id);
            up(&mut r.replica_state.replica_id);
        }
        RequestKind::ListOffsets(r) => up(&mut r.replica_id),
        RequestKind::OffsetForLeaderEpoch(r) => up(&mut r.replica_id),
        RequestKind::UnregisterBroker(r) => up(&mut r.broker_id),
        RequestKind::CreateTopics(r) => {
            for topic in &mut r.topics {
                for assignment in &mut topic.assignments {
                    list_to_upstream(ids, &mut assignment.broker_ids);
                }
                for config in &mut topic.configs {
                    let name = config.name.as_str().to_owned();
                    throttled_to_upstream(ids, &name, &mut config.value);
                }
            }
        }
        RequestKind::CreatePartitions(r) => {
            for assignment in r
                .topics
                .iter_mut()
                .filter_map(|t| t.assignments.as_mut())
                .flatten()
            {
                list_to_upstream(ids, &mut assignment.broker_ids);
            }
        }
        RequestKind::AlterPartitionReassignments(r) => {
            for replicas in r
                .topics
                .iter_mut()
                .flat_map(|t| t.partitions.iter_mut())
                .filter_map(|p| p.replicas.as_mut())
            {
                list_to_upstream(ids, replicas);
            }
        }
        RequestKind::DescribeConfigs(r) => {
            for resource in &mut r.resources {
                resource_to_upstream(ids, resource.resource_type, &mut resource.resource_name);
            }
        }
        RequestKind::AlterConfigs(r) => {
            for resource in &mut r.resources {
                resource_to_upstream(ids, resource.resource_type, &mut resource.resource_name);
                for config in &mut resource.configs {
                    let name = config.name.as_str().to_owned();
                    throttled_to_upstream(ids, &name, &mut config.value);
                }
            }
        }
        RequestKind::IncrementalAlterConfigs(r) => {
            for resource in &mut r.resources {
                resource_to_upstream(ids, resource.resource_type, &mut resource.resource_name);
                for config in &mut resource.configs {
                    let name = config.name.as_str().to_owned();
                    throttled_to_upstream(ids, &name, &mut config.value);
                }
            }
        }
        _ => {}
    }
}

/// A broker id written as a string, as config resources name brokers: the
/// exact form `i32` prints. "" (the cluster-wide default) and anything else
/// that is not an id stay as they are.
fn parse_id(name: &str) -> Option<i32> {
    let id: i32 = name.parse().ok()?;
    (id.to_string() == name).then_some(id)
}

fn is_broker_resource(resource_type: i8) -> bool {
    resource_type == BROKER || resource_type == BROKER_LOGGER
}

fn resource_to_upstream(ids: &Translator<'_>, resource_type: i8, name: &mut StrBytes) {
    if !is_broker_resource(resource_type) {
        return;
    }
    if let Some(edge) = parse_id(name.as_str()) {
        let upstream = ids.to_upstream(edge).unwrap_or(-1);
        *name = StrBytes::from_string(upstream.to_string());
    }
}

fn resource_to_edge(ids: &mut Translator<'_>, resource_type: i8, name: &mut StrBytes) {
    if !is_broker_resource(resource_type) {
        return;
    }
    if let Some(upstream) = parse_id(name.as_str()) {
        let edge = ids.to_edge(upstream).unwrap_or(-1);
        *name = StrBytes::from_string(edge.to_string());
    }
}

/// A config value that names brokers, in an answer.
fn config_to_edge(
    ids: &mut Translator<'_>,
    resource_type: i8,
    name: &str,
    value: &mut Option<StrBytes>,
) {
    let Some(text) = value.as_ref().map(|v| v.as_str().to_owned()) else {
        return;
    };
    let mapped = if resource_type == BROKER && OWN_ID.contains(&name) {
        parse_id(&text).map(|id| ids.to_edge(id).unwrap_or(-1).to_string())
    } else if THROTTLED_REPLICAS.contains(&name) {
        map_throttled(&text, |id| ids.to_edge(id))
    } else {
        None
    };
    if let Some(mapped) = mapped {
        *value = Some(StrBytes::from_string(mapped));
    }
}

fn throttled_to_upstream(ids: &Translator<'_>, name: &str, value: &mut Option<StrBytes>) {
    if !THROTTLED_REPLICAS.contains(&name) {
        return;
    }
    let Some(text) = value.as_ref().map(|v| v.as_str().to_owned()) else {
        return;
    };
    if let Some(mapped) = map_throttled(&text, |id| ids.to_upstream(id)) {
        *value = Some(StrBytes::from_string(mapped));
    }
}

/// `partition:broker,...` with each broker translated (unknown: -1, which
/// brokers refuse as a config value); `*` and values that are not such a
/// list stay (`None`).
fn map_throttled(value: &str, mut map: impl FnMut(i32) -> Option<i32>) -> Option<String> {
    if value.trim().is_empty() || value.trim() == "*" {
        return None;
    }
    let mut out = Vec::new();
    for entry in value.split(',') {
        let (partition, broker) = entry.trim().split_once(':')?;
        let broker = parse_id(broker.trim())?;
        out.push(format!(
            "{}:{}",
            partition.trim(),
            map(broker).unwrap_or(-1)
        ));
    }
    Some(out.join(","))
}

#[cfg(test)]
#[path = "node_ids_tests.rs"]
mod tests;

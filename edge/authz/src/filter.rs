//! The authorization filter: checks every request that names a resource
//! against the current rules, answers denied requests itself with Kafka's
//! per-resource error codes, and hides what the principal may not describe
//! from Metadata, ListGroups, ListTransactions, OffsetFetch and
//! DescribeTopicPartitions answers.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use async_trait::async_trait;
use strait_filter::{
    ApiKeySet, ConnectionInfo, Filter, FilterContext, FilterFactory, Principal, RequestFrame,
    RequestVerdict, ResponseFrame, ResponseVerdict,
};
use strait_kafka::kafka_protocol::messages::*;
use uuid::Uuid;

use crate::audit::{AuditRecord, AuditSink};
use crate::config::{Operation, ResourceType, UnknownApiKeys, CLUSTER_RESOURCE_NAME};
use crate::metrics::{AuthzMetrics, DecisionCounters};
use crate::responses::{self, codes::*, CONFIG_GROUP, CONFIG_TOPIC};
use crate::rules::{Authorizer, Decision, RuleSet};

/// API keys that are always allowed and never decoded by this filter:
/// version negotiation, SASL and client telemetry (KIP-714) name no resource.
pub const ALWAYS_ALLOWED: [ApiKey; 5] = [
    ApiKey::ApiVersions,
    ApiKey::SaslHandshake,
    ApiKey::SaslAuthenticate,
    ApiKey::GetTelemetrySubscriptions,
    ApiKey::PushTelemetry,
];

/// Kafka's marker for "authorized operations were not requested".
const OPERATIONS_NOT_REQUESTED: i32 = i32::MIN;

/// Responses this filter rewrites.
const RESPONSE_KEYS: [ApiKey; 9] = [
    ApiKey::DescribeCluster,
    ApiKey::DescribeGroups,
    ApiKey::ConsumerGroupDescribe,
    ApiKey::Metadata,
    ApiKey::Produce,
    ApiKey::ListGroups,
    ApiKey::ListTransactions,
    ApiKey::OffsetFetch,
    ApiKey::DescribeTopicPartitions,
];

fn request_keys() -> ApiKeySet {
    let mut set = ApiKeySet::EMPTY;
    for key in 0i16..256 {
        if let Ok(api_key) = ApiKey::try_from(key) {
            if !ALWAYS_ALLOWED.contains(&api_key) {
                set.insert(key);
            }
        }
    }
    set
}

/// Topic ids seen in Metadata answers of one virtual cluster, shared by its
/// connections: clients often fetch on a connection other than the one that
/// carried their Metadata request. The ids come from the broker, never from a
/// client, so sharing them leaks nothing.
#[derive(Debug, Default)]
pub(crate) struct TopicIds(RwLock<HashMap<Uuid, TopicName>>);

impl TopicIds {
    fn get(&self, id: &Uuid) -> Option<TopicName> {
        self.0.read().ok()?.get(id).cloned()
    }

    fn learn(&self, response: &MetadataResponse) {
        let unknown: Vec<(Uuid, TopicName)> = {
            let Ok(map) = self.0.read() else { return };
            response
                .topics
                .iter()
                .filter_map(|t| Some((t.topic_id, t.name.clone()?)))
                .filter(|(id, name)| !id.is_nil() && map.get(id) != Some(name))
                .collect()
        };
        if !unknown.is_empty() {
            if let Ok(mut map) = self.0.write() {
                map.extend(unknown);
            }
        }
    }
}

/// Everything about a connection that does not change.
struct Conn {
    authorizer: Arc<Authorizer>,
    audit: AuditSink,
    counters: DecisionCounters,
    virtual_cluster: Arc<str>,
    topic_ids: Arc<TopicIds>,
    principal: Principal,
    principal_name: Arc<str>,
    client_addr: SocketAddr,
    via_peer: Option<Arc<str>>,
}

/// Builds an [`AuthorizationFilter`] per connection of one virtual cluster.
pub struct AuthorizationFilterFactory {
    authorizer: Arc<Authorizer>,
    audit: AuditSink,
    counters: DecisionCounters,
    virtual_cluster: Arc<str>,
    topic_ids: Arc<TopicIds>,
    request_keys: ApiKeySet,
}

impl AuthorizationFilterFactory {
    /// `virtual_cluster` labels the metrics and audit lines.
    pub fn new(
        authorizer: Arc<Authorizer>,
        audit: AuditSink,
        metrics: &AuthzMetrics,
        virtual_cluster: impl Into<Arc<str>>,
    ) -> AuthorizationFilterFactory {
        let virtual_cluster = virtual_cluster.into();
        AuthorizationFilterFactory {
            counters: metrics.decision_counters(&virtual_cluster),
            authorizer,
            audit,
            virtual_cluster,
            topic_ids: Arc::default(),
            request_keys: request_keys(),
        }
    }

    /// The filter for one connection, as a concrete type (for tests and benches).
    pub fn filter_for(&self, connection: &ConnectionInfo) -> AuthorizationFilter {
        let principal_name: Arc<str> = match &connection.principal {
            Principal::Named(name) => name.clone(),
            Principal::Anonymous => "anonymous".into(),
        };
        AuthorizationFilter {
            conn: Conn {
                authorizer: self.authorizer.clone(),
                audit: self.audit.clone(),
                counters: self.counters.clone(),
                virtual_cluster: self.virtual_cluster.clone(),
                topic_ids: self.topic_ids.clone(),
                principal: connection.principal.clone(),
                principal_name,
                client_addr: connection.client_addr,
                via_peer: connection.via_peer.clone(),
            },
            view: None,
            request_keys: self.request_keys,
            produce_pending: HashMap::new(),
            metadata_explicit: HashMap::new(),
            hold_until: None,
        }
    }
}

impl FilterFactory for AuthorizationFilterFactory {
    fn create(&self, connection: &ConnectionInfo) -> Box<dyn Filter> {
        Box::new(self.filter_for(connection))
    }
}

/// The per-connection authorization filter. See the crate documentation.
pub struct AuthorizationFilter {
    conn: Conn,
    /// The rule set last used and the indices of its rules matching this
    /// connection's principal; recomputed when the rules are reloaded.
    view: Option<(Arc<RuleSet>, Arc<[u32]>)>,
    request_keys: ApiKeySet,
    /// Error entries for the denied topics of partially forwarded Produce
    /// requests, merged into the broker's answer (by correlation id).
    produce_pending: HashMap<i32, Vec<produce_response::TopicProduceResponse>>,
    /// Whether a forwarded Metadata request named its topics.
    metadata_explicit: HashMap<i32, bool>,
    /// A Fetch allowed by a lease that ends within [`LEASE_FETCH_MARGIN`]:
    /// held until the lease ends, then decided again.
    hold_until: Option<SystemTime>,
}

/// How long before a Read lease ends the broker must have answered a Fetch
/// it allowed. The broker's long-poll timer starts when the request reaches
/// it, after the edge's decision, and it returns whatever was appended
/// until it answers; this margin absorbs that delay, so nothing appended
/// after the lease's end is delivered.
const LEASE_FETCH_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

/// Evaluates the checks of one request, auditing and counting each.
struct Checker<'a> {
    conn: &'a Conn,
    rules: Arc<RuleSet>,
    candidates: Arc<[u32]>,
    now: SystemTime,
    api_key: i16,
    denies: Vec<AuditRecord>,
    /// The error for a refusal: the highest-ranked denied resource type.
    code: Option<i16>,
    unknown_ids: HashSet<Uuid>,
    /// The earliest lease end among the rules that allowed this request.
    valid_until: Option<SystemTime>,
}

fn rank(code: i16) -> u8 {
    match code {
        TRANSACTIONAL_ID_AUTHORIZATION_FAILED => 4,
        GROUP_AUTHORIZATION_FAILED => 3,
        CLUSTER_AUTHORIZATION_FAILED => 2,
        _ => 1,
    }
}

fn code_of(resource: ResourceType) -> i16 {
    match resource {
        ResourceType::Topic => TOPIC_AUTHORIZATION_FAILED,
        ResourceType::Group => GROUP_AUTHORIZATION_FAILED,
        ResourceType::TransactionalId => TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        ResourceType::Cluster => CLUSTER_AUTHORIZATION_FAILED,
    }
}

impl Checker<'_> {
    /// Decides without auditing or counting (used to filter listings and for
    /// the auto-creation check, which Kafka does not audit either).
    fn quiet(&self, resource: ResourceType, name: &str, operation: Operation) -> bool {
        self.rules
            .decide_among(&self.candidates, resource, name, operation, self.now)
            .allowed
    }

    fn check(&mut self, resource: ResourceType, name: &str, operation: Operation) -> bool {
        let decision =
            self.rules
                .decide_among(&self.candidates, resource, name, operation, self.now);
        self.record(resource, name, operation, decision)
    }

    fn record(
        &mut self,
        resource: ResourceType,
        name: &str,
        operation: Operation,
        decision: Decision,
    ) -> bool {
        let allowed = decision.allowed;
        if allowed {
            if let Some(end) = decision.rule.as_ref().and_then(|rule| rule.not_after) {
                self.valid_until = Some(self.valid_until.map_or(end, |current| current.min(end)));
            }
            self.conn.counters.allow.inc();
            if self.conn.audit.sample_allow() {
                let record = self.audit_record(resource, name, operation, decision);
                self.conn.audit.record_allow(record);
            }
        } else {
            self.conn.counters.deny.inc();
            let code = code_of(resource);
            if self.code.is_none_or(|current| rank(code) > rank(current)) {
                self.code = Some(code);
            }
            if self.conn.audit.is_enabled() {
                let record = self.audit_record(resource, name, operation, decision);
                self.denies.push(record);
            }
        }
        allowed
    }

    fn audit_record(
        &self,
        resource: ResourceType,
        name: &str,
        operation: Operation,
        decision: Decision,
    ) -> AuditRecord {
        AuditRecord {
            time: self.now,
            principal: self.conn.principal_name.clone(),
            client_addr: self.conn.client_addr,
            via_peer: self.conn.via_peer.clone(),
            virtual_cluster: self.conn.virtual_cluster.clone(),
            api_key: self.api_key,
            resource_type: resource,
            resource_name: name.to_owned(),
            operation,
            allowed: decision.allowed,
            rule: decision.rule,
        }
    }

    /// A topic named by name or, in newer versions, by id.
    fn check_topic(&mut self, name: &TopicName, id: Uuid, operation: Operation) -> bool {
        if !name.is_empty() || id.is_nil() {
            return self.check(ResourceType::Topic, name.as_str(), operation);
        }
        match self.conn.topic_ids.get(&id) {
            Some(name) => self.check(ResourceType::Topic, name.as_str(), operation),
            None => {
                // Never match an id against name patterns: `topic: "*"` must
                // not let an unknown id through by accident.
                self.unknown_ids.insert(id);
                self.record(
                    ResourceType::Topic,
                    &format!("topic-id:{id}"),
                    operation,
                    Decision {
                        allowed: false,
                        rule: None,
                    },
                )
            }
        }
    }

    fn check_cluster(&mut self, operation: Operation) -> bool {
        self.check(ResourceType::Cluster, CLUSTER_RESOURCE_NAME, operation)
    }

    fn quiet_topic(&self, name: Option<&TopicName>, id: Uuid, operation: Operation) -> bool {
        match name.filter(|n| !n.is_empty()) {
            Some(name) => self.quiet(ResourceType::Topic, name.as_str(), operation),
            None => match self.conn.topic_ids.get(&id) {
                Some(name) => self.quiet(ResourceType::Topic, name.as_str(), operation),
                None => false,
            },
        }
    }

    /// Kafka's "authorized operations" bit field (bit = AclOperation code)
    /// for the operations that apply to this resource type.
    fn authorized_operations(&self, resource: ResourceType, name: &str) -> i32 {
        use Operation::*;
        let applicable: &[(Operation, u8)] = match resource {
            ResourceType::Topic => &[
                (Read, 3),
                (Write, 4),
                (Create, 5),
                (Delete, 6),
                (Alter, 7),
                (Describe, 8),
                (DescribeConfigs, 10),
                (AlterConfigs, 11),
            ],
            ResourceType::Group => &[
                (Read, 3),
                (Delete, 6),
                (Describe, 8),
                (DescribeConfigs, 10),
                (AlterConfigs, 11),
            ],
            ResourceType::TransactionalId => &[(Write, 4), (Describe, 8)],
            ResourceType::Cluster => &[
                (Create, 5),
                (Alter, 7),
                (Describe, 8),
                (ClusterAction, 9),
                (DescribeConfigs, 10),
                (AlterConfigs, 11),
                (IdempotentWrite, 12),
            ],
        };
        applicable
            .iter()
            .filter(|(operation, _)| self.quiet(resource, name, *operation))
            .fold(0i32, |bits, (_, code)| bits | (1 << code))
    }

    fn config_resource(&mut self, resource_type: i8, name: &str, operation: Operation) -> bool {
        match resource_type {
            CONFIG_TOPIC => self.check(ResourceType::Topic, name, operation),
            CONFIG_GROUP => self.check(ResourceType::Group, name, operation),
            _ => self.check_cluster(operation),
        }
    }
}

/// What the per-API evaluation decided.
enum Plan {
    /// Every check passed (or the API is checked on the response).
    Forward,
    /// Some check failed: answer with the refusal built from the request.
    Refuse,
    /// The API names nothing this filter knows how to check.
    Unmapped,
}

/// Checks every resource an all-or-nothing request names. Produce and
/// Metadata are handled by the filter itself.
fn evaluate(c: &mut Checker<'_>, body: &RequestKind) -> Plan {
    use Operation::*;
    use ResourceType::{Group, TransactionalId as Txn};
    let mut ok = true;
    // `&=` on purpose: every resource is checked (and audited), not just up
    // to the first denial, as Kafka does.
    match body {
        RequestKind::Fetch(req) => {
            if req.replica_id.0 >= 0 || req.replica_state.replica_id.0 >= 0 {
                ok &= c.check_cluster(ClusterAction);
            }
            for topic in &req.topics {
                ok &= c.check_topic(&topic.topic, topic.topic_id, Read);
            }
        }
        RequestKind::ListOffsets(req) => {
            for topic in &req.topics {
                ok &= c.check(ResourceType::Topic, &topic.name, Describe);
            }
        }
        RequestKind::OffsetForLeaderEpoch(req) => {
            if req.replica_id.0 >= 0 {
                ok &= c.check_cluster(ClusterAction);
            }
            for topic in &req.topics {
                ok &= c.check(ResourceType::Topic, &topic.topic, Describe);
            }
        }
        RequestKind::OffsetCommit(req) => {
            ok &= c.check(Group, &req.group_id, Read);
            for topic in &req.topics {
                ok &= c.check_topic(&topic.name, topic.topic_id, Read);
            }
        }
        RequestKind::OffsetFetch(req) => {
            if req.groups.is_empty() {
                ok &= c.check(Group, &req.group_id, Describe);
                for topic in req.topics.iter().flatten() {
                    ok &= c.check(ResourceType::Topic, &topic.name, Describe);
                }
            }
            for group in &req.groups {
                ok &= c.check(Group, &group.group_id, Describe);
                for topic in group.topics.iter().flatten() {
                    ok &= c.check_topic(&topic.name, topic.topic_id, Describe);
                }
            }
        }
        RequestKind::FindCoordinator(req) => {
            let keys: Vec<&str> = if req.coordinator_keys.is_empty() {
                vec![req.key.as_str()]
            } else {
                req.coordinator_keys.iter().map(|k| k.as_str()).collect()
            };
            for key in keys {
                ok &= match req.key_type {
                    0 => c.check(Group, key, Describe),
                    1 => c.check(Txn, key, Describe),
                    // Share-group coordinators are for brokers.
                    _ => c.check_cluster(ClusterAction),
                };
            }
        }
        RequestKind::JoinGroup(req) => ok &= c.check(Group, &req.group_id, Read),
        RequestKind::SyncGroup(req) => ok &= c.check(Group, &req.group_id, Read),
        RequestKind::Heartbeat(req) => ok &= c.check(Group, &req.group_id, Read),
        RequestKind::LeaveGroup(req) => ok &= c.check(Group, &req.group_id, Read),
        RequestKind::ConsumerGroupHeartbeat(req) => ok &= c.check(Group, &req.group_id, Read),
        RequestKind::DescribeGroups(req) => {
            for group in &req.groups {
                ok &= c.check(Group, group, Describe);
            }
        }
        RequestKind::ConsumerGroupDescribe(req) => {
            for group in &req.group_ids {
                ok &= c.check(Group, group, Describe);
            }
        }
        // Filtered on the response.
        RequestKind::ListGroups(_) | RequestKind::ListTransactions(_) => {}
        RequestKind::DeleteGroups(req) => {
            for group in &req.groups_names {
                ok &= c.check(Group, group, Delete);
            }
        }
        RequestKind::CreateTopics(req) => {
            let cluster = c.rules.decide_among(
                &c.candidates,
                ResourceType::Cluster,
                CLUSTER_RESOURCE_NAME,
                Create,
                c.now,
            );
            if cluster.allowed {
                c.record(
                    ResourceType::Cluster,
                    CLUSTER_RESOURCE_NAME,
                    Create,
                    cluster,
                );
            } else {
                for topic in &req.topics {
                    ok &= c.check(ResourceType::Topic, &topic.name, Create);
                }
            }
        }
        RequestKind::DeleteTopics(req) => {
            for name in &req.topic_names {
                ok &= c.check(ResourceType::Topic, name, Delete);
            }
            for topic in &req.topics {
                let name = topic.name.clone().unwrap_or_default();
                ok &= c.check_topic(&name, topic.topic_id, Delete);
            }
        }
        RequestKind::DeleteRecords(req) => {
            for topic in &req.topics {
                ok &= c.check(ResourceType::Topic, &topic.name, Delete);
            }
        }
        RequestKind::CreatePartitions(req) => {
            for topic in &req.topics {
                ok &= c.check(ResourceType::Topic, &topic.name, Alter);
            }
        }
        RequestKind::DescribeConfigs(req) => {
            for r in &req.resources {
                ok &= c.config_resource(r.resource_type, &r.resource_name, DescribeConfigs);
            }
        }
        RequestKind::AlterConfigs(req) => {
            for r in &req.resources {
                ok &= c.config_resource(r.resource_type, &r.resource_name, AlterConfigs);
            }
        }
        RequestKind::IncrementalAlterConfigs(req) => {
            for r in &req.resources {
                ok &= c.config_resource(r.resource_type, &r.resource_name, AlterConfigs);
            }
        }
        RequestKind::InitProducerId(req) => match &req.transactional_id {
            Some(id) if !id.is_empty() => ok &= c.check(Txn, id, Write),
            _ => {
                let cluster = c.rules.decide_among(
                    &c.candidates,
                    ResourceType::Cluster,
                    CLUSTER_RESOURCE_NAME,
                    IdempotentWrite,
                    c.now,
                );
                // Kafka >= 3.0: Write on any topic implies IdempotentWrite.
                let decision = if cluster.allowed {
                    cluster
                } else {
                    match c.rules.any_topic_write(&c.candidates, c.now) {
                        Some(rule) => Decision {
                            allowed: true,
                            rule: Some(rule),
                        },
                        None => cluster,
                    }
                };
                ok &= c.record(
                    ResourceType::Cluster,
                    CLUSTER_RESOURCE_NAME,
                    IdempotentWrite,
                    decision,
                );
            }
        },
        RequestKind::AddPartitionsToTxn(req) => {
            if req.transactions.is_empty() {
                ok &= c.check(Txn, &req.v3_and_below_transactional_id, Write);
                for topic in &req.v3_and_below_topics {
                    ok &= c.check(ResourceType::Topic, &topic.name, Write);
                }
            }
            // v4+ (batched) is the broker-to-broker form (KIP-890): Kafka
            // requires ClusterAction and nothing else.
            if !req.transactions.is_empty() {
                ok &= c.check_cluster(ClusterAction);
            }
        }
        RequestKind::AddOffsetsToTxn(req) => {
            ok &= c.check(Txn, &req.transactional_id, Write);
            ok &= c.check(Group, &req.group_id, Read);
        }
        RequestKind::EndTxn(req) => ok &= c.check(Txn, &req.transactional_id, Write),
        RequestKind::TxnOffsetCommit(req) => {
            ok &= c.check(Txn, &req.transactional_id, Write);
            ok &= c.check(Group, &req.group_id, Read);
            for topic in &req.topics {
                ok &= c.check(ResourceType::Topic, &topic.name, Read);
            }
        }
        RequestKind::OffsetDelete(req) => {
            ok &= c.check(Group, &req.group_id, Delete);
            for topic in &req.topics {
                ok &= c.check(ResourceType::Topic, &topic.name, Read);
            }
        }
        RequestKind::DescribeProducers(req) => {
            for topic in &req.topics {
                ok &= c.check(ResourceType::Topic, &topic.name, Read);
            }
        }
        RequestKind::DescribeTransactions(req) => {
            for id in &req.transactional_ids {
                ok &= c.check(Txn, id, Describe);
            }
        }
        RequestKind::DescribeTopicPartitions(req) => {
            for topic in &req.topics {
                ok &= c.check(ResourceType::Topic, &topic.name, Describe);
            }
        }
        RequestKind::DescribeCluster(_)
        | RequestKind::DescribeAcls(_)
        | RequestKind::ListPartitionReassignments(_)
        | RequestKind::DescribeLogDirs(_)
        | RequestKind::DescribeUserScramCredentials(_)
        | RequestKind::DescribeQuorum(_) => ok &= c.check_cluster(Describe),
        RequestKind::CreateAcls(_)
        | RequestKind::DeleteAcls(_)
        | RequestKind::AlterPartitionReassignments(_)
        | RequestKind::ElectLeaders(_)
        | RequestKind::AlterReplicaLogDirs(_)
        | RequestKind::AlterUserScramCredentials(_)
        | RequestKind::UpdateFeatures(_) => ok &= c.check_cluster(Alter),
        RequestKind::DescribeClientQuotas(_) | RequestKind::ListConfigResources(_) => {
            ok &= c.check_cluster(DescribeConfigs)
        }
        RequestKind::AlterClientQuotas(_) => ok &= c.check_cluster(AlterConfigs),
        // Broker-to-broker and controller APIs.
        RequestKind::WriteTxnMarkers(_)
        | RequestKind::Envelope(_)
        | RequestKind::Vote(_)
        | RequestKind::BeginQuorumEpoch(_)
        | RequestKind::EndQuorumEpoch(_)
        | RequestKind::AlterPartition(_)
        | RequestKind::FetchSnapshot(_)
        | RequestKind::BrokerRegistration(_)
        | RequestKind::BrokerHeartbeat(_)
        | RequestKind::UnregisterBroker(_)
        | RequestKind::AllocateProducerIds(_)
        | RequestKind::ControllerRegistration(_)
        | RequestKind::AssignReplicasToDirs(_)
        | RequestKind::AddRaftVoter(_)
        | RequestKind::RemoveRaftVoter(_)
        | RequestKind::UpdateRaftVoter(_)
        | RequestKind::InitializeShareGroupState(_)
        | RequestKind::ReadShareGroupState(_)
        | RequestKind::WriteShareGroupState(_)
        | RequestKind::DeleteShareGroupState(_)
        | RequestKind::ReadShareGroupStateSummary(_) => ok &= c.check_cluster(ClusterAction),
        _ => return Plan::Unmapped,
    }
    if ok {
        Plan::Forward
    } else {
        Plan::Refuse
    }
}

/// Entries wait for the broker's answer. An answer that never passes this
/// filter (a later filter answered or the connection broke) would leave its
/// entry behind; far more entries than any client pipelines means that
/// happened, so start over rather than grow without bound.
const MAX_PENDING: usize = 4096;

fn bounded_insert<V>(map: &mut HashMap<i32, V>, key: i32, value: V) {
    if map.len() >= MAX_PENDING {
        tracing::warn!(
            entries = map.len(),
            "dropping stale per-request authorization state"
        );
        map.clear();
    }
    map.insert(key, value);
}

impl AuthorizationFilter {
    fn checker(&mut self, now: SystemTime, api_key: i16) -> Checker<'_> {
        let rules = self.conn.authorizer.rules();
        let candidates = match &self.view {
            Some((cached, candidates)) if Arc::ptr_eq(cached, &rules) => candidates.clone(),
            _ => {
                let candidates: Arc<[u32]> = rules.rules_for(&self.conn.principal).into();
                self.view = Some((rules.clone(), candidates.clone()));
                candidates
            }
        };
        Checker {
            conn: &self.conn,
            rules,
            candidates,
            now,
            api_key,
            denies: Vec::new(),
            code: None,
            unknown_ids: HashSet::new(),
            valid_until: None,
        }
    }

    /// Decides on a request; the deny audit lines are returned so the caller
    /// can wait for room in the audit channel outside the borrow.
    fn decide(
        &mut self,
        now: SystemTime,
        frame: &mut RequestFrame,
    ) -> (RequestVerdict, Vec<AuditRecord>) {
        let api_key = frame.api_key();
        let version = frame.version();
        match frame.body() {
            RequestKind::Produce(_) => self.produce(now, frame),
            RequestKind::Metadata(_) => self.metadata(now, frame),
            body => {
                let mut c = self.checker(now, api_key as i16);
                let plan = evaluate(&mut c, body);
                let verdict = match plan {
                    Plan::Forward => RequestVerdict::Forward,
                    Plan::Refuse => {
                        let code = c.code.unwrap_or(CLUSTER_AUTHORIZATION_FAILED);
                        match responses::refusal(body, version, code, &c.unknown_ids) {
                            Some(response) => RequestVerdict::Respond(Box::new(response)),
                            None => RequestVerdict::Close(format!(
                                "{api_key:?} denied by authorization (no error shape for this API)"
                            )),
                        }
                    }
                    Plan::Unmapped => match c.rules.unknown_api_keys() {
                        UnknownApiKeys::Allow => {
                            tracing::warn!(?api_key, principal = %c.conn.principal_name, "forwarding an API key authorization does not cover (unknown_api_keys: allow)");
                            RequestVerdict::Forward
                        }
                        UnknownApiKeys::Deny => {
                            c.record(
                                ResourceType::Cluster,
                                CLUSTER_RESOURCE_NAME,
                                Operation::All,
                                Decision {
                                    allowed: false,
                                    rule: None,
                                },
                            );
                            RequestVerdict::Close(format!(
                                "{api_key:?} is not covered by authorization (fail closed)"
                            ))
                        }
                    },
                };
                let denies = std::mem::take(&mut c.denies);
                // Fetch sessions let a broker keep serving partitions a client
                // no longer names, which would bypass re-authorization (and
                // expiring leases). Forcing sessionless full fetches makes
                // every request name every partition it reads.
                if matches!(verdict, RequestVerdict::Forward) {
                    if let RequestKind::Fetch(req) = frame.body() {
                        if version >= 7 && (req.session_id != 0 || req.session_epoch != -1) {
                            if let RequestKind::Fetch(req) = frame.body_mut() {
                                req.session_id = 0;
                                req.session_epoch = -1;
                                req.forgotten_topics_data.clear();
                            }
                        }
                    }
                    // A Fetch allowed just before a Read lease ends would otherwise
                    // long-poll past its end (max_wait_ms, 500 ms by default) and
                    // return records written after it: the broker must answer
                    // LEASE_FETCH_MARGIN before the lease ends, and a Fetch in the
                    // last margin waits for the end and is decided again.
                    if let (Some(end), RequestKind::Fetch(req)) = (c.valid_until, frame.body()) {
                        let left = end.duration_since(now).unwrap_or_default();
                        match left.checked_sub(LEASE_FETCH_MARGIN) {
                            Some(wait) if !wait.is_zero() => {
                                let wait = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
                                if wait < req.max_wait_ms {
                                    if let RequestKind::Fetch(req) = frame.body_mut() {
                                        req.max_wait_ms = wait;
                                    }
                                }
                            }
                            _ => self.hold_until = Some(end),
                        }
                    }
                }
                (verdict, denies)
            }
        }
    }

    fn produce(
        &mut self,
        now: SystemTime,
        frame: &mut RequestFrame,
    ) -> (RequestVerdict, Vec<AuditRecord>) {
        let correlation_id = frame.correlation_id();
        let version = frame.version();
        let RequestKind::Produce(req) = frame.body() else {
            unreachable!("produce() is only called for Produce requests")
        };
        let mut c = self.checker(now, ApiKey::Produce as i16);
        let txn_ok = match &req.transactional_id {
            Some(id) => c.check(ResourceType::TransactionalId, id, Operation::Write),
            None => true,
        };
        let allowed: Vec<bool> = req
            .topic_data
            .iter()
            .map(|topic| c.check_topic(&topic.name, topic.topic_id, Operation::Write))
            .collect();
        let acks = req.acks;
        let unknown_ids = std::mem::take(&mut c.unknown_ids);
        let denies = std::mem::take(&mut c.denies);
        let all = allowed.iter().all(|a| *a);
        let none = !allowed.iter().any(|a| *a);
        if txn_ok && all {
            return (RequestVerdict::Forward, denies);
        }
        if !txn_ok || none {
            let code = if txn_ok {
                TOPIC_AUTHORIZATION_FAILED
            } else {
                TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            };
            let response = responses::refusal(frame.body(), version, code, &unknown_ids)
                .expect("Produce has a refusal shape");
            return (RequestVerdict::Respond(Box::new(response)), denies);
        }
        if acks == 0 {
            // No answer to merge errors into; a broker closes the connection
            // of an acks=0 producer on error, so do the same.
            return (
                RequestVerdict::Close("acks=0 produce to a denied topic".into()),
                denies,
            );
        }
        // Mixed: forward the allowed topics, answer the others ourselves.
        let RequestKind::Produce(req) = frame.body_mut() else {
            unreachable!()
        };
        let mut denied = Vec::new();
        let mut flags = allowed.into_iter();
        req.topic_data.retain(|topic| {
            let keep = flags.next().unwrap_or(false);
            if !keep {
                let code = if !topic.topic_id.is_nil() && unknown_ids.contains(&topic.topic_id) {
                    UNKNOWN_TOPIC_ID
                } else {
                    TOPIC_AUTHORIZATION_FAILED
                };
                denied.push(responses::produce_topic_error(topic, code));
            }
            keep
        });
        bounded_insert(&mut self.produce_pending, correlation_id, denied);
        (RequestVerdict::Forward, denies)
    }

    fn metadata(
        &mut self,
        now: SystemTime,
        frame: &mut RequestFrame,
    ) -> (RequestVerdict, Vec<AuditRecord>) {
        let correlation_id = frame.correlation_id();
        let version = frame.version();
        let RequestKind::Metadata(req) = frame.body() else {
            unreachable!("metadata() is only called for Metadata requests")
        };
        let mut c = self.checker(now, ApiKey::Metadata as i16);
        // v0: an empty list means all topics; v1+: null means all topics.
        let explicit = match &req.topics {
            Some(topics) => !(topics.is_empty() && version == 0),
            None => false,
        };
        let mut disable_auto_create = false;
        if explicit {
            let cluster_create = c.quiet(
                ResourceType::Cluster,
                CLUSTER_RESOURCE_NAME,
                Operation::Create,
            );
            for topic in req.topics.iter().flatten() {
                let name = match &topic.name {
                    Some(name) if !name.is_empty() => Some(name.clone()),
                    _ => c.conn.topic_ids.get(&topic.topic_id),
                };
                // Unknown ids are settled on the answer, which names them.
                if let Some(name) = name {
                    c.check(ResourceType::Topic, &name, Operation::Describe);
                    if req.allow_auto_topic_creation
                        && !cluster_create
                        && !c.quiet(ResourceType::Topic, &name, Operation::Create)
                    {
                        disable_auto_create = true;
                    }
                }
            }
        }
        let denies = std::mem::take(&mut c.denies);
        if disable_auto_create {
            if let RequestKind::Metadata(req) = frame.body_mut() {
                req.allow_auto_topic_creation = false;
            }
        }
        bounded_insert(&mut self.metadata_explicit, correlation_id, explicit);
        (RequestVerdict::Forward, denies)
    }

    fn filter_response(&mut self, now: SystemTime, frame: &mut ResponseFrame) {
        let correlation_id = frame.correlation_id();
        let api_key = frame.api_key();
        match api_key {
            ApiKey::Produce => {
                if let Some(denied) = self.produce_pending.remove(&correlation_id) {
                    if let ResponseKind::Produce(response) = frame.body_mut() {
                        response.responses.extend(denied);
                    }
                }
            }
            ApiKey::Metadata => {
                let explicit = self
                    .metadata_explicit
                    .remove(&correlation_id)
                    .unwrap_or(false);
                let ResponseKind::Metadata(response) = frame.body() else {
                    return;
                };
                self.conn.topic_ids.learn(response);
                let c = self.checker(now, api_key as i16);
                let hidden: Vec<bool> = response
                    .topics
                    .iter()
                    .map(|t| !c.quiet_topic(t.name.as_ref(), t.topic_id, Operation::Describe))
                    .collect();
                // The broker computed "authorized operations" for the edge's
                // own identity; when the client asked for them, answer with
                // what the edge's rules allow this principal instead.
                let topic_ops: Vec<Option<i32>> = response
                    .topics
                    .iter()
                    .map(|t| {
                        (t.topic_authorized_operations != OPERATIONS_NOT_REQUESTED)
                            .then(|| {
                                t.name
                                    .as_ref()
                                    .map(|n| c.authorized_operations(ResourceType::Topic, n))
                            })
                            .flatten()
                    })
                    .collect();
                let cluster_ops = (response.cluster_authorized_operations
                    != OPERATIONS_NOT_REQUESTED)
                    .then(|| c.authorized_operations(ResourceType::Cluster, CLUSTER_RESOURCE_NAME));
                if !hidden.iter().any(|h| *h)
                    && topic_ops.iter().all(Option::is_none)
                    && cluster_ops.is_none()
                {
                    return;
                }
                let ResponseKind::Metadata(response) = frame.body_mut() else {
                    return;
                };
                if let Some(ops) = cluster_ops {
                    response.cluster_authorized_operations = ops;
                }
                for (topic, ops) in response.topics.iter_mut().zip(topic_ops) {
                    if let Some(ops) = ops {
                        topic.topic_authorized_operations = ops;
                    }
                }
                let topics = std::mem::take(&mut response.topics);
                response.topics = topics
                    .into_iter()
                    .zip(hidden)
                    .filter_map(|(topic, hidden)| match (hidden, explicit) {
                        (false, _) => Some(topic),
                        // Named in the request: say it is not allowed, as Kafka does.
                        (true, true) => Some(
                            metadata_response::MetadataResponseTopic::default()
                                .with_name(topic.name)
                                .with_error_code(TOPIC_AUTHORIZATION_FAILED),
                        ),
                        (true, false) => None,
                    })
                    .collect();
            }
            ApiKey::DescribeCluster => {
                let c = self.checker(now, api_key as i16);
                let ResponseKind::DescribeCluster(response) = frame.body() else {
                    return;
                };
                if response.cluster_authorized_operations == OPERATIONS_NOT_REQUESTED {
                    return;
                }
                let ops = c.authorized_operations(ResourceType::Cluster, CLUSTER_RESOURCE_NAME);
                if let ResponseKind::DescribeCluster(response) = frame.body_mut() {
                    response.cluster_authorized_operations = ops;
                }
            }
            ApiKey::DescribeGroups | ApiKey::ConsumerGroupDescribe => {
                let c = self.checker(now, api_key as i16);
                let ops: Vec<Option<i32>> = match frame.body() {
                    ResponseKind::DescribeGroups(r) => r
                        .groups
                        .iter()
                        .map(|g| {
                            (g.authorized_operations != OPERATIONS_NOT_REQUESTED)
                                .then(|| c.authorized_operations(ResourceType::Group, &g.group_id))
                        })
                        .collect(),
                    ResponseKind::ConsumerGroupDescribe(r) => r
                        .groups
                        .iter()
                        .map(|g| {
                            (g.authorized_operations != OPERATIONS_NOT_REQUESTED)
                                .then(|| c.authorized_operations(ResourceType::Group, &g.group_id))
                        })
                        .collect(),
                    _ => return,
                };
                if ops.iter().all(Option::is_none) {
                    return;
                }
                match frame.body_mut() {
                    ResponseKind::DescribeGroups(r) => {
                        for (g, ops) in r.groups.iter_mut().zip(ops) {
                            if let Some(ops) = ops {
                                g.authorized_operations = ops;
                            }
                        }
                    }
                    ResponseKind::ConsumerGroupDescribe(r) => {
                        for (g, ops) in r.groups.iter_mut().zip(ops) {
                            if let Some(ops) = ops {
                                g.authorized_operations = ops;
                            }
                        }
                    }
                    _ => {}
                }
            }
            ApiKey::ListGroups => {
                let c = self.checker(now, api_key as i16);
                if c.quiet(
                    ResourceType::Cluster,
                    CLUSTER_RESOURCE_NAME,
                    Operation::Describe,
                ) {
                    return;
                }
                let ResponseKind::ListGroups(response) = frame.body() else {
                    return;
                };
                let keep: Vec<bool> = response
                    .groups
                    .iter()
                    .map(|g| c.quiet(ResourceType::Group, &g.group_id, Operation::Describe))
                    .collect();
                if keep.iter().all(|k| *k) {
                    return;
                }
                if let ResponseKind::ListGroups(response) = frame.body_mut() {
                    let mut keep = keep.into_iter();
                    response.groups.retain(|_| keep.next().unwrap_or(false));
                }
            }
            ApiKey::ListTransactions => {
                let c = self.checker(now, api_key as i16);
                let ResponseKind::ListTransactions(response) = frame.body() else {
                    return;
                };
                let keep: Vec<bool> = response
                    .transaction_states
                    .iter()
                    .map(|t| {
                        c.quiet(
                            ResourceType::TransactionalId,
                            &t.transactional_id,
                            Operation::Describe,
                        )
                    })
                    .collect();
                if keep.iter().all(|k| *k) {
                    return;
                }
                if let ResponseKind::ListTransactions(response) = frame.body_mut() {
                    let mut keep = keep.into_iter();
                    response
                        .transaction_states
                        .retain(|_| keep.next().unwrap_or(false));
                }
            }
            ApiKey::OffsetFetch => {
                // Requests naming topics were checked; this hides the topics
                // of "all committed offsets" answers.
                let c = self.checker(now, api_key as i16);
                let ResponseKind::OffsetFetch(response) = frame.body() else {
                    return;
                };
                let keep_topics: Vec<bool> = response
                    .topics
                    .iter()
                    .map(|t| c.quiet_topic(Some(&t.name), Uuid::nil(), Operation::Describe))
                    .collect();
                let keep_groups: Vec<Vec<bool>> = response
                    .groups
                    .iter()
                    .map(|g| {
                        g.topics
                            .iter()
                            .map(|t| c.quiet_topic(Some(&t.name), t.topic_id, Operation::Describe))
                            .collect()
                    })
                    .collect();
                if keep_topics
                    .iter()
                    .chain(keep_groups.iter().flatten())
                    .all(|k| *k)
                {
                    return;
                }
                if let ResponseKind::OffsetFetch(response) = frame.body_mut() {
                    let mut keep = keep_topics.into_iter();
                    response.topics.retain(|_| keep.next().unwrap_or(false));
                    for (group, keep) in response.groups.iter_mut().zip(keep_groups) {
                        let mut keep = keep.into_iter();
                        group.topics.retain(|_| keep.next().unwrap_or(false));
                    }
                }
            }
            ApiKey::DescribeTopicPartitions => {
                let c = self.checker(now, api_key as i16);
                let ResponseKind::DescribeTopicPartitions(response) = frame.body() else {
                    return;
                };
                let keep: Vec<bool> = response
                    .topics
                    .iter()
                    .map(|t| c.quiet_topic(t.name.as_ref(), t.topic_id, Operation::Describe))
                    .collect();
                if keep.iter().all(|k| *k) {
                    return;
                }
                if let ResponseKind::DescribeTopicPartitions(response) = frame.body_mut() {
                    let mut keep = keep.into_iter();
                    response.topics.retain(|_| keep.next().unwrap_or(false));
                }
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Filter for AuthorizationFilter {
    fn name(&self) -> &'static str {
        "authorization"
    }

    fn request_keys(&self) -> ApiKeySet {
        self.request_keys
    }

    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&RESPONSE_KEYS)
    }

    async fn on_request(
        &mut self,
        ctx: &FilterContext<'_>,
        frame: &mut RequestFrame,
    ) -> RequestVerdict {
        let (mut verdict, mut denies) = self.decide(ctx.now, frame);
        // Each pass decides at a later time, so the lease that held it has
        // ended by then: this ends after as many passes as rules end soon.
        while let Some(end) = self.hold_until.take() {
            if let Ok(wait) = end.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            let now = SystemTime::now().max(end);
            (verdict, denies) = self.decide(now, frame);
        }
        for record in denies {
            self.conn.audit.record_deny(record).await;
        }
        verdict
    }

    async fn on_response(
        &mut self,
        ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        self.filter_response(ctx.now, frame);
        ResponseVerdict::Forward
    }
}

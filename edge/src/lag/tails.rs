//! The Kafka reads of a replication-lag check: every partition's end offset
//! and last data record, for a list of topics of one cluster. Requests go
//! to each partition's leader (ListOffsets and Fetch must), one connection
//! per leader, one request per leader and kind.

use std::collections::BTreeMap;

use bytes::Bytes;
use strait_edge_config::HostPort;
use strait_encryption::keys::{last_record, next_offset, LastRecord};
use strait_kafka::kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use strait_kafka::kafka_protocol::messages::list_offsets_request::{
    ListOffsetsPartition, ListOffsetsTopic,
};
use strait_kafka::kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use strait_kafka::kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, ListOffsetsRequest, MetadataRequest, MetadataResponse,
    RequestKind, ResponseKind, TopicName,
};
use strait_kafka::kafka_protocol::protocol::StrBytes;
use strait_proxy::own_conn::OwnConn;
use strait_proxy::upstream::{Upstream, UpstreamTarget};

const CLIENT_ID: &str = "strait-edge-lag";
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
/// How far back from the end the last data record is looked for (control
/// records of transactions take offsets too).
const TAIL_SPAN: i64 = 64;
const FETCH_BYTES: i32 = 4 << 20;
/// Fetches per partition before giving up on reaching its end.
const MAX_FETCHES: usize = 8;

/// One partition's end and last data record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// The high watermark (read_uncommitted ListOffsets latest).
    pub end: i64,
    /// The log start offset.
    pub start: i64,
    /// The last data record between `max(start, end - 64)` and `end`.
    pub last: Option<LastRecord>,
}

pub type Tails = BTreeMap<(String, i32), Tail>;

fn name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_string()))
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// One Metadata request at the bootstrap: `topics` None asks for all.
async fn metadata(
    upstream: &dyn Upstream,
    topics: Option<Vec<MetadataRequestTopic>>,
) -> Result<MetadataResponse, String> {
    let mut conn = OwnConn::open(upstream, &UpstreamTarget::Bootstrap, CLIENT_ID)
        .await
        .map_err(|e| err("Metadata", e))?;
    let req = MetadataRequest::default()
        .with_topics(topics)
        .with_allow_auto_topic_creation(false);
    match conn
        .call(ApiKey::Metadata, 12, RequestKind::Metadata(req))
        .await
        .map_err(|e| err("Metadata", e))?
    {
        ResponseKind::Metadata(resp) => Ok(resp),
        _ => Err("Metadata answered with another message".into()),
    }
}

/// The topics of the cluster, with `is_internal` Kafka's own view.
pub async fn topic_names(upstream: &dyn Upstream) -> Result<Vec<(String, bool)>, String> {
    let resp = metadata(upstream, None).await?;
    Ok(resp
        .topics
        .iter()
        .filter(|t| t.error_code == 0)
        .filter_map(|t| Some((t.name.as_ref()?.0.to_string(), t.is_internal)))
        .collect())
}

/// The partitions of `topics` grouped by their leader, with its address; a
/// topic the cluster does not have is left out.
pub struct Leaders(Vec<(UpstreamTarget, BTreeMap<String, Vec<i32>>)>);

impl Leaders {
    pub async fn of(upstream: &dyn Upstream, topics: &[String]) -> Result<Self, String> {
        if topics.is_empty() {
            return Ok(Leaders(Vec::new()));
        }
        let wanted = topics
            .iter()
            .map(|t| MetadataRequestTopic::default().with_name(Some(name(t))))
            .collect();
        let meta = metadata(upstream, Some(wanted)).await?;
        let brokers: BTreeMap<i32, HostPort> = meta
            .brokers
            .iter()
            .filter_map(|b| {
                Some((
                    b.node_id.0,
                    HostPort {
                        host: b.host.to_string(),
                        port: u16::try_from(b.port).ok()?,
                    },
                ))
            })
            .collect();
        // leader -> topic -> partitions
        let mut by_leader: BTreeMap<i32, BTreeMap<String, Vec<i32>>> = BTreeMap::new();
        for t in &meta.topics {
            let Some(topic) = t.name.as_ref().map(|n| n.0.to_string()) else {
                continue;
            };
            match t.error_code {
                0 => {}
                UNKNOWN_TOPIC_OR_PARTITION => continue,
                code => return Err(format!("Metadata of {topic}: error code {code}")),
            }
            for p in &t.partitions {
                if p.leader_id.0 < 0 {
                    return Err(format!("{topic}-{} has no leader", p.partition_index));
                }
                by_leader
                    .entry(p.leader_id.0)
                    .or_default()
                    .entry(topic.clone())
                    .or_default()
                    .push(p.partition_index);
            }
        }
        let mut out = Vec::new();
        for (leader, topics) in by_leader {
            let address = brokers
                .get(&leader)
                .cloned()
                .ok_or_else(|| format!("leader {leader} is not among the brokers"))?;
            let target = UpstreamTarget::Broker {
                node_id: leader,
                address,
            };
            out.push((target, topics));
        }
        Ok(Leaders(out))
    }

    /// Each leader, and the partitions it leads by topic.
    pub fn iter(&self) -> impl Iterator<Item = &(UpstreamTarget, BTreeMap<String, Vec<i32>>)> {
        self.0.iter()
    }
}

/// The tails of every partition of `topics`; a topic the cluster does not
/// have is absent from the answer.
pub async fn tails(upstream: &dyn Upstream, topics: &[String]) -> Result<Tails, String> {
    let mut out = Tails::new();
    for (target, topics) in Leaders::of(upstream, topics).await?.iter() {
        let mut conn = OwnConn::open(upstream, target, CLIENT_ID)
            .await
            .map_err(|e| err("ListOffsets", e))?;
        let ends = list_offsets(&mut conn, topics, -1).await?;
        let starts = list_offsets(&mut conn, topics, -2).await?;
        for (key, end) in ends {
            let start = starts.get(&key).copied().unwrap_or(0);
            let last = last_data_record(&mut conn, &key.0, key.1, start, end).await?;
            out.insert(key, Tail { end, start, last });
        }
    }
    Ok(out)
}

/// `timestamp` -1: the end (high watermark), -2: the log start, else the
/// first offset whose record's timestamp is at or after it (-1 when none is).
pub async fn list_offsets(
    conn: &mut OwnConn,
    topics: &BTreeMap<String, Vec<i32>>,
    timestamp: i64,
) -> Result<BTreeMap<(String, i32), i64>, String> {
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_isolation_level(0)
        .with_topics(
            topics
                .iter()
                .map(|(t, parts)| {
                    ListOffsetsTopic::default()
                        .with_name(name(t))
                        .with_partitions(
                            parts
                                .iter()
                                .map(|p| {
                                    ListOffsetsPartition::default()
                                        .with_partition_index(*p)
                                        .with_current_leader_epoch(-1)
                                        .with_timestamp(timestamp)
                                })
                                .collect(),
                        )
                })
                .collect(),
        );
    let ResponseKind::ListOffsets(resp) = conn
        .call(ApiKey::ListOffsets, 7, RequestKind::ListOffsets(req))
        .await
        .map_err(|e| err("ListOffsets", e))?
    else {
        return Err("ListOffsets answered with another message".into());
    };
    let mut out = BTreeMap::new();
    for t in &resp.topics {
        for p in &t.partitions {
            if p.error_code != 0 {
                return Err(format!(
                    "ListOffsets of {}-{}: error code {}",
                    t.name.0, p.partition_index, p.error_code
                ));
            }
            out.insert((t.name.0.to_string(), p.partition_index), p.offset);
        }
    }
    Ok(out)
}

async fn last_data_record(
    conn: &mut OwnConn,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
) -> Result<Option<LastRecord>, String> {
    let mut offset = start.max(end - TAIL_SPAN);
    let mut last = None;
    for _ in 0..MAX_FETCHES {
        if offset >= end {
            return Ok(last);
        }
        let records = fetch(conn, topic, partition, offset).await?;
        if records.is_empty() {
            return Ok(last);
        }
        if let Some(r) = last_record(&records)? {
            if r.0 < end {
                last = Some(r);
            }
        }
        match next_offset(&records) {
            Some(next) if next > offset => offset = next,
            _ => return Ok(last),
        }
    }
    Err(format!(
        "{topic}-{partition}: the end ({end}) not reached in {MAX_FETCHES} fetches"
    ))
}

async fn fetch(
    conn: &mut OwnConn,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Bytes, String> {
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(FETCH_BYTES)
        .with_isolation_level(0)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(partition)
                .with_current_leader_epoch(-1)
                .with_fetch_offset(offset)
                .with_last_fetched_epoch(-1)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(FETCH_BYTES)])]);
    let ResponseKind::Fetch(resp) = conn
        .call(ApiKey::Fetch, 12, RequestKind::Fetch(req))
        .await
        .map_err(|e| err("Fetch", e))?
    else {
        return Err("Fetch answered with another message".into());
    };
    if resp.error_code != 0 {
        return Err(format!("Fetch: error code {}", resp.error_code));
    }
    let p = resp
        .responses
        .first()
        .and_then(|t| t.partitions.first())
        .ok_or_else(|| "Fetch named no partition".to_string())?;
    if p.error_code != 0 {
        return Err(format!(
            "Fetch of {topic}-{partition} at {offset}: error code {}",
            p.error_code
        ));
    }
    Ok(p.records.clone().unwrap_or_default())
}

//! The keys topic of a virtual cluster, over the cluster's own upstream.
//!
//! Record encryption keeps every realm's wrap of every federated DEK in a
//! compacted topic of the cluster that holds the data (see
//! `edge/encryption/FORMAT.md`, "Federation"), so that replication copies
//! the wraps with the records. This crate is the Kafka IO behind it: it
//! writes entries to the cluster's keys topic (creating it compacted, one
//! partition, the broker's default replication factor) and follows that
//! topic and the other sites' keys topics as mirrored here, feeding what it
//! reads into the encryption core's index. It connects to the brokers as the
//! virtual cluster's clients are connected (TLS, SASL), never as a client.

#![forbid(unsafe_code)]

mod follow;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, CreateTopicsRequest, MetadataRequest, ProduceRequest, RequestKind, ResponseKind,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use strait_edge_config::HostPort;
use strait_proxy::upstream::{Upstream, UpstreamTarget};
use tokio_util::sync::DropGuard;

use strait_proxy::own_conn::{OwnConn as Conn, OwnConnError};

/// The keys topic's connections name it in the brokers' logs.
pub(crate) const CLIENT_ID: &str = "strait-edge-keys";
pub use follow::spawn_followers;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{what} failed with Kafka error code {code}")]
    Kafka { what: &'static str, code: i16 },
    #[error("topic {0} has no leader yet")]
    NoLeader(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl From<OwnConnError> for Error {
    fn from(e: OwnConnError) -> Self {
        match e {
            OwnConnError::Connect(m) => Error::Connect(m),
            OwnConnError::Io(e) => Error::Io(e),
            OwnConnError::Protocol(m) => Error::Protocol(m),
        }
    }
}

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const TOPIC_ALREADY_EXISTS: i16 = 36;
/// How long one write may take, creation of the topic included.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

fn topic_name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_string()))
}

/// The leader of partition 0 of `topic`; `None` when the topic does not exist.
pub async fn leader(
    upstream: &dyn Upstream,
    topic: &str,
) -> Result<Option<(i32, HostPort)>, Error> {
    let mut conn = Conn::open(upstream, &UpstreamTarget::Bootstrap, CLIENT_ID).await?;
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(topic_name(topic)))
        ]))
        .with_allow_auto_topic_creation(false);
    let ResponseKind::Metadata(resp) = conn
        .call(ApiKey::Metadata, 12, RequestKind::Metadata(req))
        .await?
    else {
        return Err(Error::Protocol(
            "Metadata answered with another message".into(),
        ));
    };
    let Some(t) = resp.topics.first() else {
        return Err(Error::Protocol("Metadata named no topic".into()));
    };
    match t.error_code {
        0 => {}
        UNKNOWN_TOPIC_OR_PARTITION => return Ok(None),
        code => {
            return Err(Error::Kafka {
                what: "Metadata",
                code,
            })
        }
    }
    let leader = t
        .partitions
        .iter()
        .find(|p| p.partition_index == 0)
        .map(|p| p.leader_id.0)
        .filter(|id| *id >= 0)
        .ok_or_else(|| Error::NoLeader(topic.to_string()))?;
    let broker = resp
        .brokers
        .iter()
        .find(|b| b.node_id.0 == leader)
        .ok_or_else(|| Error::NoLeader(topic.to_string()))?;
    Ok(Some((
        leader,
        HostPort {
            host: broker.host.to_string(),
            port: u16::try_from(broker.port)
                .map_err(|_| Error::Protocol(format!("broker port {}", broker.port)))?,
        },
    )))
}

async fn create(upstream: &dyn Upstream, topic: &str) -> Result<(), Error> {
    let mut conn = Conn::open(upstream, &UpstreamTarget::Bootstrap, CLIENT_ID).await?;
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(15_000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(topic_name(topic))
            .with_num_partitions(1)
            .with_replication_factor(-1)
            .with_configs(vec![CreatableTopicConfig::default()
                .with_name(StrBytes::from_static_str("cleanup.policy"))
                .with_value(Some(StrBytes::from_static_str("compact")))])]);
    let ResponseKind::CreateTopics(resp) = conn
        .call(ApiKey::CreateTopics, 5, RequestKind::CreateTopics(req))
        .await?
    else {
        return Err(Error::Protocol(
            "CreateTopics answered with another message".into(),
        ));
    };
    match resp.topics.first().map(|t| t.error_code) {
        Some(0) | Some(TOPIC_ALREADY_EXISTS) => {
            tracing::info!(topic, "created the keys topic (compacted)");
            Ok(())
        }
        Some(code) => Err(Error::Kafka {
            what: "CreateTopics",
            code,
        }),
        None => Err(Error::Protocol("CreateTopics named no topic".into())),
    }
}

/// Writes to a virtual cluster's keys topic.
pub struct KeysTopic {
    upstream: Arc<dyn Upstream>,
    topic: String,
    /// Stops the upstream's credential watchers when the last user is gone.
    _guard: Arc<DropGuard>,
}

impl KeysTopic {
    pub fn new(upstream: Arc<dyn Upstream>, topic: String, guard: Arc<DropGuard>) -> Self {
        Self {
            upstream,
            topic,
            _guard: guard,
        }
    }

    async fn leader_or_create(&self) -> Result<(i32, HostPort), Error> {
        let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
        let mut created = false;
        loop {
            match leader(self.upstream.as_ref(), &self.topic).await {
                Ok(Some(l)) => return Ok(l),
                Ok(None) if !created => {
                    create(self.upstream.as_ref(), &self.topic).await?;
                    created = true;
                }
                Ok(None) | Err(Error::NoLeader(_)) => {}
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NoLeader(self.topic.clone()));
            }
            // A new topic's leader is elected within milliseconds.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn produce(&self, records: Vec<(Bytes, Option<Bytes>)>) -> Result<(), Error> {
        let (node_id, address) = self.leader_or_create().await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let recs: Vec<Record> = records
            .into_iter()
            .enumerate()
            .map(|(i, (key, value))| Record {
                transactional: false,
                control: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: -1,
                timestamp: now,
                key: Some(key),
                value,
                headers: Default::default(),
                delete_horizon: false,
            })
            .collect();
        let mut batch = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut batch,
            &recs,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .map_err(|e| Error::Protocol(format!("cannot encode the batch: {e}")))?;
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(15_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic_name(&self.topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(batch.freeze()))])]);
        let mut conn = Conn::open(
            self.upstream.as_ref(),
            &UpstreamTarget::Broker { node_id, address },
            CLIENT_ID,
        )
        .await?;
        let ResponseKind::Produce(resp) = conn
            .call(ApiKey::Produce, 9, RequestKind::Produce(req))
            .await?
        else {
            return Err(Error::Protocol(
                "Produce answered with another message".into(),
            ));
        };
        let code = resp
            .responses
            .first()
            .and_then(|t| t.partition_responses.first())
            .map(|p| p.error_code)
            .ok_or_else(|| Error::Protocol("Produce named no partition".into()))?;
        if code != 0 {
            return Err(Error::Kafka {
                what: "Produce",
                code,
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl strait_encryption::KeyLog for KeysTopic {
    async fn publish(&self, records: Vec<(Bytes, Option<Bytes>)>) -> Result<(), String> {
        match tokio::time::timeout(PUBLISH_TIMEOUT * 2, self.produce(records)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("keys topic {}: {e}", self.topic)),
            Err(_) => Err(format!(
                "keys topic {}: {}",
                self.topic,
                Error::Timeout(PUBLISH_TIMEOUT * 2)
            )),
        }
    }
}

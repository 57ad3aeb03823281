//! The produce fence of a planned switchover: while a FailoverGroup's
//! produce is fenced, every Produce is answered by the edge, with an error
//! certain not to have been written, so nothing new reaches the active
//! cluster while replication catches up, and clients (librdkafka, the Java
//! client) retry the same records once the switch has happened. Fetch and
//! every other API pass: consumers keep reading the active cluster
//! meanwhile.
//!
//! The error is `NOT_LEADER_OR_FOLLOWER`, except for the first batch the
//! fence sees of each idempotent producer (outside a transaction), which is
//! answered `UNKNOWN_PRODUCER_ID`: librdkafka then bumps its epoch once and
//! renumbers its records from sequence 0, which whichever cluster comes
//! next accepts, including one that holds the producer's state from before
//! (a planned failback), where its old sequence would be refused as out of
//! order. librdkafka accepts `UNKNOWN_PRODUCER_ID` only as the first error
//! of a batch, so it must come first, and only once: after it, the fence's
//! other answers do not matter, since the bump resets every partition's
//! sequence. The Java client, given no log start offset, retries as for
//! `NOT_LEADER_OR_FOLLOWER`.
//!
//! The filter is installed on the connections opened after the fence was
//! raised; the edge drains the connections opened before it (as for a
//! switch), so no connection produces around the fence.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use strait_filter::{
    ApiKeySet, ConnectionInfo, Filter, FilterContext, FilterFactory, RequestFrame, RequestVerdict,
};
use strait_kafka::kafka_protocol::messages::{ApiKey, ProduceResponse, RequestKind, ResponseKind};
use strait_kafka::produce_answer::refuse_produce;
use strait_kafka::ProducerFields;

/// Retriable, and certain not to have been written: the client refreshes
/// metadata and resends, unlike after a timeout, which may have been.
pub const FENCED_ERROR: i16 = 6; // NOT_LEADER_OR_FOLLOWER
/// The first answer to an idempotent producer (see the module's comment).
pub const BUMP_EPOCH_ERROR: i16 = 59; // UNKNOWN_PRODUCER_ID

/// Producer ids remembered per fence; past it, new producers get
/// `FENCED_ERROR` only (told twice, librdkafka would fail).
const MAX_TOLD: usize = 65_536;

/// How long a client is asked to back off, so that a fenced producer does
/// not spin (clients honour `throttle_time_ms` on Produce v1+).
const FENCE_THROTTLE_MS: i32 = 100;

pub struct FenceFilterFactory {
    group: String,
    /// Producer ids answered `BUMP_EPOCH_ERROR`, on any connection.
    told: Arc<Mutex<HashSet<i64>>>,
}

impl FenceFilterFactory {
    pub fn new(group: &str) -> Self {
        Self {
            group: group.to_string(),
            told: Arc::default(),
        }
    }
}

impl FilterFactory for FenceFilterFactory {
    fn create(&self, _connection: &ConnectionInfo) -> Box<dyn Filter> {
        Box::new(FenceFilter {
            group: self.group.clone(),
            told: self.told.clone(),
            warned: false,
        })
    }
}

struct FenceFilter {
    group: String,
    told: Arc<Mutex<HashSet<i64>>>,
    /// One line per connection, not one per request.
    warned: bool,
}

#[async_trait]
impl Filter for FenceFilter {
    fn name(&self) -> &'static str {
        "fence"
    }

    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::Produce])
    }

    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[])
    }

    async fn on_request(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut RequestFrame,
    ) -> RequestVerdict {
        let RequestKind::Produce(req) = frame.body() else {
            return RequestVerdict::Forward;
        };
        if !self.warned {
            self.warned = true;
            tracing::info!(group = %self.group, "produce fenced for a planned switchover; answering NOT_LEADER_OR_FOLLOWER (UNKNOWN_PRODUCER_ID to an idempotent producer's first batch)");
        }
        if req.acks == 0 {
            // No answer is expected, so none can carry the error; a broker
            // closes an acks=0 producer's connection on error, and so do we.
            return RequestVerdict::Close("acks=0 produce while fenced".into());
        }
        let mut told = self.told.lock().unwrap_or_else(|e| e.into_inner());
        let answer = fenced_answer(req, &mut told);
        drop(told);
        RequestVerdict::Respond(Box::new(ResponseKind::Produce(answer)))
    }
}

/// The idempotent producer of a partition's batch, if any.
fn idempotent_producer(
    partition: &strait_kafka::kafka_protocol::messages::produce_request::PartitionProduceData,
) -> Option<i64> {
    let fields = ProducerFields::read(partition.records.as_deref()?)?;
    fields.idempotent_only().then_some(fields.producer_id)
}

fn fenced_answer(
    req: &strait_kafka::kafka_protocol::messages::ProduceRequest,
    told: &mut HashSet<i64>,
) -> ProduceResponse {
    // Producers told to bump their epoch by this answer: every partition
    // of theirs in it says so.
    let mut telling = HashSet::new();
    for partition in req.topic_data.iter().flat_map(|t| &t.partition_data) {
        if let Some(producer) = idempotent_producer(partition) {
            if !told.contains(&producer) && told.len() < MAX_TOLD {
                telling.insert(producer);
            }
        }
    }
    told.extend(&telling);
    refuse_produce(
        req,
        FENCE_THROTTLE_MS,
        |partition| match idempotent_producer(partition) {
            Some(producer) if telling.contains(&producer) => BUMP_EPOCH_ERROR,
            _ => FENCED_ERROR,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_kafka::kafka_protocol::messages::produce_request::{
        PartitionProduceData, TopicProduceData,
    };
    use strait_kafka::kafka_protocol::messages::{ProduceRequest, TopicName};
    use strait_kafka::kafka_protocol::protocol::StrBytes;

    #[test]
    fn every_partition_of_a_fenced_produce_gets_the_retriable_error() {
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str("orders")))
                .with_partition_data(vec![
                    PartitionProduceData::default().with_index(0),
                    PartitionProduceData::default().with_index(3),
                ])]);
        let answer = fenced_answer(&req, &mut HashSet::new());
        let got: Vec<(String, i32, i16, i64)> = answer
            .responses
            .iter()
            .flat_map(|t| {
                t.partition_responses
                    .iter()
                    .map(|p| (t.name.0.to_string(), p.index, p.error_code, p.base_offset))
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("orders".to_string(), 0, FENCED_ERROR, -1),
                ("orders".to_string(), 3, FENCED_ERROR, -1)
            ]
        );
        assert_eq!(answer.throttle_time_ms, FENCE_THROTTLE_MS);
    }

    /// A v2 batch header of this producer (what the fence reads).
    fn batch(producer_id: i64, attributes: i16) -> Vec<u8> {
        let mut b = vec![0u8; 61];
        b[16] = 2;
        b[21..23].copy_from_slice(&attributes.to_be_bytes());
        b[43..51].copy_from_slice(&producer_id.to_be_bytes());
        b
    }

    fn errors(batches: &[(i64, i16)], told: &mut HashSet<i64>) -> Vec<i16> {
        let partitions = batches
            .iter()
            .enumerate()
            .map(|(i, &(producer, attributes))| {
                PartitionProduceData::default()
                    .with_index(i as i32)
                    .with_records(Some(batch(producer, attributes).into()))
            })
            .collect();
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str("orders")))
                .with_partition_data(partitions)]);
        fenced_answer(&req, told).responses[0]
            .partition_responses
            .iter()
            .map(|p| p.error_code)
            .collect()
    }

    #[test]
    fn an_idempotent_producer_is_told_to_bump_its_epoch_once_per_fence() {
        let mut told = HashSet::new();
        // Producer 7 on two partitions, a transactional one, a plain one.
        let first = [(7, 0), (7, 0), (9, 0x10), (-1, 0)];
        assert_eq!(
            errors(&first, &mut told),
            vec![
                BUMP_EPOCH_ERROR,
                BUMP_EPOCH_ERROR,
                FENCED_ERROR,
                FENCED_ERROR
            ]
        );
        // Producer 7 again (any connection of the fence): told already.
        assert_eq!(
            errors(&[(7, 0), (8, 0)], &mut told),
            vec![FENCED_ERROR, BUMP_EPOCH_ERROR]
        );
        assert_eq!(told, HashSet::from([7, 8]));
    }
}

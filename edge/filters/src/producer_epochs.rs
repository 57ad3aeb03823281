//! Idempotent producers across a switch back to a cluster that knows them.
//!
//! An idempotent producer keeps its producer id and epoch across a switch.
//! A cluster with no state for that id takes its batches as they come
//! (Apache Kafka 4.x accepts an unknown producer's first sequence). A
//! cluster that does hold state for the id (the primary after a failback,
//! which keeps the producer's state from before the failover for
//! `producer.id.expiration.ms`) sees a sequence that jumped, by the records
//! written on the standby, and answers `OUT_OF_ORDER_SEQUENCE_NUMBER`.
//! librdkafka takes that error on its first unacknowledged batch as fatal
//! (the Java client bumps its epoch either way).
//!
//! So, on an upstream the edge switched to, the first such answer for a
//! producer (id, epoch) on a partition, before any batch of it succeeded
//! there, is passed to the client as `UNKNOWN_PRODUCER_ID`: the broker holds
//! no state of *this* producer's sequence. Nothing of the batch was written
//! (the broker refused it either way), and clients answer with what KIP-360
//! specifies for a broker that lost a producer's state: they bump the epoch
//! and send the same records again from sequence 0, which the broker
//! accepts. The batches in flight behind it keep their
//! `OUT_OF_ORDER_SEQUENCE_NUMBER`, which clients retry after the bump, and a
//! later such error (after a success, or at the new epoch) passes as the
//! broker sent it. A batch the client had retried (it may be written on the
//! cluster before the switch) stays fatal to librdkafka, rightly.
//! Transactional batches pass: their producer id comes from the coordinator
//! of the cluster they write to.
//!
//! Installed only on upstreams after a switch (generation 1 and later):
//! Produce stays undecoded on the first upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use strait_filter::{
    ApiKeySet, ConnectionInfo, Filter, FilterContext, FilterFactory, RequestFrame, RequestVerdict,
    ResponseFrame, ResponseVerdict,
};
use strait_kafka::kafka_protocol::messages::produce_response::TopicProduceResponse;
use strait_kafka::kafka_protocol::messages::{ApiKey, ProduceRequest, RequestKind, ResponseKind};
use strait_kafka::ProducerFields;

pub const UNKNOWN_PRODUCER_ID: i16 = 59;
pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;

/// Sequences remembered per upstream; past it the map is cleared (a
/// producer seen before is then treated as new once more).
const MAX_KNOWN: usize = 65_536;
/// Produce requests awaiting their answer, per connection (clients keep
/// five in flight; a bound keeps a misbehaving one from growing the map).
const MAX_PENDING: usize = 64;

/// A producer's sequence on one partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Sequence {
    producer_id: i64,
    epoch: i16,
    partition: Partition,
}

/// A partition as a Produce names it (by name before v13, by id from it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Partition {
    topic: String,
    topic_id: u128,
    index: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A batch succeeded here: later errors are the broker's to tell.
    Written,
    /// Told `UNKNOWN_PRODUCER_ID` once.
    Restarted,
}

/// One per upstream generation: a new switch brings a new factory, and with
/// it an empty map.
pub struct ProducerEpochsFactory {
    known: Arc<Mutex<HashMap<Sequence, Seen>>>,
    group: String,
}

impl ProducerEpochsFactory {
    pub fn new(group: &str) -> Self {
        Self {
            known: Arc::default(),
            group: group.to_string(),
        }
    }
}

impl FilterFactory for ProducerEpochsFactory {
    fn create(&self, _connection: &ConnectionInfo) -> Box<dyn Filter> {
        Box::new(ProducerEpochs {
            known: self.known.clone(),
            group: self.group.clone(),
            pending: HashMap::new(),
        })
    }
}

struct ProducerEpochs {
    known: Arc<Mutex<HashMap<Sequence, Seen>>>,
    group: String,
    /// correlation id -> the idempotent sequences its request carries.
    pending: HashMap<i32, Vec<Sequence>>,
}

#[async_trait]
impl Filter for ProducerEpochs {
    fn name(&self) -> &'static str {
        "producer-epochs"
    }

    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::Produce])
    }

    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::Produce])
    }

    async fn on_request(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut RequestFrame,
    ) -> RequestVerdict {
        if let RequestKind::Produce(req) = frame.body() {
            let sequences = sequences(req);
            tracing::debug!(correlation_id = frame.correlation_id(), batches = ?req.topic_data.iter().flat_map(|t| t.partition_data.iter().filter_map(|p| p.records.as_deref().and_then(ProducerFields::read).map(|b| (p.index, b.producer_id, b.producer_epoch, b.base_sequence)))).collect::<Vec<_>>(), "idempotent produce");
            if !sequences.is_empty() && self.pending.len() < MAX_PENDING {
                self.pending.insert(frame.correlation_id(), sequences);
            }
        }
        RequestVerdict::Forward
    }

    async fn on_response(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        let Some(sent) = self.pending.remove(&frame.correlation_id()) else {
            return ResponseVerdict::Forward;
        };
        let ResponseKind::Produce(resp) = frame.body() else {
            return ResponseVerdict::Forward;
        };
        tracing::debug!(correlation_id = frame.correlation_id(), errors = ?resp.responses.iter().flat_map(|t| t.partition_responses.iter().map(|p| (p.index, p.error_code))).collect::<Vec<_>>(), "idempotent produce answered");
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() > MAX_KNOWN {
            known.clear();
        }
        let rewrites = restarts(&resp.responses, &sent, &mut known);
        drop(known);
        if rewrites.is_empty() {
            return ResponseVerdict::Forward;
        }
        tracing::info!(group = %self.group, partitions = rewrites.len(), "an idempotent producer's sequence is out of order on a switched-to upstream; answering UNKNOWN_PRODUCER_ID so that it bumps its epoch");
        if let ResponseKind::Produce(resp) = frame.body_mut() {
            for (t, p) in rewrites {
                resp.responses[t].partition_responses[p].error_code = UNKNOWN_PRODUCER_ID;
            }
        }
        ResponseVerdict::Forward
    }
}

/// The idempotent, non-transactional sequences of a Produce.
fn sequences(req: &ProduceRequest) -> Vec<Sequence> {
    let mut out = Vec::new();
    for topic in &req.topic_data {
        for partition in &topic.partition_data {
            let Some(batch) = partition.records.as_deref().and_then(ProducerFields::read) else {
                continue;
            };
            if !batch.idempotent_only() {
                continue;
            }
            out.push(Sequence {
                producer_id: batch.producer_id,
                epoch: batch.producer_epoch,
                partition: Partition {
                    topic: topic.name.0.to_string(),
                    topic_id: topic.topic_id.as_u128(),
                    index: partition.index,
                },
            });
        }
    }
    out
}

/// Records what the answer says of `sent`, and returns the (topic,
/// partition) positions in the answer whose OUT_OF_ORDER_SEQUENCE_NUMBER is
/// to become UNKNOWN_PRODUCER_ID.
fn restarts(
    answer: &[TopicProduceResponse],
    sent: &[Sequence],
    known: &mut HashMap<Sequence, Seen>,
) -> Vec<(usize, usize)> {
    let mut rewrites = Vec::new();
    for (t, topic) in answer.iter().enumerate() {
        for (p, partition) in topic.partition_responses.iter().enumerate() {
            let at = Partition {
                topic: topic.name.0.to_string(),
                topic_id: topic.topic_id.as_u128(),
                index: partition.index,
            };
            let Some(sequence) = sent.iter().find(|s| s.partition == at) else {
                continue;
            };
            match (partition.error_code, known.get(sequence)) {
                (0, _) => {
                    known.insert(sequence.clone(), Seen::Written);
                }
                (OUT_OF_ORDER_SEQUENCE_NUMBER, None) => {
                    known.insert(sequence.clone(), Seen::Restarted);
                    rewrites.push((t, p));
                }
                _ => {}
            }
        }
    }
    rewrites
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_kafka::kafka_protocol::messages::produce_request::{
        PartitionProduceData, TopicProduceData,
    };
    use strait_kafka::kafka_protocol::messages::produce_response::PartitionProduceResponse;
    use strait_kafka::kafka_protocol::messages::TopicName;
    use strait_kafka::kafka_protocol::protocol::StrBytes;

    /// A v2 batch header (61 bytes) with these producer fields.
    fn batch(producer_id: i64, epoch: i16, base_sequence: i32, transactional: bool) -> Vec<u8> {
        let mut b = vec![0u8; 61];
        b[16] = 2;
        let attributes: i16 = if transactional { 0x10 } else { 0 };
        b[21..23].copy_from_slice(&attributes.to_be_bytes());
        b[43..51].copy_from_slice(&producer_id.to_be_bytes());
        b[51..53].copy_from_slice(&epoch.to_be_bytes());
        b[53..57].copy_from_slice(&base_sequence.to_be_bytes());
        b
    }

    fn orders() -> TopicName {
        TopicName(StrBytes::from_static_str("orders"))
    }

    fn produce(batches: Vec<Vec<u8>>) -> ProduceRequest {
        ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(orders())
                .with_partition_data(
                    batches
                        .into_iter()
                        .enumerate()
                        .map(|(i, b)| {
                            PartitionProduceData::default()
                                .with_index(i as i32)
                                .with_records(Some(b.into()))
                        })
                        .collect(),
                )])
    }

    fn answer(codes: &[i16]) -> Vec<TopicProduceResponse> {
        vec![TopicProduceResponse::default()
            .with_name(orders())
            .with_partition_responses(
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        PartitionProduceResponse::default()
                            .with_index(i as i32)
                            .with_error_code(*c)
                    })
                    .collect(),
            )]
    }

    #[test]
    fn the_first_out_of_order_answer_of_a_sequence_becomes_unknown_producer() {
        let mut known = HashMap::new();
        let sent = sequences(&produce(vec![
            batch(7, 0, 560, false),
            batch(7, 0, 80, false),
        ]));
        assert_eq!(sent.len(), 2);
        // The primary remembers the producer at another sequence on both.
        let oos = OUT_OF_ORDER_SEQUENCE_NUMBER;
        assert_eq!(
            restarts(&answer(&[oos, oos]), &sent, &mut known),
            vec![(0, 0), (0, 1)]
        );
        // The batches pipelined behind: out of order, as the broker said.
        assert_eq!(restarts(&answer(&[oos, oos]), &sent, &mut known), vec![]);
        // The bumped epoch is written; a later error at it is the broker's.
        let bumped = sequences(&produce(vec![batch(7, 1, 0, false)]));
        assert_eq!(restarts(&answer(&[0]), &bumped, &mut known), vec![]);
        assert_eq!(restarts(&answer(&[oos]), &bumped, &mut known), vec![]);
        // Another producer written before its error: passed as it is.
        let other = sequences(&produce(vec![batch(9, 0, 10, false)]));
        assert_eq!(restarts(&answer(&[0]), &other, &mut known), vec![]);
        assert_eq!(restarts(&answer(&[oos]), &other, &mut known), vec![]);
    }

    #[test]
    fn transactional_and_producerless_batches_are_not_followed() {
        let mut old = batch(10, 0, 5, false);
        old[16] = 1;
        let req = produce(vec![batch(11, 0, 9, true), batch(-1, -1, -1, false), old]);
        assert_eq!(sequences(&req), vec![]);
    }
}

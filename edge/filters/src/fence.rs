//! The produce fence of a planned switchover: while a FailoverGroup's
//! produce is fenced, every Produce is answered by the edge with
//! `NOT_LEADER_OR_FOLLOWER` on each of its partitions, so nothing new
//! reaches the active cluster while replication catches up, and clients
//! (librdkafka, the Java client) retry the same batches, idempotent
//! sequence numbers included, once the switch has happened. Fetch and every
//! other API pass: consumers keep reading the active cluster meanwhile.
//!
//! The filter is installed on the connections opened after the fence was
//! raised; the edge drains the connections opened before it (as for a
//! switch), so no connection produces around the fence.

use async_trait::async_trait;
use strait_filter::{
    ApiKeySet, ConnectionInfo, Filter, FilterContext, FilterFactory, RequestFrame, RequestVerdict,
};
use strait_kafka::kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, TopicProduceResponse,
};
use strait_kafka::kafka_protocol::messages::{ApiKey, ProduceResponse, RequestKind, ResponseKind};

/// Retriable, and certain not to have been written: the client refreshes
/// metadata and resends, unlike after a timeout, which may have been.
pub const FENCED_ERROR: i16 = 6; // NOT_LEADER_OR_FOLLOWER

/// How long a client is asked to back off, so that a fenced producer does
/// not spin (clients honour `throttle_time_ms` on Produce v1+).
const FENCE_THROTTLE_MS: i32 = 100;

pub struct FenceFilterFactory {
    group: String,
}

impl FenceFilterFactory {
    pub fn new(group: &str) -> Self {
        Self {
            group: group.to_string(),
        }
    }
}

impl FilterFactory for FenceFilterFactory {
    fn create(&self, _connection: &ConnectionInfo) -> Box<dyn Filter> {
        Box::new(FenceFilter {
            group: self.group.clone(),
            warned: false,
        })
    }
}

struct FenceFilter {
    group: String,
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
            tracing::info!(group = %self.group, "produce fenced for a planned switchover; answering NOT_LEADER_OR_FOLLOWER");
        }
        if req.acks == 0 {
            // No answer is expected, so none can carry the error; a broker
            // closes an acks=0 producer's connection on error, and so do we.
            return RequestVerdict::Close("acks=0 produce while fenced".into());
        }
        RequestVerdict::Respond(Box::new(ResponseKind::Produce(fenced_answer(req))))
    }
}

fn fenced_answer(req: &strait_kafka::kafka_protocol::messages::ProduceRequest) -> ProduceResponse {
    ProduceResponse::default()
        .with_throttle_time_ms(FENCE_THROTTLE_MS)
        .with_responses(
            req.topic_data
                .iter()
                .map(|topic| {
                    TopicProduceResponse::default()
                        .with_name(topic.name.clone())
                        .with_topic_id(topic.topic_id)
                        .with_partition_responses(
                            topic
                                .partition_data
                                .iter()
                                .map(|p| {
                                    PartitionProduceResponse::default()
                                        .with_index(p.index)
                                        .with_error_code(FENCED_ERROR)
                                        .with_base_offset(-1)
                                })
                                .collect(),
                        )
                })
                .collect(),
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
        let answer = fenced_answer(&req);
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
}

//! Produce answers the edge gives itself, for records it did not forward.

use kafka_protocol::messages::produce_request::PartitionProduceData;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};

/// The answer to `request` that refuses each of its partitions with the
/// error `error_of` gives it: nothing was written (no base offset, no log
/// start offset), and the client is asked to wait `throttle_ms`.
pub fn refuse_produce(
    request: &ProduceRequest,
    throttle_ms: i32,
    error_of: impl Fn(&PartitionProduceData) -> i16,
) -> ProduceResponse {
    ProduceResponse::default()
        .with_throttle_time_ms(throttle_ms)
        .with_responses(
            request
                .topic_data
                .iter()
                .map(|topic| {
                    TopicProduceResponse::default()
                        .with_name(topic.name.clone())
                        .with_topic_id(topic.topic_id)
                        .with_partition_responses(
                            topic
                                .partition_data
                                .iter()
                                .map(|partition| {
                                    PartitionProduceResponse::default()
                                        .with_index(partition.index)
                                        .with_error_code(error_of(partition))
                                        .with_base_offset(-1)
                                        .with_log_start_offset(-1)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
}

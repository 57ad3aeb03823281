//! What a draining connection answers: a Produce that arrives after the
//! drain began (a switch of upstream, a shutdown) is not written anywhere,
//! and the edge answers it with an error certain to mean "not written",
//! which clients retry on their next connection without counting a retry.
//! Left unread, it would be lost with the closed connection, and clients
//! count that as a retry of a batch that may have been written.
//!
//! Which error depends on why the connection drains:
//! - a switch of upstream to another cluster, or to a produce fence (see
//!   `cluster::bumps_epochs`): an idempotent producer's batch (outside a
//!   transaction) is answered `UNKNOWN_PRODUCER_ID`. The cluster it goes to
//!   next either has no state of its producer id, or, after a failback,
//!   state from before the failover at a sequence the batches written
//!   elsewhere moved past, which it would refuse as out of order. The error
//!   makes librdkafka bump its epoch and renumber from sequence 0 before it
//!   reaches that cluster, which accepts a new epoch from 0 either way.
//!   librdkafka accepts the error only as the first error of a batch since
//!   its last bump: a `NOT_LEADER_OR_FOLLOWER` here would make a later one
//!   (the fence's, the rewritten answer of a failback) fatal. The Java
//!   client, given no log start offset, retries the batch, and bumps its
//!   epoch on the cluster's own answer;
//! - anything else (shutdown, a session's end, a relayed connection whose
//!   broker is now known, a fence lifted, a switch away from a fence, which
//!   told the producers already): every partition is answered
//!   `NOT_LEADER_OR_FOLLOWER`.

use bytes::Bytes;
use strait_filter::{RequestFrame, ResponseFrame};
use strait_kafka::kafka_protocol::messages::{RequestKind, ResponseKind};
use strait_kafka::produce_answer::refuse_produce;
use strait_kafka::ProducerFields;

use crate::connection::ConnectionError;

const NOT_LEADER_OR_FOLLOWER: i16 = 6;
const UNKNOWN_PRODUCER_ID: i16 = 59;

/// The answer to `frame`, a Produce read while draining (`switched`: the
/// drain has idempotent producers bump their epoch); `None` for acks=0, which expects none
/// (the connection then closes, as a broker's does on a refused acks=0
/// produce).
pub(crate) fn produce_refused(
    frame: Bytes,
    switched: bool,
) -> Result<Option<Bytes>, ConnectionError> {
    let request = RequestFrame::decode(frame)?;
    let RequestKind::Produce(produce) = request.body() else {
        return Ok(None);
    };
    if produce.acks == 0 {
        return Ok(None);
    }
    let answer = refuse_produce(produce, 0, |partition| {
        let idempotent = partition
            .records
            .as_deref()
            .and_then(ProducerFields::read)
            .is_some_and(|b| b.idempotent_only());
        if switched && idempotent {
            UNKNOWN_PRODUCER_ID
        } else {
            NOT_LEADER_OR_FOLLOWER
        }
    });
    Ok(Some(
        ResponseFrame::answering(&request, ResponseKind::Produce(answer)).into_bytes()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_kafka::codec::{decode_response, encode_request};
    use strait_kafka::kafka_protocol::messages::produce_request::{
        PartitionProduceData, TopicProduceData,
    };
    use strait_kafka::kafka_protocol::messages::{
        ApiKey, ProduceRequest, RequestHeader, TopicName,
    };
    use strait_kafka::kafka_protocol::protocol::StrBytes;

    /// A v2 batch header with these producer fields (what the edge reads).
    fn batch(producer_id: i64, attributes: i16) -> Bytes {
        let mut b = vec![0u8; 61];
        b[16] = 2;
        b[21..23].copy_from_slice(&attributes.to_be_bytes());
        b[43..51].copy_from_slice(&producer_id.to_be_bytes());
        Bytes::from(b)
    }

    /// The error codes of the answer to a Produce v9 with these batches
    /// on partitions 0, 1, ...
    fn answer(batches: Vec<Bytes>, acks: i16, switched: bool) -> Option<Vec<i16>> {
        let partitions = batches
            .into_iter()
            .enumerate()
            .map(|(i, records)| {
                PartitionProduceData::default()
                    .with_index(i as i32)
                    .with_records(Some(records))
            })
            .collect();
        let body = ProduceRequest::default()
            .with_acks(acks)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str("orders")))
                .with_partition_data(partitions)]);
        let header = RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(9)
            .with_correlation_id(7);
        let frame = encode_request(&header, &RequestKind::Produce(body)).unwrap();
        let bytes = produce_refused(frame, switched).unwrap()?;
        let (header, ResponseKind::Produce(resp)) =
            decode_response(ApiKey::Produce, 9, bytes).unwrap()
        else {
            panic!("not a Produce answer");
        };
        assert_eq!(header.correlation_id, 7);
        Some(
            resp.responses[0]
                .partition_responses
                .iter()
                .map(|p| p.error_code)
                .collect(),
        )
    }

    #[test]
    fn a_switch_answers_idempotent_batches_unknown_producer_id_and_the_rest_not_leader() {
        let batches = || vec![batch(7, 0), batch(7, 0x10), batch(-1, 0)];
        assert_eq!(
            answer(batches(), -1, true),
            Some(vec![
                UNKNOWN_PRODUCER_ID,
                NOT_LEADER_OR_FOLLOWER,
                NOT_LEADER_OR_FOLLOWER
            ])
        );
        assert_eq!(
            answer(batches(), 1, false),
            Some(vec![NOT_LEADER_OR_FOLLOWER; 3])
        );
        // acks=0 expects no answer: the connection closes instead.
        assert_eq!(answer(batches(), 0, true), None);
    }
}

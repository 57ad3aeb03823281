//! Protects record encryption's produce and fetch paths (edge/encryption
//! `lib.rs` over `batch.rs` and `format.rs`) with the bytes of a `records`
//! field as a client (produce) or a topic (fetch) holds them. A produce that
//! the core accepts must decrypt on fetch to exactly the records that were
//! sent: no value stored in the clear, none lost or changed.
//!
//! Input: a mode byte (bit 0: fetch instead of produce; bit 1: the strict
//! engine that also encrypts headers and refuses plaintext; bit 2: the
//! topic under the two-version KEK), then the records bytes.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use strait_encryption::testing::split_batches;
use strait_encryption::RecordEncryption;
use strait_fuzz::{block_on, encryption};
use strait_kafka::kafka_protocol::messages::fetch_response::{
    FetchableTopicResponse, PartitionData,
};
use strait_kafka::kafka_protocol::messages::produce_request::{
    PartitionProduceData, TopicProduceData,
};
use strait_kafka::kafka_protocol::messages::{FetchResponse, ProduceRequest, TopicName};
use strait_kafka::kafka_protocol::protocol::StrBytes;

fn engine(strict: bool) -> &'static RecordEncryption {
    static PLAIN: OnceLock<RecordEncryption> = OnceLock::new();
    static STRICT: OnceLock<RecordEncryption> = OnceLock::new();
    let cell = if strict { &STRICT } else { &PLAIN };
    cell.get_or_init(|| encryption(strict))
}

fn fetch_of(topic: &TopicName, records: Bytes) -> FetchResponse {
    FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
        .with_topic(topic.clone())
        .with_partitions(vec![PartitionData::default()
            .with_high_watermark(100)
            .with_records(Some(records))])])
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, records)) = data.split_first() else {
        return;
    };
    let engine = engine(mode & 2 != 0);
    let topic = TopicName(StrBytes::from_static_str(if mode & 4 != 0 {
        "old-orders"
    } else {
        "secret-orders"
    }));
    let records = Bytes::copy_from_slice(records);
    block_on(async {
        if mode & 1 != 0 {
            let mut fetch = fetch_of(&topic, records);
            engine.decrypt_fetch(&mut fetch, 12).await;
            return;
        }
        let mut produce = ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic.clone())
                .with_partition_data(vec![
                    PartitionProduceData::default().with_records(Some(records.clone()))
                ])]);
        if engine.encrypt_produce(&mut produce, 9).await.is_err() {
            return;
        }
        let Some(stored) = produce.topic_data[0].partition_data[0].records.clone() else {
            return;
        };
        let mut fetch = fetch_of(&topic, stored);
        let report = engine.decrypt_fetch(&mut fetch, 12).await;
        assert!(
            report.failed_partitions.is_empty(),
            "what was encrypted does not decrypt: {:?}",
            report.failed_partitions
        );
        let returned = fetch.responses[0].partitions[0]
            .records
            .clone()
            .unwrap_or_default();
        let before = split_batches(&records).expect("accepted records split");
        let after = split_batches(&returned).expect("decrypted records split");
        assert_eq!(before.len(), after.len(), "batch count changed");
        for (sent, got) in before.iter().zip(&after) {
            if let Ok(sent) = sent.records() {
                let got = got.records().expect("a decrypted batch decodes");
                assert_eq!(sent, got, "records changed by encrypt then decrypt");
            }
        }
    });
});

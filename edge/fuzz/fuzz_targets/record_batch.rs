//! Protects the record-batch codec of record encryption (edge/encryption
//! `batch.rs`): splitting a `records` field into batches, decompressing them
//! (gzip, snappy, lz4, zstd) and decoding records with the counts a client or
//! broker declares. Whatever decodes must re-encode into a batch that decodes
//! to the same records, since that is what the edge hands on after it
//! rewrote values.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use strait_encryption::testing::split_batches;

fuzz_target!(|data: &[u8]| {
    let Ok(batches) = split_batches(&Bytes::copy_from_slice(data)) else {
        return;
    };
    for batch in batches {
        let _ = (batch.is_control(), batch.compression_code());
        let Ok(records) = batch.records() else {
            continue;
        };
        let Ok(again) = batch.with_records(&records) else {
            continue;
        };
        let split = split_batches(&again).expect("a re-encoded batch splits");
        assert_eq!(split.len(), 1, "one batch in, one batch out");
        let decoded = split[0].records().expect("a re-encoded batch decodes");
        assert_eq!(decoded, records);
    }
});

//! Protects the only bytes the hot path reads of every frame (edge/kafka
//! `frame.rs`): the request and response prefixes (length limits, negative
//! and tiny sizes) and the `acks` peek into Produce requests, which must ask
//! for more bytes or fail, never read past the buffer or panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_kafka::frame::{produce_acks, REQUEST_PREFIX_LEN, RESPONSE_PREFIX_LEN};
use strait_kafka::{RequestPrefix, ResponsePrefix};

fuzz_target!(|data: &[u8]| {
    // The limit comes from the input too, so small limits are exercised as well.
    let Some((limit, frame)) = data.split_first_chunk::<4>() else {
        return;
    };
    let max = u32::from_be_bytes(*limit);
    if let Ok(Some(prefix)) = RequestPrefix::parse(frame, max) {
        assert!(frame.len() >= REQUEST_PREFIX_LEN);
        assert!(prefix.size <= max && prefix.size >= 8);
        assert_eq!(prefix.frame_len(), prefix.size as usize + 4);
        if let Ok(Some(acks)) = produce_acks(frame, prefix.api_version) {
            // Peeking is pure: the same bytes give the same answer.
            assert_eq!(produce_acks(frame, prefix.api_version), Ok(Some(acks)));
        }
    }
    if let Ok(Some(prefix)) = ResponsePrefix::parse(frame, max) {
        assert!(frame.len() >= RESPONSE_PREFIX_LEN);
        assert!(prefix.size <= max && prefix.size >= 4);
        assert_eq!(prefix.frame_len(), prefix.size as usize + 4);
    }
    // Every version, not only the one the prefix names.
    for version in [0, 2, 3, 8, 9, 13, i16::MAX, -1] {
        let _ = produce_acks(frame, version);
    }
});

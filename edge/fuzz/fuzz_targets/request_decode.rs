//! Protects every request decoder the edge uses (edge/kafka `codec.rs` over
//! the vendored kafka-protocol): a filter decodes what an anonymous client
//! sends, so any frame must decode or fail, never panic or allocate beyond
//! its size. A decoded request is re-encoded, as a filter that changed it
//! would, and that must not panic either; what re-encodes must decode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_filter::RequestFrame;
use strait_fuzz::framed;
use strait_kafka::codec::{decode_request, encode_request};

fuzz_target!(|body: &[u8]| {
    // The length field is made to match, so inputs reach the decoders.
    let Ok((_, header, request)) = decode_request(framed(body)) else {
        return;
    };
    if let Ok(bytes) = encode_request(&header, &request) {
        if let Err(err) = decode_request(bytes) {
            panic!("a re-encoded {header:?} does not decode: {err}");
        }
    }
    // The filter seam's own path: unchanged frames leave with their bytes.
    let frame = RequestFrame::decode(framed(body)).expect("decoded once already");
    assert_eq!(&frame.into_bytes().expect("original bytes")[4..], body);
});

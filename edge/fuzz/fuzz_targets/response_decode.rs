//! Protects every response decoder the edge uses (edge/kafka `codec.rs`,
//! including the retry without trailing tagged fields): brokers, and through
//! a tunnel other edges, answer with whatever they like. The first four
//! bytes pick the API key and version of the request being answered (as the
//! edge knows them from the request), the rest is the frame. A decoded
//! response is re-encoded, as a filter that changed it would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_filter::ResponseFrame;
use strait_fuzz::framed;
use strait_kafka::codec::{decode_response_frame, encode_response};
use strait_kafka::kafka_protocol::messages::ApiKey;

fuzz_target!(|data: &[u8]| {
    let Some((key_version, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(api_key) = ApiKey::try_from(i16::from_be_bytes([key_version[0], key_version[1]])) else {
        return;
    };
    let version = i16::from_be_bytes([key_version[2], key_version[3]]);
    let Ok((header, response, decoded)) = decode_response_frame(api_key, version, framed(body))
    else {
        return;
    };
    // What is forwarded unchanged is itself decodable (the stripped copy, if any).
    assert!(decode_response_frame(api_key, version, decoded.clone()).is_ok());
    if let Ok(bytes) = encode_response(api_key, version, &header, &response) {
        if let Err(err) = decode_response_frame(api_key, version, bytes) {
            panic!("a re-encoded {api_key:?} v{version} response does not decode: {err}");
        }
    }
    let frame = ResponseFrame::decode(api_key, version, framed(body)).expect("decoded once");
    assert_eq!(frame.into_bytes().expect("original bytes"), decoded);
});

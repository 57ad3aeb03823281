//! Protects the mesh tunnel stream header and answer (edge/mesh
//! `header.rs`, TUNNEL.md): the far edge reads them from a peer before
//! anything else on a stream, so lengths, kinds, node ids, principals and
//! extensions must be bounded and checked. What decodes must encode and
//! decode back to the same header or answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_fuzz::block_on;
use strait_mesh::header::{Answer, StreamHeader};

fuzz_target!(|data: &[u8]| {
    block_on(async {
        let mut reader = data;
        if let Ok(header) = StreamHeader::read_from(&mut reader).await {
            let bytes = header.encode().expect("a header that was read encodes");
            let again = StreamHeader::read_from(&mut &bytes[..]).await;
            assert_eq!(again.expect("an encoded header reads back"), header);
        }
        let mut reader = data;
        if let Ok(answer) = Answer::read_from(&mut reader).await {
            let bytes = answer.encode();
            let again = Answer::read_from(&mut &bytes[..]).await;
            assert_eq!(again.expect("an encoded answer reads back"), answer);
        }
    });
});

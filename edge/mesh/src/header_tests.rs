//! Encode/decode of stream headers and answers, and what is refused.

use super::*;

async fn roundtrip(h: &StreamHeader) -> StreamHeader {
    let bytes = h.encode().unwrap();
    StreamHeader::read_from(&mut bytes.as_slice())
        .await
        .unwrap()
}

#[tokio::test]
async fn headers_round_trip() {
    for h in [
        StreamHeader {
            name: "orders".into(),
            target: StreamTarget::Bootstrap,
            principal: ForwardedPrincipal::Anonymous,
        },
        StreamHeader {
            name: "orders".into(),
            target: StreamTarget::Broker(3),
            principal: ForwardedPrincipal::Named("spiffe://west.example/ns/a/sa/b".into()),
        },
    ] {
        assert_eq!(roundtrip(&h).await, h);
    }
}

#[tokio::test]
async fn the_wire_layout_is_the_documented_one() {
    let h = StreamHeader {
        name: "vc".into(),
        target: StreamTarget::Broker(7),
        principal: ForwardedPrincipal::Named("p".into()),
    };
    assert_eq!(
        h.encode().unwrap(),
        b"STRT\x01\x01\x00\x00\x00\x07\x00\x02vc\x01\x00\x01p\x00\x00".to_vec()
    );
    assert_eq!(
        Answer::Refuse {
            code: RefusalCode::PrincipalNotAllowed,
            reason: "no".into()
        }
        .encode(),
        b"\x01\x02\x00\x02no".to_vec()
    );
    assert_eq!(Answer::Accept.encode(), b"\x01\x00\x00\x00".to_vec());
}

#[tokio::test]
async fn bad_headers_are_named_and_bounded() {
    let read = |b: Vec<u8>| async move { StreamHeader::read_from(&mut b.as_slice()).await };
    assert!(matches!(
        read(b"GET / HTTP/1.1\r\n".to_vec()).await,
        Err(HeaderError::BadMagic)
    ));
    let err = read(b"STRT\x02".to_vec()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream header version 2; this edge speaks 1"
    );
    assert_eq!(
        err.answer(),
        Some(Answer::Refuse {
            code: RefusalCode::UnsupportedVersion,
            reason: "stream header version 2; this edge speaks 1".into()
        })
    );
    // A 64 KiB name is refused from its length, before it is read.
    let mut long = b"STRT\x01\x00\xff\xff\xff\xff".to_vec();
    long.extend_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(
        read(long).await.unwrap_err().to_string(),
        "stream header: virtual cluster is 65535 bytes, at most 255"
    );
    let negative = b"STRT\x01\x01\xff\xff\xff\xfe\x00\x01v\x00\x00\x00".to_vec();
    assert_eq!(
        read(negative).await.unwrap_err().to_string(),
        "stream header: broker node id -2"
    );
    // A truncated header is an I/O error: nothing to answer.
    let err = read(b"STRT\x01\x00".to_vec()).await.unwrap_err();
    assert!(matches!(err, HeaderError::Io(_)) && err.answer().is_none());
    // Extensions from a newer writer are skipped.
    let mut ext = b"STRT\x01\x00\xff\xff\xff\xff\x00\x01v\x00".to_vec();
    ext.extend_from_slice(&3u16.to_be_bytes());
    ext.extend_from_slice(b"abc");
    assert_eq!(read(ext).await.unwrap().name, "v");
}

#[test]
fn long_reasons_are_cut_on_a_character_boundary() {
    let reason = "é".repeat(MAX_REASON);
    let bytes = Answer::Refuse {
        code: RefusalCode::Unavailable,
        reason,
    }
    .encode();
    let len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    assert_eq!(len, MAX_REASON);
    assert!(std::str::from_utf8(&bytes[4..]).is_ok());
}

#[tokio::test]
async fn a_service_header_round_trips_in_the_documented_layout() {
    let h = StreamHeader {
        name: "kms".into(),
        target: StreamTarget::Service,
        principal: ForwardedPrincipal::Anonymous,
    };
    let bytes = h.encode().unwrap();
    assert_eq!(
        bytes,
        b"STRT\x01\x02\xff\xff\xff\xff\x00\x03kms\x00\x00\x00".to_vec()
    );
    assert_eq!(roundtrip(&h).await, h);
}

#[tokio::test]
async fn service_headers_are_refused_when_malformed() {
    let read = |b: Vec<u8>| async move { StreamHeader::read_from(&mut b.as_slice()).await };
    let message = |b: Vec<u8>| async move { read(b).await.unwrap_err().to_string() };
    // A service stream with a node id.
    assert_eq!(
        message(b"STRT\x01\x02\x00\x00\x00\x01\x00\x03kms\x00\x00\x00".to_vec()).await,
        "stream header: node id 1 on a target kind 2 stream (must be -1)"
    );
    // A service stream carrying a principal: nothing would check it.
    let named = b"STRT\x01\x02\xff\xff\xff\xff\x00\x03kms\x01\x00\x01p\x00\x00".to_vec();
    let err = read(named).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream header: a service stream carries no principal"
    );
    assert!(matches!(
        err.answer(),
        Some(Answer::Refuse {
            code: RefusalCode::Malformed,
            ..
        })
    ));
    // An empty service name, and one too long (refused from its length).
    assert_eq!(
        message(b"STRT\x01\x02\xff\xff\xff\xff\x00\x00\x00\x00\x00".to_vec()).await,
        "stream header: empty service"
    );
    let mut long = b"STRT\x01\x02\xff\xff\xff\xff".to_vec();
    long.extend_from_slice(&256u16.to_be_bytes());
    assert_eq!(
        message(long).await,
        "stream header: service is 256 bytes, at most 255"
    );
    // A kind this edge does not know yet.
    assert_eq!(
        message(b"STRT\x01\x04\xff\xff\xff\xff\x00\x01v\x00\x00\x00".to_vec()).await,
        "stream header: target kind 4"
    );
}

#[test]
fn a_service_header_is_not_written_with_a_principal_or_without_a_name() {
    let named = StreamHeader {
        name: "kms".into(),
        target: StreamTarget::Service,
        principal: ForwardedPrincipal::Named("spiffe://west.example/x".into()),
    };
    assert_eq!(
        named.encode().unwrap_err().to_string(),
        "stream header: a service stream carries no principal"
    );
    let empty = StreamHeader {
        name: String::new(),
        target: StreamTarget::Service,
        principal: ForwardedPrincipal::Anonymous,
    };
    assert_eq!(
        empty.encode().unwrap_err().to_string(),
        "stream header: empty service"
    );
}

#[tokio::test]
async fn a_keepalive_header_round_trips_and_carries_no_principal() {
    let h = StreamHeader::keepalive();
    let bytes = h.encode().unwrap();
    assert_eq!(
        bytes,
        b"STRT\x01\x03\xff\xff\xff\xff\x00\x09keepalive\x00\x00\x00".to_vec()
    );
    assert_eq!(roundtrip(&h).await, h);
    let read = |b: Vec<u8>| async move { StreamHeader::read_from(&mut b.as_slice()).await };
    let named = b"STRT\x01\x03\xff\xff\xff\xff\x00\x01k\x01\x00\x01p\x00\x00".to_vec();
    assert_eq!(
        read(named).await.unwrap_err().to_string(),
        "stream header: a keepalive stream carries no principal"
    );
    let with_node = b"STRT\x01\x03\x00\x00\x00\x02\x00\x01k\x00\x00\x00".to_vec();
    assert_eq!(
        read(with_node).await.unwrap_err().to_string(),
        "stream header: node id 2 on a target kind 3 stream (must be -1)"
    );
}

//! Full decode and encode of the frames a filter asked for.
//!
//! Frames here always include their 4-byte length field, exactly as they
//! travel on the wire, so an unmodified frame can be forwarded as it came.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("{api_key:?} v{version} is outside the decodable range {min}..={max}")]
    UnsupportedVersion {
        api_key: ApiKey,
        version: i16,
        min: i16,
        max: i16,
    },
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: anyhow::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: anyhow::Error,
    },
    #[error("frame shorter than its length field")]
    Truncated,
}

/// A decodable (known and in-range) API key for this version.
pub fn decodable_api_key(api_key: i16, version: i16) -> Result<ApiKey, CodecError> {
    let key = ApiKey::try_from(api_key).map_err(|()| CodecError::UnknownApiKey(api_key))?;
    let range = key.valid_versions();
    if version < range.min || version > range.max {
        return Err(CodecError::UnsupportedVersion {
            api_key: key,
            version,
            min: range.min,
            max: range.max,
        });
    }
    Ok(key)
}

fn body_of(mut frame: Bytes) -> Result<Bytes, CodecError> {
    if frame.len() < 4 {
        return Err(CodecError::Truncated);
    }
    let size = frame.get_i32() as usize;
    if frame.len() != size {
        return Err(CodecError::Truncated);
    }
    Ok(frame)
}

/// Decodes a whole request frame (length field included).
pub fn decode_request(frame: Bytes) -> Result<(ApiKey, RequestHeader, RequestKind), CodecError> {
    let mut body = body_of(frame)?;
    if body.len() < 4 {
        return Err(CodecError::Truncated);
    }
    let api_key = i16::from_be_bytes([body[0], body[1]]);
    let version = i16::from_be_bytes([body[2], body[3]]);
    let key = decodable_api_key(api_key, version)?;
    let header = RequestHeader::decode(&mut body, key.request_header_version(version)).map_err(
        |source| CodecError::Decode {
            what: "request header",
            source,
        },
    )?;
    let request =
        RequestKind::decode(key, &mut body, version).map_err(|source| CodecError::Decode {
            what: "request body",
            source,
        })?;
    Ok((key, header, request))
}

/// Encodes a request with its length field.
pub fn encode_request(header: &RequestHeader, body: &RequestKind) -> Result<Bytes, CodecError> {
    let key = decodable_api_key(header.request_api_key, header.request_api_version)?;
    let version = header.request_api_version;
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    header
        .encode(&mut buf, key.request_header_version(version))
        .map_err(|source| CodecError::Encode {
            what: "request header",
            source,
        })?;
    body.encode(&mut buf, version)
        .map_err(|source| CodecError::Encode {
            what: "request body",
            source,
        })?;
    finish_frame(buf)
}

/// Decodes a whole response frame for the request it answers.
///
/// Some brokers put tagged fields into versions that do not define them
/// (Tansu 0.6 sends Fetch v12 with tag 0, which exists from v16). Such a
/// frame is decoded without its trailing top-level tagged fields, which
/// clients ignore anyway; re-encoding then produces a valid frame.
pub fn decode_response(
    api_key: ApiKey,
    version: i16,
    frame: Bytes,
) -> Result<(ResponseHeader, ResponseKind), CodecError> {
    decode_response_frame(api_key, version, frame).map(|(header, body, _)| (header, body))
}

/// Like [`decode_response`], and also returns the bytes that were decoded:
/// `frame` itself, or the frame without its trailing tagged fields when only
/// that copy could be decoded. Whoever forwards an unchanged frame must
/// forward these bytes, not `frame`: the stripped fields were never seen by
/// a filter, and in Produce v10+ and Fetch v16+ the top-level tag 0 holds
/// broker addresses (KIP-951 `node_endpoints`), so forwarding them unread
/// would let an address past the rewriter.
pub fn decode_response_frame(
    api_key: ApiKey,
    version: i16,
    frame: Bytes,
) -> Result<(ResponseHeader, ResponseKind, Bytes), CodecError> {
    match decode_response_strict(api_key, version, frame.clone()) {
        Ok((header, body)) => Ok((header, body, frame)),
        Err(err @ CodecError::Decode { .. }) => without_trailing_tags(api_key, version, &frame)
            .and_then(|stripped| {
                decode_response_strict(api_key, version, stripped.clone())
                    .ok()
                    .map(|(header, body)| (header, body, stripped))
            })
            .ok_or(err),
        Err(err) => Err(err),
    }
}

/// The frame with its final tagged-field section replaced by an empty one,
/// for flexible versions. The section is found by scanning back for a
/// `count, (tag, size, data)...` run that ends exactly at the frame's end.
fn without_trailing_tags(api_key: ApiKey, version: i16, frame: &Bytes) -> Option<Bytes> {
    if api_key.response_header_version(version) < 1 || frame.len() < 8 {
        return None;
    }
    let end = frame.len();
    let lowest = end.saturating_sub(64 * 1024).max(8);
    for start in (lowest..end.saturating_sub(2)).rev() {
        if tagged_section_len(&frame[start..]) == Some(end - start) {
            let mut out = BytesMut::with_capacity(start + 1);
            out.extend_from_slice(&frame[..start]);
            out.put_u8(0);
            let size = (out.len() - 4) as i32;
            out[..4].copy_from_slice(&size.to_be_bytes());
            return Some(out.freeze());
        }
    }
    None
}

/// Length of a well-formed tagged-field section with at least one field at
/// the start of `buf`, if there is one.
fn tagged_section_len(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    let count = uvarint(buf, &mut pos)?;
    if count == 0 || count > 16 {
        return None;
    }
    for _ in 0..count {
        uvarint(buf, &mut pos)?;
        let size = uvarint(buf, &mut pos)? as usize;
        pos = pos.checked_add(size)?;
        if pos > buf.len() {
            return None;
        }
    }
    Some(pos)
}

fn uvarint(buf: &[u8], pos: &mut usize) -> Option<u32> {
    let mut value = 0u32;
    for shift in (0..35).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn decode_response_strict(
    api_key: ApiKey,
    version: i16,
    frame: Bytes,
) -> Result<(ResponseHeader, ResponseKind), CodecError> {
    decodable_api_key(api_key as i16, version)?;
    let mut body = body_of(frame)?;
    let header = ResponseHeader::decode(&mut body, api_key.response_header_version(version))
        .map_err(|source| CodecError::Decode {
            what: "response header",
            source,
        })?;
    let response =
        ResponseKind::decode(api_key, &mut body, version).map_err(|source| CodecError::Decode {
            what: "response body",
            source,
        })?;
    Ok((header, response))
}

/// Encodes a response with its length field.
pub fn encode_response(
    api_key: ApiKey,
    version: i16,
    header: &ResponseHeader,
    body: &ResponseKind,
) -> Result<Bytes, CodecError> {
    decodable_api_key(api_key as i16, version)?;
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    header
        .encode(&mut buf, api_key.response_header_version(version))
        .map_err(|source| CodecError::Encode {
            what: "response header",
            source,
        })?;
    body.encode(&mut buf, version)
        .map_err(|source| CodecError::Encode {
            what: "response body",
            source,
        })?;
    finish_frame(buf)
}

fn finish_frame(mut buf: BytesMut) -> Result<Bytes, CodecError> {
    let size = i32::try_from(buf.len() - 4).map_err(|_| CodecError::Encode {
        what: "frame",
        source: anyhow::anyhow!("frame of {} bytes exceeds i32", buf.len()),
    })?;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use kafka_protocol::messages::{BrokerId, MetadataResponse};
    use kafka_protocol::protocol::StrBytes;

    /// A count is not trusted before its elements are read: as published,
    /// kafka-protocol reserved the announced capacity first, and 2^31 - 1
    /// topics in a 30-byte frame aborted the process (third_party/README.md).
    #[test]
    fn huge_counts_in_tiny_frames_are_errors_not_allocations() {
        let frame = |body: &[u8]| {
            let mut out = (body.len() as i32).to_be_bytes().to_vec();
            out.extend_from_slice(body);
            Bytes::from(out)
        };
        // Metadata v1: header v1 (key, version, correlation id, null client id), topics array.
        let mut metadata = vec![0, 3, 0, 1, 0, 0, 0, 9, 0xff, 0xff];
        metadata.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(decode_request(frame(&metadata)).is_err());
        // Produce v9: header v2, null transactional id, acks, timeout, 2^32 - 2 topics (compact).
        let mut produce = vec![
            0, 0, 0, 9, 0, 0, 0, 9, 0xff, 0xff, 0, 0, 0, 1, 0, 0, 3, 0xe8,
        ];
        produce.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_request(frame(&produce)).is_err());
        // A string announcing 32 KiB in a few bytes: Metadata v1 with one topic named so.
        let mut name = vec![0, 3, 0, 1, 0, 0, 0, 9, 0xff, 0xff, 0, 0, 0, 1, 0x7f, 0xff];
        name.extend_from_slice(b"abc");
        assert!(decode_request(frame(&name)).is_err());
    }

    /// Found by fuzzing (edge/fuzz `request_decode`): a tagged field whose
    /// tag is beyond `i32::MAX` was kept as a negative tag, left out when the
    /// message was re-encoded while the field count still counted it, so the
    /// broker would have read the rest of the header as the body. Such tags
    /// are refused now (edge/third_party/README.md).
    #[test]
    fn tags_beyond_i32_are_refused() {
        let frame = |tag: &[u8]| {
            // DescribeCluster v0: header v2 (key 60, version 0, correlation id,
            // empty client id, one tagged field of 0 bytes), then the body's
            // include_cluster_authorized_operations and its empty tag section.
            let mut body = vec![0, 60, 0, 0, 0, 0, 0, 1, 0, 0, 1];
            body.extend_from_slice(tag);
            body.extend_from_slice(&[0, 0, 0]);
            let mut out = (body.len() as i32).to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            Bytes::from(out)
        };
        // Tag 2^32 - 1.
        assert!(decode_request(frame(&[0xff, 0xff, 0xff, 0xff, 0x0f])).is_err());
        // Tag 2^31 - 1 is kept, and survives a re-encode.
        let (_, header, body) = decode_request(frame(&[0xff, 0xff, 0xff, 0xff, 0x07])).unwrap();
        assert!(header.unknown_tagged_fields.contains_key(&i32::MAX));
        let again = encode_request(&header, &body).unwrap();
        assert_eq!(again, frame(&[0xff, 0xff, 0xff, 0xff, 0x07]));
    }

    #[test]
    fn response_round_trip_all_metadata_versions() {
        for version in 0..=13 {
            let response =
                MetadataResponse::default().with_brokers(vec![MetadataResponseBroker::default()
                    .with_node_id(BrokerId(3))
                    .with_host(StrBytes::from_static_str("kafka-3.internal"))
                    .with_port(9092)]);
            let header = ResponseHeader::default().with_correlation_id(99);
            let frame = encode_response(
                ApiKey::Metadata,
                version,
                &header,
                &ResponseKind::Metadata(response.clone()),
            )
            .unwrap();
            let (decoded_header, decoded) =
                decode_response(ApiKey::Metadata, version, frame).unwrap();
            assert_eq!(decoded_header.correlation_id, 99);
            let ResponseKind::Metadata(decoded) = decoded else {
                panic!("wrong kind")
            };
            assert_eq!(decoded.brokers[0].host.as_str(), "kafka-3.internal");
        }
    }

    /// Tansu 0.6 sends Fetch v12 with top-level tag 0 (NodeEndpoints, v16+).
    #[test]
    fn tolerates_a_tagged_field_the_version_does_not_define() {
        use kafka_protocol::messages::FetchResponse;
        let header = ResponseHeader::default().with_correlation_id(4);
        let clean = encode_response(
            ApiKey::Fetch,
            12,
            &header,
            &ResponseKind::Fetch(FetchResponse::default().with_session_id(77)),
        )
        .unwrap();
        // Replace the empty trailing tag section (0x00) with one field: tag 0, 3 bytes.
        let mut dirty = BytesMut::from(&clean[..clean.len() - 1]);
        dirty.extend_from_slice(&[1, 0, 3, 0xaa, 0xbb, 0xcc]);
        let size = (dirty.len() - 4) as i32;
        dirty[..4].copy_from_slice(&size.to_be_bytes());
        let dirty = dirty.freeze();
        assert!(decode_response_strict(ApiKey::Fetch, 12, dirty.clone()).is_err());
        let (header, body) = decode_response(ApiKey::Fetch, 12, dirty.clone()).unwrap();
        assert_eq!(header.correlation_id, 4);
        let ResponseKind::Fetch(fetch) = body else {
            panic!()
        };
        assert_eq!(fetch.session_id, 77);
        // What was decoded is the frame without the undefined field, and that
        // (not the frame as received) is what an unchanged frame forwards.
        let (_, _, decoded) = decode_response_frame(ApiKey::Fetch, 12, dirty).unwrap();
        assert_eq!(decoded, clean);
        let (_, _, decoded) = decode_response_frame(ApiKey::Fetch, 12, clean.clone()).unwrap();
        assert_eq!(decoded, clean);
        // Garbage stays an error.
        assert!(decode_response(
            ApiKey::Fetch,
            12,
            Bytes::from_static(&[0, 0, 0, 5, 0, 0, 0, 4, 9])
        )
        .is_err());
    }

    #[test]
    fn rejects_unknown_and_out_of_range() {
        assert!(matches!(
            decodable_api_key(9999, 0),
            Err(CodecError::UnknownApiKey(9999))
        ));
        assert!(matches!(
            decodable_api_key(ApiKey::Metadata as i16, 99),
            Err(CodecError::UnsupportedVersion { .. })
        ));
        assert!(matches!(
            decode_request(Bytes::from_static(&[0, 0, 0, 9, 0, 3])),
            Err(CodecError::Truncated)
        ));
    }
}

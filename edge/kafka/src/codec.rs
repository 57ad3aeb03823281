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
pub fn decode_response(
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

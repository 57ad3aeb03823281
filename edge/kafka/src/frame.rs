//! Frame prefixes: the only bytes the hot path reads.
//!
//! A Kafka frame is a big-endian `i32` size followed by `size` bytes. Requests
//! start with `api_key: i16, api_version: i16, correlation_id: i32`; responses
//! with `correlation_id: i32`.

use thiserror::Error;

/// Bytes needed to read a request's prefix: size, api key, version, correlation id.
pub const REQUEST_PREFIX_LEN: usize = 12;
/// Bytes needed to read a response's prefix: size and correlation id.
pub const RESPONSE_PREFIX_LEN: usize = 8;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: i64, max: u32 },
    #[error("frame of {size} bytes is too small to hold a {what} header")]
    TooSmall { size: i64, what: &'static str },
    #[error("malformed {what}: {detail}")]
    Malformed {
        what: &'static str,
        detail: &'static str,
    },
}

/// The fixed part at the start of every request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestPrefix {
    /// Size of the frame after the 4-byte length field.
    pub size: u32,
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

impl RequestPrefix {
    /// Whole frame length including the length field.
    pub fn frame_len(&self) -> usize {
        self.size as usize + 4
    }

    /// Reads the prefix from the start of `buf`. `Ok(None)` means more bytes are needed.
    pub fn parse(buf: &[u8], max_size: u32) -> Result<Option<Self>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        check_size(size, max_size, 8, "request")?;
        if buf.len() < REQUEST_PREFIX_LEN {
            return Ok(None);
        }
        Ok(Some(RequestPrefix {
            size: size as u32,
            api_key: i16::from_be_bytes([buf[4], buf[5]]),
            api_version: i16::from_be_bytes([buf[6], buf[7]]),
            correlation_id: i32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        }))
    }
}

/// The fixed part at the start of every response frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePrefix {
    pub size: u32,
    pub correlation_id: i32,
}

impl ResponsePrefix {
    pub fn frame_len(&self) -> usize {
        self.size as usize + 4
    }

    pub fn parse(buf: &[u8], max_size: u32) -> Result<Option<Self>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        check_size(size, max_size, 4, "response")?;
        if buf.len() < RESPONSE_PREFIX_LEN {
            return Ok(None);
        }
        Ok(Some(ResponsePrefix {
            size: size as u32,
            correlation_id: i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
        }))
    }
}

fn check_size(size: i32, max: u32, min: i32, what: &'static str) -> Result<(), FrameError> {
    if size < min {
        return Err(FrameError::TooSmall {
            size: size.into(),
            what,
        });
    }
    if size as u32 > max {
        return Err(FrameError::TooLarge {
            size: size.into(),
            max,
        });
    }
    Ok(())
}

/// Reads the `acks` field of a Produce request without decoding the request,
/// so the proxy knows whether a response will come (`acks = 0` gets none).
///
/// `frame` starts at the length field. Returns `Ok(None)` when more bytes are
/// needed. Layout: request header v1 (v0-8) or v2 (v9+, adds tagged fields),
/// then `transactional_id` (v3+; compact in v9+), then `acks: i16`.
pub fn produce_acks(frame: &[u8], api_version: i16) -> Result<Option<i16>, FrameError> {
    let mut cursor = Cursor {
        buf: frame,
        pos: REQUEST_PREFIX_LEN,
    };
    let flexible = api_version >= 9;
    // client_id is a classic nullable string even in header v2.
    let Some(client_id_len) = cursor.i16()? else {
        return Ok(None);
    };
    if client_id_len > 0 && !cursor.skip(client_id_len as usize) {
        return Ok(None);
    }
    if flexible && !cursor.skip_tagged_fields()? {
        return Ok(None);
    }
    if api_version >= 3 {
        if flexible {
            let Some(len_plus_one) = cursor.uvarint()? else {
                return Ok(None);
            };
            if len_plus_one > 1 && !cursor.skip(len_plus_one as usize - 1) {
                return Ok(None);
            }
        } else {
            let Some(len) = cursor.i16()? else {
                return Ok(None);
            };
            if len > 0 && !cursor.skip(len as usize) {
                return Ok(None);
            }
        }
    }
    cursor.i16()
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn i16(&mut self) -> Result<Option<i16>, FrameError> {
        let Some(bytes) = self.buf.get(self.pos..self.pos + 2) else {
            return Ok(None);
        };
        self.pos += 2;
        Ok(Some(i16::from_be_bytes([bytes[0], bytes[1]])))
    }

    fn skip(&mut self, n: usize) -> bool {
        if self.buf.len() < self.pos + n {
            return false;
        }
        self.pos += n;
        true
    }

    fn uvarint(&mut self) -> Result<Option<u32>, FrameError> {
        let mut value: u32 = 0;
        for shift in (0..35).step_by(7) {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Ok(None);
            };
            self.pos += 1;
            value |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(Some(value));
            }
        }
        Err(FrameError::Malformed {
            what: "produce request",
            detail: "varint longer than 5 bytes",
        })
    }

    /// `Ok(false)` means more bytes are needed.
    fn skip_tagged_fields(&mut self) -> Result<bool, FrameError> {
        let Some(count) = self.uvarint()? else {
            return Ok(false);
        };
        for _ in 0..count {
            if self.uvarint()?.is_none() {
                return Ok(false);
            }
            let Some(size) = self.uvarint()? else {
                return Ok(false);
            };
            if !self.skip(size as usize) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_request;
    use kafka_protocol::messages::{ApiKey, ProduceRequest, RequestHeader, RequestKind};
    use kafka_protocol::protocol::StrBytes;

    fn produce_frame(version: i16, acks: i16, txn: Option<&str>) -> Vec<u8> {
        let header = RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(Some(StrBytes::from_static_str("client-1")));
        let body = ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(1000)
            .with_transactional_id(txn.map(|t| StrBytes::from_string(t.to_owned()).into()));
        encode_request(&header, &RequestKind::Produce(body))
            .unwrap()
            .to_vec()
    }

    #[test]
    fn request_prefix_parses_and_limits() {
        let frame = produce_frame(9, 1, None);
        let prefix = RequestPrefix::parse(&frame, 1 << 20).unwrap().unwrap();
        assert_eq!(prefix.api_key, ApiKey::Produce as i16);
        assert_eq!(prefix.api_version, 9);
        assert_eq!(prefix.correlation_id, 7);
        assert_eq!(prefix.frame_len(), frame.len());
        assert_eq!(RequestPrefix::parse(&frame[..5], 1 << 20), Ok(None));
        assert!(matches!(
            RequestPrefix::parse(&frame, 10),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            RequestPrefix::parse(&[0, 0, 0, 2, 0, 0], 100),
            Err(FrameError::TooSmall { .. })
        ));
        assert!(matches!(
            RequestPrefix::parse(&[0xff, 0xff, 0xff, 0xff], 100),
            Err(FrameError::TooSmall { .. })
        ));
    }

    #[test]
    fn produce_acks_all_versions() {
        for version in 3..=13 {
            for acks in [0, 1, -1] {
                for txn in [None, Some("txn-42")] {
                    let frame = produce_frame(version, acks, txn);
                    assert_eq!(
                        produce_acks(&frame, version),
                        Ok(Some(acks)),
                        "version {version} acks {acks} txn {txn:?}"
                    );
                    // Any truncation before the acks field asks for more bytes.
                    assert_eq!(
                        produce_acks(&frame[..REQUEST_PREFIX_LEN + 3], version),
                        Ok(None)
                    );
                }
            }
        }
    }

    #[test]
    fn response_prefix() {
        let buf = [0, 0, 0, 10, 0, 0, 0, 42];
        let prefix = ResponsePrefix::parse(&buf, 100).unwrap().unwrap();
        assert_eq!(prefix.correlation_id, 42);
        assert_eq!(prefix.frame_len(), 14);
    }
}

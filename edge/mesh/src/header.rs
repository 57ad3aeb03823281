//! The stream header: the first bytes of every tunnel stream, before any
//! Kafka byte (layout in `docs/TUNNEL.md`).
//!
//! The near edge names the far edge's virtual cluster, the broker endpoint
//! (bootstrap or node id) and the principal it authenticated; the far edge
//! answers accept, or a refusal with a code and a reason, and only after an
//! accept do Kafka frames flow. Every length is bounded and checked before
//! anything is allocated, so a hostile peer cannot make the far edge buffer
//! more than [`MAX_HEADER_BYTES`].

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The only version this edge writes; it reads it and refuses others with
/// [`RefusalCode::UnsupportedVersion`].
pub const HEADER_VERSION: u8 = 1;
/// Magic bytes, so that a stream opened by something else fails at once.
pub const MAGIC: [u8; 4] = *b"STRT";
/// Bounds on each field (bytes of UTF-8).
pub const MAX_NAME: usize = 255;
pub const MAX_PRINCIPAL: usize = 1024;
pub const MAX_EXTENSIONS: usize = 4096;
pub const MAX_REASON: usize = 1024;
/// The most a header can take on the wire.
pub const MAX_HEADER_BYTES: usize =
    4 + 1 + 1 + 4 + 2 + MAX_NAME + 1 + 2 + MAX_PRINCIPAL + 2 + MAX_EXTENSIONS;

/// Which listener of the far virtual cluster the stream stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTarget {
    Bootstrap,
    Broker(i32),
}

/// The principal the near edge established for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardedPrincipal {
    Anonymous,
    Named(String),
}

impl ForwardedPrincipal {
    /// The string `may_assert` globs are matched against (`anonymous` for
    /// an anonymous client, as in authorization rules).
    pub fn as_str(&self) -> &str {
        match self {
            ForwardedPrincipal::Anonymous => "anonymous",
            ForwardedPrincipal::Named(name) => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub virtual_cluster: String,
    pub target: StreamTarget,
    pub principal: ForwardedPrincipal,
}

/// Why the far edge refused a stream (a byte on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// The virtual cluster does not exist at the far edge, or is not
    /// exported to this peer (the two are not told apart).
    NotExported,
    /// The peer may not assert this principal (`may_assert`).
    PrincipalNotAllowed,
    /// The broker node id is not known (yet) to the far edge.
    UnknownBroker,
    /// A header version the far edge does not speak.
    UnsupportedVersion,
    /// The far virtual cluster cannot take the stream now (draining,
    /// upstream unreachable); the client should retry.
    Unavailable,
    /// The header is malformed.
    Malformed,
    /// A code this edge does not know (a newer peer).
    Other(u8),
}

impl RefusalCode {
    fn to_byte(self) -> u8 {
        match self {
            RefusalCode::NotExported => 1,
            RefusalCode::PrincipalNotAllowed => 2,
            RefusalCode::UnknownBroker => 3,
            RefusalCode::UnsupportedVersion => 4,
            RefusalCode::Unavailable => 5,
            RefusalCode::Malformed => 6,
            RefusalCode::Other(b) => b,
        }
    }

    fn from_byte(b: u8) -> Self {
        match b {
            1 => RefusalCode::NotExported,
            2 => RefusalCode::PrincipalNotAllowed,
            3 => RefusalCode::UnknownBroker,
            4 => RefusalCode::UnsupportedVersion,
            5 => RefusalCode::Unavailable,
            6 => RefusalCode::Malformed,
            other => RefusalCode::Other(other),
        }
    }

    /// The `reason` label of the refusal counters.
    pub fn label(self) -> &'static str {
        match self {
            RefusalCode::NotExported => "not_exported",
            RefusalCode::PrincipalNotAllowed => "principal_not_allowed",
            RefusalCode::UnknownBroker => "unknown_broker",
            RefusalCode::UnsupportedVersion => "unsupported_version",
            RefusalCode::Unavailable => "unavailable",
            RefusalCode::Malformed => "malformed",
            RefusalCode::Other(_) => "other",
        }
    }
}

/// The far edge's answer to a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Accept,
    Refuse { code: RefusalCode, reason: String },
}

#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("not a Strait tunnel stream (bad magic)")]
    BadMagic,
    #[error("stream header version {0}; this edge speaks {HEADER_VERSION}")]
    UnsupportedVersion(u8),
    #[error("stream header: {0}")]
    Malformed(String),
    #[error("stream header: {0}")]
    Io(#[from] std::io::Error),
}

impl HeaderError {
    /// The answer to send back for a header that could not be read (none
    /// when the stream itself broke).
    pub fn answer(&self) -> Option<Answer> {
        let code = match self {
            HeaderError::BadMagic | HeaderError::Malformed(_) => RefusalCode::Malformed,
            HeaderError::UnsupportedVersion(_) => RefusalCode::UnsupportedVersion,
            HeaderError::Io(_) => return None,
        };
        Some(Answer::Refuse {
            code,
            reason: self.to_string(),
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize, what: &str) -> Result<(), HeaderError> {
    if s.len() > max {
        return Err(HeaderError::Malformed(format!(
            "{what} is {} bytes, at most {max}",
            s.len()
        )));
    }
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

impl StreamHeader {
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        if self.virtual_cluster.is_empty() {
            return Err(HeaderError::Malformed("empty virtual cluster".into()));
        }
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        out.push(HEADER_VERSION);
        let (kind, node) = match self.target {
            StreamTarget::Bootstrap => (0u8, -1i32),
            StreamTarget::Broker(id) => (1u8, id),
        };
        out.push(kind);
        out.extend_from_slice(&node.to_be_bytes());
        put_str(&mut out, &self.virtual_cluster, MAX_NAME, "virtual cluster")?;
        match &self.principal {
            ForwardedPrincipal::Anonymous => out.push(0),
            ForwardedPrincipal::Named(name) => {
                if name.is_empty() {
                    return Err(HeaderError::Malformed("empty principal".into()));
                }
                out.push(1);
                put_str(&mut out, name, MAX_PRINCIPAL, "principal")?;
            }
        }
        // Extensions: none written by version 1; readers skip them.
        out.extend_from_slice(&0u16.to_be_bytes());
        Ok(out)
    }

    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), HeaderError> {
        w.write_all(&self.encode()?).await?;
        w.flush().await?;
        Ok(())
    }

    pub async fn read_from<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, HeaderError> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic).await?;
        if magic != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = r.read_u8().await?;
        if version != HEADER_VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let target = match (r.read_u8().await?, r.read_i32().await?) {
            (0, _) => StreamTarget::Bootstrap,
            (1, id) if id >= 0 => StreamTarget::Broker(id),
            (1, id) => return Err(HeaderError::Malformed(format!("broker node id {id}"))),
            (kind, _) => return Err(HeaderError::Malformed(format!("target kind {kind}"))),
        };
        let virtual_cluster = read_str(r, MAX_NAME, "virtual cluster").await?;
        if virtual_cluster.is_empty() {
            return Err(HeaderError::Malformed("empty virtual cluster".into()));
        }
        let principal = match r.read_u8().await? {
            0 => ForwardedPrincipal::Anonymous,
            1 => {
                let name = read_str(r, MAX_PRINCIPAL, "principal").await?;
                if name.is_empty() {
                    return Err(HeaderError::Malformed("empty principal".into()));
                }
                ForwardedPrincipal::Named(name)
            }
            kind => return Err(HeaderError::Malformed(format!("principal kind {kind}"))),
        };
        let extensions = r.read_u16().await? as usize;
        if extensions > MAX_EXTENSIONS {
            return Err(HeaderError::Malformed(format!(
                "extensions are {extensions} bytes, at most {MAX_EXTENSIONS}"
            )));
        }
        let mut skip = vec![0u8; extensions];
        r.read_exact(&mut skip).await?;
        Ok(StreamHeader {
            virtual_cluster,
            target,
            principal,
        })
    }
}

async fn read_str<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    what: &str,
) -> Result<String, HeaderError> {
    let len = r.read_u16().await? as usize;
    if len > max {
        return Err(HeaderError::Malformed(format!(
            "{what} is {len} bytes, at most {max}"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    String::from_utf8(buf).map_err(|_| HeaderError::Malformed(format!("{what} is not UTF-8")))
}

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![HEADER_VERSION];
        match self {
            Answer::Accept => {
                out.push(0);
                out.extend_from_slice(&0u16.to_be_bytes());
            }
            Answer::Refuse { code, reason } => {
                out.push(code.to_byte());
                // Truncated on a character boundary: a reason never fails the answer.
                let mut end = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&(end as u16).to_be_bytes());
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
        }
        out
    }

    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.encode()).await?;
        w.flush().await
    }

    pub async fn read_from<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, HeaderError> {
        let version = r.read_u8().await?;
        if version != HEADER_VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let status = r.read_u8().await?;
        let reason = read_str(r, MAX_REASON, "reason").await?;
        Ok(match status {
            0 => Answer::Accept,
            code => Answer::Refuse {
                code: RefusalCode::from_byte(code),
                reason,
            },
        })
    }
}

#[cfg(test)]
mod tests {
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
                virtual_cluster: "orders".into(),
                target: StreamTarget::Bootstrap,
                principal: ForwardedPrincipal::Anonymous,
            },
            StreamHeader {
                virtual_cluster: "orders".into(),
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
            virtual_cluster: "vc".into(),
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
        assert_eq!(read(ext).await.unwrap().virtual_cluster, "v");
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
}

//! The stream header: the first bytes of every tunnel stream, before any
//! Kafka byte (layout in `docs/TUNNEL.md`).
//!
//! The near edge names the far edge's virtual cluster and the broker
//! endpoint (bootstrap or node id) and the principal it authenticated, or a
//! named TCP service the far edge exports (kind 2: bytes relayed raw, no
//! principal); the far edge answers accept, or a refusal with a code and a
//! reason, and only after an accept do Kafka frames (or the service's bytes)
//! flow. Every length is bounded and checked before
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

/// What the stream stands for at the far edge: a listener of the virtual
/// cluster the header names, or the TCP service it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTarget {
    Bootstrap,
    Broker(i32),
    /// A service of the far edge's `mesh.services` (kind 2): the far edge
    /// dials its address and copies bytes both ways without reading them,
    /// so a TLS session inside stays end to end. Always anonymous: the near
    /// edge authenticated nobody, the service authenticates its clients.
    Service,
    /// A keepalive (kind 3, TLS-over-TCP tunnels): the far edge echoes
    /// every byte, so the near edge hears within a round trip whether the
    /// peer is still there; TCP alone notices a silent peer only after
    /// minutes. Anonymous; its name is not looked up.
    Keepalive,
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
    /// The far virtual cluster (kinds 0 and 1) or service (kind 2).
    pub name: String,
    pub target: StreamTarget,
    pub principal: ForwardedPrincipal,
}

/// Why the far edge refused a stream (a byte on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// The virtual cluster (or service) does not exist at the far edge, or
    /// is not exported to this peer (the two are not told apart).
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
        if self.name.is_empty() {
            return Err(HeaderError::Malformed(format!("empty {}", self.what())));
        }
        if self.target.is_anonymous_only() && self.principal != ForwardedPrincipal::Anonymous {
            return Err(HeaderError::Malformed(format!(
                "a {} stream carries no principal",
                self.what()
            )));
        }
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        out.push(HEADER_VERSION);
        let (kind, node) = match self.target {
            StreamTarget::Bootstrap => (0u8, -1i32),
            StreamTarget::Broker(id) => (1u8, id),
            StreamTarget::Service => (2u8, -1i32),
            StreamTarget::Keepalive => (3u8, -1i32),
        };
        out.push(kind);
        out.extend_from_slice(&node.to_be_bytes());
        put_str(&mut out, &self.name, MAX_NAME, self.what())?;
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
            (2, -1) => StreamTarget::Service,
            (3, -1) => StreamTarget::Keepalive,
            (kind @ (2 | 3), id) => {
                return Err(HeaderError::Malformed(format!(
                    "node id {id} on a target kind {kind} stream (must be -1)"
                )))
            }
            (kind, _) => return Err(HeaderError::Malformed(format!("target kind {kind}"))),
        };
        let what = target.what();
        let name = read_str(r, MAX_NAME, what).await?;
        if name.is_empty() {
            return Err(HeaderError::Malformed(format!("empty {what}")));
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
        // Nobody would check a principal on a service stream: refused
        // rather than silently dropped, so a confused peer hears of it.
        if target.is_anonymous_only() && principal != ForwardedPrincipal::Anonymous {
            return Err(HeaderError::Malformed(format!(
                "a {what} stream carries no principal"
            )));
        }
        let extensions = r.read_u16().await? as usize;
        if extensions > MAX_EXTENSIONS {
            return Err(HeaderError::Malformed(format!(
                "extensions are {extensions} bytes, at most {MAX_EXTENSIONS}"
            )));
        }
        let mut skip = vec![0u8; extensions];
        r.read_exact(&mut skip).await?;
        Ok(StreamHeader {
            name,
            target,
            principal,
        })
    }

    /// What `name` names, for errors.
    fn what(&self) -> &'static str {
        self.target.what()
    }

    /// The header of a keepalive stream.
    pub fn keepalive() -> Self {
        StreamHeader {
            name: "keepalive".into(),
            target: StreamTarget::Keepalive,
            principal: ForwardedPrincipal::Anonymous,
        }
    }
}

impl StreamTarget {
    /// Targets that carry no principal: nobody at the far edge would check one.
    fn is_anonymous_only(self) -> bool {
        matches!(self, StreamTarget::Service | StreamTarget::Keepalive)
    }

    fn what(self) -> &'static str {
        match self {
            StreamTarget::Service => "service",
            StreamTarget::Keepalive => "keepalive",
            StreamTarget::Bootstrap | StreamTarget::Broker(_) => "virtual cluster",
        }
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

    /// Writes a refusal and ends the stream cleanly: a stream dropped
    /// without its end may be reset, and the reset can overtake the answer,
    /// so the near edge would see a broken stream, not the reason.
    pub async fn refuse<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        self.write_to(w).await?;
        w.shutdown().await
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
#[path = "header_tests.rs"]
mod tests;

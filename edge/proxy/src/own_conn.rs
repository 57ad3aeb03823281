//! One Kafka connection for the edge's own requests (not a client's: the
//! keys topic, health probes): one request at a time, answers checked
//! against their correlation id.

use bytes::{BufMut, BytesMut};
use strait_kafka::codec::{decode_response, encode_request};
use strait_kafka::kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseKind};
use strait_kafka::kafka_protocol::protocol::StrBytes;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::upstream::{BoxedIo, Upstream, UpstreamTarget};

#[derive(Debug, Error)]
pub enum OwnConnError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

use OwnConnError as Error;

/// Answers larger than this are refused (a Fetch asks for at most 8 MiB).
const MAX_ANSWER: usize = 64 << 20;

pub struct OwnConn {
    io: BoxedIo,
    next_id: i32,
    client_id: &'static str,
}

impl OwnConn {
    /// `client_id` names the edge's job in the brokers' logs and quotas.
    pub async fn open(
        upstream: &dyn Upstream,
        target: &UpstreamTarget,
        client_id: &'static str,
    ) -> Result<Self, Error> {
        let io = upstream
            .connect_session(target)
            .await
            .map_err(|e| Error::Connect(e.to_string()))?
            .io;
        Ok(Self {
            io,
            next_id: 1,
            client_id,
        })
    }

    pub async fn call(
        &mut self,
        api_key: ApiKey,
        version: i16,
        body: RequestKind,
    ) -> Result<ResponseKind, Error> {
        let correlation_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str(self.client_id)));
        let frame = encode_request(&header, &body)
            .map_err(|e| Error::Protocol(format!("cannot encode {api_key:?}: {e}")))?;
        self.io.write_all(&frame).await?;
        self.io.flush().await?;
        let size = self.io.read_i32().await?;
        let size = usize::try_from(size)
            .ok()
            .filter(|s| (4..=MAX_ANSWER).contains(s))
            .ok_or_else(|| Error::Protocol(format!("answer to {api_key:?} has size {size}")))?;
        let mut buf = BytesMut::with_capacity(size + 4);
        buf.put_i32(size as i32);
        buf.resize(size + 4, 0);
        self.io.read_exact(&mut buf[4..]).await?;
        let (header, answer) = decode_response(api_key, version, buf.freeze()).map_err(|e| {
            Error::Protocol(format!("cannot decode the answer to {api_key:?}: {e}"))
        })?;
        if header.correlation_id != correlation_id {
            return Err(Error::Protocol(format!(
                "answer to {api_key:?} has correlation id {}, expected {correlation_id}",
                header.correlation_id
            )));
        }
        Ok(answer)
    }
}

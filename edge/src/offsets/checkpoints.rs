//! MirrorMaker 2's checkpoints, followed: `<source_alias>.checkpoints.internal`
//! on the cluster MM2 replicates into holds, per consumer group and
//! partition (the target-side topic name), the group's committed offset at
//! the source and its translation at the target. The index keeps the
//! latest translation of each.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use strait_encryption::keys::{next_offset, read_records};
use strait_kafka::kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use strait_kafka::kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, RequestKind, ResponseKind, TopicName,
};
use strait_kafka::kafka_protocol::protocol::StrBytes;
use strait_proxy::own_conn::OwnConn;
use strait_proxy::upstream::{Upstream, UpstreamTarget};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

const CLIENT_ID: &str = "strait-edge-checkpoints";
const LONG_POLL_MS: i32 = 500;
const MAX_BYTES: i32 = 8 << 20;
const RETRY: Duration = Duration::from_secs(1);
const OFFSET_OUT_OF_RANGE: i16 = 1;

/// (group, topic, partition) on the target side.
pub type Key = (String, String, i32);

pub struct Checkpoints {
    index: RwLock<HashMap<Key, i64>>,
    /// True once the topic was read to its end (or found absent) once.
    loaded: watch::Sender<bool>,
    _stop: DropGuard,
}

impl Checkpoints {
    pub fn follow(upstream: Arc<dyn Upstream>, topic: String) -> Arc<Self> {
        let stop = CancellationToken::new();
        let (loaded, _) = watch::channel(false);
        let this = Arc::new(Self {
            index: RwLock::new(HashMap::new()),
            loaded,
            _stop: stop.clone().drop_guard(),
        });
        tokio::spawn(run(Arc::downgrade(&this), upstream, topic, stop));
        this
    }

    /// The translated offset, waiting up to `wait` for the first full read.
    pub async fn translated(&self, key: &Key, wait: Duration) -> Option<i64> {
        let mut loaded = self.loaded.subscribe();
        let _ = tokio::time::timeout(wait, loaded.wait_for(|l| *l)).await;
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }
}

/// Checkpoint.java's record: key struct{group, topic: STRING, partition:
/// INT32}; value INT16 version 0, then struct{upstreamOffset, offset:
/// INT64, metadata: STRING}, `offset` being the target's.
pub fn decode(key: &[u8], value: &[u8]) -> Option<(Key, i64)> {
    fn string(buf: &[u8], pos: usize) -> Option<(String, usize)> {
        let n =
            usize::try_from(i16::from_be_bytes(buf.get(pos..pos + 2)?.try_into().ok()?)).ok()?;
        let s = std::str::from_utf8(buf.get(pos + 2..pos + 2 + n)?).ok()?;
        Some((s.to_string(), pos + 2 + n))
    }
    let (group, pos) = string(key, 0)?;
    let (topic, pos) = string(key, pos)?;
    let partition = i32::from_be_bytes(key.get(pos..pos + 4)?.try_into().ok()?);
    if key.len() != pos + 4 || i16::from_be_bytes(value.get(..2)?.try_into().ok()?) != 0 {
        return None;
    }
    let downstream = i64::from_be_bytes(value.get(10..18)?.try_into().ok()?);
    Some(((group, topic, partition), downstream))
}

async fn run(
    this: std::sync::Weak<Checkpoints>,
    upstream: Arc<dyn Upstream>,
    topic: String,
    stop: CancellationToken,
) {
    let mut offset = 0i64;
    let mut conn: Option<OwnConn> = None;
    loop {
        let Some(cp) = this.upgrade() else { return };
        let round = tokio::select! {
            _ = stop.cancelled() => return,
            r = round(upstream.as_ref(), &topic, &mut conn, &mut offset, &cp) => r,
        };
        match round {
            Ok(at_end) => {
                if at_end {
                    cp.loaded.send_replace(true);
                }
            }
            Err(e) => {
                conn = None;
                tracing::warn!(topic = %topic, "following MirrorMaker 2 checkpoints: {e}");
                drop(cp);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// One Fetch; whether the end was reached. An absent topic counts as read
/// (no group has a checkpoint), and is looked for again after a while.
async fn round(
    upstream: &dyn Upstream,
    topic: &str,
    conn: &mut Option<OwnConn>,
    offset: &mut i64,
    cp: &Checkpoints,
) -> Result<bool, String> {
    if conn.is_none() {
        let Some((node_id, address)) = strait_keys_topic::leader(upstream, topic)
            .await
            .map_err(|e| e.to_string())?
        else {
            cp.loaded.send_replace(true);
            tokio::time::sleep(RETRY).await;
            return Ok(true);
        };
        *conn = Some(
            OwnConn::open(
                upstream,
                &UpstreamTarget::Broker { node_id, address },
                CLIENT_ID,
            )
            .await
            .map_err(|e| e.to_string())?,
        );
    }
    let Some(c) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(LONG_POLL_MS)
        .with_min_bytes(1)
        .with_max_bytes(MAX_BYTES)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_current_leader_epoch(-1)
                .with_fetch_offset(*offset)
                .with_last_fetched_epoch(-1)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(MAX_BYTES)])]);
    let ResponseKind::Fetch(resp) = c
        .call(ApiKey::Fetch, 12, RequestKind::Fetch(req))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err("Fetch answered with another message".into());
    };
    let p = resp
        .responses
        .first()
        .and_then(|t| t.partitions.first())
        .ok_or("Fetch named no partition")?;
    match p.error_code {
        0 => {}
        OFFSET_OUT_OF_RANGE => {
            *offset = p.log_start_offset.max(0);
            return Ok(false);
        }
        code => return Err(format!("Fetch error code {code}")),
    }
    let records: Bytes = p.records.clone().unwrap_or_default();
    if !records.is_empty() {
        let mut index = cp.index.write().unwrap_or_else(|e| e.into_inner());
        for (at, key, value) in read_records(&records)? {
            if at < *offset {
                continue;
            }
            if let (Some(k), Some(v)) = (key, value) {
                if let Some((k, downstream)) = decode(&k, &v) {
                    index.insert(k, downstream);
                }
            }
        }
        if let Some(next) = next_offset(&records) {
            *offset = (*offset).max(next);
        }
    }
    Ok(*offset >= p.high_watermark)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as i16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn a_checkpoint_record_decodes_as_mm2_writes_it() {
        let mut key = string("billing");
        key.extend(string("orders"));
        key.extend(2i32.to_be_bytes());
        let mut value = 0i16.to_be_bytes().to_vec();
        value.extend(120i64.to_be_bytes());
        value.extend(97i64.to_be_bytes());
        value.extend(string(""));
        assert_eq!(
            decode(&key, &value),
            Some((("billing".into(), "orders".into(), 2), 97))
        );
        // Another version, or a key with trailing bytes, is not guessed at.
        let mut v1 = value.clone();
        v1[1] = 1;
        assert_eq!(decode(&key, &v1), None);
        let mut long = key.clone();
        long.push(0);
        assert_eq!(decode(&long, &value), None);
    }
}

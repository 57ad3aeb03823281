//! Following keys topics: every record from the start, then long polls,
//! applied to the encryption core's index.

use std::sync::{Arc, Weak};
use std::time::Duration;

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, RequestKind, ResponseKind};
use strait_encryption::keys::{next_offset, read_records};
use strait_encryption::KeyIndex;
use strait_proxy::upstream::{Upstream, UpstreamTarget};
use tokio_util::sync::DropGuard;

use crate::{leader, topic_name, Error};
use strait_proxy::own_conn::OwnConn as Conn;

/// How long the broker may hold a Fetch when there is nothing new.
const LONG_POLL_MS: i32 = 500;
const MAX_BYTES: i32 = 8 << 20;
/// A keys topic that does not exist (yet) is looked for again this often.
const ABSENT_RETRY: Duration = Duration::from_secs(2);
const ERROR_RETRY: Duration = Duration::from_secs(1);
const OFFSET_OUT_OF_RANGE: i16 = 1;

/// Follow `topics` (name, whether it is this cluster's own keys topic) until
/// the index is dropped (its record encryption was replaced or stopped).
pub fn spawn_followers(
    upstream: Arc<dyn Upstream>,
    topics: Vec<(String, bool)>,
    index: &Arc<KeyIndex>,
    guard: Arc<DropGuard>,
) {
    for (topic, own) in topics {
        let follower = Follower {
            upstream: upstream.clone(),
            topic,
            own,
            index: Arc::downgrade(index),
            _guard: guard.clone(),
        };
        tokio::spawn(follower.run());
    }
}

struct Follower {
    upstream: Arc<dyn Upstream>,
    topic: String,
    own: bool,
    index: Weak<KeyIndex>,
    _guard: Arc<DropGuard>,
}

enum Round {
    /// Read up to the end the broker reported.
    AtEnd,
    More,
    Absent,
}

impl Follower {
    async fn run(self) {
        let mut offset = 0i64;
        let mut conn: Option<Conn> = None;
        let mut failing = false;
        loop {
            let Some(index) = self.index.upgrade() else {
                return;
            };
            match self.round(&index, &mut conn, &mut offset).await {
                Ok(round) => {
                    if failing {
                        tracing::info!(topic = %self.topic, "reading the keys topic again");
                        failing = false;
                    }
                    match round {
                        Round::AtEnd => index.mark_caught_up(&self.topic),
                        Round::More => {}
                        Round::Absent => {
                            // Nothing to read: not there yet (not created, or not mirrored).
                            index.mark_caught_up(&self.topic);
                            drop(index);
                            tokio::time::sleep(ABSENT_RETRY).await;
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(topic = %self.topic, error = %e, "cannot read the keys topic; retrying");
                        failing = true;
                    }
                    conn = None;
                    drop(index);
                    tokio::time::sleep(ERROR_RETRY).await;
                }
            }
        }
    }

    async fn round(
        &self,
        index: &KeyIndex,
        conn: &mut Option<Conn>,
        offset: &mut i64,
    ) -> Result<Round, Error> {
        if conn.is_none() {
            let Some((node_id, address)) = leader(self.upstream.as_ref(), &self.topic).await?
            else {
                return Ok(Round::Absent);
            };
            *conn = Some(
                Conn::open(
                    self.upstream.as_ref(),
                    &UpstreamTarget::Broker { node_id, address },
                    crate::CLIENT_ID,
                )
                .await?,
            );
        }
        let Some(c) = conn.as_mut() else {
            return Err(Error::Protocol("no connection".into()));
        };
        let req = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(LONG_POLL_MS)
            .with_min_bytes(1)
            .with_max_bytes(MAX_BYTES)
            .with_isolation_level(0)
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(topic_name(&self.topic))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_current_leader_epoch(-1)
                    .with_fetch_offset(*offset)
                    .with_last_fetched_epoch(-1)
                    .with_log_start_offset(-1)
                    .with_partition_max_bytes(MAX_BYTES)])]);
        let ResponseKind::Fetch(resp) = c.call(ApiKey::Fetch, 12, RequestKind::Fetch(req)).await?
        else {
            return Err(Error::Protocol(
                "Fetch answered with another message".into(),
            ));
        };
        if resp.error_code != 0 {
            return Err(Error::Kafka {
                what: "Fetch",
                code: resp.error_code,
            });
        }
        let p = resp
            .responses
            .first()
            .and_then(|t| t.partitions.first())
            .ok_or_else(|| Error::Protocol("Fetch named no partition".into()))?;
        match p.error_code {
            0 => {}
            OFFSET_OUT_OF_RANGE => {
                // Compaction or retention removed the start: read from what is left.
                *offset = p.log_start_offset.max(0);
                return Ok(Round::More);
            }
            code => {
                return Err(Error::Kafka {
                    what: "Fetch",
                    code,
                })
            }
        }
        let records = p.records.clone().unwrap_or_default();
        if !records.is_empty() {
            let read = read_records(&records).map_err(Error::Protocol)?;
            for (at, key, value) in read {
                if at < *offset {
                    continue; // a batch may begin before the offset asked for
                }
                if let Some(key) = key {
                    index.apply(self.own, &key, value.as_deref());
                }
            }
            if let Some(next) = next_offset(&records) {
                *offset = (*offset).max(next);
            }
        }
        Ok(if *offset >= p.high_watermark {
            Round::AtEnd
        } else {
            Round::More
        })
    }
}

//! Consumer-group offsets across a failover (issue 14, item 5). After a
//! switch to a standby that MirrorMaker 2 replicates into, a group that
//! never committed on the standby would start from its `auto.offset.reset`
//! there: from the beginning (re-reading everything) or the end (skipping
//! what it had not read). This filter answers OffsetFetch, for every
//! partition the standby has no committed offset for, with MM2's
//! translation of the group's last checkpointed offset at the primary, so
//! the group resumes near where it was. What the group commits on the
//! standby from then on is answered as it is.
//!
//! Re-reads to expect: the records between the checkpoint MM2 last made
//! (every `emit.checkpoints.interval.seconds`, after the group's commit)
//! and the switch; MM2 translates to an offset at or before the committed
//! one, never after, so nothing is skipped. Partitions without a checkpoint
//! keep `-1`, and the client applies its `auto.offset.reset`, unless the
//! failover group sets the edge's own (`offset_reset`, see [`reset`]).

mod checkpoints;
mod reset;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub use checkpoints::Checkpoints;
use strait_edge_config::OffsetReset;
use strait_filter::{
    ApiKeySet, ConnectionInfo, Filter, FilterContext, FilterFactory, RequestFrame, RequestVerdict,
    ResponseFrame, ResponseVerdict,
};
use strait_kafka::kafka_protocol::messages::{ApiKey, RequestKind, ResponseKind};
use strait_proxy::upstream::Upstream;

/// How long an OffsetFetch waits for the checkpoints to be read once
/// after a switch, before it is answered without them.
const LOAD_WAIT: Duration = Duration::from_secs(5);
/// Requests awaiting their answer, per connection (a client pipelines few
/// OffsetFetches; a bound keeps a misbehaving one from growing the map).
const MAX_PENDING: usize = 64;

/// The edge's own reset policy and the standby it asks for offsets.
#[derive(Clone)]
pub struct Reset {
    pub policy: OffsetReset,
    pub upstream: Arc<dyn Upstream>,
}

pub struct OffsetTranslationFactory {
    checkpoints: Arc<Checkpoints>,
    reset: Option<Reset>,
}

impl OffsetTranslationFactory {
    pub fn new(checkpoints: Arc<Checkpoints>, reset: Option<Reset>) -> Self {
        Self { checkpoints, reset }
    }
}

impl FilterFactory for OffsetTranslationFactory {
    fn create(&self, _connection: &ConnectionInfo) -> Box<dyn Filter> {
        Box::new(OffsetTranslation {
            checkpoints: self.checkpoints.clone(),
            reset: self.reset.clone(),
            groups: HashMap::new(),
        })
    }
}

struct OffsetTranslation {
    checkpoints: Arc<Checkpoints>,
    reset: Option<Reset>,
    /// correlation id -> the group of an OffsetFetch before v8, whose
    /// answer does not name it.
    groups: HashMap<i32, String>,
}

#[async_trait]
impl Filter for OffsetTranslation {
    fn name(&self) -> &'static str {
        "offset-translation"
    }

    fn request_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::OffsetFetch])
    }

    fn response_keys(&self) -> ApiKeySet {
        ApiKeySet::of(&[ApiKey::OffsetFetch])
    }

    async fn on_request(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut RequestFrame,
    ) -> RequestVerdict {
        if let RequestKind::OffsetFetch(req) = frame.body() {
            if frame.version() < 8 && self.groups.len() < MAX_PENDING {
                self.groups
                    .insert(frame.correlation_id(), req.group_id.0.to_string());
            }
        }
        RequestVerdict::Forward
    }

    async fn on_response(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        let old_group = self.groups.remove(&frame.correlation_id());
        let ResponseKind::OffsetFetch(resp) = frame.body() else {
            return ResponseVerdict::Forward;
        };
        // (group, topic, partition) of each unanswered partition, where it is.
        let mut missing = Vec::new();
        if let Some(group) = &old_group {
            for (t, topic) in resp.topics.iter().enumerate() {
                for (p, part) in topic.partitions.iter().enumerate() {
                    if part.error_code == 0 && part.committed_offset < 0 {
                        missing.push((
                            None,
                            t,
                            p,
                            (
                                group.clone(),
                                topic.name.0.to_string(),
                                part.partition_index,
                            ),
                        ));
                    }
                }
            }
        }
        for (g, group) in resp.groups.iter().enumerate() {
            for (t, topic) in group.topics.iter().enumerate() {
                // A topic named by id only (v10) is left as it is.
                if topic.name.0.is_empty() {
                    continue;
                }
                for (p, part) in topic.partitions.iter().enumerate() {
                    if part.error_code == 0 && part.committed_offset < 0 {
                        missing.push((
                            Some(g),
                            t,
                            p,
                            (
                                group.group_id.0.to_string(),
                                topic.name.0.to_string(),
                                part.partition_index,
                            ),
                        ));
                    }
                }
            }
        }
        if missing.is_empty() {
            return ResponseVerdict::Forward;
        }
        let mut found = Vec::new();
        let mut unplaced = Vec::new();
        for (g, t, p, key) in missing {
            match self.checkpoints.translated(&key, LOAD_WAIT).await {
                Some(offset) => found.push((g, t, p, key, Source::Checkpoint, offset)),
                None => unplaced.push((g, t, p, key)),
            }
        }
        if let (Some(reset), false) = (&self.reset, unplaced.is_empty()) {
            let partitions: BTreeSet<(String, i32)> = unplaced
                .iter()
                .map(|(_, _, _, (_, topic, partition))| (topic.clone(), *partition))
                .collect();
            let asked = reset::placed(reset.upstream.as_ref(), &partitions, reset.policy);
            match tokio::time::timeout(LOAD_WAIT, asked).await {
                Ok(Ok(offsets)) => {
                    for (g, t, p, key) in unplaced {
                        if let Some(offset) = offsets.get(&(key.1.clone(), key.2)) {
                            found.push((g, t, p, key, Source::Reset(reset.policy), *offset));
                        }
                    }
                }
                // The client's own auto.offset.reset applies instead.
                Ok(Err(err)) => {
                    tracing::warn!(%err, "offset reset: the standby's offsets could not be read; the client's auto.offset.reset applies")
                }
                Err(_) => {
                    tracing::warn!("offset reset: the standby's offsets were not read in time; the client's auto.offset.reset applies")
                }
            }
        }
        if found.is_empty() {
            return ResponseVerdict::Forward;
        }
        let ResponseKind::OffsetFetch(resp) = frame.body_mut() else {
            return ResponseVerdict::Forward;
        };
        for (g, t, p, (group, topic, partition), source, offset) in found {
            let slot = match g {
                None => resp
                    .topics
                    .get_mut(t)
                    .and_then(|x| x.partitions.get_mut(p))
                    .map(|x| &mut x.committed_offset),
                Some(g) => resp
                    .groups
                    .get_mut(g)
                    .and_then(|x| x.topics.get_mut(t))
                    .and_then(|x| x.partitions.get_mut(p))
                    .map(|x| &mut x.committed_offset),
            };
            if let Some(slot) = slot {
                *slot = offset;
                match source {
                    Source::Checkpoint => {
                        tracing::info!(group = %group, topic = %topic, partition, offset, "consumer offset translated from MirrorMaker 2's checkpoint")
                    }
                    Source::Reset(policy) => {
                        tracing::info!(group = %group, topic = %topic, partition, offset, ?policy, "consumer offset placed by the edge's offset_reset (no checkpoint)")
                    }
                }
            }
        }
        ResponseVerdict::Forward
    }
}

/// Where an answered offset came from, for its log line.
#[derive(Clone, Copy)]
enum Source {
    Checkpoint,
    Reset(OffsetReset),
}

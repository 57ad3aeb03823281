//! The edge's own offset reset (`upstream.failover.offset_reset`): where a
//! group starts on a standby partition that has neither an offset committed
//! there nor a MirrorMaker 2 checkpoint to translate. Without it the client's
//! `auto.offset.reset` decides, which differs from client to client; with it
//! every group of the virtual cluster starts alike, from the standby's own
//! offsets (ListOffsets at each partition's leader).

use std::collections::{BTreeMap, BTreeSet};

use strait_edge_config::OffsetReset;
use strait_proxy::own_conn::OwnConn;
use strait_proxy::upstream::Upstream;

use crate::lag::tails::{list_offsets, Leaders};

const CLIENT_ID: &str = "strait-edge-offset-reset";

/// ListOffsets' timestamps for the log start and the end.
const EARLIEST: i64 = -2;
const LATEST: i64 = -1;

/// The offset `reset` places each of `partitions` at; a partition of a topic
/// the cluster does not have is left out.
pub async fn placed(
    upstream: &dyn Upstream,
    partitions: &BTreeSet<(String, i32)>,
    reset: OffsetReset,
) -> Result<BTreeMap<(String, i32), i64>, String> {
    let topics: Vec<String> = partitions
        .iter()
        .map(|(t, _)| t.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let timestamp = match reset {
        OffsetReset::Earliest => EARLIEST,
        OffsetReset::Latest => LATEST,
        OffsetReset::TimestampMs(ms) => ms.max(0),
    };
    let mut out = BTreeMap::new();
    for (target, led) in Leaders::of(upstream, &topics).await?.iter() {
        let wanted = only(led, |topic, p| partitions.contains(&(topic.to_string(), p)));
        if wanted.is_empty() {
            continue;
        }
        let mut conn = OwnConn::open(upstream, target, CLIENT_ID)
            .await
            .map_err(|e| format!("ListOffsets: {e}"))?;
        let mut found = list_offsets(&mut conn, &wanted, timestamp).await?;
        // No record at or after the time: the group starts at the end.
        let after_the_last = only(&wanted, |topic, p| {
            found.get(&(topic.to_string(), p)).is_some_and(|o| *o < 0)
        });
        if !after_the_last.is_empty() {
            found.extend(list_offsets(&mut conn, &after_the_last, LATEST).await?);
        }
        out.extend(found);
    }
    Ok(out)
}

fn only(
    topics: &BTreeMap<String, Vec<i32>>,
    keep: impl Fn(&str, i32) -> bool,
) -> BTreeMap<String, Vec<i32>> {
    topics
        .iter()
        .map(|(topic, parts)| {
            let kept: Vec<i32> = parts.iter().copied().filter(|p| keep(topic, *p)).collect();
            (topic.clone(), kept)
        })
        .filter(|(_, parts)| !parts.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keeps_the_asked_partitions_and_drops_empty_topics() {
        let led = BTreeMap::from([("a".to_string(), vec![0, 1, 2]), ("b".to_string(), vec![0])]);
        let kept = only(&led, |t, p| t == "a" && p != 1);
        assert_eq!(kept, BTreeMap::from([("a".to_string(), vec![0, 2])]));
    }
}

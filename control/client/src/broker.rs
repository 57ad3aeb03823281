//! What a KMS broker follows in the control plane: the trust bundles that
//! verify its callers and the deny lists it enforces. Cached on disk like
//! the edge's snapshot, so a broker restarted while the control plane is
//! down still knows whom to trust and whom to refuse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_control_state::spec::{DenyListSpec, TrustBundleSpec};
use strait_control_state::Kind;
use tokio::sync::watch;

use crate::{follow, typed_map, write_atomic, ClientError, ControlClient};
use crate::{SnapshotSource, Store};

/// Kinds a KMS broker watches (its access role allows these and KmsRealm).
pub const BROKER_KINDS: [Kind; 2] = [Kind::TrustBundle, Kind::DenyList];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSnapshot {
    pub broker: String,
    pub revision: u64,
    pub source: SnapshotSource,
    pub trust_bundles: BTreeMap<String, TrustBundleSpec>,
    pub deny_lists: BTreeMap<String, DenyListSpec>,
}

impl BrokerSnapshot {
    fn same_content(&self, o: &BrokerSnapshot) -> bool {
        self.trust_bundles == o.trust_bundles && self.deny_lists == o.deny_lists
    }
}

pub fn build_broker_snapshot(broker: &str, revision: u64, store: &Store) -> BrokerSnapshot {
    BrokerSnapshot {
        broker: broker.to_string(),
        revision,
        source: SnapshotSource::ControlPlane,
        trust_bundles: typed_map(store, Kind::TrustBundle, |_, _: &TrustBundleSpec| true),
        deny_lists: typed_map(store, Kind::DenyList, |_, _: &DenyListSpec| true),
    }
}

pub fn broker_cache_path(cache_dir: &Path, broker: &str) -> PathBuf {
    cache_dir.join(format!("kms-broker-{broker}.json"))
}

pub fn write_broker_cache(cache_dir: &Path, snap: &BrokerSnapshot) -> Result<(), ClientError> {
    let bytes = serde_json::to_vec_pretty(snap).expect("snapshot serializes");
    write_atomic(
        cache_dir,
        &broker_cache_path(cache_dir, &snap.broker),
        &bytes,
    )
}

pub fn read_broker_cache(cache_dir: &Path, broker: &str) -> Option<BrokerSnapshot> {
    let path = broker_cache_path(cache_dir, broker);
    let mut s = crate::read_cached(&path, |s: &BrokerSnapshot| s.broker == broker)?;
    s.source = SnapshotSource::Cache;
    Some(s)
}

/// Builds the client afresh (re-reading certificate files, or over the live
/// TLS configuration of an SVID) for every new connection.
pub type ClientSource = Arc<dyn Fn() -> Result<ControlClient, ClientError> + Send + Sync>;

pub struct BrokerWatchConfig {
    pub client: ClientSource,
    pub broker_name: String,
    pub cache_dir: PathBuf,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

pub struct BrokerWatch {
    /// `None` until a snapshot is known (from the cache or the control plane).
    pub config: watch::Receiver<Option<Arc<BrokerSnapshot>>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts following the control plane for broker `broker_name`; the cached
/// snapshot, if any, is published before this returns.
pub fn watch_broker_config(cfg: BrokerWatchConfig) -> Result<BrokerWatch, ClientError> {
    // Fail at start on a configuration that can never connect.
    (cfg.client)()?;
    let cached = read_broker_cache(&cfg.cache_dir, &cfg.broker_name).map(Arc::new);
    let (tx, rx) = watch::channel(cached);
    let task = tokio::spawn(async move {
        let closed = tx.clone();
        let source = cfg.client.clone();
        follow(
            move || source(),
            &BROKER_KINDS,
            cfg.backoff_min,
            cfg.backoff_max,
            || !closed.is_closed(),
            |store, revision| {
                let snap = build_broker_snapshot(&cfg.broker_name, revision, store);
                let unchanged = tx.borrow().as_ref().is_some_and(|cur| {
                    cur.source == SnapshotSource::ControlPlane && cur.same_content(&snap)
                });
                if unchanged {
                    return;
                }
                if let Err(e) = write_broker_cache(&cfg.cache_dir, &snap) {
                    tracing::warn!(error = %e, "could not write the config cache");
                }
                tx.send_replace(Some(Arc::new(snap)));
            },
        )
        .await
    });
    Ok(BrokerWatch { config: rx, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(store: &mut Store, key: (Kind, String), spec: serde_json::Value) {
        store.insert(key, spec.into());
    }

    #[test]
    fn snapshot_and_cache_round_trip() {
        let mut store: Store = BTreeMap::new();
        put(
            &mut store,
            (Kind::TrustBundle, "home".into()),
            json!({"trust_domain": "example.org", "pem": "-----BEGIN CERTIFICATE-----"}),
        );
        put(
            &mut store,
            (Kind::DenyList, "leak".into()),
            json!({"spiffe_ids": ["spiffe://example.org/edge/e9"], "reason": "key leaked"}),
        );
        put(
            &mut store,
            (Kind::KmsRealm, "v".into()),
            json!({"provider": "local"}),
        );
        let s = build_broker_snapshot("k1", 4, &store);
        assert_eq!(s.trust_bundles["home"].trust_domain, "example.org");
        assert_eq!(
            s.deny_lists["leak"].spiffe_ids,
            vec!["spiffe://example.org/edge/e9".to_string()]
        );
        let dir = tempfile::tempdir().unwrap();
        write_broker_cache(dir.path(), &s).unwrap();
        let back = read_broker_cache(dir.path(), "k1").unwrap();
        assert_eq!(back.source, SnapshotSource::Cache);
        assert!(back.same_content(&s));
        assert!(read_broker_cache(dir.path(), "k2").is_none());
    }
}

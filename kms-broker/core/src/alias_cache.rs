//! Caches alias resolution (default 10 minutes, as Kroxylicious) so that
//! naming a KEK per topic does not cost a KMS call per request. NotFound is
//! cached too, for a shorter time, so a topic with no key cannot cause a KMS
//! request storm.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{KekRef, Kms, KmsError, Result};

pub struct AliasCache {
    ttl: Duration,
    negative_ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Result<KekRef>)>>,
}

impl Default for AliasCache {
    fn default() -> Self {
        Self::new(Duration::from_secs(600), Duration::from_secs(30))
    }
}

impl AliasCache {
    pub fn new(ttl: Duration, negative_ttl: Duration) -> Self {
        Self {
            ttl,
            negative_ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Cached answer if still fresh, else ask `kms` and remember the answer
    /// (successes and NotFound; transient errors are not cached).
    pub async fn resolve(&self, kms: &dyn Kms, alias: &str) -> Result<KekRef> {
        if let Some(hit) = self.lookup(alias) {
            return hit;
        }
        let res = kms.resolve_alias(alias).await;
        let cacheable = matches!(res, Ok(_) | Err(KmsError::NotFound(_)));
        if cacheable {
            self.entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(alias.to_string(), (Instant::now(), res.clone()));
        }
        res
    }

    fn lookup(&self, alias: &str) -> Option<Result<KekRef>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (at, res) = entries.get(alias)?;
        let ttl = if res.is_ok() {
            self.ttl
        } else {
            self.negative_ttl
        };
        (at.elapsed() < ttl).then(|| res.clone())
    }

    pub fn invalidate(&self, alias: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(alias);
    }
}

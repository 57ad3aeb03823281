//! Per-principal quotas, enforced as Kafka brokers do (KIP-219): a client
//! over its quota still gets its answer at once, with `throttle_time_ms` set,
//! and the edge then reads nothing more from that connection until the
//! throttle time has passed. Well-behaved clients wait on their own too.
//!
//! Accounting is on raw frame sizes, so quotas never make the edge decode a
//! frame; only an answer that must carry a throttle time is re-encoded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use globset::{Glob, GlobMatcher};
use prometheus_client::metrics::counter::Counter;
use strait_filter::Principal;
use strait_kafka::kafka_protocol::messages::ResponseKind;

/// Longest throttle ever imposed on one request.
const MAX_THROTTLE: Duration = Duration::from_secs(30);

pub use strait_edge_config::Rates;

/// Quotas of one virtual cluster: a default and overrides by principal glob.
pub struct QuotaPolicy {
    default: Rates,
    overrides: Vec<(GlobMatcher, Rates)>,
    principals: Mutex<HashMap<Principal, Arc<PrincipalQuota>>>,
    throttled_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl QuotaPolicy {
    /// `overrides` are principal globs, first match wins.
    pub fn new(
        default: Rates,
        overrides: &[(String, Rates)],
        throttled_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    ) -> Result<Self, globset::Error> {
        let overrides = overrides
            .iter()
            .map(|(pattern, rates)| Ok((Glob::new(pattern)?.compile_matcher(), *rates)))
            .collect::<Result<_, globset::Error>>()?;
        Ok(QuotaPolicy {
            default,
            overrides,
            principals: Mutex::default(),
            throttled_seconds,
        })
    }

    /// The shared quota state of a principal: all its connections draw on it.
    pub fn for_principal(&self, principal: &Principal) -> Option<Arc<PrincipalQuota>> {
        let mut principals = self.principals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(quota) = principals.get(principal) {
            return Some(quota.clone());
        }
        let rates = self
            .overrides
            .iter()
            .find(|(glob, _)| glob.is_match(principal.as_str()))
            .map(|(_, rates)| *rates)
            .unwrap_or(self.default);
        if rates == Rates::default() {
            return None;
        }
        let now = Instant::now();
        let quota = Arc::new(PrincipalQuota {
            produce: rates
                .produce_bytes_per_second
                .map(|r| Mutex::new(Bucket::new(r, now))),
            fetch: rates
                .fetch_bytes_per_second
                .map(|r| Mutex::new(Bucket::new(r, now))),
            requests: rates
                .requests_per_second
                .map(|r| Mutex::new(Bucket::new(r, now))),
            throttled_seconds: self.throttled_seconds.clone(),
        });
        principals.insert(principal.clone(), quota.clone());
        Some(quota)
    }
}

/// One principal's token buckets.
pub struct PrincipalQuota {
    produce: Option<Mutex<Bucket>>,
    fetch: Option<Mutex<Bucket>>,
    requests: Option<Mutex<Bucket>>,
    throttled_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl PrincipalQuota {
    /// Records a request about to be sent and returns how long the client
    /// must be throttled for it (zero when within quota).
    pub fn on_request(&self, api_key: i16, frame_len: usize) -> Duration {
        let now = Instant::now();
        let mut throttle = Duration::ZERO;
        if let Some(requests) = &self.requests {
            throttle = throttle.max(lock(requests).take(1.0, now));
        }
        if api_key == 0 {
            if let Some(produce) = &self.produce {
                throttle = throttle.max(lock(produce).take(frame_len as f64, now));
            }
        }
        if api_key == 1 {
            // Fetch bytes are charged when the answer arrives; a fetch is
            // throttled for the debt earlier answers left.
            if let Some(fetch) = &self.fetch {
                throttle = throttle.max(lock(fetch).take(0.0, now));
            }
        }
        if !throttle.is_zero() {
            self.throttled_seconds.inc_by(throttle.as_secs_f64());
        }
        throttle
    }

    /// Charges a fetch answer of `frame_len` bytes.
    pub fn on_fetch_response(&self, frame_len: usize) {
        if let Some(fetch) = &self.fetch {
            lock(fetch).take(frame_len as f64, Instant::now());
        }
    }

    pub fn limits_fetch(&self) -> bool {
        self.fetch.is_some()
    }
}

fn lock(bucket: &Mutex<Bucket>) -> std::sync::MutexGuard<'_, Bucket> {
    bucket.lock().unwrap_or_else(|e| e.into_inner())
}

/// A token bucket that may go into debt: the debt, divided by the rate, is
/// the throttle time. One second of burst.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Self {
        Bucket {
            rate,
            tokens: rate,
            last: now,
        }
    }

    fn take(&mut self, amount: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - amount;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate).min(MAX_THROTTLE)
        }
    }
}

/// Sets `throttle_time_ms` on answers that have it, keeping the larger of the
/// broker's and the edge's. Returns false for APIs without the field.
pub fn set_throttle_time(body: &mut ResponseKind, throttle_ms: i32) -> bool {
    macro_rules! bump {
        ($resp:expr) => {{
            $resp.throttle_time_ms = $resp.throttle_time_ms.max(throttle_ms);
            true
        }};
    }
    match body {
        ResponseKind::Produce(r) => bump!(r),
        ResponseKind::Fetch(r) => bump!(r),
        ResponseKind::ListOffsets(r) => bump!(r),
        ResponseKind::Metadata(r) => bump!(r),
        ResponseKind::OffsetCommit(r) => bump!(r),
        ResponseKind::OffsetFetch(r) => bump!(r),
        ResponseKind::FindCoordinator(r) => bump!(r),
        ResponseKind::JoinGroup(r) => bump!(r),
        ResponseKind::Heartbeat(r) => bump!(r),
        ResponseKind::LeaveGroup(r) => bump!(r),
        ResponseKind::SyncGroup(r) => bump!(r),
        ResponseKind::DescribeGroups(r) => bump!(r),
        ResponseKind::ListGroups(r) => bump!(r),
        ResponseKind::ApiVersions(r) => bump!(r),
        ResponseKind::CreateTopics(r) => bump!(r),
        ResponseKind::DeleteTopics(r) => bump!(r),
        ResponseKind::InitProducerId(r) => bump!(r),
        ResponseKind::DescribeConfigs(r) => bump!(r),
        ResponseKind::DescribeCluster(r) => bump!(r),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_throttles_by_debt_over_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(1000.0, start);
        assert_eq!(
            bucket.take(1000.0, start),
            Duration::ZERO,
            "one second of burst"
        );
        let throttle = bucket.take(500.0, start);
        assert_eq!(throttle, Duration::from_millis(500));
        // Half a second later the debt is repaid.
        assert_eq!(
            bucket.take(0.0, start + Duration::from_millis(500)),
            Duration::ZERO
        );
        assert_eq!(
            bucket.take(1e9, start + Duration::from_secs(1)),
            MAX_THROTTLE,
            "capped"
        );
    }

    #[test]
    fn principals_share_a_quota_and_overrides_match_by_glob() {
        let policy = QuotaPolicy::new(
            Rates {
                produce_bytes_per_second: Some(100.0),
                ..Rates::default()
            },
            &[("spiffe://example.org/ns/batch/*".into(), Rates::default())],
            Counter::default(),
        )
        .unwrap();
        let app = Principal::Named("spiffe://example.org/ns/shop/sa/orders".into());
        let a = policy.for_principal(&app).unwrap();
        let b = policy.for_principal(&app).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.on_request(0, 100), Duration::ZERO);
        assert!(
            b.on_request(0, 50) > Duration::ZERO,
            "second connection shares the bucket"
        );
        assert_eq!(
            a.on_request(3, 1_000_000),
            Duration::ZERO,
            "metadata is not produce"
        );
        let batch = Principal::Named("spiffe://example.org/ns/batch/sa/loader".into());
        assert!(policy.for_principal(&batch).is_none(), "unlimited override");
    }
}

//! A token bucket per source address for `Identity/Join`, the one method
//! anyone who reaches the port may call (the join token is the credential):
//! it bounds how fast a source can guess tokens or make the node sign and
//! write through Raft. The table of sources is bounded too: when it is
//! full, buckets that have refilled (idle sources) are dropped, and if none
//! has, new sources share one overflow bucket rather than growing memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Rate, burst and how many sources are tracked at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JoinLimit {
    /// Tokens added per second per source.
    pub per_second: f64,
    /// Bucket size: joins a source may make at once.
    pub burst: u32,
    /// Sources tracked at once (the overflow bucket beyond).
    pub max_sources: usize,
}

impl Default for JoinLimit {
    fn default() -> Self {
        JoinLimit {
            per_second: 1.0,
            burst: 10,
            max_sources: 10_000,
        }
    }
}

impl JoinLimit {
    pub fn validate(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            errs.push(format!(
                "--join-rate must be a positive number of joins per second, got {}",
                self.per_second
            ));
        }
        if self.burst == 0 {
            errs.push("--join-burst must be at least 1".to_string());
        }
        if self.max_sources == 0 {
            errs.push("--join-rate-sources must be at least 1".to_string());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Where a refused source stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    /// When the next join from it would be accepted.
    pub retry_after: Duration,
    /// It was counted in the shared overflow bucket.
    pub overflow: bool,
}

pub struct JoinLimiter {
    limit: JoinLimit,
    state: Mutex<(HashMap<IpAddr, Bucket>, Option<Bucket>)>,
}

impl JoinLimiter {
    pub fn new(limit: JoinLimit) -> JoinLimiter {
        JoinLimiter {
            limit,
            state: Mutex::new((HashMap::new(), None)),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.limit.per_second).min(self.limit.burst as f64);
        b.at = now;
    }

    fn take(&self, b: &mut Bucket, now: Instant, overflow: bool) -> Result<(), Refused> {
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err(Refused {
            retry_after: Duration::from_secs_f64((1.0 - b.tokens) / self.limit.per_second),
            overflow,
        })
    }

    /// Spends one join of `source` at `now`.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), Refused> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (buckets, overflow) = &mut *guard;
        let full = Bucket {
            tokens: self.limit.burst as f64,
            at: now,
        };
        if !buckets.contains_key(&source) && buckets.len() >= self.limit.max_sources {
            let burst = self.limit.burst as f64;
            let rate = self.limit.per_second;
            buckets.retain(|_, b| {
                let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + elapsed * rate < burst
            });
            if buckets.len() >= self.limit.max_sources {
                let b = overflow.get_or_insert(full);
                return self.take(b, now, true);
            }
        }
        let b = buckets.entry(source).or_insert(full);
        self.take(b, now, false)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state.lock().unwrap().0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn per_source_burst_then_rate() {
        let l = JoinLimiter::new(JoinLimit {
            per_second: 2.0,
            burst: 3,
            max_sources: 10,
        });
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check(ip(1), t), Ok(()));
        }
        let r = l.check(ip(1), t).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_millis(500));
        assert!(!r.overflow);
        // Another source has its own bucket.
        assert_eq!(l.check(ip(2), t), Ok(()));
        // Half a second later one more join from the first source.
        let t1 = t + Duration::from_millis(500);
        assert_eq!(l.check(ip(1), t1), Ok(()));
        assert!(l.check(ip(1), t1).is_err());
        // The bucket never holds more than the burst.
        let t2 = t + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.check(ip(1), t2), Ok(()));
        }
        assert!(l.check(ip(1), t2).is_err());
    }

    #[test]
    fn the_table_is_bounded() {
        let l = JoinLimiter::new(JoinLimit {
            per_second: 1.0,
            burst: 1,
            max_sources: 2,
        });
        let t = Instant::now();
        assert_eq!(l.check(ip(1), t), Ok(()));
        assert_eq!(l.check(ip(2), t), Ok(()));
        // Full of busy sources: new ones share the overflow bucket.
        assert_eq!(l.check(ip(3), t), Ok(()));
        let r = l.check(ip(4), t).unwrap_err();
        assert!(r.overflow);
        assert_eq!(l.tracked(), 2);
        // Once the tracked sources have refilled they are dropped for new ones.
        let later = t + Duration::from_secs(5);
        assert_eq!(l.check(ip(4), later), Ok(()));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn bad_limits_are_named() {
        let e = JoinLimit {
            per_second: 0.0,
            burst: 0,
            max_sources: 0,
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("--join-rate"), "{e}");
        assert!(e.contains("--join-burst"), "{e}");
        assert!(e.contains("--join-rate-sources"), "{e}");
    }
}

//! Memory and connection limits shared by connections.
//!
//! The hot path streams frames it does not decode, so it holds at most one
//! read buffer per connection. A frame a filter decodes is held whole, and
//! that is what these limits bound: per connection (a frame over the
//! connection's budget is refused once its prefix is read, before its body),
//! and edge-wide ([`BufferBudget`]: a connection that would go over stops
//! being read until other frames are done with, as Kafka's
//! `queued.max.request.bytes` makes a broker stop reading).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of frames held for decoding across the whole edge.
#[derive(Clone, Debug)]
pub struct BufferBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
}

/// Bytes taken from a [`BufferBudget`], given back when dropped.
#[derive(Debug)]
pub struct BufferPermit {
    _permit: Option<OwnedSemaphorePermit>,
}

impl BufferBudget {
    pub fn new(total: u64) -> Self {
        let total = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        BufferBudget {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held now.
    pub fn in_use(&self) -> usize {
        self.total - self.semaphore.available_permits()
    }

    /// Takes `bytes` if they are free now; `None` means the caller must wait
    /// ([`Self::acquire`]) or the frame is larger than the whole budget.
    pub fn try_acquire(&self, bytes: usize) -> Option<BufferPermit> {
        if bytes == 0 {
            return Some(BufferPermit { _permit: None });
        }
        let n = u32::try_from(bytes).ok()?;
        self.semaphore
            .clone()
            .try_acquire_many_owned(n)
            .ok()
            .map(|permit| BufferPermit {
                _permit: Some(permit),
            })
    }

    /// Waits until `bytes` are free. The semaphore is fair, so a large frame
    /// is not starved by a stream of small ones. The caller checked that
    /// `bytes` fits the whole budget (a larger request never completes).
    pub async fn acquire(&self, bytes: usize) -> BufferPermit {
        if bytes == 0 {
            return BufferPermit { _permit: None };
        }
        let n = u32::try_from(bytes.min(self.total)).unwrap_or(u32::MAX);
        // The semaphore is never closed.
        let permit = self.semaphore.clone().acquire_many_owned(n).await.ok();
        BufferPermit { _permit: permit }
    }
}

/// Open connections of one listener.
#[derive(Clone, Debug)]
pub struct ConnectionCount {
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One open connection counted by a [`ConnectionCount`]; uncounted when dropped.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionCount {
    pub fn new(max: u32) -> Self {
        ConnectionCount {
            open: Arc::default(),
            max: max as usize,
        }
    }

    /// A slot if fewer than the maximum are open.
    pub fn try_open(&self) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.open.clone()))
    }
}

/// Lets one WARN line through per interval and counts what it held back,
/// so a flood of refused connections cannot flood the log too.
#[derive(Debug)]
pub struct WarnLimiter {
    start: Instant,
    interval: Duration,
    /// Milliseconds after `start` when the next line may go out.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnLimiter {
    pub fn new(interval: Duration) -> Self {
        WarnLimiter {
            start: Instant::now(),
            interval,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Acquire);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::AcqRel);
        None
    }
}

/// A [`WarnLimiter`] per reason, so one noisy reason (a scanner's garbage)
/// does not hide the first line of another (an expired certificate).
#[derive(Debug)]
pub struct WarnLimiters {
    interval: Duration,
    by_reason: std::sync::Mutex<std::collections::HashMap<&'static str, Arc<WarnLimiter>>>,
}

impl WarnLimiters {
    pub fn new(interval: Duration) -> Self {
        WarnLimiters {
            interval,
            by_reason: std::sync::Mutex::default(),
        }
    }

    /// [`WarnLimiter::allow`] for `reason`.
    pub fn allow(&self, reason: &'static str) -> Option<u64> {
        let limiter = self
            .by_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_insert_with(|| Arc::new(WarnLimiter::new(self.interval)))
            .clone();
        limiter.allow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn budget_blocks_until_bytes_are_freed() {
        let budget = BufferBudget::new(100);
        let a = budget.try_acquire(60).unwrap();
        assert_eq!(budget.in_use(), 60);
        assert!(budget.try_acquire(50).is_none(), "over the budget");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.acquire(50).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(a);
        let b = waiting.await.unwrap();
        assert_eq!(budget.in_use(), 50);
        drop(b);
        assert_eq!(budget.in_use(), 0);
        assert!(budget.try_acquire(101).is_none(), "never fits");
        assert!(budget.try_acquire(0).is_some());
    }

    #[test]
    fn connection_count_refuses_beyond_max() {
        let count = ConnectionCount::new(2);
        let a = count.try_open().unwrap();
        let _b = count.try_open().unwrap();
        assert!(count.try_open().is_none());
        drop(a);
        assert!(count.try_open().is_some());
    }

    #[test]
    fn warn_limiter_lets_one_line_through_per_interval() {
        let limiter = WarnLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        let limiter = WarnLimiter::new(Duration::ZERO);
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), Some(0));
    }

    #[test]
    fn warn_limiters_hold_back_each_reason_on_its_own() {
        let limiters = WarnLimiters::new(Duration::from_secs(3600));
        assert_eq!(limiters.allow("protocol"), Some(0));
        assert_eq!(limiters.allow("protocol"), None);
        assert_eq!(
            limiters.allow("expired"),
            Some(0),
            "another reason's first line"
        );
        assert_eq!(limiters.allow("expired"), None);
    }
}

//! Rate limiters in Firecracker's `RateLimiter` shape: two token buckets, one
//! for bandwidth (bytes) and one for operations, each with a size, an
//! optional one-time burst and the time it takes to refill from empty.
//!
//! A device asks [`RateLimiter::consume`] before it serves a request; when a
//! bucket cannot pay, the request is not served now (it stays in the guest's
//! queue) and the device sleeps for [`RateLimiter::wait`] (a timerfd in its
//! worker's epoll loop) before it asks again. A guest that floods a device
//! therefore waits; it never makes the host spin, buffer without bound, or
//! drop its requests. Time is a parameter (`now`), so the buckets are tested
//! with a made-up clock.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::timerfd::TimerFd;

/// A bad limiter configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RateLimiterError {
    /// A bucket of size 0 would never let anything through
    #[error("rate limiter {bucket} bucket: size must be greater than zero")]
    ZeroSize {
        /// `"bandwidth"` or `"ops"`.
        bucket: &'static str,
    },
    /// A refill time of 0 would be no limit at all
    #[error("rate limiter {bucket} bucket: refillTimeMs must be greater than zero")]
    ZeroRefill {
        /// `"bandwidth"` or `"ops"`.
        bucket: &'static str,
    },
    /// A refill time past an hour is a configuration mistake, and bounds the
    /// arithmetic
    #[error("rate limiter {bucket} bucket: refillTimeMs {ms} exceeds {MAX_REFILL_MS}")]
    RefillTooLong {
        /// `"bandwidth"` or `"ops"`.
        bucket: &'static str,
        /// What was asked.
        ms: u64,
    },
}

/// The longest refill time accepted (one hour).
pub const MAX_REFILL_MS: u64 = 3_600_000;

/// One bucket's configuration (`{"size", "oneTimeBurst", "refillTimeMs"}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full (bytes or operations).
    pub size: u64,
    /// Extra tokens available once, before the first refill counts.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time_ms: u64,
}

/// A limiter's configuration: either bucket may be absent (no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BucketConfig>,
    /// Operations per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<BucketConfig>,
}

impl RateLimiterConfig {
    /// Checks both buckets.
    pub fn check(&self) -> Result<(), RateLimiterError> {
        for (bucket, config) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(c) = config {
                if c.size == 0 {
                    return Err(RateLimiterError::ZeroSize { bucket });
                }
                if c.refill_time_ms == 0 {
                    return Err(RateLimiterError::ZeroRefill { bucket });
                }
                if c.refill_time_ms > MAX_REFILL_MS {
                    return Err(RateLimiterError::RefillTooLong {
                        bucket,
                        ms: c.refill_time_ms,
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether neither bucket is configured.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// A token bucket. The budget may go below zero: a request larger than the
/// whole bucket is let through once the bucket is full, and the debt delays
/// the next one (a 1 MiB write through a 64 KiB/s bucket costs 16 s either way,
/// and is never stuck for ever).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    /// What is left of the one-time burst.
    burst: u64,
    refill_ns: u128,
    /// Tokens now (negative: debt).
    budget: i128,
    /// When `budget` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket as of `now`.
    pub fn new(config: &BucketConfig, now: Instant) -> TokenBucket {
        TokenBucket {
            size: config.size,
            burst: config.one_time_burst,
            refill_ns: u128::from(config.refill_time_ms) * 1_000_000,
            budget: i128::from(config.size),
            last: now,
        }
    }

    /// Adds the tokens earned since the last update (whole tokens only: the
    /// remainder of the time is kept for the next update).
    fn refill(&mut self, now: Instant) {
        let size = i128::from(self.size);
        if self.budget >= size {
            self.last = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let earned = elapsed * u128::from(self.size) / self.refill_ns;
        if earned == 0 {
            return;
        }
        let earned = i128::try_from(earned).unwrap_or(i128::MAX);
        if self.budget.saturating_add(earned) >= size {
            self.budget = size;
            self.last = now;
        } else {
            self.budget += earned;
            // The time those tokens took, so that fractions are not lost.
            let used = (earned as u128) * self.refill_ns / u128::from(self.size);
            self.last += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        }
    }

    /// What a request of `tokens` must find in the bucket: all of it, or a
    /// full bucket when it is larger than the bucket.
    fn needed(&self, tokens: u64) -> i128 {
        i128::from(tokens.min(self.size))
    }

    /// Whether `tokens` can be taken now (the burst first, then the budget).
    fn can_take(&mut self, tokens: u64, now: Instant) -> bool {
        if tokens <= self.burst {
            return true;
        }
        self.refill(now);
        self.budget >= self.needed(tokens - self.burst)
    }

    /// Takes `tokens` (call after [`TokenBucket::can_take`] said yes).
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// How long until `tokens` can be taken (zero if now).
    fn wait(&mut self, tokens: u64, now: Instant) -> Duration {
        if self.can_take(tokens, now) {
            return Duration::ZERO;
        }
        let missing = (self.needed(tokens - self.burst) - self.budget) as u128;
        let ns = (missing * self.refill_ns).div_ceil(u128::from(self.size));
        let since = now.saturating_duration_since(self.last).as_nanos();
        Duration::from_nanos(u64::try_from(ns.saturating_sub(since)).unwrap_or(u64::MAX))
            .max(Duration::from_millis(1))
    }

    /// Tokens available now, burst included (for tests and listings).
    pub fn available(&mut self, now: Instant) -> i128 {
        self.refill(now);
        self.budget + i128::from(self.burst)
    }
}

/// A bandwidth bucket and an operations bucket, both optional.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    throttled: u64,
}

impl RateLimiter {
    /// A limiter with full buckets as of `now`.
    pub fn new(config: &RateLimiterConfig, now: Instant) -> Result<RateLimiter, RateLimiterError> {
        config.check()?;
        Ok(RateLimiter {
            bandwidth: config.bandwidth.map(|c| TokenBucket::new(&c, now)),
            ops: config.ops.map(|c| TokenBucket::new(&c, now)),
            throttled: 0,
        })
    }

    /// Takes `bytes` from the bandwidth bucket and `ops` from the operations
    /// bucket if both can pay now; else takes nothing, counts one throttled
    /// event and returns false.
    pub fn consume(&mut self, bytes: u64, ops: u64, now: Instant) -> bool {
        let fits =
            |b: &mut Option<TokenBucket>, n: u64| b.as_mut().is_none_or(|b| b.can_take(n, now));
        if fits(&mut self.bandwidth, bytes) && fits(&mut self.ops, ops) {
            if let Some(b) = &mut self.bandwidth {
                b.take(bytes);
            }
            if let Some(b) = &mut self.ops {
                b.take(ops);
            }
            true
        } else {
            self.throttled += 1;
            false
        }
    }

    /// How long until a request of `bytes` and `ops` would be let through.
    pub fn wait(&mut self, bytes: u64, ops: u64, now: Instant) -> Duration {
        let b = self
            .bandwidth
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(bytes, now));
        let o = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(ops, now));
        b.max(o)
    }

    /// How many requests were refused so far.
    pub fn throttled(&self) -> u64 {
        self.throttled
    }
}

/// A timerfd for a device worker's epoll loop whose reads never block (the
/// worker reads it when epoll says it fired, but a re-arm in between clears
/// the expiration: the read is then `EAGAIN`, not a wait).
pub fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: F_SETFL on the timerfd this function owns; no memory is involved.
    let rc = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_time_ms: u64) -> BucketConfig {
        BucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms,
        }
    }

    fn limiter(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
        t0: Instant,
    ) -> RateLimiter {
        RateLimiter::new(&RateLimiterConfig { bandwidth, ops }, t0).unwrap()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_bucket_pays_then_refills_with_time() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket(1000, 0, 100)), None, t0);
        assert!(l.consume(600, 1, t0));
        assert!(!l.consume(600, 1, t0), "400 left");
        assert_eq!(l.throttled(), 1);
        // 200 tokens need 20 ms; the wait says so.
        assert_eq!(l.wait(600, 1, t0), 20 * MS);
        assert!(!l.consume(600, 1, t0 + 19 * MS));
        assert!(l.consume(600, 1, t0 + 20 * MS));
        // Refill stops at the size.
        assert!(l.consume(1000, 1, t0 + 10_000 * MS));
        assert!(!l.consume(1, 1, t0 + 10_000 * MS));
        assert_eq!(l.throttled(), 3);
    }

    #[test]
    fn fractions_of_a_token_are_not_lost_between_updates() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(3, 0, 1000), t0);
        b.take(3);
        // One token every 333.3 ms: a look every 100 ms still sees one at 400.
        for i in 1..=3 {
            assert_eq!(b.available(t0 + 100 * i * MS), 0);
        }
        assert_eq!(b.available(t0 + 400 * MS), 1);
        assert_eq!(b.available(t0 + 1000 * MS), 3);
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket(100, 500, 1000)), None, t0);
        assert!(l.consume(500, 0, t0), "from the burst");
        assert!(l.consume(100, 0, t0), "from the budget");
        assert!(!l.consume(1, 0, t0));
        assert!(l.consume(100, 0, t0 + 1000 * MS));
        assert!(!l.consume(1, 0, t0 + 1000 * MS), "the burst is gone");
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_when_full_and_leaves_a_debt() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket(100, 0, 1000)), None, t0);
        assert!(l.consume(300, 1, t0));
        // 200 of debt plus 100 to fill: 3 s until the bucket is full again.
        assert_eq!(l.wait(300, 1, t0), 3000 * MS);
        assert!(!l.consume(300, 1, t0 + 2999 * MS));
        assert!(l.consume(300, 1, t0 + 3000 * MS));
    }

    #[test]
    fn both_buckets_must_pay_or_neither_is_charged() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket(1000, 0, 1000)), Some(bucket(2, 0, 1000)), t0);
        assert!(l.consume(10, 1, t0));
        assert!(l.consume(10, 1, t0));
        assert!(!l.consume(10, 1, t0), "ops empty");
        // The refused request took no bytes: 980 are still there.
        assert_eq!(l.bandwidth.as_mut().unwrap().available(t0), 980);
        assert_eq!(l.wait(10, 1, t0), 500 * MS, "one op every 500 ms");
    }

    #[test]
    fn no_bucket_is_no_limit() {
        let t0 = Instant::now();
        let mut l = limiter(None, None, t0);
        for _ in 0..1000 {
            assert!(l.consume(u64::MAX, u64::MAX, t0));
        }
        assert_eq!(l.wait(u64::MAX, 1, t0), Duration::ZERO);
        assert!(RateLimiterConfig::default().is_unlimited());
    }

    #[test]
    fn bad_configurations_are_refused_with_the_bucket_named() {
        let t0 = Instant::now();
        let bad =
            |bandwidth, ops| RateLimiter::new(&RateLimiterConfig { bandwidth, ops }, t0).err();
        assert_eq!(
            bad(Some(bucket(0, 0, 100)), None),
            Some(RateLimiterError::ZeroSize {
                bucket: "bandwidth"
            })
        );
        assert_eq!(
            bad(None, Some(bucket(1, 0, 0))),
            Some(RateLimiterError::ZeroRefill { bucket: "ops" })
        );
        assert_eq!(
            bad(None, Some(bucket(1, 0, MAX_REFILL_MS + 1))),
            Some(RateLimiterError::RefillTooLong {
                bucket: "ops",
                ms: MAX_REFILL_MS + 1
            })
        );
        let json = br#"{"bandwidth":{"size":1048576,"oneTimeBurst":4096,"refillTimeMs":1000}}"#;
        let c: RateLimiterConfig = serde_json::from_slice(json).unwrap();
        assert_eq!(c.bandwidth, Some(bucket(1 << 20, 4096, 1000)));
        assert!(
            serde_json::from_slice::<RateLimiterConfig>(br#"{"bandwidth":{"size":1}}"#).is_err()
        );
        assert!(serde_json::from_slice::<RateLimiterConfig>(br#"{"iops":{}}"#).is_err());
    }

    #[test]
    fn a_huge_configuration_does_not_overflow() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket(u64::MAX, u64::MAX, MAX_REFILL_MS)), None, t0);
        assert!(l.consume(u64::MAX, 1, t0));
        assert!(l.consume(u64::MAX, 1, t0));
        assert!(!l.consume(u64::MAX, 1, t0));
        let wait = l.wait(u64::MAX, 1, t0);
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(MAX_REFILL_MS));
        assert!(l.consume(u64::MAX, 1, t0 + Duration::from_secs(7200)));
    }
}

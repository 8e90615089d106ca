//! Rate limits (`rate_limit`): a token bucket per task, local to the worker or shared by the cluster
//! through the broker (`rate_limit_scope = "cluster"`).

use super::*;

/// A task's rate limiter: per worker (governor) or shared by every worker through the broker.
pub(super) enum Limiter {
    Local(governor::DefaultDirectRateLimiter),
    Cluster {
        key: String,
        interval: Duration,
        /// Used when the broker has no shared limiter (RabbitMQ) or it fails: this worker limits alone.
        fallback: governor::DefaultDirectRateLimiter,
        warned: std::sync::atomic::AtomicBool,
    },
}

pub(super) fn local_limiter(interval: Duration) -> governor::DefaultDirectRateLimiter {
    let quota = governor::Quota::with_period(interval.max(Duration::from_nanos(1)))
        .expect("non-zero period");
    governor::RateLimiter::direct(quota)
}

pub(super) fn local_check(l: &governor::DefaultDirectRateLimiter) -> Option<Duration> {
    use governor::clock::Clock;
    l.check()
        .err()
        .map(|not_until| not_until.wait_time_from(governor::clock::DefaultClock::default().now()))
}

impl Limiter {
    pub(super) fn new(name: &str, rate: RateLimit) -> Self {
        if rate.cluster {
            Self::Cluster {
                key: name.to_string(),
                interval: rate.interval,
                fallback: local_limiter(rate.interval),
                warned: std::sync::atomic::AtomicBool::new(false),
            }
        } else {
            Self::Local(local_limiter(rate.interval))
        }
    }

    /// `None`: run now; `Some(wait)`: not before `wait` from now.
    pub(super) async fn check(&self, broker: &dyn Broker) -> Option<Duration> {
        match self {
            Self::Local(l) => local_check(l),
            Self::Cluster {
                key,
                interval,
                fallback,
                warned,
            } => match broker.take_shared_token(key, *interval, 1).await {
                Ok(wait) => wait,
                Err(e) => {
                    if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        warn!(error = %e, task = %key, "shared rate limiter unavailable; this worker limits on its own");
                    }
                    local_check(fallback)
                }
            },
        }
    }
}

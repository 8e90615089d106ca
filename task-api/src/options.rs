//! Per-task options (Celery's task decorator options), rate limits and Celery's retry backoff.

/// A rate limit (`"10/s"`, `"100/m"`, `"1000/h"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Time between two tasks.
    pub interval: std::time::Duration,
    /// Shared by all workers through the broker instead of per worker.
    pub cluster: bool,
}

impl RateLimit {
    /// Parses Celery's rate strings; a bare number is per second.
    pub fn parse(s: &str, cluster: bool) -> Result<Self, String> {
        let (n, unit) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
        let n: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("rate limit {s:?}: expected N/s, N/m or N/h"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            other => {
                return Err(format!(
                    "rate limit {s:?}: unknown unit {other:?} (use s, m or h)"
                ));
            }
        };
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("rate limit {s:?}: the rate must be positive"));
        }
        Ok(Self {
            interval: std::time::Duration::from_secs_f64(per / n),
            cluster,
        })
    }
}

/// Per-task options (Celery's task decorator options). `None` means: use the worker-wide setting or
/// Celery's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskOptions {
    /// Overrides `task_acks_late`.
    pub acks_late: Option<bool>,
    /// Overrides `task_ignore_result`.
    pub ignore_result: Option<bool>,
    /// Overrides `task_reject_on_worker_lost`.
    pub reject_on_worker_lost: Option<bool>,
    /// Overrides `task_acks_on_failure_or_timeout`.
    pub acks_on_failure_or_timeout: Option<bool>,
    /// Overrides `task_track_started`.
    pub track_started: Option<bool>,
    /// Retries before giving up (Celery default 3; negative: unlimited).
    pub max_retries: Option<i64>,
    /// Seconds before a retry without countdown (Celery default 180).
    pub default_retry_delay: Option<f64>,
    /// Exception class names (`"ValueError"`, or `"Exception"` for any) retried automatically.
    pub autoretry_for: Option<Vec<String>>,
    /// Exponential backoff factor in seconds for automatic retries (0: use `default_retry_delay`).
    pub retry_backoff: Option<f64>,
    /// Cap of the backoff (Celery default 600).
    pub retry_backoff_max: Option<f64>,
    /// Full jitter on the backoff (Celery default true).
    pub retry_jitter: Option<bool>,
    /// Hard time limit in seconds.
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds.
    pub soft_time_limit: Option<f64>,
    /// Rate limit.
    pub rate_limit: Option<RateLimit>,
}

/// Celery's `get_exponential_backoff_interval`: `min(max, factor * 2^retries)`, then with full jitter a
/// uniform draw in `[0, countdown]` (`unit` is that draw's position in `[0, 1)`).
pub fn backoff(factor: f64, retries: i64, max: f64, jitter: bool, unit: f64) -> f64 {
    let exp = factor * 2f64.powi(retries.clamp(0, 62) as i32);
    let countdown = exp.min(max);
    let countdown = if jitter {
        (unit * (countdown + 1.0)).floor().min(countdown)
    } else {
        countdown
    };
    countdown.max(0.0)
}

/// A uniform draw in `[0, 1)` for jitter (from the OS's random source, through a v4 UUID).
pub fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

//! Worker configuration with Celery's key names, read from TOML. Unknown keys and wrong types are rejected
//! with a message naming them. Command-line flags and `CELERY_*` environment variables override the file.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Celery settings celeriac understands (a subset of Celery's, same names and meanings).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CeleryConfig {
    /// Broker URL (`redis://host:port/db`).
    pub broker_url: Option<String>,
    /// Result backend URL; `disabled` stores nothing. Defaults to the broker URL.
    pub result_backend: Option<String>,
    /// Queue for tasks without a route.
    pub task_default_queue: String,
    /// Per-task routes: `task_routes = { "bench.add" = { queue = "realtime" } }` or `{ "bench.add" = "realtime" }`.
    pub task_routes: BTreeMap<String, Route>,
    /// Per-task options, as Celery's `task_annotations` (`{ "bench.mark" = { acks_late = true } }`).
    pub task_annotations: BTreeMap<String, Annotation>,
    /// Concurrent tasks per worker (default: number of cores).
    pub worker_concurrency: Option<usize>,
    /// Unacked messages per concurrency slot (prefetch = concurrency × this).
    pub worker_prefetch_multiplier: usize,
    /// Acknowledge after the task ran instead of before (at-least-once).
    pub task_acks_late: bool,
    /// With acks_late: requeue a message whose task was lost (panicked runtime, hard abort) instead of
    /// acknowledging it.
    pub task_reject_on_worker_lost: bool,
    /// Store no results.
    pub task_ignore_result: bool,
    /// Store name, args, kwargs, worker, retries and queue with each result.
    pub result_extended: bool,
    /// Seconds results are kept; 0 keeps them forever.
    pub result_expires: u64,
    /// Broker transport options.
    pub broker_transport_options: BrokerTransportOptions,
    /// Result backend transport options.
    pub result_backend_transport_options: BackendTransportOptions,
    /// Seconds a warm shutdown waits for running tasks (celeriac).
    pub worker_shutdown_timeout: f64,
    /// Register the built-in `bench.*` tasks (celeriac).
    pub worker_bench_tasks: bool,
    /// Once consuming, hand the executable's start-up code pages back to the kernel (Linux; celeriac).
    pub worker_release_startup_pages: bool,
    /// Hard time limit in seconds for every task.
    pub task_time_limit: Option<f64>,
    /// Soft time limit in seconds for every task.
    pub task_soft_time_limit: Option<f64>,
    /// Store STARTED (with pid and hostname) when a task starts.
    pub task_track_started: bool,
    /// acks_late tasks that fail or time out are acknowledged (true) or rejected (false; on Redis both
    /// remove the message).
    pub task_acks_on_failure_or_timeout: bool,
    /// Seconds: ETA tasks due later than this are parked in the broker, not held in worker memory (celeriac).
    pub worker_eta_horizon: f64,
    /// At most this many ETA tasks wait in worker memory; more are parked (celeriac).
    pub worker_eta_max_in_memory: usize,
    /// Send task events (as `-E`).
    pub worker_send_task_events: bool,
    /// Publish a `task-sent` event for every task this process publishes.
    pub task_send_sent_event: bool,
    /// Queue declarations, as Celery's `task_queues`:
    /// `[task_queues.realtime] queue_arguments = { "x-max-length" = 1000, "x-overflow" = "reject-publish" }`.
    /// A queue listed here takes exactly these arguments; `realtime` and `bulk` otherwise default to
    /// 1,000 / 5,000 messages with `reject-publish` (RabbitMQ).
    pub task_queues: BTreeMap<String, QueueDeclaration>,
    /// `x-max-priority` for every queue declared (Celery's `task_queue_max_priority`).
    pub task_queue_max_priority: Option<u8>,
    /// The type of the task queues this process declares on RabbitMQ (Celery's `task_default_queue_type`):
    /// `"classic"` or `"quorum"` (replicated across a cluster); an entry of `task_queues` that sets
    /// `x-queue-type` keeps its own.
    pub task_default_queue_type: QueueType,
    /// With a list of RabbitMQ nodes (`amqp://h1//;amqp://h2//`): `"round-robin"` or `"shuffle"`.
    pub broker_failover_strategy: celeriac_broker::FailoverStrategy,
    /// The domain database, as the application role (neither superuser nor `BYPASSRLS`): what task
    /// families use (celeriac; env `CELERIAC_DATABASE_URL`).
    pub database_url: Option<String>,
    /// The domain database as its owner: `celeriac migrate` and `celeriac tenants add` (celeriac; env
    /// `CELERIAC_DATABASE_ADMIN_URL`).
    pub database_admin_url: Option<String>,
    /// PostgreSQL schema of the domain tables (default: the role's search path; env
    /// `CELERIAC_DATABASE_SCHEMA`).
    pub database_schema: Option<String>,
    /// Task family sections (`[email]`, `[payment]`, ...), taken out of the file by
    /// [`CeleryConfig::from_toml_with_sections`] and overlaid with `CELERIAC_<SECTION>__<KEY>` variables;
    /// each family validates its own.
    #[serde(skip)]
    pub sections: BTreeMap<String, toml::Table>,
}

/// One entry of `task_queues`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueDeclaration {
    /// AMQP queue arguments (`x-max-length`, `x-overflow`, `x-max-priority`, `x-queue-type`,
    /// `x-dead-letter-exchange`, `x-message-ttl`, ...).
    #[serde(default)]
    pub queue_arguments: BTreeMap<String, toml::Value>,
}

impl Default for CeleryConfig {
    fn default() -> Self {
        Self {
            broker_url: None,
            result_backend: None,
            task_default_queue: "celery".into(),
            task_routes: BTreeMap::new(),
            task_annotations: BTreeMap::new(),
            worker_concurrency: None,
            worker_prefetch_multiplier: 4,
            task_acks_late: false,
            task_reject_on_worker_lost: false,
            task_ignore_result: false,
            result_extended: false,
            result_expires: 86_400,
            broker_transport_options: BrokerTransportOptions::default(),
            result_backend_transport_options: BackendTransportOptions::default(),
            worker_shutdown_timeout: 60.0,
            worker_bench_tasks: true,
            worker_release_startup_pages: true,
            task_time_limit: None,
            task_soft_time_limit: None,
            task_track_started: false,
            task_acks_on_failure_or_timeout: true,
            worker_eta_horizon: 60.0,
            worker_eta_max_in_memory: 10_000,
            worker_send_task_events: false,
            task_send_sent_event: false,
            task_queues: BTreeMap::new(),
            task_queue_max_priority: None,
            task_default_queue_type: QueueType::Classic,
            broker_failover_strategy: Default::default(),
            database_url: None,
            database_admin_url: None,
            database_schema: None,
            sections: BTreeMap::new(),
        }
    }
}

/// A route: a queue name, or a table with `queue`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Route {
    /// `"realtime"`.
    Queue(String),
    /// `{ queue = "realtime" }`.
    Table {
        /// Queue name.
        queue: String,
    },
}

impl Route {
    /// The queue.
    pub fn queue(&self) -> &str {
        match self {
            Self::Queue(q) | Self::Table { queue: q } => q,
        }
    }
}

/// Per-task options.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Annotation {
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
    /// Retries before giving up (Celery default 3; -1: unlimited).
    pub max_retries: Option<i64>,
    /// Seconds before a retry without countdown (Celery default 180).
    pub default_retry_delay: Option<f64>,
    /// Exception class names retried automatically (`["ValueError"]`, `["Exception"]` for all).
    pub autoretry_for: Option<Vec<String>>,
    /// Exponential backoff for automatic retries: `true` (factor 1 s) or a factor in seconds.
    pub retry_backoff: Option<BoolOrNumber>,
    /// Cap of the backoff in seconds (default 600).
    pub retry_backoff_max: Option<f64>,
    /// Full jitter on the backoff (default true).
    pub retry_jitter: Option<bool>,
    /// Hard time limit in seconds.
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds.
    pub soft_time_limit: Option<f64>,
    /// `"10/s"`, `"100/m"`, `"1000/h"`.
    pub rate_limit: Option<String>,
    /// `"worker"` (default: each worker has its own limit) or `"cluster"` (one limit shared by all workers).
    pub rate_limit_scope: Option<String>,
}

/// `true`/`false` or a number (Celery's `retry_backoff`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum BoolOrNumber {
    /// `true` = 1, `false` = off.
    Bool(bool),
    /// A factor.
    Number(f64),
}

impl Annotation {
    /// The task options this annotation sets; `task` names the task in errors.
    pub fn to_options(&self, task: &str) -> Result<celeriac_task::TaskOptions, String> {
        let cluster = match self.rate_limit_scope.as_deref() {
            None | Some("worker") => false,
            Some("cluster") => true,
            Some(other) => {
                return Err(format!(
                    "task_annotations.{task}.rate_limit_scope: unknown value {other:?} (expected \"worker\" or \"cluster\")"
                ));
            }
        };
        let rate_limit = self
            .rate_limit
            .as_deref()
            .map(|r| celeriac_task::RateLimit::parse(r, cluster))
            .transpose()
            .map_err(|e| format!("task_annotations.{task}.rate_limit: {e}"))?;
        Ok(celeriac_task::TaskOptions {
            acks_late: self.acks_late,
            ignore_result: self.ignore_result,
            reject_on_worker_lost: self.reject_on_worker_lost,
            acks_on_failure_or_timeout: self.acks_on_failure_or_timeout,
            track_started: self.track_started,
            max_retries: self.max_retries,
            default_retry_delay: self.default_retry_delay,
            autoretry_for: self.autoretry_for.clone(),
            retry_backoff: self.retry_backoff.map(|b| match b {
                BoolOrNumber::Bool(true) => 1.0,
                BoolOrNumber::Bool(false) => 0.0,
                BoolOrNumber::Number(n) => n,
            }),
            retry_backoff_max: self.retry_backoff_max,
            retry_jitter: self.retry_jitter,
            time_limit: self.time_limit,
            soft_time_limit: self.soft_time_limit,
            rate_limit,
        })
    }
}

/// A RabbitMQ queue type (Celery's `task_default_queue_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic queues (RabbitMQ's default).
    #[default]
    Classic,
    /// Quorum queues: replicated on a majority of a cluster's nodes; no priorities.
    Quorum,
}

/// `broker_transport_options`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerTransportOptions {
    /// Seconds before an unacked message is given back to its queue.
    pub visibility_timeout: f64,
    /// Prefix for every broker key.
    pub global_keyprefix: String,
    /// `"priority"` (queues strictly in `-Q` order) or `"weighted"` (shares by `queue_weights`).
    pub queue_order_strategy: String,
    /// Weights per queue for the weighted strategy, in `-Q` order.
    pub queue_weights: Vec<u32>,
    /// With a `sentinel://` broker URL: the name the sentinels monitor the master under.
    pub master_name: Option<String>,
    /// With a `sentinel://` broker URL: the sentinels' own credentials (`{ password = "..." }`).
    pub sentinel_kwargs: celeriac_broker::sentinel::SentinelKwargs,
}

impl Default for BrokerTransportOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: 3600.0,
            global_keyprefix: String::new(),
            queue_order_strategy: "priority".into(),
            queue_weights: Vec::new(),
            master_name: None,
            sentinel_kwargs: Default::default(),
        }
    }
}

/// `result_backend_transport_options`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTransportOptions {
    /// Prefix for result keys (`_` appended as Celery does).
    pub global_keyprefix: String,
    /// With a `sentinel://` result backend: the name the sentinels monitor the master under.
    pub master_name: Option<String>,
    /// With a `sentinel://` result backend: the sentinels' own credentials.
    pub sentinel_kwargs: celeriac_broker::sentinel::SentinelKwargs,
}

impl CeleryConfig {
    /// AMQP arguments per queue: `task_queues` entries as written, celeriac's defaults for `realtime` and
    /// `bulk` otherwise.
    pub fn queue_arguments(
        &self,
    ) -> std::collections::HashMap<String, serde_json::Map<String, serde_json::Value>> {
        let mut out = std::collections::HashMap::new();
        for q in ["realtime", "bulk"] {
            if let Some(args) = celeriac_broker::amqp::default_queue_arguments(q) {
                out.insert(q.to_string(), args);
            }
        }
        for (q, decl) in &self.task_queues {
            let args = decl
                .queue_arguments
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
                    )
                })
                .collect();
            out.insert(q.clone(), args);
        }
        out
    }

    /// AMQP arguments every declared queue gets unless its own entry sets them: `x-max-priority` from
    /// `task_queue_max_priority`, as Celery applies it to every queue it declares.
    pub fn common_queue_arguments(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(p) = self.task_queue_max_priority {
            m.insert("x-max-priority".into(), p.into());
        }
        if self.task_default_queue_type == QueueType::Quorum {
            m.insert("x-queue-type".into(), "quorum".into());
        }
        m
    }

    /// Parses TOML text; the error names the offending key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let cfg: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text whose top-level tables named in `sections` belong to task families: they are kept
    /// aside in [`CeleryConfig::sections`] (with the environment overlay), the rest parsed as usual.
    pub fn from_toml_with_sections(text: &str, sections: &[&str]) -> Result<Self, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut taken = BTreeMap::new();
        for name in sections {
            match table.remove(*name) {
                Some(toml::Value::Table(t)) => {
                    taken.insert(name.to_string(), t);
                }
                Some(other) => {
                    return Err(format!(
                        "{name}: expected a table ([{name}]), found a {}",
                        other.type_str()
                    ));
                }
                None => {}
            }
        }
        let mut cfg: Self = table
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        cfg.sections = taken;
        cfg.overlay_env(sections, std::env::vars())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies `CELERIAC_DATABASE_URL`, `CELERIAC_DATABASE_ADMIN_URL`, `CELERIAC_DATABASE_SCHEMA` and
    /// `CELERIAC_<SECTION>__<KEY>` (a TOML literal, else a string) over the file (platform.md §6).
    pub fn overlay_env(
        &mut self,
        sections: &[&str],
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), String> {
        for (name, value) in vars {
            match name.as_str() {
                "CELERIAC_DATABASE_URL" => self.database_url = Some(value),
                "CELERIAC_DATABASE_ADMIN_URL" => self.database_admin_url = Some(value),
                "CELERIAC_DATABASE_SCHEMA" => self.database_schema = Some(value),
                _ => {
                    let Some(rest) = name.strip_prefix("CELERIAC_") else {
                        continue;
                    };
                    let Some((section, key)) = rest.split_once("__") else {
                        continue;
                    };
                    let section = section.to_ascii_lowercase();
                    if !sections.contains(&section.as_str()) {
                        continue;
                    }
                    if key.is_empty() {
                        return Err(format!("{name}: no key after the section"));
                    }
                    let parsed = format!("v = {value}")
                        .parse::<toml::Table>()
                        .ok()
                        .and_then(|mut t| t.remove("v"))
                        .unwrap_or(toml::Value::String(value));
                    self.sections
                        .entry(section)
                        .or_default()
                        .insert(key.to_ascii_lowercase(), parsed);
                }
            }
        }
        Ok(())
    }

    /// Reads a TOML file whose tables named in `sections` belong to task families (see
    /// [`CeleryConfig::from_toml_with_sections`]).
    pub fn from_file_with_sections(path: &Path, sections: &[&str]) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_toml_with_sections(&text, sections)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.worker_prefetch_multiplier == 0 {
            return Err("worker_prefetch_multiplier must be at least 1".into());
        }
        for (task, a) in &self.task_annotations {
            a.to_options(task)?;
        }
        if self.worker_concurrency == Some(0) {
            return Err("worker_concurrency must be at least 1".into());
        }
        if self.task_default_queue_type == QueueType::Quorum
            && self.task_queue_max_priority.is_some()
        {
            return Err("task_queue_max_priority cannot be used with task_default_queue_type = \"quorum\": RabbitMQ quorum queues have no x-max-priority".into());
        }
        let vt = self.broker_transport_options.visibility_timeout;
        if vt.is_nan() || vt <= 0.0 {
            return Err("broker_transport_options.visibility_timeout must be positive".into());
        }
        match self.broker_transport_options.queue_order_strategy.as_str() {
            "priority" | "weighted" => Ok(()),
            other => Err(format!(
                "broker_transport_options.queue_order_strategy: unknown value {other:?} (expected \"priority\" or \"weighted\")"
            )),
        }
    }

    /// The queue a task is routed to.
    pub fn queue_for(&self, task: &str) -> &str {
        self.task_routes
            .get(task)
            .map(Route::queue)
            .unwrap_or(&self.task_default_queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_celery_keys() {
        let c = CeleryConfig::from_toml(
            r#"
broker_url = "redis://127.0.0.1:6379/3"
task_default_queue = "bulk"
task_acks_late = true
worker_prefetch_multiplier = 1
result_expires = 60
task_routes = { "bench.add" = { queue = "realtime" }, "bench.echo" = "echoes" }
task_annotations = { "bench.mark" = { acks_late = false } }
[broker_transport_options]
visibility_timeout = 5
global_keyprefix = "x:"
"#,
        )
        .unwrap();
        assert_eq!(c.broker_url.as_deref(), Some("redis://127.0.0.1:6379/3"));
        assert!(c.task_acks_late);
        assert_eq!(c.worker_prefetch_multiplier, 1);
        assert_eq!(c.broker_transport_options.visibility_timeout, 5.0);
        assert_eq!(c.queue_for("bench.add"), "realtime");
        assert_eq!(c.queue_for("bench.echo"), "echoes");
        assert_eq!(c.queue_for("other"), "bulk");
        assert_eq!(c.task_annotations["bench.mark"].acks_late, Some(false));
    }

    #[test]
    fn annotations_become_task_options() {
        let c = CeleryConfig::from_toml(
            r#"
task_annotations = { "bench.fail" = { autoretry_for = ["ValueError"], retry_backoff = true, max_retries = 5, rate_limit = "10/m", rate_limit_scope = "cluster" } }
"#,
        )
        .unwrap();
        let o = c.task_annotations["bench.fail"]
            .to_options("bench.fail")
            .unwrap();
        assert_eq!(o.autoretry_for, Some(vec!["ValueError".to_string()]));
        assert_eq!(o.retry_backoff, Some(1.0));
        assert_eq!(o.max_retries, Some(5));
        let rate = o.rate_limit.unwrap();
        assert_eq!(
            (rate.interval, rate.cluster),
            (std::time::Duration::from_secs(6), true)
        );
        let e = CeleryConfig::from_toml(r#"task_annotations = { "t" = { rate_limit = "fast" } }"#)
            .unwrap_err();
        assert!(e.contains("task_annotations.t.rate_limit"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = CeleryConfig::from_toml("task_acks_lates = true").unwrap_err();
        assert!(e.contains("unknown field `task_acks_lates`"), "{e}");
        let e = CeleryConfig::from_toml("[broker_transport_options]\nvisibility = 3").unwrap_err();
        assert!(e.contains("unknown field `visibility`"), "{e}");
    }

    #[test]
    fn shipped_ha_configs_parse() {
        for text in [
            include_str!("../../compose/ha/sentinel.toml"),
            include_str!("../../compose/ha/rabbitmq.toml"),
        ] {
            CeleryConfig::from_toml(text).unwrap();
        }
    }

    #[test]
    fn quorum_queues_and_failover_strategy() {
        let c = CeleryConfig::from_toml(
            "task_default_queue_type = \"quorum\"\nbroker_failover_strategy = \"shuffle\"\n[task_queues.orders]\nqueue_arguments = { \"x-queue-type\" = \"classic\" }",
        )
        .unwrap();
        assert_eq!(
            c.broker_failover_strategy,
            celeriac_broker::FailoverStrategy::Shuffle
        );
        assert_eq!(c.common_queue_arguments()["x-queue-type"], "quorum");
        assert_eq!(c.queue_arguments()["orders"]["x-queue-type"], "classic");
        let e = CeleryConfig::from_toml(
            "task_default_queue_type = \"quorum\"\ntask_queue_max_priority = 5",
        )
        .unwrap_err();
        assert!(e.contains("no x-max-priority"), "{e}");
        let e = CeleryConfig::from_toml("task_default_queue_type = \"stream\"").unwrap_err();
        assert!(e.contains("unknown variant `stream`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = CeleryConfig::from_toml("worker_prefetch_multiplier = \"four\"").unwrap_err();
        assert!(e.contains("worker_prefetch_multiplier"), "{e}");
        assert!(e.contains("invalid type"), "{e}");
    }
}

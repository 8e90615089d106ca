//! Celery result backends: the [`ResultBackend`] trait and the Redis backend that Python's
//! `AsyncResult.get()` reads (`celery-task-meta-<id>`, written with SETEX + PUBLISH on the same name).
//!
//! # Layout
//! - [`redis`]: the Redis backend (store with dedupe, get, wait through Pub/Sub).
//! - [`rpc`]: `rpc://`, results sent as messages to the client's reply queue over RabbitMQ.
//! - `memory` (feature `test-utils`): results in this process, for fast runtime tests.

#[cfg(any(test, feature = "test-utils"))]
pub mod memory;
pub mod redis;
pub mod rpc;

use async_trait::async_trait;
use celeriac_protocol::ResultMeta;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Why a backend operation failed.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The URL is not one we can use.
    #[error("invalid result backend URL {url:?}: {reason}")]
    Url {
        /// The URL (password masked).
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// RabbitMQ failed (`rpc://`).
    #[error("rpc backend: {0}")]
    Amqp(#[from] lapin::Error),
    /// No RabbitMQ node of the broker URL could be reached (`rpc://`).
    #[error("rpc backend: {0}")]
    Connect(String),
    /// The backend cannot do this.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A stored meta is not JSON.
    #[error("stored result for {task_id} is not valid JSON: {source}")]
    Corrupt {
        /// Task id.
        task_id: String,
        /// Parser error.
        source: serde_json::Error,
    },
}

/// Result alias.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// Options of a result backend.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// `result_expires`: how long results are kept (`None` = forever).
    pub result_expires: Option<Duration>,
    /// `result_backend_transport_options.global_keyprefix`.
    pub global_keyprefix: String,
    /// The broker URL (`rpc://` sends results through the broker's RabbitMQ).
    pub broker_url: Option<String>,
    /// With a `sentinel://` URL: `result_backend_transport_options`' master name and sentinel credentials.
    pub sentinel: celeriac_broker::sentinel::SentinelOptions,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            result_expires: Some(Duration::from_secs(86_400)),
            global_keyprefix: String::new(),
            broker_url: None,
            sentinel: Default::default(),
        }
    }
}

/// A chord whose header just completed and whose body this worker must now apply.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordReady {
    /// Header results in `group_index` order, each `(task_id, state, result)`.
    pub results: Vec<(String, String, Value)>,
    /// The dispatch claim; pass it to [`ResultBackend::chord_finish`].
    pub token: String,
}

/// Where task results go.
#[async_trait]
pub trait ResultBackend: Send + Sync + 'static {
    /// Records a chord header task's outcome (Celery 5.7's join: a redelivered header task counts once) and,
    /// when it completes the chord and this caller wins the dispatch claim, returns the header results.
    async fn chord_part_return(
        &self,
        group_id: &str,
        task_id: &str,
        group_index: Option<i64>,
        state: &str,
        result: &Value,
    ) -> Result<Option<ChordReady>> {
        let _ = (group_id, task_id, group_index, state, result);
        Ok(None)
    }

    /// After the body was applied: releases the claim, deletes the join state and marks the chord done (so
    /// late duplicates are ignored). With `failed`, only the chord size is dropped, as Celery does.
    async fn chord_finish(&self, group_id: &str, token: &str, failed: bool) -> Result<()> {
        let _ = (group_id, token, failed);
        Ok(())
    }

    /// Records a chord's header size before its last header task is published (5.7 clients' order).
    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<()> {
        let _ = (group_id, size);
        Ok(())
    }

    /// Stores metas (one round trip for the batch). A task whose stored state is already SUCCESS is not
    /// overwritten (a redelivered task that ran twice does not change its result). Returns how many were
    /// written.
    async fn store(&self, metas: &[ResultMeta]) -> Result<usize>;

    /// The stored meta of a task, if any.
    async fn get(&self, task_id: &str) -> Result<Option<Value>>;

    /// Waits until the task is in a ready state (or `timeout` passes) and returns the last meta seen.
    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<Value>>;
}

/// A backend that stores nothing (`result_backend` unset or `disabled`).
#[derive(Debug, Default)]
pub struct DisabledBackend;

#[async_trait]
impl ResultBackend for DisabledBackend {
    async fn store(&self, _metas: &[ResultMeta]) -> Result<usize> {
        Ok(0)
    }
    async fn get(&self, _task_id: &str) -> Result<Option<Value>> {
        Ok(None)
    }
    async fn wait(&self, _task_id: &str, _timeout: Duration) -> Result<Option<Value>> {
        Ok(None)
    }
}

/// Connects to the backend named by `url` (`redis://`, `rediss://`, `redis+socket://`; `disabled` or an
/// empty string for none).
pub async fn connect(url: &str, options: BackendOptions) -> Result<Arc<dyn ResultBackend>> {
    if url.is_empty() || url == "disabled" {
        return Ok(Arc::new(DisabledBackend));
    }
    let scheme = url.split("://").next().unwrap_or("");
    match scheme {
        "redis" | "rediss" | "redis+socket" | "socket" | "unix" | "redis+unix" | "sentinel" => {
            let target = celeriac_broker::url::redis_target(url, &options.sentinel)
                .await
                .map_err(|reason| BackendError::Url {
                    url: celeriac_broker::url::redact(url),
                    reason,
                })?;
            Ok(Arc::new(
                redis::RedisBackend::connect(target, options).await?,
            ))
        }
        "rpc" => {
            let broker = options.broker_url.clone().unwrap_or_default();
            let uri = match celeriac_broker::url::BrokerUrl::parse(&broker) {
                Ok(celeriac_broker::url::BrokerUrl::Amqp(uri)) => uri,
                _ => {
                    return Err(BackendError::Url {
                        url: url.to_string(),
                        reason: format!(
                            "rpc:// sends results through a RabbitMQ broker, but the broker is {:?}",
                            celeriac_broker::url::redact(&broker)
                        ),
                    });
                }
            };
            Ok(Arc::new(rpc::RpcBackend::connect(uri).await?))
        }
        other => Err(BackendError::Url {
            url: celeriac_broker::url::redact(url),
            reason: format!(
                "unsupported result backend scheme {other:?}; expected redis://, rediss://, rpc:// or disabled"
            ),
        }),
    }
}

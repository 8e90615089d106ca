//! The Redis result backend, as Celery's `RedisBackend`: key `celery-task-meta-<id>` (after the global key
//! prefix), value the meta JSON, written with SETEX (or SET without expiry) and PUBLISHed on a channel of the
//! same name, skipping tasks already stored as SUCCESS. The check-and-write runs as one Lua script per task,
//! pipelined for a batch, where Celery needs a GET round trip before each MULTI.

use crate::{BackendError, BackendOptions, Result, ResultBackend};
use async_trait::async_trait;
use celeriac_broker::url::RedisTarget;
use celeriac_protocol::{ResultMeta, State};
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde_json::Value;
use std::sync::LazyLock;
use std::time::Duration;

/// GET-before-store dedupe, then SETEX/SET + PUBLISH. KEYS: meta key. ARGV: json, expiry seconds (0 = none).
static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = redis.call('GET', KEYS[1])
if old then
  if string.sub(old, 1, 21) == '{"status": "SUCCESS",' then return 0 end
  if string.sub(old, 1, 11) ~= '{"status": ' then
    local ok, m = pcall(cjson.decode, old)
    if ok and type(m) == 'table' and m.status == 'SUCCESS' then return 0 end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#,
    )
});

/// The Redis result backend.
pub struct RedisBackend {
    target: RedisTarget,
    conn: ConnectionManager,
    prefix: String,
    expires: u64,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Celery's `_add_global_keyprefix`: `_` is appended unless the prefix already ends in one of `:_-.`.
pub fn normalize_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with([':', '_', '-', '.']) {
        prefix.to_string()
    } else {
        format!("{prefix}_")
    }
}

impl RedisBackend {
    /// Connects and loads the store script.
    pub async fn connect(target: RedisTarget, options: BackendOptions) -> Result<Self> {
        let mut conn = celeriac_broker::redis::connection(&target, Some(Duration::from_secs(30)))
            .await
            .map_err(|e| match e {
                celeriac_broker::BrokerError::Redis(r) => BackendError::Redis(r),
                other => BackendError::Url {
                    url: String::new(),
                    reason: other.to_string(),
                },
            })?;
        STORE.load_async(&mut conn).await?;
        Ok(Self {
            target,
            conn,
            prefix: normalize_prefix(&options.global_keyprefix),
            expires: options.result_expires.map(|d| d.as_secs()).unwrap_or(0),
        })
    }

    /// The key (and Pub/Sub channel) of a task's meta.
    pub fn key_for(&self, task_id: &str) -> String {
        format!("{}celery-task-meta-{task_id}", self.prefix)
    }

    async fn store_batch(&self, metas: &[ResultMeta]) -> redis::RedisResult<Vec<i64>> {
        let mut pipe = redis::pipe();
        for m in metas {
            pipe.cmd("EVALSHA")
                .arg(STORE.get_hash())
                .arg(1)
                .arg(self.key_for(&m.task_id))
                .arg(m.to_json())
                .arg(self.expires);
        }
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    async fn store(&self, metas: &[ResultMeta]) -> Result<usize> {
        if metas.is_empty() {
            return Ok(0);
        }
        let written = match self.store_batch(metas).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis restarted or its script cache was flushed: load again and retry once.
                let mut conn = self.conn.clone();
                STORE.load_async(&mut conn).await?;
                self.store_batch(metas).await?
            }
            other => other?,
        };
        Ok(written.iter().filter(|w| **w == 1).count())
    }

    async fn get(&self, task_id: &str) -> Result<Option<Value>> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = conn.get(self.key_for(task_id)).await?;
        raw.map(|r| {
            serde_json::from_slice(&r).map_err(|source| BackendError::Corrupt {
                task_id: task_id.to_string(),
                source,
            })
        })
        .transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<Value>> {
        // As Celery's client: subscribe first, then GET (a result stored before the subscription is not
        // missed), then wait for messages on the channel.
        let client = redis::Client::open(self.target.info.clone())?;
        let mut pubsub = client.get_async_pubsub().await?;
        let key = self.key_for(task_id);
        pubsub.subscribe(&key).await?;
        let mut last = self.get(task_id).await?;
        let ready = |v: &Option<Value>| {
            v.as_ref()
                .and_then(|m| m.get("status"))
                .and_then(Value::as_str)
                .is_some_and(|s| State::parse(s).is_ready())
        };
        if ready(&last) {
            return Ok(last);
        }
        let mut stream = pubsub.on_message();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) | Ok(None) => return Ok(last),
                Ok(Some(msg)) => {
                    let payload: Vec<u8> = msg.get_payload()?;
                    if let Ok(v) = serde_json::from_slice::<Value>(&payload) {
                        last = Some(v);
                        if ready(&last) {
                            return Ok(last);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_normalised_like_celery() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("app"), "app_");
        assert_eq!(normalize_prefix("app:"), "app:");
        assert_eq!(normalize_prefix("app-"), "app-");
    }
}

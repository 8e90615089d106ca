//! The Redis result backend, as Celery's `RedisBackend`: key `celery-task-meta-<id>` (after the global key
//! prefix), value the meta JSON, written with SETEX (or SET without expiry) and PUBLISHed on a channel of the
//! same name, skipping tasks already stored as SUCCESS. The check-and-write runs as one Lua script per batch
//! (one MGET, then SETEX + PUBLISH per result), where Celery needs a GET round trip before each MULTI.
//!
//! **Late announcements.** Celery's client subscribes to a result's channel without waiting for Redis to
//! confirm, then GETs the key on another connection; Redis can run the GET first, so a result stored between
//! the two is neither read nor received, and `AsyncResult.get()` waits until its timeout (seen with chains:
//! the client subscribes to the last step only when it calls `get()`, which is when a fast worker stores it).
//! A final state of a task another task published (it has a `parent_id`: chain steps, callbacks, chord
//! bodies) whose PUBLISH reached nobody is therefore PUBLISHed once more [`REANNOUNCE_AFTER`] later.

use crate::{BackendError, BackendOptions, ChordReady, Result, ResultBackend};
use async_trait::async_trait;
use celeriac_broker::url::RedisTarget;
use celeriac_protocol::{ResultMeta, State};
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde_json::Value;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// GET-before-store dedupe, then SETEX/SET + PUBLISH, for a batch of results in one call (one MGET for the
/// checks instead of a GET per task). KEYS: meta keys. ARGV: expiry seconds (0 = none), then the JSON of
/// each key in order. Returns, per key, 0 when skipped (already SUCCESS, before the batch or earlier in it),
/// else 1 + the number of subscribers the PUBLISH reached.
static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local function succeeded(v)
  if not v then return false end
  if string.sub(v, 1, 21) == '{"status": "SUCCESS",' then return true end
  if string.sub(v, 1, 11) ~= '{"status": ' then
    local ok, m = pcall(cjson.decode, v)
    return ok and type(m) == 'table' and m.status == 'SUCCESS'
  end
  return false
end
local ex = tonumber(ARGV[1])
local olds = redis.call('MGET', unpack(KEYS))
local now = {}
local out = {}
for i, key in ipairs(KEYS) do
  local old = now[key]
  if old == nil then old = olds[i] end
  if succeeded(old) then
    out[i] = 0
  else
    local value = ARGV[i + 1]
    if ex > 0 then
      redis.call('SETEX', key, ex, value)
    else
      redis.call('SET', key, value)
    end
    now[key] = value
    out[i] = 1 + redis.call('PUBLISH', key, value)
  end
end
return out
"#,
    )
});

/// Results per STORE call: the keys go through Lua's `unpack`, whose stack has a limit.
const STORE_CHUNK: usize = 256;

/// Celery 5.7's chord join. KEYS: `.j .t .s .d`, the group key, `.c`. ARGV: task id, encoded member,
/// ordered ("1"), group index (score), expiry, group expiry, claim expiry, claim token.
/// Returns `{readycount, totaldiff, size, claimed}` (readycount -1: the chord is already done).
static CHORD_PART_RETURN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, score = ARGV[1], ARGV[2], ARGV[4]
local expires, group_expires = tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('GET', ckey) == 'done' then
  return {-1, false, false, 0}
end
local member = tid .. ':' .. score
if redis.call('SISMEMBER', dkey, member) == 0 then
  redis.call('ZADD', jkey, score, value)
  redis.call('SADD', dkey, member)
end
local readycount = redis.call('ZCOUNT', jkey, '-inf', '+inf')
if expires > 0 then
  for _, key in ipairs({jkey, tkey, skey, dkey}) do redis.call('EXPIRE', key, expires) end
  if group_expires > 0 then redis.call('EXPIRE', gkey, group_expires) end
end
local totaldiff = redis.call('GET', tkey)
local size = redis.call('GET', skey)
local claimed = 0
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
  if redis.call('SET', ckey, ARGV[8], 'NX', 'EX', tonumber(ARGV[7])) then claimed = 1 end
end
return {readycount, totaldiff, size, claimed}
"#,
    )
});

/// Celery 5.7's cleanup: if we hold the claim, delete the join state and mark the chord done.
/// KEYS: `.c .j .t .s .d`. ARGV: token, done expiry.
static CHORD_CLEANUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  redis.call('SET', KEYS[1], 'done', 'EX', tonumber(ARGV[2]))
  return 1
end
return 0
"#,
    )
});

/// How long after a PUBLISH that reached nobody a final state is announced again.
pub const REANNOUNCE_AFTER: Duration = Duration::from_millis(250);

/// Final states waiting for their second PUBLISH: `(due, channel, payload)` in due order.
type Pending =
    std::sync::Mutex<std::collections::VecDeque<(tokio::time::Instant, String, Vec<u8>)>>;

/// The Redis result backend.
pub struct RedisBackend {
    target: RedisTarget,
    conn: ConnectionManager,
    prefix: String,
    expires: u64,
    reannounce: Arc<Pending>,
    wake: Arc<tokio::sync::Notify>,
    /// The task sending late announcements; aborted when the backend is dropped.
    announcer: tokio::task::JoinHandle<()>,
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        self.announcer.abort();
    }
}

/// Sends the late announcements when due, in one pipeline per round.
async fn announcer(conn: ConnectionManager, pending: Arc<Pending>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let next = pending
            .lock()
            .expect("reannounce")
            .front()
            .map(|(due, ..)| *due);
        match next {
            None => wake.notified().await,
            Some(due) if due > tokio::time::Instant::now() => tokio::time::sleep_until(due).await,
            Some(_) => {
                let now = tokio::time::Instant::now();
                let mut pipe = redis::pipe();
                {
                    let mut q = pending.lock().expect("reannounce");
                    while q.front().is_some_and(|(due, ..)| *due <= now) {
                        let (_, channel, payload) = q.pop_front().expect("front");
                        pipe.publish(channel, payload).ignore();
                    }
                }
                let mut c = conn.clone();
                if let Err(e) = pipe.query_async::<()>(&mut c).await {
                    tracing::debug!(error = %e, "late result announcements failed");
                }
            }
        }
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn uuid_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
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
        let reannounce: Arc<Pending> = Arc::default();
        let wake = Arc::new(tokio::sync::Notify::new());
        let announcer = tokio::spawn(announcer(
            conn.clone(),
            Arc::clone(&reannounce),
            Arc::clone(&wake),
        ));
        Ok(Self {
            target,
            conn,
            prefix: normalize_prefix(&options.global_keyprefix),
            expires: options.result_expires.map(|d| d.as_secs()).unwrap_or(0),
            reannounce,
            wake,
            announcer,
        })
    }

    /// A chord key: `celery-taskset-meta-<gid>` plus a suffix (`.j`, `.s`, ...).
    pub fn group_key(&self, group_id: &str, suffix: &str) -> String {
        format!("{}celery-taskset-meta-{group_id}{suffix}", self.prefix)
    }

    /// The key (and Pub/Sub channel) of a task's meta.
    pub fn key_for(&self, task_id: &str) -> String {
        format!("{}celery-task-meta-{task_id}", self.prefix)
    }

    async fn store_batch(&self, metas: &[ResultMeta]) -> redis::RedisResult<Vec<i64>> {
        let mut pipe = redis::pipe();
        for chunk in metas.chunks(STORE_CHUNK) {
            let cmd = pipe.cmd("EVALSHA").arg(STORE.get_hash()).arg(chunk.len());
            for m in chunk {
                cmd.arg(self.key_for(&m.task_id));
            }
            cmd.arg(self.expires);
            for m in chunk {
                cmd.arg(m.to_json());
            }
        }
        let mut conn = self.conn.clone();
        let per_call: Vec<Vec<i64>> = pipe.query_async(&mut conn).await?;
        let written: Vec<i64> = per_call.into_iter().flatten().collect();
        // A final state of a task another task published, stored while nobody listened: announce it again.
        let due = tokio::time::Instant::now() + REANNOUNCE_AFTER;
        let mut late = Vec::new();
        for (m, w) in metas.iter().zip(&written) {
            if *w == 1 && m.status.is_ready() && m.parent_id.is_some() {
                late.push((due, self.key_for(&m.task_id), m.to_json()));
            }
        }
        if !late.is_empty() {
            self.reannounce.lock().expect("reannounce").extend(late);
            self.wake.notify_one();
        }
        Ok(written)
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    async fn chord_part_return(
        &self,
        group_id: &str,
        task_id: &str,
        group_index: Option<i64>,
        state: &str,
        result: &Value,
    ) -> Result<Option<ChordReady>> {
        let k = |s| self.group_key(group_id, s);
        let member =
            celeriac_protocol::json::to_vec(&serde_json::json!([1, task_id, state, result]));
        let score = group_index
            .map(|i| i.to_string())
            .unwrap_or_else(|| "+inf".into());
        let token = uuid_hex();
        let mut conn = self.conn.clone();
        let (ready, diff, size, claimed): (i64, Option<i64>, Option<i64>, i64) = CHORD_PART_RETURN
            .key(k(".j"))
            .key(k(".t"))
            .key(k(".s"))
            .key(k(".d"))
            .key(k(""))
            .key(k(".c"))
            .arg(task_id)
            .arg(member)
            .arg("1")
            .arg(score)
            .arg(self.expires)
            .arg(self.expires)
            .arg(10)
            .arg(&token)
            .invoke_async(&mut conn)
            .await?;
        let Some(size) = size else { return Ok(None) };
        if ready < 0 || claimed != 1 || ready != size + diff.unwrap_or(0) {
            return Ok(None);
        }
        let raw: Vec<Vec<u8>> = conn.zrange(k(".j"), 0, -1).await?;
        let mut results = Vec::with_capacity(raw.len());
        for r in raw {
            let v: Value = serde_json::from_slice(&r).map_err(|source| BackendError::Corrupt {
                task_id: group_id.into(),
                source,
            })?;
            let tid = v
                .get(1)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let state = v
                .get(2)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            results.push((tid, state, v.get(3).cloned().unwrap_or(Value::Null)));
        }
        Ok(Some(ChordReady { results, token }))
    }

    async fn chord_finish(&self, group_id: &str, token: &str, failed: bool) -> Result<()> {
        let k = |s| self.group_key(group_id, s);
        let mut conn = self.conn.clone();
        if failed {
            let _: () = conn.del(k(".s")).await?;
            return Ok(());
        }
        let _: i64 = CHORD_CLEANUP
            .key(k(".c"))
            .key(k(".j"))
            .key(k(".t"))
            .key(k(".s"))
            .key(k(".d"))
            .arg(token)
            .arg(300)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.del(self.group_key(group_id, ".c")).ignore();
        if self.expires > 0 {
            pipe.set_ex(self.group_key(group_id, ".s"), size, self.expires)
                .ignore();
        } else {
            pipe.set(self.group_key(group_id, ".s"), size).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

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
        Ok(written.iter().filter(|w| **w >= 1).count())
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

//! Beat state in Redis, shared by every beat process: the leader lease and, per entry, the last slot sent and
//! how many were sent. Times are passed in (not read from Redis) so the logic runs on any clock, including a
//! simulated one in tests. Keys live under the broker's `global_keyprefix`.

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use std::sync::LazyLock;
use std::time::Duration;

/// Takes or renews the lease when it is free, expired, or ours. KEYS: lease. ARGV: me, now (ms), ttl (ms).
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if v then
  local owner, expires = string.match(v, '^(.*)|(%d+)$')
  if owner ~= ARGV[1] and tonumber(expires) > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. (tonumber(ARGV[2]) + tonumber(ARGV[3])), 'EX', 86400)
return 1
"#,
    )
});

/// Claims a slot: advances the entry's last run to it only if it is newer, and counts the run.
/// KEYS: last-run hash, run-count hash. ARGV: entry, slot (ms). Returns 1 when claimed.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if current >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return 1
"#,
    )
});

/// Releases the lease if we hold it (a clean shutdown hands over at once).
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(.*)|') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// Beat's Redis state.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

impl Store {
    /// State under `prefix` (the broker's `global_keyprefix`).
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_string(),
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}celeriac.beat.{k}", self.prefix)
    }

    /// True when `me` holds the lease until `now + ttl`.
    pub async fn lead(
        &self,
        me: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let got: i64 = LEASE
            .key(self.key("leader"))
            .arg(me)
            .arg(ms(now))
            .arg(ttl.as_millis() as i64)
            .invoke_async(&mut conn)
            .await?;
        Ok(got == 1)
    }

    /// Gives the lease up if held.
    pub async fn resign(&self, me: &str) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE
            .key(self.key("leader"))
            .arg(me)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The last slot sent for an entry.
    pub async fn last_run(&self, entry: &str) -> redis::RedisResult<Option<DateTime<Utc>>> {
        let mut conn = self.conn.clone();
        let v: Option<i64> = conn.hget(self.key("last_run"), entry).await?;
        Ok(v.and_then(DateTime::from_timestamp_millis))
    }

    /// Records a starting point for a new entry unless one exists (Celery starts counting at start-up).
    pub async fn init_last_run(&self, entry: &str, at: DateTime<Utc>) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: bool = conn.hset_nx(self.key("last_run"), entry, ms(at)).await?;
        Ok(())
    }

    /// Claims `(entry, slot)`: true for exactly one caller per slot, across every beat.
    pub async fn claim(&self, entry: &str, slot: DateTime<Utc>) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let got: i64 = CLAIM
            .key(self.key("last_run"))
            .key(self.key("total_run_count"))
            .arg(entry)
            .arg(ms(slot))
            .invoke_async(&mut conn)
            .await?;
        Ok(got == 1)
    }

    /// How many slots of an entry were sent.
    pub async fn total_run_count(&self, entry: &str) -> redis::RedisResult<u64> {
        let mut conn = self.conn.clone();
        Ok(conn
            .hget::<_, _, Option<u64>>(self.key("total_run_count"), entry)
            .await?
            .unwrap_or(0))
    }
}

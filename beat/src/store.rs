//! Beat state shared by every beat process: who leads, and per entry the last slot sent and how many were sent.
//! [`BeatStore`] is the abstraction; [`Store`] keeps it in Redis (leader lease with times passed in, so the
//! logic runs on any clock, including a simulated one in tests; keys under the broker's `global_keyprefix`),
//! and `crate::db::DbStore` keeps it in the schedule database.

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

/// Why beat state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The database failed.
    #[error("database: {0}")]
    Db(String),
}

/// Where beats coordinate.
#[async_trait::async_trait]
pub trait BeatStore: Send + Sync {
    /// True when `me` leads now (taking or renewing leadership for `ttl`).
    async fn lead(&self, me: &str, now: DateTime<Utc>, ttl: Duration) -> Result<bool, StoreError>;
    /// Gives leadership up.
    async fn resign(&self, me: &str) -> Result<(), StoreError>;
    /// The last slot sent for an entry.
    async fn last_run(&self, entry: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Records a starting point for an entry that never ran.
    async fn init_last_run(&self, entry: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// Claims `(entry, slot)`: true for exactly one caller per slot.
    async fn claim(&self, entry: &str, slot: DateTime<Utc>) -> Result<bool, StoreError>;
    /// A one-off entry was sent: disable it.
    async fn finish_one_off(&self, entry: &str) -> Result<(), StoreError> {
        let _ = entry;
        Ok(())
    }
}

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

    /// How many slots of an entry were sent.
    pub async fn total_run_count(&self, entry: &str) -> redis::RedisResult<u64> {
        let mut conn = self.conn.clone();
        Ok(conn
            .hget::<_, _, Option<u64>>(self.key("total_run_count"), entry)
            .await?
            .unwrap_or(0))
    }
}

#[async_trait::async_trait]
impl BeatStore for Store {
    /// True when `me` holds the lease until `now + ttl`.
    async fn lead(&self, me: &str, now: DateTime<Utc>, ttl: Duration) -> Result<bool, StoreError> {
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
    async fn resign(&self, me: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE
            .key(self.key("leader"))
            .arg(me)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The last slot sent for an entry.
    async fn last_run(&self, entry: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut conn = self.conn.clone();
        let v: Option<i64> = conn.hget(self.key("last_run"), entry).await?;
        Ok(v.and_then(DateTime::from_timestamp_millis))
    }

    /// Records a starting point for a new entry unless one exists (Celery starts counting at start-up).
    async fn init_last_run(&self, entry: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: bool = conn.hset_nx(self.key("last_run"), entry, ms(at)).await?;
        Ok(())
    }

    /// Claims `(entry, slot)`: true for exactly one caller per slot, across every beat.
    async fn claim(&self, entry: &str, slot: DateTime<Utc>) -> Result<bool, StoreError> {
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
}

//! The schedule in PostgreSQL (sea-orm; tables from `celeriac-migrations`, entities from `celeriac-entities`):
//! [`load`] reads the enabled periodic tasks with their schedules, [`fingerprint`] tells when they changed
//! (beats reload), and [`DbStore`] coordinates beats in the same database: a session-level advisory lock
//! elects the leader (released when its connection dies, so a crashed leader is replaced at once), and a slot
//! is claimed by an `UPDATE ... WHERE last_run_at < slot` that succeeds for exactly one beat.

use crate::config::{Entry, Loaded};
use crate::crontab::Crontab;
use crate::schedule::{CatchUp, Schedule};
use crate::solar::Solar;
use crate::store::{BeatStore, StoreError};
use celeriac_entities::{
    clocked_schedule, crontab_schedule, interval_schedule, periodic_task, solar_schedule,
};
use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, pool::PoolConnection};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Statement,
};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::Mutex;

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Every row of a schedule table, by id.
async fn by_id<E, F>(db: &DatabaseConnection, id: F) -> Result<HashMap<i32, E::Model>, StoreError>
where
    E: EntityTrait,
    F: Fn(&E::Model) -> i32,
{
    Ok(E::find()
        .all(db)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(|m| (id(&m), m))
        .collect())
}

/// Reads the enabled periodic tasks as schedule entries; rows that do not validate are reported, not loaded.
pub async fn load(
    db: &DatabaseConnection,
    catch_up: CatchUp,
) -> Result<(Loaded, Vec<String>), StoreError> {
    let intervals = by_id::<interval_schedule::Entity, _>(db, |m| m.id).await?;
    let crontabs = by_id::<crontab_schedule::Entity, _>(db, |m| m.id).await?;
    let solars = by_id::<solar_schedule::Entity, _>(db, |m| m.id).await?;
    let clocks = by_id::<clocked_schedule::Entity, _>(db, |m| m.id).await?;
    let tasks = periodic_task::Entity::find()
        .filter(periodic_task::Column::Enabled.eq(true))
        .all(db)
        .await
        .map_err(db_err)?;
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for t in tasks {
        match entry(&t, &intervals, &crontabs, &solars, &clocks) {
            Ok(e) => entries.push(e),
            Err(why) => problems.push(format!("periodic task {:?}: {why}", t.name)),
        }
    }
    Ok((Loaded { entries, catch_up }, problems))
}

fn entry(
    t: &periodic_task::Model,
    intervals: &HashMap<i32, interval_schedule::Model>,
    crontabs: &HashMap<i32, crontab_schedule::Model>,
    solars: &HashMap<i32, solar_schedule::Model>,
    clocks: &HashMap<i32, clocked_schedule::Model>,
) -> Result<Entry, String> {
    let schedule = if let Some(i) = t.interval_id.and_then(|id| intervals.get(&id)) {
        let unit = match i.period.as_str() {
            "days" => 86_400_000_000,
            "hours" => 3_600_000_000,
            "minutes" => 60_000_000,
            "seconds" => 1_000_000,
            "microseconds" => 1,
            other => return Err(format!("unknown interval period {other:?}")),
        };
        if i.every <= 0 {
            return Err("interval every must be positive".into());
        }
        Schedule::Interval(chrono::Duration::microseconds(i.every * unit))
    } else if let Some(c) = t.crontab_id.and_then(|id| crontabs.get(&id)) {
        let tz = c
            .timezone
            .parse()
            .map_err(|_| format!("unknown time zone {:?}", c.timezone))?;
        Schedule::Crontab(Crontab::new(
            &c.minute,
            &c.hour,
            &c.day_of_week,
            &c.day_of_month,
            &c.month_of_year,
            tz,
        )?)
    } else if let Some(s) = t.solar_id.and_then(|id| solars.get(&id)) {
        Schedule::Solar(Solar::new(&s.event, s.latitude, s.longitude)?)
    } else if let Some(c) = t.clocked_id.and_then(|id| clocks.get(&id)) {
        Schedule::Clocked(c.clocked_time)
    } else {
        return Err("no schedule".into());
    };
    let parse = |what: &str, text: &str| {
        serde_json::from_str::<Value>(text).map_err(|e| format!("{what} is not JSON: {e}"))
    };
    let args = match parse("args", &t.args)? {
        Value::Array(a) => a,
        _ => return Err("args must be a JSON list".into()),
    };
    let kwargs = match parse("kwargs", &t.kwargs)? {
        Value::Object(k) => k,
        _ => return Err("kwargs must be a JSON object".into()),
    };
    let mut options = Map::new();
    if let Some(q) = &t.queue {
        options.insert("queue".into(), q.clone().into());
    }
    if let Some(p) = t.priority {
        options.insert("priority".into(), p.into());
    }
    if let Some(x) = t.expire_seconds {
        options.insert("expires".into(), x.into());
    }
    if let Value::Object(h) = parse("headers", &t.headers)?
        && !h.is_empty()
    {
        options.insert("headers".into(), Value::Object(h));
    }
    Ok(Entry {
        name: t.name.clone(),
        task: t.task.clone(),
        schedule,
        args,
        kwargs,
        options,
        one_off: t.one_off,
        start_time: t.start_time,
        expires: t.expires,
    })
}

/// Changes whenever a periodic task is added, changed or removed.
pub async fn fingerprint(db: &DatabaseConnection) -> Result<String, StoreError> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COALESCE(MAX(date_changed)::text, '') || '/' || COUNT(*)::text AS f FROM celeriac_periodic_task",
        ))
        .await
        .map_err(db_err)?;
    Ok(row
        .and_then(|r| r.try_get::<String>("", "f").ok())
        .unwrap_or_default())
}

/// Beat coordination in the schedule database.
pub struct DbStore {
    db: DatabaseConnection,
    /// The connection holding the advisory lock while we lead.
    lock: Mutex<Option<PoolConnection<sqlx::Postgres>>>,
    key: i64,
}

impl std::fmt::Debug for DbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbStore").field("key", &self.key).finish()
    }
}

impl DbStore {
    /// Coordination for beats sharing the schedule tables in `schema` of `db` (one advisory lock per schema,
    /// so separate deployments in one database do not block each other).
    pub fn new(db: DatabaseConnection, schema: &str) -> Self {
        // FNV-1a of the schema name: a stable lock key.
        let key = schema.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        }) as i64;
        Self {
            db,
            lock: Mutex::new(None),
            key,
        }
    }
}

#[async_trait::async_trait]
impl BeatStore for DbStore {
    async fn lead(
        &self,
        _me: &str,
        _now: DateTime<Utc>,
        _ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut guard = self.lock.lock().await;
        if let Some(conn) = guard.as_mut() {
            // Still ours while the session lives; a dead connection lost it.
            if sqlx::query("SELECT 1").execute(&mut **conn).await.is_ok() {
                return Ok(true);
            }
            *guard = None;
        }
        let mut conn = self
            .db
            .get_postgres_connection_pool()
            .acquire()
            .await
            .map_err(db_err)?;
        let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(self.key)
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
        if got {
            *guard = Some(conn);
        }
        Ok(got)
    }

    async fn resign(&self, _me: &str) -> Result<(), StoreError> {
        if let Some(mut conn) = self.lock.lock().await.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .execute(&mut *conn)
                .await;
        }
        Ok(())
    }

    async fn last_run(&self, entry: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = periodic_task::Entity::find()
            .filter(periodic_task::Column::Name.eq(entry))
            .one(&self.db)
            .await
            .map_err(db_err)?;
        Ok(row.and_then(|r| r.last_run_at))
    }

    async fn init_last_run(&self, entry: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let pool = self.db.get_postgres_connection_pool();
        sqlx::query("UPDATE celeriac_periodic_task SET last_run_at = $1 WHERE name = $2 AND last_run_at IS NULL")
            .bind(at)
            .bind(entry)
            .execute(pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn claim(&self, entry: &str, slot: DateTime<Utc>) -> Result<bool, StoreError> {
        let pool = self.db.get_postgres_connection_pool();
        let done = sqlx::query(
            "UPDATE celeriac_periodic_task SET last_run_at = $1, total_run_count = total_run_count + 1 \
             WHERE name = $2 AND (last_run_at IS NULL OR last_run_at < $1)",
        )
        .bind(slot)
        .bind(entry)
        .execute(pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_one_off(&self, entry: &str) -> Result<(), StoreError> {
        let pool = self.db.get_postgres_connection_pool();
        sqlx::query("UPDATE celeriac_periodic_task SET enabled = false, date_changed = now() WHERE name = $1")
            .bind(entry)
            .execute(pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }
}

//! The family's database access through a `TenantTx` (`$1` is the tenant): sources (the token sealed),
//! stream checkpoints and their leases, and a generic upsert of synced records by `(tenant_id,
//! external_id)` that skips unchanged content (orders, customers; catalog products build on it).

use crate::engine::{Counts, Cursor};
use crate::source::Stream;
use celeriac_domain::{DomainError, TenantTx};
use chrono::{DateTime, Utc};
use sea_orm::Value as Sql;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

/// A stream's checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    /// The composite cursor of the last committed record.
    pub cursor: Option<Cursor>,
    /// The running pass.
    pub pass_id: Option<Uuid>,
    /// `full` or `incremental`.
    pub pass_mode: Option<String>,
    /// Where the running pass continues.
    pub resume_url: Option<String>,
    /// The running pass's counts.
    pub counts: Counts,
    /// Pages committed in the running pass.
    pub pages: u64,
}

fn db(e: sea_orm::DbErr) -> DomainError {
    DomainError::Db(e)
}

fn checkpoint_of(r: &sea_orm::QueryResult) -> Result<Checkpoint, DomainError> {
    let t: Option<DateTime<Utc>> = r.try_get("", "cursor_updated_at").map_err(db)?;
    let id: Option<i64> = r.try_get("", "cursor_id").map_err(db)?;
    let counts: Value = r.try_get("", "pass_counts").map_err(db)?;
    Ok(Checkpoint {
        cursor: t.zip(id),
        pass_id: r.try_get("", "pass_id").map_err(db)?,
        pass_mode: r.try_get("", "pass_mode").map_err(db)?,
        resume_url: r.try_get("", "resume_url").map_err(db)?,
        counts: Counts::from_json(&counts),
        pages: counts["pages"].as_u64().unwrap_or(0),
    })
}

/// Takes the stream's lease for `owner` (free, expired, or already its own); `None` when another run holds it.
pub async fn take_lease(
    tx: &TenantTx,
    stream: Stream,
    owner: &str,
    lease: Duration,
) -> Result<Option<Checkpoint>, DomainError> {
    tx.execute(
        "INSERT INTO sync_state (tenant_id, stream) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        vec![stream.as_str().into()],
    )
    .await?;
    let row = tx
        .one(
            "UPDATE sync_state SET lease_until = now() + make_interval(secs => $3), lease_owner = $4, last_run_at = now() \
             WHERE tenant_id = $1 AND stream = $2 AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $4) \
             RETURNING cursor_updated_at, cursor_id, pass_id, pass_mode, resume_url, pass_counts",
            vec![stream.as_str().into(), lease.as_secs_f64().into(), owner.into()],
        )
        .await?;
    row.as_ref().map(checkpoint_of).transpose()
}

/// Starts a new pass.
pub async fn start_pass(tx: &TenantTx, stream: Stream, cp: &Checkpoint) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE sync_state SET pass_id = $3, pass_mode = $4, pass_started_at = now(), resume_url = NULL, \
         pass_counts = '{}'::jsonb WHERE tenant_id = $1 AND stream = $2",
        vec![stream.as_str().into(), cp.pass_id.into(), cp.pass_mode.clone().into()],
    )
    .await?;
    Ok(())
}

/// Commits a page's checkpoint with its records (in the same transaction). The last page ends the pass and
/// releases the lease. Fails when another run took the lease over.
pub async fn checkpoint(
    tx: &TenantTx,
    stream: Stream,
    cp: &Checkpoint,
    owner: &str,
    lease: Duration,
    last: bool,
) -> Result<(), DomainError> {
    let mut counts = cp.counts.to_json();
    counts["pages"] = json!(cp.pages);
    let n = tx
        .execute(
            "UPDATE sync_state SET cursor_updated_at = $3, cursor_id = $4, resume_url = $5, pass_counts = $6, \
             lease_until = CASE WHEN $7 THEN NULL ELSE now() + make_interval(secs => $8) END, \
             lease_owner = CASE WHEN $7 THEN NULL ELSE lease_owner END, \
             last_success_at = CASE WHEN $7 THEN now() ELSE last_success_at END, \
             last_counts = CASE WHEN $7 THEN $6 ELSE last_counts END, \
             last_error = CASE WHEN $7 THEN NULL ELSE last_error END, \
             pass_id = CASE WHEN $7 THEN NULL ELSE pass_id END, \
             pass_mode = CASE WHEN $7 THEN NULL ELSE pass_mode END \
             WHERE tenant_id = $1 AND stream = $2 AND lease_owner = $9",
            vec![
                stream.as_str().into(),
                cp.cursor.map(|c| c.0).into(),
                cp.cursor.map(|c| c.1).into(),
                cp.resume_url.clone().into(),
                counts.into(),
                last.into(),
                lease.as_secs_f64().into(),
                owner.into(),
            ],
        )
        .await?;
    if n == 0 {
        return Err(DomainError::Db(sea_orm::DbErr::Custom(format!(
            "the {} run lost its lease to another run",
            stream.as_str()
        ))));
    }
    Ok(())
}

/// Records a failed run and releases its lease (the checkpoint stays for the next run).
pub async fn fail_run(
    tx: &TenantTx,
    stream: Stream,
    owner: &str,
    error: &str,
) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE sync_state SET last_error = $3, lease_until = NULL, lease_owner = NULL \
         WHERE tenant_id = $1 AND stream = $2 AND lease_owner = $4",
        vec![stream.as_str().into(), error.into(), owner.into()],
    )
    .await?;
    Ok(())
}

/// Every stream's state for `sync.status`.
pub async fn states(tx: &TenantTx) -> Result<Vec<Value>, DomainError> {
    let fmt = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    };
    tx.all(
        "SELECT stream, cursor_updated_at, cursor_id, pass_mode, resume_url IS NOT NULL AS resuming, \
         lease_until > now() AS running, last_run_at, last_success_at, last_counts, last_error, \
         EXTRACT(EPOCH FROM now() - last_success_at)::float8 AS lag FROM sync_state WHERE tenant_id = $1 ORDER BY stream",
        vec![],
    )
    .await?
    .iter()
    .map(|r| {
        let t: Option<DateTime<Utc>> = r.try_get("", "cursor_updated_at").map_err(db)?;
        let id: Option<i64> = r.try_get("", "cursor_id").map_err(db)?;
        Ok(json!({
            "stream": r.try_get::<String>("", "stream").map_err(db)?,
            "cursor": crate::engine::cursor_json(&t.zip(id)),
            "running": r.try_get::<Option<bool>>("", "running").map_err(db)?.unwrap_or(false),
            "resuming": r.try_get::<bool>("", "resuming").map_err(db)?,
            "last_run_at": fmt(r.try_get("", "last_run_at").map_err(db)?),
            "last_success_at": fmt(r.try_get("", "last_success_at").map_err(db)?),
            "last_counts": r.try_get::<Option<Value>>("", "last_counts").map_err(db)?,
            "lag_seconds": r.try_get::<Option<f64>>("", "lag").map_err(db)?,
            "last_error": r.try_get::<Option<String>>("", "last_error").map_err(db)?,
        }))
    })
    .collect()
}

/// A tenant's source as stored (the token still sealed).
#[derive(Debug, Clone)]
pub struct SourceRow {
    /// `shopify`.
    pub kind: String,
    /// Shop URL.
    pub url: String,
    /// API version.
    pub api_version: String,
    /// Sealed token.
    pub token: Vec<u8>,
    /// Sealed webhook secret.
    pub webhook_secret: Option<Vec<u8>>,
    /// Off after a 401/403.
    pub enabled: bool,
    /// Why it is off.
    pub last_error: Option<String>,
}

/// The tenant's source.
pub async fn source(tx: &TenantTx) -> Result<Option<SourceRow>, DomainError> {
    tx.one(
        "SELECT kind, url, api_version, token, webhook_secret, enabled, last_error FROM sync_sources WHERE tenant_id = $1",
        vec![],
    )
    .await?
    .map(|r| {
        Ok(SourceRow {
            kind: r.try_get("", "kind").map_err(db)?,
            url: r.try_get("", "url").map_err(db)?,
            api_version: r.try_get("", "api_version").map_err(db)?,
            token: r.try_get("", "token").map_err(db)?,
            webhook_secret: r.try_get("", "webhook_secret").map_err(db)?,
            enabled: r.try_get("", "enabled").map_err(db)?,
            last_error: r.try_get("", "last_error").map_err(db)?,
        })
    })
    .transpose()
}

/// Creates or replaces the tenant's source (enabled).
pub async fn set_source(
    tx: &TenantTx,
    kind: &str,
    url: &str,
    api_version: &str,
    token: Vec<u8>,
    webhook_secret: Option<Vec<u8>>,
) -> Result<(), DomainError> {
    tx.execute(
        "INSERT INTO sync_sources (tenant_id, kind, url, api_version, token, webhook_secret) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (tenant_id) DO UPDATE SET kind = EXCLUDED.kind, url = EXCLUDED.url, api_version = EXCLUDED.api_version, \
         token = EXCLUDED.token, webhook_secret = EXCLUDED.webhook_secret, enabled = true, last_error = NULL, updated_at = now()",
        vec![kind.into(), url.into(), api_version.into(), token.into(), webhook_secret.into()],
    )
    .await?;
    Ok(())
}

/// Turns the source off (a 401/403) with the reason.
pub async fn disable_source(tx: &TenantTx, reason: &str) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE sync_sources SET enabled = false, last_error = $2, updated_at = now() WHERE tenant_id = $1",
        vec![reason.into()],
    )
    .await?;
    Ok(())
}

/// SHA-256 of a record's JSON (hex): what "unchanged" compares.
pub fn content_hash(v: &Value) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        serde_json::to_string(v).unwrap_or_default().as_bytes(),
    );
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A time field of a record (RFC 3339 with offset).
pub fn time_field(rec: &Value, field: &str) -> Option<DateTime<Utc>> {
    rec[field]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// A record's `(updated_at, id)`.
pub fn record_cursor(rec: &Value) -> Result<Cursor, String> {
    let id = rec["id"]
        .as_i64()
        .ok_or_else(|| format!("a record without an integer id: {rec}"))?;
    let t = time_field(rec, "updated_at")
        .ok_or_else(|| format!("record {id} has no valid updated_at"))?;
    Ok((t, id))
}

/// Upserts one record into `table` by `(tenant_id, external_id)`: `columns` (beside `tenant_id`,
/// `external_id`, `content_hash`, `raw`, `seen_pass`) are rewritten only when the content changed or the row
/// was deleted. Returns whether it was written.
pub async fn upsert_record(
    tx: &TenantTx,
    table: &str,
    external_id: i64,
    record: &Value,
    columns: &[(&str, Sql)],
    pass: Option<Uuid>,
) -> Result<bool, DomainError> {
    let hash = content_hash(record);
    let mut names = vec![
        "tenant_id",
        "external_id",
        "content_hash",
        "raw",
        "seen_pass",
    ];
    let mut values: Vec<Sql> = vec![
        external_id.into(),
        hash.into(),
        record.clone().into(),
        pass.into(),
    ];
    for (c, v) in columns {
        names.push(c);
        values.push(v.clone());
    }
    let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
    let updates: Vec<String> = names[2..]
        .iter()
        .map(|c| match *c {
            // A webhook (no pass) must not make a row look unseen by the pass running meanwhile.
            "seen_pass" => format!("seen_pass = COALESCE(EXCLUDED.seen_pass, {table}.seen_pass)"),
            c => format!("{c} = EXCLUDED.{c}"),
        })
        .chain([
            "deleted_at = NULL".to_string(),
            "synced_at = now()".to_string(),
        ])
        .collect();
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT (tenant_id, external_id) DO UPDATE SET {} \
         WHERE {table}.content_hash IS DISTINCT FROM EXCLUDED.content_hash OR {table}.deleted_at IS NOT NULL \
         RETURNING external_id",
        names.join(", "),
        placeholders.join(", "),
        updates.join(", ")
    );
    if tx.one(&sql, values).await?.is_some() {
        return Ok(true);
    }
    if pass.is_some() {
        tx.execute(
            &format!("UPDATE {table} SET seen_pass = $3 WHERE tenant_id = $1 AND external_id = $2"),
            vec![external_id.into(), pass.into()],
        )
        .await?;
    }
    Ok(false)
}

/// Soft-deletes every live row of `table` not seen by `pass` (of `stream`) and not written since it began
/// (a webhook's upsert during the pass is newer than the pass's snapshot).
pub async fn sweep(
    tx: &TenantTx,
    table: &str,
    stream: Stream,
    pass: Uuid,
) -> Result<u64, DomainError> {
    tx.execute(
        &format!(
            "UPDATE {table} SET deleted_at = now() WHERE tenant_id = $1 AND deleted_at IS NULL \
             AND seen_pass IS DISTINCT FROM $2 AND synced_at < (SELECT pass_started_at FROM sync_state \
             WHERE tenant_id = $1 AND stream = $3)"
        ),
        vec![pass.into(), stream.as_str().into()],
    )
    .await
}

/// Soft-deletes one row.
pub async fn delete_record(
    tx: &TenantTx,
    table: &str,
    external_id: i64,
) -> Result<u64, DomainError> {
    tx.execute(
        &format!("UPDATE {table} SET deleted_at = now() WHERE tenant_id = $1 AND external_id = $2 AND deleted_at IS NULL"),
        vec![external_id.into()],
    )
    .await
}

/// Records a shop webhook id; false when it was seen before.
pub async fn first_webhook(
    tx: &TenantTx,
    webhook_id: &str,
    topic: &str,
) -> Result<bool, DomainError> {
    Ok(tx
        .execute(
            "INSERT INTO sync_webhooks (tenant_id, webhook_id, topic) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            vec![webhook_id.into(), topic.into()],
        )
        .await?
        == 1)
}

/// A tenant's orders, newest first, optionally of one customer's email.
pub async fn orders(
    tx: &TenantTx,
    email: Option<&str>,
    limit: i64,
) -> Result<Vec<Value>, DomainError> {
    tx.all(
        "SELECT raw, deleted_at IS NOT NULL AS deleted FROM sync_orders WHERE tenant_id = $1 AND deleted_at IS NULL \
         AND ($2::text IS NULL OR lower(email) = lower($2)) ORDER BY src_updated_at DESC, external_id DESC LIMIT $3",
        vec![email.map(str::to_string).into(), limit.into()],
    )
    .await?
    .iter()
    .map(|r| r.try_get::<Value>("", "raw").map_err(db))
    .collect()
}

//! The family's tables, always through a [`TenantTx`] (row-level security behind it): interactions
//! (recorded ones and `sync_orders` line items as purchases), the tenants' versioned models, catalog
//! categories, and popularity.

use crate::data::Event;
use celeriac_domain::{DomainError, TenantTx};
use chrono::{DateTime, Utc};
use sea_orm::Value as Sql;
use std::collections::HashSet;

/// Every interaction of the tenant as `(customer, product, microseconds)`: recorded ones and the line items
/// of synced orders (purchases at the order's time).
pub const ALL_INTERACTIONS: &str = "
    SELECT customer_id, product_id, (extract(epoch FROM at) * 1000000)::bigint AS at
      FROM recommend_interactions WHERE tenant_id = $1
    UNION ALL
    SELECT o.customer_id::text, li->>'product_id',
           (extract(epoch FROM coalesce(o.src_created_at, o.src_updated_at)) * 1000000)::bigint
      FROM sync_orders o CROSS JOIN LATERAL jsonb_array_elements(
             CASE WHEN jsonb_typeof(o.raw->'line_items') = 'array' THEN o.raw->'line_items' ELSE '[]' END) li
     WHERE o.tenant_id = $1 AND o.deleted_at IS NULL AND o.customer_id IS NOT NULL
       AND li->>'product_id' IS NOT NULL";

/// One interaction to record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The customer.
    pub customer_id: String,
    /// The product.
    pub product_id: String,
    /// `view`, `cart` or `purchase`.
    pub kind: &'static str,
    /// When.
    pub at: DateTime<Utc>,
    /// What makes it once: `event:<the storefront's event id>` or `task:<the Celery task id>`.
    pub key: String,
}

/// Inserts `records` in one statement, skipping any whose key the tenant already has; returns the keys
/// written.
pub async fn insert(tx: &TenantTx, records: &[Record]) -> Result<HashSet<String>, DomainError> {
    if records.is_empty() {
        return Ok(HashSet::new());
    }
    let mut sql = String::from(
        "INSERT INTO recommend_interactions (tenant_id, customer_id, product_id, kind, at, event_key) VALUES ",
    );
    let mut values = Vec::with_capacity(records.len() * 5);
    for (n, r) in records.iter().enumerate() {
        let p = 2 + n * 5;
        if n > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "($1, ${p}, ${}, ${}, ${}, ${})",
            p + 1,
            p + 2,
            p + 3,
            p + 4
        ));
        values.push(Sql::from(r.customer_id.as_str()));
        values.push(Sql::from(r.product_id.as_str()));
        values.push(Sql::from(r.kind));
        values.push(Sql::from(r.at));
        values.push(Sql::from(r.key.as_str()));
    }
    sql.push_str(
        " ON CONFLICT (tenant_id, event_key) WHERE event_key IS NOT NULL DO NOTHING RETURNING event_key",
    );
    tx.all(&sql, values)
        .await?
        .into_iter()
        .map(|r| Ok(r.try_get::<String>("", "event_key")?))
        .collect()
}

/// Every interaction of the tenant, oldest first.
pub async fn interactions(tx: &TenantTx) -> Result<Vec<Event>, DomainError> {
    // A fixed order numbers the items the same way every time, so a seeded training is reproducible.
    let sql = format!("SELECT * FROM ({ALL_INTERACTIONS}) i ORDER BY at, customer_id, product_id");
    let rows = tx.all(&sql, vec![]).await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                r.try_get::<String>("", "customer_id")?,
                r.try_get::<String>("", "product_id")?,
                r.try_get::<i64>("", "at")?,
            ))
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(DomainError::from)
}

/// The customer's newest `limit` products, oldest first.
pub async fn history(
    tx: &TenantTx,
    customer: &str,
    limit: usize,
) -> Result<Vec<String>, DomainError> {
    let sql = format!(
        "SELECT product_id FROM ({ALL_INTERACTIONS}) i WHERE customer_id = $2 ORDER BY at DESC LIMIT $3"
    );
    let rows = tx
        .all(&sql, vec![Sql::from(customer), Sql::from(limit as i64)])
        .await?;
    let mut items: Vec<String> = rows
        .into_iter()
        .map(|r| r.try_get::<String>("", "product_id"))
        .collect::<Result<_, _>>()?;
    items.reverse();
    Ok(items)
}

/// The tenant's `limit` most popular products and their share of all interactions, best first.
pub async fn popular(tx: &TenantTx, limit: usize) -> Result<Vec<(String, f32)>, DomainError> {
    let sql = format!(
        "SELECT product_id, count(*)::float8 / sum(count(*)) OVER () AS share
           FROM ({ALL_INTERACTIONS}) i GROUP BY product_id ORDER BY count(*) DESC, product_id LIMIT $2"
    );
    let rows = tx.all(&sql, vec![Sql::from(limit as i64)]).await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                r.try_get::<String>("", "product_id")?,
                r.try_get::<f64>("", "share")? as f32,
            ))
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(DomainError::from)
}

/// Each catalog product's category (`product_type`), for products that have one.
pub async fn categories(tx: &TenantTx) -> Result<Vec<(String, String)>, DomainError> {
    let rows = tx
        .all(
            "SELECT external_id::text AS product_id, lower(btrim(product_type)) AS category
               FROM catalog_products
              WHERE tenant_id = $1 AND deleted_at IS NULL AND btrim(coalesce(product_type, '')) <> ''",
            vec![],
        )
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                r.try_get::<String>("", "product_id")?,
                r.try_get::<String>("", "category")?,
            ))
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(DomainError::from)
}

/// The newest model version of the tenant, if any.
pub async fn latest_version(tx: &TenantTx) -> Result<Option<i32>, DomainError> {
    let row = tx
        .one(
            "SELECT max(version) AS version FROM recommend_models WHERE tenant_id = $1",
            vec![],
        )
        .await?;
    Ok(row.and_then(|r| r.try_get::<Option<i32>>("", "version").ok().flatten()))
}

/// A stored model.
#[derive(Debug, Clone)]
pub struct StoredModel {
    /// Its version.
    pub version: i32,
    /// Burn's record.
    pub weights: Vec<u8>,
    /// Shape, items and figures.
    pub meta: serde_json::Value,
}

/// The model `version` of the tenant.
pub async fn load_model(tx: &TenantTx, version: i32) -> Result<Option<StoredModel>, DomainError> {
    let row = tx
        .one(
            "SELECT version, weights, meta FROM recommend_models WHERE tenant_id = $1 AND version = $2",
            vec![Sql::from(version)],
        )
        .await?;
    row.map(|r| {
        Ok(StoredModel {
            version: r.try_get("", "version")?,
            weights: r.try_get("", "weights")?,
            meta: r.try_get("", "meta")?,
        })
    })
    .transpose()
    .map_err(|e: sea_orm::DbErr| DomainError::from(e))
}

/// Stores a new version (one more than the newest, under a per-tenant lock so concurrent trainings take
/// turns) and keeps the newest `keep` versions; returns the version.
pub async fn save_model(
    tx: &TenantTx,
    weights: Vec<u8>,
    meta: serde_json::Value,
    keep: i32,
) -> Result<i32, DomainError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('recommend_models:' || $1::text))",
        vec![],
    )
    .await?;
    let row = tx
        .one(
            "INSERT INTO recommend_models (tenant_id, version, weights, meta)
             SELECT $1, coalesce(max(version), 0) + 1, $2, $3 FROM recommend_models WHERE tenant_id = $1
             RETURNING version",
            vec![Sql::from(weights), Sql::from(meta)],
        )
        .await?
        .ok_or_else(|| DomainError::Db(sea_orm::DbErr::RecordNotInserted))?;
    let version: i32 = row.try_get("", "version")?;
    tx.execute(
        "DELETE FROM recommend_models WHERE tenant_id = $1 AND version <= $2",
        vec![Sql::from(version - keep)],
    )
    .await?;
    Ok(version)
}

/// Cosine similarity of `product`'s vision embedding with every other product's of the same model (empty
/// when the vision family has none for it).
pub async fn visual_neighbours(
    tx: &TenantTx,
    product: &str,
) -> Result<std::collections::HashMap<String, f32>, DomainError> {
    let rows = tx
        .all(
            "WITH q AS (SELECT embedding, model FROM vision_embeddings WHERE tenant_id = $1 AND product_id = $2)
             SELECT v.product_id,
                    (SELECT sum(a::float8 * b::float8) FROM unnest(v.embedding, q.embedding) AS t(a, b)) AS cosine
               FROM vision_embeddings v, q
              WHERE v.tenant_id = $1 AND v.model = q.model AND v.product_id <> $2",
            vec![Sql::from(product)],
        )
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                r.try_get::<String>("", "product_id")?,
                r.try_get::<Option<f64>>("", "cosine")?.unwrap_or(0.0) as f32,
            ))
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(DomainError::from)
}

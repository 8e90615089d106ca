//! The read tasks (platform.md §5): `catalog.products`, `catalog.product`, `sync.orders`, and
//! `vision.embed_product`, which marks an image embedding request recorded in a binary without the vision
//! family (the vision family, registered after this one, replaces it with the task that embeds the image).

use crate::store;
use crate::tasks::{SyncFamily, limit, required, string};
use celeriac_task::{Registry, TaskContext, TaskError, TaskOptions};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::sync::Arc;

fn product_json(
    r: &sea_orm::QueryResult,
    variants: Vec<Value>,
    images: Vec<Value>,
) -> Result<Value, sea_orm::DbErr> {
    let t = |c: &str| -> Result<Option<String>, sea_orm::DbErr> {
        Ok(r.try_get::<Option<DateTime<Utc>>>("", c)?
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
    };
    Ok(json!({
        "external_id": r.try_get::<i64>("", "external_id")?.to_string(),
        "title": r.try_get::<String>("", "title")?,
        "vendor": r.try_get::<Option<String>>("", "vendor")?,
        "product_type": r.try_get::<Option<String>>("", "product_type")?,
        "handle": r.try_get::<Option<String>>("", "handle")?,
        "status": r.try_get::<Option<String>>("", "status")?,
        "tags": r.try_get::<Option<String>>("", "tags")?,
        "body_html": r.try_get::<Option<String>>("", "body_html")?,
        "updated_at": t("src_updated_at")?,
        "deleted": r.try_get::<Option<DateTime<Utc>>>("", "deleted_at")?.is_some(),
        "variants": variants,
        "images": images,
    }))
}

const PRODUCT: &str = "external_id, title, vendor, product_type, handle, status, tags, body_html, src_updated_at, deleted_at";

async fn details(
    tx: &celeriac_domain::TenantTx,
    id: i64,
) -> Result<(Vec<Value>, Vec<Value>), celeriac_domain::DomainError> {
    let variants = tx
        .all("SELECT external_id, title, price, sku, position, inventory_quantity FROM catalog_variants \
              WHERE tenant_id = $1 AND product_id = $2 ORDER BY position, external_id", vec![id.into()])
        .await?
        .iter()
        .map(|v| -> Result<Value, sea_orm::DbErr> {
            Ok(json!({"external_id": v.try_get::<i64>("", "external_id")?.to_string(), "title": v.try_get::<Option<String>>("", "title")?,
                      "price": v.try_get::<Option<String>>("", "price")?, "sku": v.try_get::<Option<String>>("", "sku")?,
                      "position": v.try_get::<Option<i32>>("", "position")?,
                      "inventory_quantity": v.try_get::<Option<i32>>("", "inventory_quantity")?}))
        })
        .collect::<Result<_, _>>()?;
    let images = tx
        .all("SELECT external_id, src, position, width, height FROM catalog_images WHERE tenant_id = $1 AND product_id = $2 \
              ORDER BY position, external_id", vec![id.into()])
        .await?
        .iter()
        .map(|i| -> Result<Value, sea_orm::DbErr> {
            Ok(json!({"external_id": i.try_get::<i64>("", "external_id")?.to_string(), "src": i.try_get::<String>("", "src")?,
                      "position": i.try_get::<Option<i32>>("", "position")?, "width": i.try_get::<Option<i32>>("", "width")?,
                      "height": i.try_get::<Option<i32>>("", "height")?}))
        })
        .collect::<Result<_, _>>()?;
    Ok((variants, images))
}

/// Registers the read tasks.
pub fn register(registry: &mut Registry, family: Arc<SyncFamily>) {
    let f = Arc::clone(&family);
    registry.task(
        "catalog.products",
        &["tenant_id", "query?", "updated_since?", "include_deleted?", "limit?", "offset?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (t, q, since, deleted, lim, off): (Value, Value, Value, Value, Value, Value)| {
            let f = Arc::clone(&f);
            async move {
                let query = string("query", &q)?;
                let since: Option<DateTime<Utc>> = match string("updated_since", &since)? {
                    None => None,
                    Some(s) => Some(DateTime::parse_from_rfc3339(s.as_str()).map(|t| t.with_timezone(&Utc)).map_err(|e| {
                        TaskError::value_error(format!("updated_since: expected an ISO 8601 time with offset, got {s:?} ({e})"))
                    })?),
                };
                let include_deleted = match deleted {
                    Value::Null => false,
                    Value::Bool(b) => b,
                    other => return Err(TaskError::value_error(format!("include_deleted: expected a bool, got {other}"))),
                };
                let count = limit(&lim, 50, "limit")?.min(500);
                let offset = limit(&off, 0, "offset")?;
                let tenant = f.tenants()?.resolve(&required("tenant_id", &t)?).await?;
                let tx = f.tx(&tenant).await?;
                let pattern = query.map(|q| format!("%{}%", q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
                let rows = tx
                    .all(&format!(
                        "SELECT {PRODUCT}, count(*) OVER () AS total FROM catalog_products WHERE tenant_id = $1 \
                         AND ($2::text IS NULL OR title ILIKE $2 OR vendor ILIKE $2 OR tags ILIKE $2 OR product_type ILIKE $2) \
                         AND ($3::timestamptz IS NULL OR src_updated_at >= $3) AND ($4 OR deleted_at IS NULL) \
                         ORDER BY src_updated_at DESC, external_id DESC LIMIT $5 OFFSET $6"),
                        vec![pattern.into(), since.into(), include_deleted.into(), count.into(), offset.into()])
                    .await?;
                let total = rows.first().map(|r| r.try_get::<i64>("", "total")).transpose().map_err(celeriac_domain::DomainError::from)?.unwrap_or(0);
                let mut items = Vec::with_capacity(rows.len());
                for r in &rows {
                    let id: i64 = r.try_get("", "external_id").map_err(celeriac_domain::DomainError::from)?;
                    let (v, i) = details(&tx, id).await?;
                    items.push(product_json(r, v, i).map_err(celeriac_domain::DomainError::from)?);
                }
                tx.commit().await?;
                Ok(json!({"total": total, "limit": count, "offset": offset, "products": items}))
            }
        },
    );
    let f = Arc::clone(&family);
    registry.task("catalog.product", &["tenant_id", "external_id"], TaskOptions::default(),
        move |_ctx: TaskContext, (t, id): (Value, Value)| {
            let f = Arc::clone(&f);
            async move {
                let id: i64 = match &id {
                    Value::Number(n) => n.as_i64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                }
                .ok_or_else(|| TaskError::value_error(format!("external_id: expected the product's id, got {id}")))?;
                let tenant = f.tenants()?.resolve(&required("tenant_id", &t)?).await?;
                let tx = f.tx(&tenant).await?;
                let row = tx.one(&format!("SELECT {PRODUCT} FROM catalog_products WHERE tenant_id = $1 AND external_id = $2"),
                                 vec![id.into()]).await?;
                let out = match row {
                    None => Value::Null,
                    Some(r) => {
                        let (v, i) = details(&tx, id).await?;
                        product_json(&r, v, i).map_err(celeriac_domain::DomainError::from)?
                    }
                };
                tx.commit().await?;
                Ok(out)
            }
        });
    let f = Arc::clone(&family);
    registry.task(
        "sync.orders",
        &["tenant_id", "customer_email?", "limit?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (t, email, lim): (Value, Value, Value)| {
            let f = Arc::clone(&f);
            async move {
                let email = string("customer_email", &email)?;
                let count = limit(&lim, 100, "limit")?.min(1000);
                let tenant = f.tenants()?.resolve(&required("tenant_id", &t)?).await?;
                let tx = f.tx(&tenant).await?;
                let orders = store::orders(&tx, email.as_deref(), count).await?;
                tx.commit().await?;
                Ok(json!({"orders": orders}))
            }
        },
    );
    let f = Arc::clone(&family);
    registry.task("vision.embed_product", &["tenant_id", "product_id", "image_id", "src", "content_hash"], TaskOptions::default(),
        move |_ctx: TaskContext, (t, _p, image, _src, hash): (Value, Value, Value, Value, Value)| {
            let f = Arc::clone(&f);
            async move {
                let tenant = f.tenants()?.resolve(&required("tenant_id", &t)?).await?;
                let image = image.as_i64().ok_or_else(|| TaskError::value_error("image_id: expected an integer"))?;
                let tx = f.tx(&tenant).await?;
                let n = tx.execute("UPDATE catalog_embed_requests SET status = 'recorded' WHERE tenant_id = $1 \
                                    AND image_id = $2 AND content_hash = $3 AND status = 'pending'",
                                   vec![image.into(), required("content_hash", &hash)?.into()]).await?;
                tx.commit().await?;
                Ok(json!({"image_id": image, "recorded": n == 1, "embedded": false}))
            }
        });
}

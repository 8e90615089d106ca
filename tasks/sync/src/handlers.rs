//! How each stream's records are stored: products with their variants and images (a changed product queues
//! its images for embedding), orders and customers. All go through the generic upsert of `store`.

use crate::engine::{Counts, Cursor, StreamHandler};
use crate::source::Stream;
use crate::store::{self, content_hash, record_cursor, time_field};
use celeriac_domain::{DomainError, TenantTx};
use futures::future::BoxFuture;
use sea_orm::Value as Sql;
use serde_json::{Value, json};
use uuid::Uuid;

fn text(rec: &Value, field: &str) -> Sql {
    match &rec[field] {
        Value::Null => Sql::String(None),
        Value::String(s) => s.clone().into(),
        other => other.to_string().into(),
    }
}

fn int32(rec: &Value, field: &str) -> Sql {
    rec[field]
        .as_i64()
        .and_then(|n| i32::try_from(n).ok())
        .into()
}

fn id_of(rec: &Value) -> Result<i64, DomainError> {
    rec["id"].as_i64().ok_or_else(|| {
        DomainError::Db(sea_orm::DbErr::Custom(format!(
            "a record without an integer id: {rec}"
        )))
    })
}

/// Products, variants and images.
#[derive(Debug, Default)]
pub struct Products;

impl Products {
    async fn upsert_all(
        &self,
        tx: &TenantTx,
        records: &[Value],
        pass: Option<Uuid>,
    ) -> Result<(Counts, Vec<Value>), DomainError> {
        let mut counts = Counts {
            fetched: records.len() as u64,
            ..Default::default()
        };
        let mut embed = Vec::new();
        for rec in records {
            let id = id_of(rec)?;
            let cols = [
                ("title", text(rec, "title")),
                ("body_html", text(rec, "body_html")),
                ("vendor", text(rec, "vendor")),
                ("product_type", text(rec, "product_type")),
                ("handle", text(rec, "handle")),
                ("status", text(rec, "status")),
                ("tags", text(rec, "tags")),
                ("src_created_at", time_field(rec, "created_at").into()),
                ("src_updated_at", time_field(rec, "updated_at").into()),
            ];
            if !store::upsert_record(tx, "catalog_products", id, rec, &cols, pass).await? {
                counts.unchanged += 1;
                continue;
            }
            counts.upserted += 1;
            // The product changed: its variants and images are replaced as they are now.
            tx.execute(
                "DELETE FROM catalog_variants WHERE tenant_id = $1 AND product_id = $2",
                vec![id.into()],
            )
            .await?;
            tx.execute(
                "DELETE FROM catalog_images WHERE tenant_id = $1 AND product_id = $2",
                vec![id.into()],
            )
            .await?;
            for v in rec["variants"].as_array().into_iter().flatten() {
                tx.execute(
                    "INSERT INTO catalog_variants (tenant_id, external_id, product_id, title, price, sku, position, \
                     inventory_quantity, raw) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (tenant_id, external_id) \
                     DO UPDATE SET product_id = EXCLUDED.product_id, title = EXCLUDED.title, price = EXCLUDED.price, \
                     sku = EXCLUDED.sku, position = EXCLUDED.position, inventory_quantity = EXCLUDED.inventory_quantity, raw = EXCLUDED.raw",
                    vec![id_of(v)?.into(), id.into(), text(v, "title"), text(v, "price"), text(v, "sku"),
                         int32(v, "position"), int32(v, "inventory_quantity"), v.clone().into()],
                )
                .await?;
            }
            let hash = content_hash(rec);
            for img in rec["images"].as_array().into_iter().flatten() {
                let image_id = id_of(img)?;
                tx.execute(
                    "INSERT INTO catalog_images (tenant_id, external_id, product_id, src, position, width, height) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, external_id) DO UPDATE SET \
                     product_id = EXCLUDED.product_id, src = EXCLUDED.src, position = EXCLUDED.position, \
                     width = EXCLUDED.width, height = EXCLUDED.height",
                    vec![image_id.into(), id.into(), text(img, "src"), int32(img, "position"), int32(img, "width"), int32(img, "height")],
                )
                .await?;
                let new = tx
                    .execute(
                        "INSERT INTO catalog_embed_requests (tenant_id, image_id, product_id, src, content_hash, status) \
                         VALUES ($1, $2, $3, $4, $5, 'pending') ON CONFLICT DO NOTHING",
                        vec![image_id.into(), id.into(), text(img, "src"), hash.clone().into()],
                    )
                    .await?;
                if new == 1 {
                    embed.push(json!({"product_id": id, "image_id": image_id, "src": img["src"], "content_hash": hash}));
                }
            }
        }
        Ok((counts, embed))
    }
}

impl StreamHandler for Products {
    fn stream(&self) -> Stream {
        Stream::Products
    }
    fn cursor(&self, record: &Value) -> Result<Cursor, String> {
        record_cursor(record)
    }
    fn upsert<'a>(
        &'a self,
        tx: &'a TenantTx,
        records: &'a [Value],
        pass: Option<Uuid>,
    ) -> BoxFuture<'a, Result<(Counts, Vec<Value>), DomainError>> {
        Box::pin(self.upsert_all(tx, records, pass))
    }
    fn sweep<'a>(
        &'a self,
        tx: &'a TenantTx,
        pass: Uuid,
    ) -> BoxFuture<'a, Result<u64, DomainError>> {
        Box::pin(store::sweep(tx, "catalog_products", Stream::Products, pass))
    }
    fn delete<'a>(
        &'a self,
        tx: &'a TenantTx,
        external_id: i64,
    ) -> BoxFuture<'a, Result<u64, DomainError>> {
        Box::pin(store::delete_record(tx, "catalog_products", external_id))
    }
}

/// A stream stored in one table.
#[derive(Debug)]
pub struct Flat {
    stream: Stream,
    table: &'static str,
}

/// Orders.
pub fn orders() -> Flat {
    Flat {
        stream: Stream::Orders,
        table: "sync_orders",
    }
}

/// Customers.
pub fn customers() -> Flat {
    Flat {
        stream: Stream::Customers,
        table: "sync_customers",
    }
}

impl Flat {
    fn columns(&self, rec: &Value) -> Vec<(&'static str, Sql)> {
        let mut cols = vec![
            ("src_created_at", time_field(rec, "created_at").into()),
            ("src_updated_at", time_field(rec, "updated_at").into()),
        ];
        match self.stream {
            Stream::Orders => cols.extend([
                ("name", text(rec, "name")),
                ("email", text(rec, "email")),
                ("customer_id", rec["customer"]["id"].as_i64().into()),
                ("financial_status", text(rec, "financial_status")),
                ("fulfillment_status", text(rec, "fulfillment_status")),
                ("currency", text(rec, "currency")),
                ("total_price", text(rec, "total_price")),
            ]),
            Stream::Customers => cols.extend([
                ("email", text(rec, "email")),
                ("first_name", text(rec, "first_name")),
                ("last_name", text(rec, "last_name")),
                ("orders_count", int32(rec, "orders_count")),
                ("total_spent", text(rec, "total_spent")),
            ]),
            Stream::Products => {}
        }
        cols
    }

    async fn upsert_all(
        &self,
        tx: &TenantTx,
        records: &[Value],
        pass: Option<Uuid>,
    ) -> Result<(Counts, Vec<Value>), DomainError> {
        let mut counts = Counts {
            fetched: records.len() as u64,
            ..Default::default()
        };
        for rec in records {
            if store::upsert_record(tx, self.table, id_of(rec)?, rec, &self.columns(rec), pass)
                .await?
            {
                counts.upserted += 1;
            } else {
                counts.unchanged += 1;
            }
        }
        Ok((counts, Vec::new()))
    }
}

impl StreamHandler for Flat {
    fn stream(&self) -> Stream {
        self.stream
    }
    fn cursor(&self, record: &Value) -> Result<Cursor, String> {
        record_cursor(record)
    }
    fn upsert<'a>(
        &'a self,
        tx: &'a TenantTx,
        records: &'a [Value],
        pass: Option<Uuid>,
    ) -> BoxFuture<'a, Result<(Counts, Vec<Value>), DomainError>> {
        Box::pin(self.upsert_all(tx, records, pass))
    }
    fn sweep<'a>(
        &'a self,
        tx: &'a TenantTx,
        pass: Uuid,
    ) -> BoxFuture<'a, Result<u64, DomainError>> {
        Box::pin(store::sweep(tx, self.table, self.stream, pass))
    }
    fn delete<'a>(
        &'a self,
        tx: &'a TenantTx,
        external_id: i64,
    ) -> BoxFuture<'a, Result<u64, DomainError>> {
        Box::pin(store::delete_record(tx, self.table, external_id))
    }
}

/// The handler of a stream.
pub fn handler(stream: Stream) -> Box<dyn StreamHandler> {
    match stream {
        Stream::Products => Box::new(Products),
        Stream::Orders => Box::new(orders()),
        Stream::Customers => Box::new(customers()),
    }
}

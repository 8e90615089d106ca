//! Visual search per tenant: `vision_embeddings` in PostgreSQL (one `real[]` per product, written through a
//! `TenantTx`, row-level security behind it) and, in each worker, an in-memory copy of each tenant's vectors
//! searched by an exact scan (cosine similarity of unit vectors: a dot product).
//!
//! Every search first brings the copy up to date: it re-reads the rows stamped within [`OVERLAP`] of the
//! newest it has seen (a writer's stamp precedes its commit by far less than that, so an upsert another
//! worker committed late is not missed) and reloads everything when the row count disagrees (a delete).
//! Rows of another model (weights retrained) are not searched.

use celeriac_domain::{DomainError, TenantTx, Tenants};
use chrono::{DateTime, Utc};
use sea_orm::Value as Sql;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// How far back each refresh re-reads.
pub const OVERLAP: Duration = Duration::from_secs(10);

/// One hit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Hit {
    /// The product.
    pub product_id: String,
    /// Cosine similarity with the query.
    pub score: f32,
}

/// One tenant's vectors.
#[derive(Debug, Default)]
struct Vectors {
    ids: Vec<String>,
    data: Vec<f32>,
    position: HashMap<String, usize>,
    newest: Option<DateTime<Utc>>,
    loaded: bool,
}

impl Vectors {
    fn upsert(&mut self, id: String, v: &[f32]) {
        match self.position.get(&id) {
            Some(&i) => self.data[i * v.len()..(i + 1) * v.len()].copy_from_slice(v),
            None => {
                self.position.insert(id.clone(), self.ids.len());
                self.ids.push(id);
                self.data.extend_from_slice(v);
            }
        }
    }

    fn top(&self, q: &[f32], k: usize) -> Vec<Hit> {
        let d = q.len();
        let mut scored: Vec<(f32, usize)> = self
            .data
            .chunks_exact(d)
            .enumerate()
            .map(|(i, v)| (v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(), i))
            .collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Vec::new();
        }
        let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        scored.select_nth_unstable_by(k - 1, by_score);
        scored.truncate(k);
        scored.sort_by(by_score);
        scored
            .into_iter()
            .map(|(score, i)| Hit {
                product_id: self.ids[i].clone(),
                score,
            })
            .collect()
    }
}

/// The tenants' embeddings: the table and the in-memory copies.
#[derive(Debug)]
pub struct SearchIndex {
    tenants: Result<Arc<Tenants>, String>,
    model: String,
    cache: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<Vectors>>>>,
}

fn db(e: sea_orm::DbErr) -> DomainError {
    DomainError::from(e)
}

fn array_literal(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 12 + 2);
    s.push('{');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&x.to_string());
    }
    s.push('}');
    s
}

fn parse_array(s: &str) -> Option<Vec<f32>> {
    s.strip_prefix('{')?
        .strip_suffix('}')?
        .split(',')
        .map(|x| x.trim().parse::<f32>().ok())
        .collect()
}

impl SearchIndex {
    /// The index over `tenants` (an error when the domain database is not configured) for `model`.
    pub fn new(tenants: Result<Arc<Tenants>, String>, model: String) -> Self {
        Self {
            tenants,
            model,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn begin(&self, tenant: &str) -> Result<TenantTx, DomainError> {
        let tenants = self
            .tenants
            .as_ref()
            .map_err(|_| DomainError::NotConfigured("database_url".into()))?;
        tenants.begin(tenant).await
    }

    /// Stores `embedding` as `product_id`'s; true when it replaced one.
    pub async fn put(
        &self,
        tenant: &str,
        product_id: &str,
        embedding: &[f32],
    ) -> Result<bool, DomainError> {
        let tx = self.begin(tenant).await?;
        let replaced = self.upsert(&tx, product_id, embedding).await?;
        tx.commit().await?;
        Ok(replaced)
    }

    /// Answers one of the catalog's embedding requests (`catalog_embed_requests`, written by the sync
    /// family): stores `embedding` as `product_id`'s and marks the request for that image and content `done`,
    /// in one transaction. Returns whether it replaced an embedding and whether a request was waiting.
    pub async fn put_requested(
        &self,
        tenant: &str,
        product_id: &str,
        embedding: &[f32],
        image_id: i64,
        content_hash: &str,
    ) -> Result<(bool, bool), DomainError> {
        let tx = self.begin(tenant).await?;
        let replaced = self.upsert(&tx, product_id, embedding).await?;
        let marked = tx
            .execute(
                "UPDATE catalog_embed_requests SET status = 'done'
                  WHERE tenant_id = $1 AND image_id = $2 AND content_hash = $3 AND status <> 'done'",
                vec![Sql::from(image_id), Sql::from(content_hash)],
            )
            .await?;
        tx.commit().await?;
        Ok((replaced, marked == 1))
    }

    async fn upsert(
        &self,
        tx: &TenantTx,
        product_id: &str,
        embedding: &[f32],
    ) -> Result<bool, DomainError> {
        let row = tx
            .one(
                "INSERT INTO vision_embeddings (tenant_id, product_id, embedding, model)
                 VALUES ($1, $2, $3::real[], $4)
                 ON CONFLICT (tenant_id, product_id) DO UPDATE
                   SET embedding = EXCLUDED.embedding, model = EXCLUDED.model, updated_at = clock_timestamp()
                 RETURNING (xmax <> 0) AS replaced",
                vec![
                    Sql::from(product_id),
                    Sql::from(array_literal(embedding)),
                    Sql::from(self.model.as_str()),
                ],
            )
            .await?;
        Ok(row
            .and_then(|r| r.try_get::<bool>("", "replaced").ok())
            .unwrap_or(false))
    }

    /// Deletes `product_id`'s embedding; true when there was one.
    pub async fn delete(&self, tenant: &str, product_id: &str) -> Result<bool, DomainError> {
        let tx = self.begin(tenant).await?;
        let n = tx
            .execute(
                "DELETE FROM vision_embeddings WHERE tenant_id = $1 AND product_id = $2",
                vec![Sql::from(product_id)],
            )
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    /// The `k` products of `tenant` whose embeddings are nearest `query`, best first.
    pub async fn search(
        &self,
        tenant: &str,
        query: &[f32],
        k: usize,
    ) -> Result<(Vec<Hit>, usize), DomainError> {
        let tx = self.begin(tenant).await?;
        let id = tx.tenant().id;
        let entry = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(cache.entry(id).or_default())
        };
        let mut vectors = entry.lock_owned().await;
        self.refresh(&tx, &mut vectors, query.len()).await?;
        tx.commit().await?;
        // The exact scan is CPU work (≈0.1 s at 10^6 vectors): off the async runtime, so fetching,
        // heartbeats and the other tasks carry on meanwhile.
        let query = query.to_vec();
        let scan = tokio::task::spawn_blocking(move || (vectors.top(&query, k), vectors.ids.len()));
        // A panic in the scan is the task's panic (the worker's panic layer reports it).
        Ok(scan
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
    }

    async fn refresh(&self, tx: &TenantTx, v: &mut Vectors, dim: usize) -> Result<(), DomainError> {
        let since = match (v.loaded, v.newest) {
            (true, Some(t)) => Some(t - chrono::Duration::from_std(OVERLAP).unwrap_or_default()),
            (true, None) => Some(DateTime::<Utc>::MIN_UTC),
            _ => None,
        };
        if since.is_none() {
            *v = Vectors::default();
        }
        let rows = tx
            .all(
                "SELECT product_id, embedding::text AS embedding, updated_at FROM vision_embeddings
                 WHERE tenant_id = $1 AND model = $2 AND ($3::timestamptz IS NULL OR updated_at > $3)",
                vec![Sql::from(self.model.as_str()), Sql::from(since)],
            )
            .await?;
        for r in rows {
            let pid: String = r.try_get("", "product_id").map_err(db)?;
            let text: String = r.try_get("", "embedding").map_err(db)?;
            let at: DateTime<Utc> = r.try_get("", "updated_at").map_err(db)?;
            match parse_array(&text) {
                Some(e) if e.len() == dim => v.upsert(pid, &e),
                _ => tracing::warn!(
                    product_id = pid,
                    "vision_embeddings: a row of another shape, skipped"
                ),
            }
            v.newest = Some(v.newest.map_or(at, |n| n.max(at)));
        }
        v.loaded = true;
        let count: i64 = tx
            .one(
                "SELECT count(*) AS n FROM vision_embeddings WHERE tenant_id = $1 AND model = $2",
                vec![Sql::from(self.model.as_str())],
            )
            .await?
            .map(|r| r.try_get("", "n"))
            .transpose()
            .map_err(db)?
            .unwrap_or(0);
        if count as usize != v.ids.len() && since.is_some() {
            // A row was deleted (or skipped): read everything again.
            v.loaded = false;
            return Box::pin(self.refresh(tx, v, dim)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_ranks_by_dot_product_and_upserts_replace() {
        let mut v = Vectors::default();
        v.upsert("a".into(), &[1.0, 0.0]);
        v.upsert("b".into(), &[0.6, 0.8]);
        v.upsert("c".into(), &[0.0, 1.0]);
        let hits = v.top(&[0.0, 1.0], 2);
        assert_eq!(
            hits.iter()
                .map(|h| h.product_id.as_str())
                .collect::<Vec<_>>(),
            ["c", "b"]
        );
        v.upsert("a".into(), &[0.0, 1.0]);
        assert_eq!(v.ids.len(), 3);
        let hits = v.top(&[0.0, 1.0], 10);
        assert_eq!(hits.len(), 3);
        assert_eq!(hits[0].score, 1.0);
        assert_eq!(hits[2].product_id, "b");
    }

    #[test]
    fn arrays_round_trip_through_their_text_form() {
        let v = vec![0.1f32, -2.5e-8, 1.0];
        assert_eq!(parse_array(&array_literal(&v)).unwrap(), v);
        assert_eq!(parse_array("{1,x}"), None);
    }
}

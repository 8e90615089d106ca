//! The Celery tasks of the family, registered under their dotted names: `vision.classify`, `vision.embed`,
//! `vision.detect`, and per tenant `vision.index`, `vision.unindex` and `vision.search`. Each decodes its image off the async
//! runtime, then waits for the batching executor.

use crate::Vision;
use crate::model::{CLASS_NAMES, best_class};
use celeriac_task::{Registry, TaskContext, TaskError, TaskOptions};
use serde_json::{Value, json};
use std::sync::Arc;

/// Registers the tasks over `vision`.
pub fn register(registry: &mut Registry, vision: Arc<Vision>) {
    let v = Arc::clone(&vision);
    registry.task(
        "vision.classify",
        &["image"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (image,): (Value,)| {
            let v = Arc::clone(&v);
            async move {
                let p = v.predict(&image).await?;
                Ok(classification(&p.probs))
            }
        },
    );
    let v = Arc::clone(&vision);
    registry.task(
        "vision.embed",
        &["image"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (image,): (Value,)| {
            let v = Arc::clone(&v);
            async move { Ok::<_, TaskError>(v.predict(&image).await?.embedding) }
        },
    );
    let v = Arc::clone(&vision);
    registry.task(
        "vision.detect",
        &["image", "min_score?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (image, min_score): (Value, Option<f64>)| {
            let v = Arc::clone(&v);
            async move {
                let min_score = min_score.unwrap_or(0.3);
                if !(0.0..=1.0).contains(&min_score) {
                    return Err(TaskError::value_error(format!(
                        "min_score: {min_score} is not between 0 and 1"
                    )));
                }
                let found = v.detect(&image, min_score as f32).await?;
                Ok(Value::Array(found.iter().map(|d| d.to_json()).collect()))
            }
        },
    );
    register_search(registry, Arc::clone(&vision));
    register_embed_product(registry, vision);
}

/// `vision.embed_product`, the catalog's requests: the sync family publishes one per new or changed product
/// image (on its `embed_queue`, bulk by default). The image is fetched from `src` (size cap, timeout), its
/// embedding stored as the product's (the product's newest embedded image is the one searched) and the
/// request marked `done`, in one transaction. An image that cannot be fetched or decoded fails the task with
/// `ValueError` and leaves the request pending. This replaces the sync family's registration, which only
/// marks requests recorded when the vision family is not built in.
fn register_embed_product(registry: &mut Registry, vision: Arc<Vision>) {
    registry.task(
        "vision.embed_product",
        &["tenant_id", "product_id", "image_id", "src", "content_hash"],
        TaskOptions::default(),
        move |_ctx: TaskContext,
              (tenant, product, image_id, src, hash): (String, Value, i64, String, String)| {
            let v = Arc::clone(&vision);
            async move {
                let product = celeriac_task::id_arg("product_id", &product)?;
                if !(src.starts_with("http://") || src.starts_with("https://")) {
                    return Err(TaskError::value_error(format!(
                        "src: expected an http(s) URL, got {src:?}"
                    )));
                }
                let embedding = v.predict(&Value::String(src)).await?.embedding;
                let (replaced, requested) = v
                    .search
                    .put_requested(&tenant, &product, &embedding, image_id, &hash)
                    .await?;
                Ok(json!({"image_id": image_id, "product_id": product, "embedded": true,
                          "replaced": replaced, "requested": requested}))
            }
        },
    );
}

fn product_id(v: &str) -> Result<&str, TaskError> {
    let v = v.trim();
    if v.is_empty() || v.len() > 256 {
        return Err(TaskError::value_error(
            "product_id: expected 1 to 256 characters",
        ));
    }
    Ok(v)
}

fn register_search(registry: &mut Registry, vision: Arc<Vision>) {
    let v = Arc::clone(&vision);
    registry.task(
        "vision.index",
        &["tenant_id", "product_id", "image"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, product, image): (String, String, Value)| {
            let v = Arc::clone(&v);
            async move {
                let product = product_id(&product)?;
                let embedding = v.predict(&image).await?.embedding;
                let replaced = v.search.put(&tenant, product, &embedding).await?;
                Ok(json!({"product_id": product, "dim": embedding.len(), "replaced": replaced}))
            }
        },
    );
    let v = Arc::clone(&vision);
    registry.task(
        "vision.unindex",
        &["tenant_id", "product_id"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, product): (String, String)| {
            let v = Arc::clone(&v);
            async move {
                let product = product_id(&product)?;
                let deleted = v.search.delete(&tenant, product).await?;
                Ok(json!({"product_id": product, "deleted": deleted}))
            }
        },
    );
    let v = Arc::clone(&vision);
    registry.task(
        "vision.search",
        &["tenant_id", "image", "k?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, image, k): (String, Value, Option<i64>)| {
            let v = Arc::clone(&v);
            async move {
                let k = k.unwrap_or(10);
                if !(1..=1000).contains(&k) {
                    return Err(TaskError::value_error(format!(
                        "k: {k} is not between 1 and 1000"
                    )));
                }
                let query = v.predict(&image).await?.embedding;
                let (hits, _) = v.search.search(&tenant, &query, k as usize).await?;
                Ok(hits)
            }
        },
    );
}

/// `{"label", "class_id", "score", "probs"}` of a softmax.
pub fn classification(probs: &[f32]) -> Value {
    let (class_id, score) = best_class(probs);
    json!({
        "label": CLASS_NAMES[class_id],
        "class_id": class_id,
        "score": score,
        "probs": probs,
    })
}

//! Shop webhooks (`POST /webhooks/shopify/{tenant}`, served by `celeriac webhooks`): `products/create|update|
//! delete`, `orders/create|updated`, `customers/create|update|delete`, verified by `X-Shopify-Hmac-Sha256`
//! (base64 HMAC-SHA256 of the raw body) before anything is read, deduplicated by `X-Shopify-Webhook-Id`, and
//! applied as single-record upserts through the same stream handlers the engine uses.

use crate::handlers;
use crate::source::Stream;
use crate::store;
use crate::tasks::{SyncFamily, webhook_context};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use celeriac_domain::TenantTx;
use serde_json::Value;
use std::sync::Arc;
use tracing::{info, warn};

/// The router: `POST /webhooks/shopify/{tenant}` (id or slug).
pub fn router(family: Arc<SyncFamily>) -> Router {
    Router::new()
        .route("/webhooks/shopify/{tenant}", post(receive))
        .with_state(family)
}

/// Checks a Shopify HMAC header against the raw body.
pub fn verify(secret: &str, body: &[u8], header: &str) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(header.trim()) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, body, &given).is_ok()
}

fn topic_stream(topic: &str) -> Option<(Stream, bool)> {
    match topic {
        "products/create" | "products/update" => Some((Stream::Products, false)),
        "products/delete" => Some((Stream::Products, true)),
        "orders/create" | "orders/updated" | "orders/paid" | "orders/fulfilled"
        | "orders/cancelled" => Some((Stream::Orders, false)),
        "orders/delete" => Some((Stream::Orders, true)),
        "customers/create" | "customers/update" => Some((Stream::Customers, false)),
        "customers/delete" => Some((Stream::Customers, true)),
        _ => None,
    }
}

async fn receive(
    State(f): State<Arc<SyncFamily>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Ok(tenants) = f.tenants() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "database_url is not set".into(),
        );
    };
    let Ok(tenant) = tenants.resolve(&tenant).await else {
        return (StatusCode::NOT_FOUND, format!("no tenant {tenant:?}"));
    };
    // The secret: the tenant's own (sealed with its source), else the configured one.
    let secret = async {
        let tx = TenantTx::begin(tenants.db(), tenant.clone()).await.ok()?;
        let row = store::source(&tx).await.ok().flatten();
        let _ = tx.commit().await;
        match row.and_then(|r| r.webhook_secret) {
            Some(sealed) => f
                .sealer()
                .ok()?
                .open(&webhook_context(&tenant.id), &sealed)
                .ok(),
            None => f.config.webhook_secret.clone(),
        }
    }
    .await;
    let Some(secret) = secret else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no webhook secret for tenant {}", tenant.slug),
        );
    };
    if !h("x-shopify-hmac-sha256").is_some_and(|sig| verify(&secret, &body, &sig)) {
        warn!(tenant = %tenant.slug, "shop webhook refused: bad or missing X-Shopify-Hmac-Sha256");
        return (
            StatusCode::BAD_REQUEST,
            "bad or missing X-Shopify-Hmac-Sha256".into(),
        );
    }
    let (Some(topic), Some(webhook_id)) = (h("x-shopify-topic"), h("x-shopify-webhook-id")) else {
        return (
            StatusCode::BAD_REQUEST,
            "missing X-Shopify-Topic or X-Shopify-Webhook-Id".into(),
        );
    };
    let Ok(record) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "the body is not JSON".into());
    };
    let applied = async {
        let tx = TenantTx::begin(tenants.db(), tenant.clone()).await?;
        if !store::first_webhook(&tx, &webhook_id, &topic).await? {
            tx.commit().await?;
            return Ok::<_, celeriac_domain::DomainError>("duplicate");
        }
        let outcome = match topic_stream(&topic) {
            None => "topic not handled",
            Some((stream, delete)) => {
                let handler = handlers::handler(stream);
                if delete {
                    let id = record["id"].as_i64().unwrap_or_default();
                    handler.delete(&tx, id).await?;
                    "deleted"
                } else {
                    handler
                        .upsert(&tx, std::slice::from_ref(&record), None)
                        .await?;
                    "upserted"
                }
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }
    .await;
    match applied {
        Ok(outcome) => {
            info!(tenant = %tenant.slug, topic = %topic, webhook_id = %webhook_id, "shop webhook {outcome}");
            (StatusCode::OK, outcome.into())
        }
        Err(e) => {
            warn!(error = %e, tenant = %tenant.slug, "applying a shop webhook failed; the shop will deliver it again");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage unavailable".into(),
            )
        }
    }
}

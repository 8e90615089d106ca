//! Catalog ingestion and data-sync (`celeriac-tasks-sync`): a shop's products, orders and customers copied
//! into PostgreSQL, incremental and resumable, per tenant. Catalog and sync share this crate because they
//! share the source and the engine (platform.md lists them as two families; one crate keeps one engine).
//!
//! # Layout
//! - [`config`]: the `[sync]` section ([`SyncConfig`]).
//! - [`tasks`]: `catalog.ingest`, `sync.run`, `sync.status`, `sync.dispatch`; [`reads`]: `catalog.products`,
//!   `catalog.product`, `sync.orders`, `vision.embed_product` (records requests).
//! - [`engine`]: the incremental engine (lease, page + checkpoint per transaction, composite cursor, sweep).
//! - [`source`]: [`source::CatalogSource`] and the Shopify Admin REST source (pagination, leaky bucket).
//! - [`handlers`]: how products (variants, images), orders and customers are stored.
//! - [`store`]: sources, checkpoints, the generic record upsert.
//! - [`webhook`]: shop webhooks (HMAC-verified, deduplicated, single-record upserts).
//! - [`metrics`]: the family's Prometheus series.

pub mod config;
pub mod engine;
pub mod handlers;
pub mod metrics;
pub mod reads;
pub mod source;
pub mod store;
pub mod tasks;
pub mod webhook;

pub use config::SyncConfig;

use celeriac_domain::Platform;
use celeriac_domain::secret::Sealer;
use celeriac_task::Registry;
use std::sync::Arc;

/// The shared state, for `celeriac webhooks` and `celeriac tenants set-source`.
pub fn family(platform: &mut Platform) -> Result<Arc<tasks::SyncFamily>, String> {
    let config: SyncConfig = platform.section("sync")?.unwrap_or_default();
    config.validate()?;
    let metrics = Arc::new(metrics::SyncMetrics::new(
        platform.metrics_mut(),
        config.metrics_tenant_label,
    ));
    Ok(Arc::new(tasks::SyncFamily {
        config,
        tenants: platform.tenants().map_err(|e| e.to_string()),
        sealer: Sealer::from_env().map(Arc::new).map_err(|e| e.to_string()),
        metrics,
    }))
}

/// Registers the family's tasks (they fail with `ConfigurationError` naming what is missing: the database,
/// `CELERIAC_SECRET_KEY`, the tenant's source).
pub fn register(registry: &mut Registry, platform: &mut Platform) -> Result<(), String> {
    tasks::register(registry, family(platform)?);
    Ok(())
}

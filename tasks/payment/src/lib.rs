//! The payment task family (`celeriac-tasks-payment`): charges, refunds and webhooks on Stripe's API
//! (async-stripe) with zero double charges (platform.md §3), per tenant (§2).
//!
//! # Layout
//! - [`config`]: the `[payment]` section ([`PaymentConfig`]).
//! - [`tasks`]: the Celery tasks (`payment.charge`, `payment.refund`, `payment.apply_event`, `payment.status`).
//! - [`charge`]: the charge and refund pipelines (claim, idempotency key, outcome, replay).
//! - [`events`]: the webhook endpoint and `payment.apply_event`.
//! - [`service`]: Stripe behind [`service::PaymentApi`] (async-stripe, rustls/ring).
//! - [`store`]: payments, refunds and events, through a `TenantTx`.
//! - [`metrics`]: the family's Prometheus series.

pub mod charge;
pub mod config;
pub mod events;
pub mod metrics;
pub mod service;
pub mod store;
pub mod tasks;

pub use config::PaymentConfig;

use celeriac_domain::Platform;
use celeriac_task::Registry;
use std::sync::Arc;
use std::time::Duration;

/// Registers the family's tasks. Without `[payment]` or a secret key they still register and fail with
/// `ConfigurationError("payment.secret_key is not set")`; a section that does not parse stops the worker.
pub fn register(registry: &mut Registry, platform: &mut Platform) -> Result<(), String> {
    let config: PaymentConfig = platform.section("payment")?.unwrap_or_default();
    config.validate()?;
    let api: Result<Arc<dyn service::PaymentApi>, String> = match config.secret_key()? {
        None => Err("payment.secret_key is not set".into()),
        Some(key) => service::Stripe::new(
            &config.api_base,
            &key,
            Duration::from_secs_f64(config.request_timeout),
        )
        .map(|s| Arc::new(s) as Arc<dyn service::PaymentApi>),
    };
    let metrics = Arc::new(metrics::PaymentMetrics::new(
        platform.metrics_mut(),
        config.metrics_tenant_label,
    ));
    let payments = Arc::new(charge::Payments {
        config,
        tenants: platform.tenants().map_err(|e| e.to_string()),
        api,
        metrics,
    });
    tasks::register(registry, payments);
    Ok(())
}

//! The email task family (`celeriac-tasks-email`): transactional and bulk mail over SMTP, each idempotency
//! key sent exactly once through a PostgreSQL outbox (platform.md §3), per tenant (§2).
//!
//! # Layout
//! - [`config`]: the `[email]` section ([`EmailConfig`]).
//! - [`tasks`]: the Celery tasks (`email.send`, `email.send_bulk`, `email.template_put`,
//!   `email.template_get`, `email.status`).
//! - [`send`]: the `email.send` pipeline: outbox claim, SMTP, outcome.
//! - [`render`]: argument checks, minijinja rendering, the MIME message.
//! - [`service`]: the SMTP peer behind [`service::Transport`] (lettre pool, rustls).
//! - [`store`]: the outbox, templates, suppressions and quota, through a `TenantTx`.
//! - [`metrics`]: the family's Prometheus series.

pub mod config;
pub mod metrics;
pub mod render;
pub mod send;
pub mod service;
pub mod store;
pub mod tasks;

pub use config::EmailConfig;

use celeriac_domain::Platform;
use celeriac_task::Registry;
use std::sync::Arc;

/// Registers the family's tasks. A missing `[email]` section or `smtp_url` still registers them: calling one
/// then fails with `ConfigurationError("email.smtp_url is not set")`. A section that does not parse is an
/// error here, naming the key, and the worker does not start.
pub fn register(registry: &mut Registry, platform: &mut Platform) -> Result<(), String> {
    let config: EmailConfig = platform.section("email")?.unwrap_or_default();
    config.validate()?;
    let transport: Result<Arc<dyn service::Transport>, String> = match &config.smtp_url {
        None => Err("email.smtp_url is not set".into()),
        Some(url) => {
            service::Smtp::new(&config, url).map(|s| Arc::new(s) as Arc<dyn service::Transport>)
        }
    };
    if let Err(e) = &transport
        && config.smtp_url.is_some()
    {
        return Err(e.clone());
    }
    let tenants = platform.tenants().map_err(|e| e.to_string());
    let metrics = Arc::new(metrics::EmailMetrics::new(
        platform.metrics_mut(),
        config.metrics_tenant_label,
    ));
    let email = Arc::new(send::Email::new(config, tenants, transport, metrics));
    tasks::register(registry, email);
    Ok(())
}

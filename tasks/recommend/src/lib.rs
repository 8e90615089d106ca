//! The recommendation task family (`celeriac-tasks-recommend`): a SASRec-style causal transformer over each
//! customer's item history, trained per tenant in Rust with Burn on the tenant's interactions and served
//! behind the shared batching executor (`celeriac-inference`) on the CPU (flex) or, built with
//! `--features cuda`, on CUDA. Tenants with too little data are answered by popularity.
//!
//! # Layout
//! - [`config`]: the `[recommend]` section; [`metrics`]: the family's series.
//! - [`tasks`]: the Celery tasks (`recommend.record`, `.train`, `.train_all`, `.next_items`,
//!   `.for_customer`, `.similar`, `.complete_outfit`); [`answer`]: building their answers.
//! - [`service`]: the family's state: recording in batches, each tenant's newest model (hot swap),
//!   popularity, training.
//! - [`store`]: the tables; [`weights`]: a model's stored form; [`serve`]: the executor's runner.
//! - [`model`]: the network; [`train`]: training; [`data`]: sequences, splits, ranking metrics.
//! - [`baselines`] (popularity, BPR-MF, EASE) and [`eval`]: the MovieLens-100k protocol.

pub mod answer;
pub mod baselines;
pub mod config;
pub mod data;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod serve;
pub mod service;
pub mod store;
pub mod tasks;
pub mod train;
pub mod weights;

pub use config::RecommendConfig;
pub use service::Recommend;

use celeriac_domain::Platform;
use celeriac_task::Registry;
use metrics::RecommendMetrics;
use std::sync::Arc;

/// Registers the family's tasks. The executor starts on the first recommendation.
pub fn register(registry: &mut Registry, platform: &mut Platform) -> Result<(), String> {
    let config: RecommendConfig = platform.section("recommend")?.unwrap_or_default();
    config.validate()?;
    let metrics = Arc::new(RecommendMetrics::new(platform.metrics_mut()));
    let tenants = platform.tenants().map_err(|e| e.to_string());
    tasks::register(registry, Arc::new(Recommend::new(config, metrics, tenants)));
    Ok(())
}

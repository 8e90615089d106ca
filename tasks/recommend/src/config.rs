//! The `[recommend]` section. Every key can also come from the environment (`CELERIAC_RECOMMEND__DEVICE=cpu`).

use celeriac_inference::DeviceChoice;
use serde::Deserialize;

/// `[recommend]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecommendConfig {
    /// `auto`, `cpu` or `cuda` (serving; training runs on the CPU).
    pub device: DeviceChoice,
    /// Largest batch of histories one forward pass takes.
    pub max_batch: usize,
    /// Milliseconds the executor waits for more requests after the first one of a batch.
    pub max_wait_ms: f64,
    /// Requests waiting for the executor before tasks wait to enqueue (back-pressure).
    pub queue_capacity: usize,
    /// Threads of the CPU backend while serving (default: all cores).
    pub threads: Option<usize>,
    /// Milliseconds between checks for a newer model version of a tenant (the hot swap's delay).
    pub refresh_ms: u64,
    /// Fewest interactions a tenant needs for a transformer (below it: popularity).
    pub min_interactions: usize,
    /// Fewest customers with at least three interactions a tenant needs for a transformer.
    pub min_customers: usize,
    /// Most training epochs (early stopping on validation NDCG@10 usually ends sooner).
    pub epochs: usize,
    /// Epochs without improvement before training stops.
    pub patience: usize,
    /// Width of the transformer.
    pub dim: usize,
    /// Longest history the transformer reads.
    pub max_len: usize,
    /// Dropout while training.
    pub dropout: f64,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Model versions kept per tenant.
    pub keep_versions: i32,
    /// Records written per statement at most (`recommend.record` batches concurrent calls).
    pub record_batch: usize,
    /// Weight of visual similarity in `recommend.similar` when the vision family has embeddings (0..=1).
    pub visual_weight: f32,
}

impl Default for RecommendConfig {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Auto,
            max_batch: 64,
            max_wait_ms: 1.0,
            queue_capacity: 1024,
            threads: None,
            refresh_ms: 1000,
            min_interactions: 50,
            min_customers: 5,
            epochs: 200,
            patience: 3,
            dim: 64,
            max_len: 50,
            dropout: 0.2,
            learning_rate: 3e-3,
            keep_versions: 3,
            record_batch: 500,
            visual_weight: 0.5,
        }
    }
}

impl RecommendConfig {
    /// Checks the values a type cannot.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_batch", self.max_batch),
            ("queue_capacity", self.queue_capacity),
            ("epochs", self.epochs),
            ("patience", self.patience),
            ("dim", self.dim),
            ("max_len", self.max_len),
            ("record_batch", self.record_batch),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("recommend.{name} must be at least 1"));
        }
        if !(0.0..=1000.0).contains(&self.max_wait_ms) {
            return Err("recommend.max_wait_ms must be between 0 and 1000".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err("recommend.dropout must be in [0, 1)".into());
        }
        if self.learning_rate <= 0.0 {
            return Err("recommend.learning_rate must be positive".into());
        }
        if self.keep_versions < 1 {
            return Err("recommend.keep_versions must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.visual_weight) {
            return Err("recommend.visual_weight must be between 0 and 1".into());
        }
        Ok(())
    }
}

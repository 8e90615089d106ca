//! The `[vision]` section. Every key can also come from the environment (`CELERIAC_VISION__DEVICE=cpu`, ...).

use serde::Deserialize;
use std::path::PathBuf;

pub use celeriac_inference::DeviceChoice;

/// `[vision]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionConfig {
    /// `auto`, `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// Largest batch one forward pass takes (default: 64 on the CPU, 256 on CUDA).
    pub max_batch: Option<usize>,
    /// Milliseconds the executor waits for more requests after the first one of a batch.
    pub max_wait_ms: f64,
    /// Requests waiting for the executor before tasks wait to enqueue (back-pressure).
    pub queue_capacity: usize,
    /// A directory with `classifier.mpk` and `classifier.json`, and `detector.mpk` and `detector.json` when
    /// it holds them (default, and for a detector it lacks: the weights built into the binary).
    pub weights: Option<PathBuf>,
    /// Load the model and warm it up when the worker starts (default: only when a `[vision]` section is
    /// present; otherwise on the first vision task).
    pub preload: Option<bool>,
    /// Largest image accepted, in bytes (decoded input, or the body of a URL).
    pub max_image_bytes: usize,
    /// Largest image side accepted, in pixels.
    pub max_image_side: u32,
    /// Seconds an http(s) image URL may take.
    pub fetch_timeout: f64,
    /// Threads of the CPU backend (default: all cores).
    pub threads: Option<usize>,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Auto,
            max_batch: None,
            max_wait_ms: 2.0,
            queue_capacity: 1024,
            weights: None,
            preload: None,
            max_image_bytes: 10 * 1024 * 1024,
            max_image_side: 8192,
            fetch_timeout: 10.0,
            threads: None,
        }
    }
}

impl VisionConfig {
    /// Checks the values a type cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == Some(0) {
            return Err("vision.max_batch must be at least 1".into());
        }
        if !(0.0..=1000.0).contains(&self.max_wait_ms) {
            return Err("vision.max_wait_ms must be between 0 and 1000".into());
        }
        if self.queue_capacity == 0 {
            return Err("vision.queue_capacity must be at least 1".into());
        }
        if self.max_image_bytes == 0 || self.max_image_side == 0 {
            return Err("vision.max_image_bytes and vision.max_image_side must be positive".into());
        }
        if self.fetch_timeout <= 0.0 {
            return Err("vision.fetch_timeout must be positive".into());
        }
        Ok(())
    }
}

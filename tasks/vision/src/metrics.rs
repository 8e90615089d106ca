//! The family's metrics (on the worker's `/metrics`): the classifier executor's series (`celeriac_vision_batch_size`,
//! `_queue_wait_seconds`, `_inference_seconds`, `_queued`, `_device`, from `celeriac-inference`), the same for the detector (`celeriac_vision_detector_...`) and images
//! by outcome.

use celeriac_inference::BatchMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` or `invalid` (bad input) or `error`.
    pub outcome: String,
}

/// The vision metrics.
#[derive(Debug, Clone)]
pub struct VisionMetrics {
    /// The classifier executor's series.
    pub batch: Arc<BatchMetrics>,
    /// The detector executor's series (`celeriac_vision_detector_batch_size`, ...).
    pub detect_batch: Arc<BatchMetrics>,
    /// Images by outcome.
    pub images: Family<OutcomeLabel, Counter>,
}

impl VisionMetrics {
    /// Registers every series in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            batch: Arc::new(BatchMetrics::new(registry, "celeriac_vision", "Images")),
            detect_batch: Arc::new(BatchMetrics::new(
                registry,
                "celeriac_vision_detector",
                "Images",
            )),
            images: Family::default(),
        };
        for outcome in ["ok", "invalid", "error"] {
            let _ = m.images.get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            });
        }
        registry.register(
            "celeriac_vision_images",
            "Images handled by the vision tasks, by outcome",
            m.images.clone(),
        );
        m
    }

    /// Counts one image.
    pub fn image(&self, outcome: &str) {
        self.images
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }
}

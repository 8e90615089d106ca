//! The family's metrics (on the worker's `/metrics`): batch sizes, time in the queue, time of a forward
//! pass, requests waiting, requests by outcome and the device the models run on.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `device` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    /// `cpu` or `cuda`.
    pub device: String,
}

/// The `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` or `invalid` (bad input) or `error`.
    pub outcome: String,
}

/// The vision metrics.
#[derive(Debug, Clone)]
pub struct VisionMetrics {
    /// Images per forward pass (before padding).
    pub batch_size: Histogram,
    /// Seconds a request waited before its forward pass started.
    pub queue_wait: Histogram,
    /// Seconds of one forward pass.
    pub inference: Histogram,
    /// Requests waiting for the executor.
    pub queued: Gauge,
    /// 1 for the device the models run on.
    pub device: Family<DeviceLabel, Gauge>,
    /// Images by outcome.
    pub images: Family<OutcomeLabel, Counter>,
}

impl VisionMetrics {
    /// Registers every series in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let seconds = || {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ])
        };
        let m = Self {
            batch_size: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            queue_wait: seconds(),
            inference: seconds(),
            queued: Gauge::default(),
            device: Family::default(),
            images: Family::default(),
        };
        for outcome in ["ok", "invalid", "error"] {
            let _ = m.images.get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            });
        }
        registry.register(
            "celeriac_vision_batch_size",
            "Images per forward pass, before padding",
            m.batch_size.clone(),
        );
        registry.register(
            "celeriac_vision_queue_wait_seconds",
            "Time a request waited for its forward pass",
            m.queue_wait.clone(),
        );
        registry.register(
            "celeriac_vision_inference_seconds",
            "Time of one forward pass",
            m.inference.clone(),
        );
        registry.register(
            "celeriac_vision_queued",
            "Requests waiting for the executor",
            m.queued.clone(),
        );
        registry.register(
            "celeriac_vision_device",
            "1 for the device the vision models run on",
            m.device.clone(),
        );
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

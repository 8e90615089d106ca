//! The executor's series, named after the family that owns it (`<prefix>_batch_size`,
//! `<prefix>_queue_wait_seconds`, `<prefix>_inference_seconds`, `<prefix>_queued`, `<prefix>_device`).

use prometheus_client::encoding::EncodeLabelSet;
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

/// One executor's series.
#[derive(Debug, Clone)]
pub struct BatchMetrics {
    /// Requests per forward pass (before padding).
    pub batch_size: Histogram,
    /// Seconds a request waited before its forward pass started.
    pub queue_wait: Histogram,
    /// Seconds of one forward pass.
    pub inference: Histogram,
    /// Requests waiting for the executor.
    pub queued: Gauge,
    /// 1 for the device the models run on.
    pub device: Family<DeviceLabel, Gauge>,
}

impl BatchMetrics {
    /// Registers the series as `<prefix>_...`; `what` names a request in the help texts ("Images").
    pub fn new(registry: &mut Registry, prefix: &str, what: &str) -> Self {
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
        };
        registry.register(
            format!("{prefix}_batch_size"),
            format!("{what} per forward pass, before padding"),
            m.batch_size.clone(),
        );
        registry.register(
            format!("{prefix}_queue_wait_seconds"),
            "Time a request waited for its forward pass",
            m.queue_wait.clone(),
        );
        registry.register(
            format!("{prefix}_inference_seconds"),
            "Time of one forward pass",
            m.inference.clone(),
        );
        registry.register(
            format!("{prefix}_queued"),
            "Requests waiting for the executor",
            m.queued.clone(),
        );
        registry.register(
            format!("{prefix}_device"),
            "1 for the device the models run on",
            m.device.clone(),
        );
        m
    }

    /// Marks `device` as the one the models run on.
    pub fn set_device(&self, device: crate::Device) {
        self.device
            .get_or_create(&DeviceLabel {
                device: device.name().into(),
            })
            .set(1);
    }
}

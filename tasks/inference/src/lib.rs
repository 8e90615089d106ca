//! The model families' shared inference layer (`celeriac-inference`): where a model runs ([`device`]) and
//! the dynamic batching [`Executor`] that serves it, with its Prometheus series ([`BatchMetrics`]). The
//! vision and recommendation families each wrap one executor around their own [`Runner`].
//!
//! # Layout
//! - [`device`]: the `device` setting ([`DeviceChoice`]), the device it resolves to and the CPU pool.
//! - [`executor`]: the batching executor and the [`Runner`] trait a model implements.
//! - [`metrics`]: batch sizes, queue waits, forward-pass times, requests waiting, the device.
//! - [`rng`]: the seeded generator the families train with.

pub mod device;
pub mod executor;
pub mod metrics;
pub mod rng;

pub use device::{Device, DeviceChoice, choose_device};
pub use executor::{BatchSettings, Executor, ExecutorError, Runner};
pub use metrics::BatchMetrics;
pub use rng::Rng;

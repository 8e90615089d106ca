//! The vision task family (`celeriac-tasks-vision`): a Fashion-MNIST classifier whose penultimate layer is
//! a unit-length embedding, trained in Rust with Burn (`celeriac train vision`) and served behind a dynamic
//! batching executor on the CPU (Burn's flex backend) or, built with `--features cuda`, on CUDA.
//!
//! # Layout
//! - [`config`]: the `[vision]` section ([`VisionConfig`]).
//! - [`tasks`]: the Celery tasks (`vision.classify`, `vision.embed`, `vision.detect`, `vision.index`,
//!   `vision.unindex`, `vision.search`).
//! - [`detect`]: `vision.detect` (the detector and the namer, the classifier fine-tuned on scene crops,
//!   behind one executor);
//!   [`detector`]: the centre-heatmap network and its weights; [`scene`]: the composed scenes it trains and
//!   is measured on; [`detect_train`]: its training and evaluation; [`detect_eval`]: AP, mAP and the
//!   connected-components baseline.
//! - [`search`]: each tenant's embeddings in PostgreSQL and their in-memory scan.
//! - [`input`]: the `image` argument (base64, `data:` URL, http(s) URL) to the model's 28×28 input.
//! - [`executor`]: the batching executor and the device choice; [`export`]: the network's parameters, reference
//!   probabilities and model-only speed, for comparing with other runtimes (`make bench-vision`).
//! - [`model`]: the network; [`fold`]: its blocks for inference (batch norm folded in); [`weights`]: its saved form; [`train`]: training and evaluation;
//!   [`idx`]: the Fashion-MNIST files.
//! - [`metrics`]: the family's Prometheus series.

pub mod config;
pub mod detect;
pub mod detect_eval;
pub mod detect_train;
pub mod detector;
pub mod executor;
pub mod export;
pub mod fold;
pub mod idx;
pub mod input;
pub mod metrics;
pub mod model;
pub mod scene;
pub mod search;
pub mod tasks;
pub mod train;
pub mod weights;

pub use config::VisionConfig;

use celeriac_domain::{Platform, Tenants};
use celeriac_task::{Registry, TaskError};
use executor::{Executor, Prediction};
use input::{InputError, InputLimits};
use metrics::VisionMetrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// What goes wrong in the family outside a task's input.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The training data is missing or malformed.
    #[error("data: {0}")]
    Data(String),
    /// The weights cannot be read.
    #[error("weights: {0}")]
    Weights(String),
    /// The executor failed.
    #[error("vision executor: {0}")]
    Executor(String),
    /// The executor has stopped (the worker is shutting down).
    #[error("vision executor stopped")]
    Stopped,
    /// A bad image.
    #[error(transparent)]
    Input(#[from] InputError),
}

impl From<VisionError> for TaskError {
    fn from(e: VisionError) -> Self {
        match e {
            VisionError::Input(e) => TaskError::value_error(e.to_string()),
            other => TaskError::celeriac("VisionError", other.to_string()),
        }
    }
}

/// The family's shared state: configuration, the executor (started at registration or on first use) and
/// the HTTP client for image URLs.
#[derive(Debug)]
pub struct Vision {
    config: VisionConfig,
    metrics: Arc<VisionMetrics>,
    executor: OnceCell<Result<Arc<Executor>, String>>,
    detector: OnceCell<Result<Arc<detect::DetectExecutor>, String>>,
    http: reqwest::Client,
    /// The tenants' embeddings.
    pub search: search::SearchIndex,
}

impl Vision {
    /// The family over `config`; nothing is loaded yet.
    pub fn new(
        config: VisionConfig,
        metrics: Arc<VisionMetrics>,
        tenants: Result<Arc<Tenants>, String>,
    ) -> Result<Self, String> {
        let model = weights::Weights::resolve(config.weights.as_deref())
            .map_err(|e| e.to_string())?
            .model_id();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(config.fetch_timeout))
            .build()
            .map_err(|e| format!("vision: HTTP client: {e}"))?;
        Ok(Self {
            config,
            metrics,
            executor: OnceCell::new(),
            detector: OnceCell::new(),
            http,
            search: search::SearchIndex::new(tenants, model),
        })
    }

    fn limits(&self) -> InputLimits {
        InputLimits {
            max_bytes: self.config.max_image_bytes,
            max_side: self.config.max_image_side,
            fetch_timeout: Duration::from_secs_f64(self.config.fetch_timeout),
        }
    }

    /// Starts the executors now (blocking: loads and warms up the classifier, the detector and the namer).
    pub fn preload(&self) -> Result<(), VisionError> {
        let e = Executor::start(&self.config, Arc::clone(&self.metrics))?;
        self.executor
            .set(Ok(Arc::new(e)))
            .map_err(|_| VisionError::Executor("already started".into()))?;
        let d = detect::DetectExecutor::start(&self.config, Arc::clone(&self.metrics))?;
        self.detector
            .set(Ok(Arc::new(d)))
            .map_err(|_| VisionError::Executor("already started".into()))
    }

    /// The classifier's executor, started on first use.
    pub async fn executor(&self) -> Result<Arc<Executor>, VisionError> {
        let (config, metrics) = (self.config.clone(), Arc::clone(&self.metrics));
        started(&self.executor, move || Executor::start(&config, metrics)).await
    }

    /// The model's answer for the `image` argument.
    pub async fn predict(&self, image: &serde_json::Value) -> Result<Prediction, VisionError> {
        let pixels = match self.pixels(image).await {
            Ok(p) => p,
            Err(e) => {
                self.metrics.image("invalid");
                return Err(e.into());
            }
        };
        let r = self.executor().await?.infer(pixels).await;
        self.metrics.image(if r.is_ok() { "ok" } else { "error" });
        r
    }

    /// The model's 28×28 input for the `image` argument.
    pub async fn pixels(&self, image: &serde_json::Value) -> Result<Vec<u8>, InputError> {
        let limits = self.limits();
        let bytes = input::bytes_of(image, limits, &self.http).await?;
        tokio::task::spawn_blocking(move || {
            input::decode(&bytes, limits).map(|img| input::to_model_pixels(&img))
        })
        .await
        .unwrap_or_else(|e| Err(InputError::Corrupt("image".into(), e.to_string())))
    }
}

/// The executor in `cell`, started by `start` on a blocking thread the first time it is asked for (a
/// failure is kept: every later call gets the same error).
async fn started<T: Send + Sync + 'static>(
    cell: &OnceCell<Result<Arc<T>, String>>,
    start: impl FnOnce() -> Result<T, VisionError> + Send + 'static,
) -> Result<Arc<T>, VisionError> {
    let r = cell
        .get_or_init(|| async {
            tokio::task::spawn_blocking(start)
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map(Arc::new)
        })
        .await;
    r.clone().map_err(VisionError::Executor)
}

/// Registers the family's tasks. With `vision.preload` (on when a `[vision]` section is present) the model
/// is loaded and warmed up here, and a failure stops the worker; otherwise the first vision task loads it.
pub fn register(registry: &mut Registry, platform: &mut Platform) -> Result<(), String> {
    let section: Option<VisionConfig> = platform.section("vision")?;
    let preload_default = section.is_some();
    let config = section.unwrap_or_default();
    config.validate()?;
    let preload = config.preload.unwrap_or(preload_default);
    let metrics = Arc::new(VisionMetrics::new(platform.metrics_mut()));
    let tenants = platform.tenants().map_err(|e| e.to_string());
    let vision = Arc::new(Vision::new(config, metrics, tenants)?);
    if preload {
        vision.preload().map_err(|e| e.to_string())?;
    }
    tasks::register(registry, vision);
    Ok(())
}

//! `vision.detect`: the detector behind its own batching executor (images of any size, each run on its
//! own, the batch spread over the CPU pool), then every proposed box cropped and named by the classifier's
//! executor, where the crops of all concurrent detections batch together.

use crate::config::VisionConfig;
use crate::detector::{Detector, DetectorWeights, Proposal, detect};
use crate::executor::Prediction;
use crate::input::crop;
use crate::metrics::VisionMetrics;
use crate::model::{CLASS_NAMES, best_class};
use crate::{Vision, VisionError};
use burn::tensor::backend::Backend;
use celeriac_inference::executor::BoxedRunner;
use celeriac_inference::{BatchSettings, Device, ExecutorError, Runner};
use std::sync::Arc;
use std::time::Duration;

/// Images whose longer side is above this are scaled down to it before detection (items are expected at
/// 20 to 42 px in a canvas of 64 to 448); boxes are scaled back.
pub const MAX_SIDE: u32 = 448;

/// One image for the detector: grey, light on dark.
#[derive(Debug)]
pub struct DetectRequest {
    /// Row-major grey pixels (shared with the caller, which crops its boxes from them).
    pub pixels: Arc<[u8]>,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Lowest centre probability returned.
    pub min_objectness: f32,
}

/// The batching executor of the detector.
#[derive(Debug)]
pub struct DetectExecutor {
    inner: celeriac_inference::Executor<DetectRequest, Vec<Proposal>>,
}

struct DetectRunner<B: Backend> {
    model: Detector<B>,
    device: B::Device,
}

impl<B: Backend> Runner for DetectRunner<B>
where
    Detector<B>: Sync,
    B::Device: Sync,
{
    type Input = DetectRequest;
    type Output = Vec<Proposal>;

    fn run(&mut self, batch: &[DetectRequest]) -> Result<Vec<Vec<Proposal>>, String> {
        use rayon::prelude::*;
        let (model, device) = (&self.model, &self.device);
        Ok(batch
            .par_iter()
            .map(|r| {
                detect(
                    model,
                    &r.pixels,
                    r.width,
                    r.height,
                    r.min_objectness,
                    device,
                )
            })
            .collect())
    }
}

impl DetectExecutor {
    /// Loads the detector's weights on the chosen device, warms it up and starts its thread.
    pub fn start(config: &VisionConfig, metrics: Arc<VisionMetrics>) -> Result<Self, VisionError> {
        let weights = DetectorWeights::resolve(config.weights.as_deref())?;
        let device =
            celeriac_inference::device::resolve("vision", config.device, cfg!(feature = "cuda"));
        let settings = BatchSettings {
            max_batch: config.max_batch.unwrap_or(64),
            max_wait: Duration::from_secs_f64(config.max_wait_ms / 1000.0),
            queue_capacity: config.queue_capacity,
        };
        let pool = match device {
            Device::Cpu => Some(
                celeriac_inference::device::cpu_pool("vision-detector", config.threads)
                    .map_err(VisionError::Executor)?,
            ),
            Device::Cuda => None,
        };
        fn runner<B: Backend>(
            weights: &DetectorWeights,
        ) -> Result<BoxedRunner<DetectRequest, Vec<Proposal>>, String>
        where
            Detector<B>: Sync,
            B::Device: Sync,
        {
            let device: B::Device = Default::default();
            let model = weights.load::<B>(&device).map_err(|e| e.to_string())?;
            let _ = detect(&model, &[0; 112 * 112], 112, 112, 0.5, &device);
            tracing::info!("vision detector loaded and warmed up");
            Ok(Box::new(DetectRunner { model, device }))
        }
        let load = move || match device {
            Device::Cpu => runner::<burn::backend::Flex>(&weights),
            #[cfg(feature = "cuda")]
            Device::Cuda => runner::<burn::backend::Cuda>(&weights),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Err("no CUDA backend in this build".into()),
        };
        let inner = celeriac_inference::Executor::start(
            "vision-detector",
            device,
            settings,
            Arc::clone(&metrics.detect_batch),
            pool,
            load,
        )
        .map_err(|e| VisionError::Executor(e.to_string()))?;
        Ok(Self { inner })
    }

    /// The proposals for one image, batched with whatever else is waiting.
    pub async fn detect(&self, request: DetectRequest) -> Result<Vec<Proposal>, VisionError> {
        self.inner.submit(request).await.map_err(|e| match e {
            ExecutorError::Stopped => VisionError::Stopped,
            other => VisionError::Executor(other.to_string()),
        })
    }
}

/// One item found in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// `[x0, y0, x1, y1]` in the input image's pixels.
    pub bbox: [f32; 4],
    /// Fashion-MNIST class id.
    pub class_id: usize,
    /// The detector's centre probability times the classifier's probability of the class.
    pub score: f32,
}

impl Detection {
    /// `{"box", "label", "class_id", "score"}`, coordinates to a tenth of a pixel.
    pub fn to_json(&self) -> serde_json::Value {
        let r = |v: f32| ((v * 10.0).round() / 10.0) as f64;
        serde_json::json!({
            "box": self.bbox.map(r),
            "label": CLASS_NAMES[self.class_id],
            "class_id": self.class_id,
            "score": ((self.score * 1e4).round() / 1e4) as f64,
        })
    }
}

/// The classifier's answer for a box: its argmax class and the combined score.
pub fn named(p: &Proposal, prediction: &Prediction, scale: f32) -> Detection {
    let (class_id, prob) = best_class(&prediction.probs);
    Detection {
        bbox: p.bbox.map(|v| v * scale),
        class_id,
        score: p.objectness * prob,
    }
}

impl Vision {
    /// The detector's executor, started on first use.
    pub async fn detector(&self) -> Result<Arc<DetectExecutor>, VisionError> {
        let r = self
            .detector
            .get_or_init(|| async {
                let config = self.config.clone();
                let metrics = Arc::clone(&self.metrics);
                tokio::task::spawn_blocking(move || DetectExecutor::start(&config, metrics))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map(Arc::new)
            })
            .await;
        r.clone().map_err(VisionError::Executor)
    }

    /// The items in `image` scoring at least `min_score`, best first.
    pub async fn detect(
        &self,
        image: &serde_json::Value,
        min_score: f32,
    ) -> Result<Vec<Detection>, VisionError> {
        let limits = self.limits();
        let bytes = match crate::input::bytes_of(image, limits, &self.http).await {
            Ok(b) => b,
            Err(e) => {
                self.metrics.image("invalid");
                return Err(e.into());
            }
        };
        let decoded = tokio::task::spawn_blocking(move || {
            let img = crate::input::decode(&bytes, limits)?;
            let grey = crate::input::grey_light_on_dark(&img);
            let (w, h) = grey.dimensions();
            let longer = w.max(h);
            if longer <= MAX_SIDE {
                return Ok((grey, 1.0f32));
            }
            let f = MAX_SIDE as f32 / longer as f32;
            let (nw, nh) = (
                ((w as f32 * f).round() as u32).max(1),
                ((h as f32 * f).round() as u32).max(1),
            );
            let small =
                image::imageops::resize(&grey, nw, nh, image::imageops::FilterType::Triangle);
            Ok((small, longer as f32 / MAX_SIDE as f32))
        })
        .await
        .unwrap_or_else(|e| {
            Err(crate::input::InputError::Corrupt(
                "image".into(),
                e.to_string(),
            ))
        });
        let (grey, scale) = match decoded {
            Ok(d) => d,
            Err(e) => {
                self.metrics.image("invalid");
                return Err(e.into());
            }
        };
        let (width, height) = (grey.width() as usize, grey.height() as usize);
        let pixels: Arc<[u8]> = grey.into_raw().into();
        let request = DetectRequest {
            pixels: Arc::clone(&pixels),
            width,
            height,
            // A detection's score is at most its centre probability.
            min_objectness: min_score,
        };
        let proposals = self.detector().await?.detect(request).await?;
        let classifier = self.executor().await?;
        let answers = futures::future::join_all(proposals.iter().map(|p| {
            let px = crop(&pixels, width, height, p.bbox);
            let c = Arc::clone(&classifier);
            async move { c.infer(px).await }
        }))
        .await;
        let mut found = Vec::with_capacity(proposals.len());
        for (p, a) in proposals.iter().zip(answers) {
            let d = named(p, &a?, scale);
            if d.score >= min_score {
                found.push(d);
            }
        }
        found.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.metrics.image("ok");
        Ok(found)
    }
}

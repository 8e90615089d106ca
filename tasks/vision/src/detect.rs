//! `vision.detect`: the detector and the namer (the classifier fine-tuned on items cropped from composed
//! scenes) behind one batching executor: each image of a batch, on its own thread of the CPU pool, runs
//! the detector, then every proposed box is cropped and named.

use crate::config::VisionConfig;
use crate::detector::{DetectorWeights, FoldedDetector, Proposal, detect};
use crate::idx::PIXELS;
use crate::input::crop;
use crate::metrics::VisionMetrics;
use crate::model::{CLASS_NAMES, CLASSES, FoldedClassifier, best_class};
use crate::train::to_tensor;
use crate::weights::Weights;
use crate::{Vision, VisionError};
use burn::tensor::activation::softmax;
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
    /// Row-major grey pixels.
    pub pixels: Vec<u8>,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Lowest score returned (a detection's score is at most its centre probability, so this is also the
    /// lowest centre probability worth naming).
    pub min_score: f32,
}

/// The batching executor of the detector and its namer.
#[derive(Debug)]
pub struct DetectExecutor {
    inner: celeriac_inference::Executor<DetectRequest, Vec<Detection>>,
}

struct DetectRunner<B: Backend> {
    model: FoldedDetector<B>,
    namer: FoldedClassifier<B>,
    device: B::Device,
    /// Crops per forward pass of the namer: one on the CPU (each image of a batch has a thread, and flex runs
    /// one crop about as fast per image as several), up to 64 on CUDA.
    chunk: usize,
}

/// The namer's class probabilities for `boxes` of one grey image, `CLASSES` per box: each box cropped,
/// de-noised and scaled to 28×28, `chunk` crops per forward pass.
pub fn name_boxes<B: Backend>(
    namer: &FoldedClassifier<B>,
    image: (&[u8], usize, usize),
    boxes: &[[f32; 4]],
    chunk: usize,
    device: &B::Device,
) -> Vec<f32> {
    let (pixels, width, height) = image;
    let mut probs = Vec::with_capacity(boxes.len() * CLASSES);
    for group in boxes.chunks(chunk.max(1)) {
        let mut crops = Vec::with_capacity(group.len() * PIXELS);
        for b in group {
            crops.extend(crop(pixels, width, height, *b));
        }
        let out = namer.forward(to_tensor::<B>(&crops, device));
        probs.extend(softmax(out.logits, 1).into_data().iter::<f32>());
    }
    probs
}

/// The detections in one image, unsorted: proposals at `min_score` or above, named, kept when their
/// combined score still is.
fn detect_and_name<B: Backend>(
    model: &FoldedDetector<B>,
    namer: &FoldedClassifier<B>,
    r: &DetectRequest,
    chunk: usize,
    device: &B::Device,
) -> Vec<Detection> {
    let proposals = detect(model, &r.pixels, r.width, r.height, r.min_score, device);
    let boxes: Vec<[f32; 4]> = proposals.iter().map(|p| p.bbox).collect();
    let probs = name_boxes(namer, (&r.pixels, r.width, r.height), &boxes, chunk, device);
    proposals
        .iter()
        .zip(probs.chunks(CLASSES))
        .map(|(p, probs)| named(p, probs))
        .filter(|d| d.score >= r.min_score)
        .collect()
}

impl<B: Backend> Runner for DetectRunner<B>
where
    FoldedDetector<B>: Sync,
    FoldedClassifier<B>: Sync,
    B::Device: Sync,
{
    type Input = DetectRequest;
    type Output = Vec<Detection>;

    fn run(&mut self, batch: &[DetectRequest]) -> Result<Vec<Vec<Detection>>, String> {
        use rayon::prelude::*;
        let (model, namer, device, chunk) = (&self.model, &self.namer, &self.device, self.chunk);
        Ok(batch
            .par_iter()
            .map(|r| detect_and_name(model, namer, r, chunk, device))
            .collect())
    }
}

impl DetectExecutor {
    /// Loads the detector's and the namer's weights on the chosen device, warms them up and starts the
    /// executor's thread.
    pub fn start(config: &VisionConfig, metrics: Arc<VisionMetrics>) -> Result<Self, VisionError> {
        let weights = DetectorWeights::resolve(config.weights.as_deref())?;
        let namer = Weights::for_naming(config.weights.as_deref())?;
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
            namer: &Weights,
            chunk: usize,
        ) -> Result<BoxedRunner<DetectRequest, Vec<Detection>>, String>
        where
            FoldedDetector<B>: Sync,
            FoldedClassifier<B>: Sync,
            B::Device: Sync,
        {
            let device: B::Device = Default::default();
            let model = weights
                .load::<B>(&device)
                .map_err(|e| e.to_string())?
                .folded();
            let namer = namer
                .load::<B>(&device)
                .map_err(|e| e.to_string())?
                .folded();
            let _ = detect(&model, &[0; 112 * 112], 112, 112, 0.5, &device);
            let _ = name_boxes(
                &namer,
                (&[0; 64], 8, 8),
                &[[0.0, 0.0, 8.0, 8.0]],
                1,
                &device,
            );
            tracing::info!("vision detector and namer loaded and warmed up");
            Ok(Box::new(DetectRunner {
                model,
                namer,
                device,
                chunk,
            }))
        }
        let load = move || match device {
            Device::Cpu => runner::<burn::backend::Flex>(&weights, &namer, 1),
            #[cfg(feature = "cuda")]
            Device::Cuda => runner::<burn::backend::Cuda>(&weights, &namer, 64),
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

    /// The named detections in one image, batched with whatever else is waiting.
    pub async fn detect(&self, request: DetectRequest) -> Result<Vec<Detection>, VisionError> {
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
    /// The detector's centre probability times the namer's probability of the class.
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

/// The namer's answer for a box (`probs`: its ten class probabilities): the argmax class and the combined
/// score.
pub fn named(p: &Proposal, probs: &[f32]) -> Detection {
    let (class_id, prob) = best_class(probs);
    Detection {
        bbox: p.bbox,
        class_id,
        score: p.objectness * prob,
    }
}

impl Vision {
    /// The detector's executor, started on first use.
    pub async fn detector(&self) -> Result<Arc<DetectExecutor>, VisionError> {
        let (config, metrics) = (self.config.clone(), Arc::clone(&self.metrics));
        crate::started(&self.detector, move || {
            DetectExecutor::start(&config, metrics)
        })
        .await
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
        let request = DetectRequest {
            width: grey.width() as usize,
            height: grey.height() as usize,
            pixels: grey.into_raw(),
            min_score,
        };
        let mut found = self.detector().await?.detect(request).await?;
        for d in &mut found {
            d.bbox = d.bbox.map(|v| v * scale);
        }
        found.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.metrics.image("ok");
        Ok(found)
    }
}

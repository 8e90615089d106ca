//! The classifier behind the shared batching executor (`celeriac-inference`): a [`Runner`] that pads each
//! batch to one of a few sizes warmed up at start (CUDA compiles a kernel per shape) and runs one forward
//! pass, on the CPU (Burn's flex backend, in its own thread pool) or CUDA.

use crate::VisionError;
use crate::config::VisionConfig;
use crate::idx::PIXELS;
use crate::metrics::VisionMetrics;
use crate::model::{CLASSES, FoldedClassifier};
use crate::train::to_tensor;
use crate::weights::Weights;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use celeriac_inference::executor::BoxedRunner;
use celeriac_inference::{BatchSettings, ExecutorError, Runner};
pub use celeriac_inference::{Device, choose_device};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The model's answer for one image.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Softmax over the ten classes.
    pub probs: Vec<f32>,
    /// The unit-length embedding.
    pub embedding: Vec<f32>,
}

/// The batching executor of the classifier.
#[derive(Debug)]
pub struct Executor {
    inner: celeriac_inference::Executor<Vec<u8>, Prediction>,
}

impl Executor {
    /// Loads the weights on the chosen device, warms up every padded batch size and starts the thread.
    pub fn start(config: &VisionConfig, metrics: Arc<VisionMetrics>) -> Result<Self, VisionError> {
        let weights = Weights::resolve(config.weights.as_deref())?;
        let device =
            celeriac_inference::device::resolve("vision", config.device, cfg!(feature = "cuda"));
        let max_batch = config.max_batch.unwrap_or(match device {
            Device::Cpu => 64,
            Device::Cuda => 256,
        });
        let mut sizes: Vec<usize> = [1, 8, 32, 128]
            .into_iter()
            .filter(|s| *s < max_batch)
            .collect();
        sizes.push(max_batch);
        let settings = BatchSettings {
            max_batch,
            max_wait: Duration::from_secs_f64(config.max_wait_ms / 1000.0),
            queue_capacity: config.queue_capacity,
        };
        let pool = match device {
            Device::Cpu => Some(
                celeriac_inference::device::cpu_pool("vision", config.threads)
                    .map_err(VisionError::Executor)?,
            ),
            Device::Cuda => None,
        };
        let load = move || -> Result<BoxedRunner<Vec<u8>, Prediction>, String> {
            match device {
                Device::Cpu => Ok(Box::new(Padded::<burn::backend::Flex>::load(
                    &weights,
                    Default::default(),
                    sizes,
                )?)),
                #[cfg(feature = "cuda")]
                Device::Cuda => Ok(Box::new(Padded::<burn::backend::Cuda>::load(
                    &weights,
                    Default::default(),
                    sizes,
                )?)),
                #[cfg(not(feature = "cuda"))]
                Device::Cuda => Err("no CUDA backend in this build".into()),
            }
        };
        let inner = celeriac_inference::Executor::start(
            "vision-executor",
            device,
            settings,
            Arc::clone(&metrics.batch),
            pool,
            load,
        )
        .map_err(|e| VisionError::Executor(e.to_string()))?;
        Ok(Self { inner })
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.inner.device()
    }

    /// Runs one image (28×28 grey bytes) through the model, batched with whatever else is waiting.
    pub async fn infer(&self, pixels: Vec<u8>) -> Result<Prediction, VisionError> {
        debug_assert_eq!(pixels.len(), PIXELS);
        self.inner.submit(pixels).await.map_err(|e| match e {
            ExecutorError::Stopped => VisionError::Stopped,
            other => VisionError::Executor(other.to_string()),
        })
    }
}

/// The classifier (its batch norms folded into the convolutions) on one device, padding batches to the
/// warmed-up sizes. At start it times a forward pass of each size and keeps the fastest per image as its
/// `chunk`: a batch larger than that runs as chunks of that size, spread over the CPU pool's threads. On
/// the CPU the sizes run within a few per cent of each other per image once the batch norms are folded
/// (before, Burn 0.21's flex backend ran a batch's batch-norm arithmetic element by element and one image
/// was four times faster per image than 64); on CUDA the largest batch is the fastest and runs whole.
struct Padded<B: Backend> {
    model: FoldedClassifier<B>,
    device: B::Device,
    sizes: Vec<usize>,
    chunk: usize,
    pixels: Vec<u8>,
}

impl<B: Backend> Padded<B>
where
    FoldedClassifier<B>: Sync,
    B::Device: Sync,
{
    fn load(weights: &Weights, device: B::Device, sizes: Vec<usize>) -> Result<Self, String> {
        let model = weights
            .load::<B>(&device)
            .map_err(|e| e.to_string())?
            .folded();
        let started = Instant::now();
        let mut speeds = Vec::with_capacity(sizes.len());
        for &size in &sizes {
            let pixels = vec![0u8; size * PIXELS];
            let _ = forward(&model, &pixels, &device);
            // Images per second of this size, over at least 2 passes and about 50 ms.
            let timed = Instant::now();
            let mut passes = 0usize;
            while passes < 2 || timed.elapsed() < Duration::from_millis(50) {
                let _ = forward(&model, &pixels, &device);
                passes += 1;
            }
            speeds.push((size, (passes * size) as f64 / timed.elapsed().as_secs_f64()));
        }
        let chunk = speeds
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(1, |s| s.0);
        tracing::info!(
            sizes = ?sizes,
            images_per_second = ?speeds.iter().map(|(n, r)| (*n, r.round() as u64)).collect::<Vec<_>>(),
            chunk,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "vision classifier loaded, warmed up and timed"
        );
        let max = sizes.last().copied().unwrap_or(1);
        Ok(Self {
            model,
            device,
            sizes,
            chunk,
            pixels: Vec::with_capacity(max * PIXELS),
        })
    }

    /// One padded forward pass over `batch` (at most the largest size).
    fn padded(&self, batch: &[Vec<u8>], pixels: &mut Vec<u8>) -> Vec<Prediction> {
        let n = batch.len();
        let padded = self.sizes.iter().copied().find(|s| *s >= n).unwrap_or(n);
        pixels.clear();
        for px in batch {
            pixels.extend_from_slice(px);
        }
        pixels.resize(padded * PIXELS, 0);
        let (probs, embeddings) = forward(&self.model, pixels, &self.device);
        let d = embeddings.len() / padded;
        (0..n)
            .map(|i| Prediction {
                probs: probs[i * CLASSES..(i + 1) * CLASSES].to_vec(),
                embedding: embeddings[i * d..(i + 1) * d].to_vec(),
            })
            .collect()
    }
}

impl<B: Backend> Runner for Padded<B>
where
    FoldedClassifier<B>: Sync,
    B::Device: Sync,
{
    type Input = Vec<u8>;
    type Output = Prediction;

    fn run(&mut self, batch: &[Vec<u8>]) -> Result<Vec<Prediction>, String> {
        if batch.len() <= self.chunk {
            let mut pixels = std::mem::take(&mut self.pixels);
            let out = self.padded(batch, &mut pixels);
            self.pixels = pixels;
            return Ok(out);
        }
        use rayon::prelude::*;
        let this = &*self;
        let parts: Vec<Vec<Prediction>> = batch
            .par_chunks(this.chunk)
            .map_init(
                || Vec::with_capacity(this.chunk * PIXELS),
                |pixels, part| this.padded(part, pixels),
            )
            .collect();
        Ok(parts.into_iter().flatten().collect())
    }
}

/// One forward pass: softmax probabilities and embeddings, flattened.
pub(crate) fn forward<B: Backend>(
    model: &FoldedClassifier<B>,
    pixels: &[u8],
    device: &B::Device,
) -> (Vec<f32>, Vec<f32>) {
    let out = model.forward(to_tensor::<B>(pixels, device));
    let probs = softmax(out.logits, 1)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>();
    let embedding = out.embedding.into_data().convert::<f32>().to_vec::<f32>();
    (probs.unwrap_or_default(), embedding.unwrap_or_default())
}

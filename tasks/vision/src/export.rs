//! The classifier beside other runtimes (`celeriac eval vision`, `make bench-vision`): its parameters as JSON
//! (what the benchmark rebuilds the same network from in ONNX Runtime, the yardstick), its probabilities on
//! test images (what the other runtime must reproduce), and model-only throughput on the CPU backend at a
//! batch size, in a thread pool like the worker's executor.

use crate::VisionError;
use crate::executor::forward;
use crate::idx::{PIXELS, Split};
use crate::model::Classifier;
use crate::weights::Weights;
use burn::backend::Flex;
use std::time::{Duration, Instant};

/// The weights on the CPU backend.
pub fn load(weights: &Weights) -> Result<Classifier<Flex>, VisionError> {
    weights.load(&Default::default())
}

/// Softmax probabilities of the first `n` images of `split`, ten per image.
pub fn probabilities(model: &Classifier<Flex>, split: &Split, n: usize) -> Vec<f32> {
    let model = &model.folded();
    let n = n.min(split.len());
    let mut probs = Vec::with_capacity(n * 10);
    for start in (0..n).step_by(256) {
        let end = (start + 256).min(n);
        let pixels = &split.images[start * PIXELS..end * PIXELS];
        probs.extend(forward(model, pixels, &Default::default()).0);
    }
    probs
}

/// Images per second through forward passes of `batch` images (the outputs read back, as the worker does)
/// for about `seconds` after one warm-up pass, on `threads` CPU threads (default: all cores).
pub fn images_per_second(
    model: &Classifier<Flex>,
    split: &Split,
    batch: usize,
    seconds: f64,
    threads: Option<usize>,
) -> Result<f64, VisionError> {
    let pool = celeriac_inference::device::cpu_pool("vision-bench", threads)
        .map_err(VisionError::Executor)?;
    let batch = batch.max(1);
    let images: Vec<u8> = (0..batch)
        .flat_map(|i| split.image(i % split.len().max(1)).iter().copied())
        .collect();
    if images.len() != batch * PIXELS {
        return Err(VisionError::Data("no images to time".into()));
    }
    let model = &model.folded();
    Ok(pool.install(|| {
        let _ = forward(model, &images, &Default::default());
        let budget = Duration::from_secs_f64(seconds.max(0.1));
        let started = Instant::now();
        let mut passes = 0u64;
        while passes == 0 || started.elapsed() < budget {
            let _ = forward(model, &images, &Default::default());
            passes += 1;
        }
        (passes * batch as u64) as f64 / started.elapsed().as_secs_f64()
    }))
}

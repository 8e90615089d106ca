//! Training the classifier on Fashion-MNIST with Burn's autodiff: a seeded shuffle, a validation split taken
//! from the end of the shuffled training set, augmentation (horizontal flips, shifts of up to two pixels;
//! optionally a share of each batch as items cropped from composed scenes, what `vision.detect` feeds it),
//! AdamW with a cosine learning-rate decay, then the figures on the 10,000 test images: accuracy, visual
//! search Recall@1 (the nearest training image, by embedding, has the query's class) and the accuracy on
//! the items of scenes composed from them, cropped by their true boxes (what naming the detector's boxes
//! asks of it).

use crate::VisionError;
use crate::idx::{FashionMnist, PIXELS, SIDE, Split};
use crate::model::{Classifier, ClassifierConfig};
use crate::weights::{Meta, Role, Weights};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// `celeriac train vision` options.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Fashion-MNIST's directory (default: `$FASHION_MNIST_DIR`, then Debian's).
    pub data: Option<PathBuf>,
    /// Where `classifier.mpk` and `classifier.json` go.
    pub out: PathBuf,
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Seed of the shuffle, the augmentation and the initial weights.
    pub seed: u64,
    /// Training images held out for validation.
    pub validation: usize,
    /// Train on this many images only (a smoke run); the test set is cut to the same count.
    pub limit: Option<usize>,
    /// The network's shape.
    pub model: ClassifierConfig,
    /// Start from these weights (a directory with `classifier.*`) instead of fresh ones: fine-tuning.
    pub init: Option<PathBuf>,
    /// Share of each batch (0..1) taken from the items of composed scenes instead of the plain images: a
    /// training image drawn on a noisy canvas at 20 to 42 px among others, cropped by its box (jittered by
    /// up to 10 %) as `vision.detect` crops what its detector finds. 0: plain images only.
    pub scene_crops: f64,
    /// Which weights these are (`classifier.*` or `namer.*` in `out`).
    pub role: Role,
    /// The command line, recorded in `classifier.json`.
    pub command: String,
}

/// Scene crops of the training images, made as needed: each composed scene gives one crop per item.
struct Crops {
    pending: Vec<(Vec<u8>, u8)>,
}

impl Crops {
    fn next(&mut self, fit: &Split, rng: &mut Rng) -> (Vec<u8>, u8) {
        while self.pending.is_empty() {
            let scene = crate::scene::compose(fit, &crate::scene::SceneRules::default(), rng);
            for item in &scene.items {
                let [x0, y0, x1, y1] = item.bbox;
                let (w, h) = (x1 - x0, y1 - y0);
                let mut j = |v: f32, span: f32| v + (rng.unit() as f32 - 0.5) * 0.2 * span;
                let b = [j(x0, w), j(y0, h), j(x1, w), j(y1, h)];
                let px = crate::input::crop(&scene.pixels, scene.width, scene.height, b);
                self.pending.push((px, item.class_id as u8));
            }
        }
        self.pending.pop().expect("a crop")
    }
}

pub use celeriac_inference::Rng;

/// Scenes composed by a seed from `split`, cut into their items by their true boxes:
/// what the scene-crop accuracy is measured on.
pub fn scene_crop_split(split: &Split, scenes: usize, seed: u64) -> Split {
    let mut rng = Rng::new(seed);
    let mut out = Split {
        images: Vec::new(),
        labels: Vec::new(),
    };
    for _ in 0..scenes {
        let scene = crate::scene::compose(split, &crate::scene::SceneRules::default(), &mut rng);
        for item in &scene.items {
            out.images.extend(crate::input::crop(
                &scene.pixels,
                scene.width,
                scene.height,
                item.bbox,
            ));
            out.labels.push(item.class_id as u8);
        }
    }
    out
}

/// Test scenes (and their seed) of the scene-crop accuracy: the detector's evaluation scenes.
pub const SCENE_CROP_EVAL: (usize, u64) = (1000, 2026);

/// Pixels to a `[n, 1, 28, 28]` tensor in 0..1.
pub fn to_tensor<B: Backend>(images: &[u8], device: &B::Device) -> Tensor<B, 4> {
    let n = images.len() / PIXELS;
    let data: Vec<f32> = images.iter().map(|&p| p as f32 / 255.0).collect();
    Tensor::from_data(TensorData::new(data, [n, 1, SIDE, SIDE]), device)
}

/// A flipped and shifted copy of one image.
fn augment(src: &[u8], rng: &mut Rng, dst: &mut Vec<u8>) {
    let flip = rng.unit() < 0.5;
    let dx = rng.below(5) as isize - 2;
    let dy = rng.below(5) as isize - 2;
    for y in 0..SIDE as isize {
        for x in 0..SIDE as isize {
            let sx = x - dx;
            let sy = y - dy;
            let v = if (0..SIDE as isize).contains(&sx) && (0..SIDE as isize).contains(&sy) {
                let sx = if flip { SIDE as isize - 1 - sx } else { sx };
                src[(sy as usize) * SIDE + sx as usize]
            } else {
                0
            };
            dst.push(v);
        }
    }
}

/// Trains, evaluates, saves, and returns the figures written to `classifier.json`.
pub fn train<B: AutodiffBackend>(
    options: &TrainOptions,
    device: &B::Device,
) -> Result<serde_json::Value, VisionError> {
    let data = FashionMnist::locate(options.data.as_deref())?;
    let mut rng = Rng::new(options.seed);
    B::seed(device, options.seed);
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    rng.shuffle(&mut order);
    let validation = options.validation.min(order.len() / 5);
    let (fit_idx, val_idx) = order.split_at(order.len() - validation);
    let mut fit_idx = fit_idx.to_vec();
    if let Some(limit) = options.limit {
        fit_idx.truncate(limit);
    }
    let fit = data.train.select(&fit_idx);
    let val = data.train.select(val_idx);
    let test = match options.limit {
        Some(limit) => data
            .test
            .select(&(0..limit.min(data.test.len())).collect::<Vec<_>>()),
        None => data.test.clone(),
    };

    let (mut model, init): (Classifier<B>, _) = match &options.init {
        Some(dir) => {
            let w = Weights::from_dir(dir)?;
            let from = crate::weights::provenance(&w.meta.command, &w.meta.figures);
            (w.load(device)?, from)
        }
        None => (options.model.init(device), serde_json::Value::Null),
    };
    let mut crops = Crops {
        pending: Vec::new(),
    };
    let mut optim = AdamWConfig::new().with_weight_decay(5e-4).init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let steps_per_epoch = fit.len().div_ceil(options.batch_size);
    let total_steps = (steps_per_epoch * options.epochs).max(1);
    let started = Instant::now();
    let mut step = 0usize;
    let mut history = Vec::new();
    let mut batch = Vec::with_capacity(options.batch_size * PIXELS);
    for epoch in 1..=options.epochs {
        let mut idx: Vec<usize> = (0..fit.len()).collect();
        rng.shuffle(&mut idx);
        let mut loss_sum = 0.0;
        let epoch_started = Instant::now();
        for chunk in idx.chunks(options.batch_size) {
            batch.clear();
            let mut labels: Vec<i64> = Vec::with_capacity(chunk.len());
            for &i in chunk {
                if options.scene_crops > 0.0 && rng.unit() < options.scene_crops {
                    let (px, label) = crops.next(&fit, &mut rng);
                    batch.extend_from_slice(&px);
                    labels.push(label as i64);
                } else {
                    augment(fit.image(i), &mut rng, &mut batch);
                    labels.push(fit.labels[i] as i64);
                }
            }
            let x = to_tensor::<B>(&batch, device);
            let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [chunk.len()]), device);
            let loss = loss_fn.forward(model.forward(x).logits, y);
            loss_sum += loss.clone().into_scalar().elem::<f64>() * chunk.len() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let lr = cosine_lr(options.learning_rate, step, total_steps);
            model = optim.step(lr, model, grads);
            step += 1;
        }
        let val_accuracy = accuracy(&model.valid(), &val, device);
        let loss = loss_sum / fit.len() as f64;
        tracing::info!(
            epoch,
            loss = format!("{loss:.4}"),
            val_accuracy = format!("{val_accuracy:.4}"),
            seconds = format!("{:.0}", epoch_started.elapsed().as_secs_f64()),
            "vision training epoch"
        );
        history.push(
            json!({"epoch": epoch, "loss": round4(loss), "val_accuracy": round4(val_accuracy)}),
        );
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let trained = model.valid();
    let test_accuracy = accuracy(&trained, &test, device);
    let val_accuracy = accuracy(&trained, &val, device);
    // The gallery is the whole training set (a smoke run: the images it trained on).
    let gallery = if options.limit.is_some() {
        &fit
    } else {
        &data.train
    };
    let recall_at_1 = recall_at_1(&trained, gallery, &test, device);
    let (crop_scenes, crop_seed) = SCENE_CROP_EVAL;
    let crop_scenes = options
        .limit
        .map_or(crop_scenes, |l| (l / 20).clamp(1, crop_scenes));
    let scene_crop_accuracy = accuracy(
        &trained,
        &scene_crop_split(&test, crop_scenes, crop_seed),
        device,
    );
    let figures = json!({
        "test_accuracy": round4(test_accuracy),
        "validation_accuracy": round4(val_accuracy),
        "search_recall_at_1": round4(recall_at_1),
        "scene_crop_accuracy": round4(scene_crop_accuracy),
        "scene_crop_test_scenes": crop_scenes,
        "test_images": test.len(),
        "training_images": fit.len(),
        "validation_images": val.len(),
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "seed": options.seed,
        "scene_crops": options.scene_crops,
        "train_seconds": train_seconds.round(),
        "history": history,
        "init": init,
    });
    let meta = Meta {
        config: options.model.clone(),
        command: options.command.clone(),
        figures: figures.clone(),
    };
    Weights::save(trained, &meta, &options.out, options.role)?;
    Ok(figures)
}

/// A figure to four decimals, as the weights' json records it.
pub(crate) fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The learning rate at `step` of `total`: a cosine decay from `peak` to 1 % of it.
pub(crate) fn cosine_lr(peak: f64, step: usize, total: usize) -> f64 {
    let progress = step as f64 / total.max(1) as f64;
    peak * (0.01 + 0.99 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// Embeddings and predicted classes of `split`, in batches of 500.
pub fn infer<B: Backend>(
    model: &Classifier<B>,
    split: &Split,
    device: &B::Device,
) -> (Vec<f32>, Vec<usize>) {
    let model = model.folded();
    let mut embeddings = Vec::new();
    let mut predicted = Vec::new();
    for start in (0..split.len()).step_by(500) {
        let end = (start + 500).min(split.len());
        let out = model.forward(to_tensor::<B>(
            &split.images[start * PIXELS..end * PIXELS],
            device,
        ));
        let classes = out.logits.argmax(1).into_data();
        predicted.extend(classes.iter::<i64>().map(|c| c as usize));
        embeddings.extend(out.embedding.into_data().iter::<f32>());
    }
    (embeddings, predicted)
}

/// The share of `split` the model classifies right.
pub fn accuracy<B: Backend>(model: &Classifier<B>, split: &Split, device: &B::Device) -> f64 {
    if split.is_empty() {
        return 0.0;
    }
    let (_, predicted) = infer(model, split, device);
    let right = predicted
        .iter()
        .zip(&split.labels)
        .filter(|(p, l)| **p == **l as usize)
        .count();
    right as f64 / split.len() as f64
}

/// Visual search Recall@1: for each query, the nearest `gallery` image by cosine similarity of embeddings
/// has the query's class.
pub fn recall_at_1<B: Backend>(
    model: &Classifier<B>,
    gallery: &Split,
    queries: &Split,
    device: &B::Device,
) -> f64 {
    if queries.is_empty() || gallery.is_empty() {
        return 0.0;
    }
    let (g, _) = infer(model, gallery, device);
    let (q, _) = infer(model, queries, device);
    let d = g.len() / gallery.len();
    let g = Tensor::<B, 2>::from_data(TensorData::new(g, [gallery.len(), d]), device).transpose();
    let mut hits = 0;
    for start in (0..queries.len()).step_by(500) {
        let end = (start + 500).min(queries.len());
        let chunk = Tensor::<B, 2>::from_data(
            TensorData::new(q[start * d..end * d].to_vec(), [end - start, d]),
            device,
        );
        let nearest = chunk.matmul(g.clone()).argmax(1).into_data();
        for (i, n) in nearest.iter::<i64>().enumerate() {
            if gallery.labels[n as usize] == queries.labels[start + i] {
                hits += 1;
            }
        }
    }
    hits as f64 / queries.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_reproducible_and_the_shuffle_a_permutation() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut v: Vec<usize> = (0..100).collect();
        a.shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn augmentation_keeps_every_pixel_or_fills_black() {
        let src: Vec<u8> = (0..PIXELS).map(|i| (i % 251) as u8 + 1).collect();
        let mut rng = Rng::new(3);
        let mut out = Vec::new();
        augment(&src, &mut rng, &mut out);
        assert_eq!(out.len(), PIXELS);
        assert!(out.iter().all(|p| *p == 0 || src.contains(p)));
    }
}

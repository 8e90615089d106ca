//! Training the detector on scenes composed from the training images (a fresh scene for every step, from
//! a seeded generator; the last `validation` images of a seeded shuffle are held out and only compose the
//! validation scenes), and measuring it on scenes composed from the test images against the
//! connected-components baseline, both named by the namer (the classifier fine-tuned on scene crops).
//!
//! The loss is CenterNet's: a penalty-reduced focal loss on the centre map (a Gaussian bump at each item's
//! centre, σ a sixth of its box in cells, at least 0.7), plus L1 on the log width and height and on the
//! centre's offset inside its cell, both only at the centre cells.

use crate::VisionError;
use crate::detect::name_boxes;
use crate::detect_eval::{Scored, average_precision, components, mean_average_precision};
use crate::detector::{
    Detector, DetectorConfig, DetectorMeta, DetectorWeights, OUTPUTS, STRIDE, detect, input,
};
use crate::idx::{FashionMnist, Split};
use crate::model::{CLASSES, Classifier, FoldedClassifier, best_class};
use crate::scene::{Scene, SceneRules, compose};
use crate::train::{cosine_lr, round4};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use celeriac_inference::Rng;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// `celeriac train detector` options.
#[derive(Debug, Clone)]
pub struct DetectTrainOptions {
    /// Fashion-MNIST's directory (default: `$FASHION_MNIST_DIR`, then Debian's).
    pub data: Option<PathBuf>,
    /// Where `detector.mpk` and `detector.json` go.
    pub out: PathBuf,
    /// A weights directory whose `namer.*` (else `classifier.*`) names the boxes in the evaluation
    /// (default: the shipped namer).
    pub namer: Option<PathBuf>,
    /// Passes of `scenes_per_epoch` training scenes.
    pub epochs: usize,
    /// Training scenes per epoch (each one new).
    pub scenes_per_epoch: usize,
    /// Scenes per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Seed of the split, the scenes and the initial weights.
    pub seed: u64,
    /// Training images held out for the validation scenes.
    pub validation: usize,
    /// Test scenes of the final evaluation.
    pub eval_scenes: usize,
    /// Seed of the test scenes.
    pub eval_seed: u64,
    /// The network's shape.
    pub model: DetectorConfig,
    /// Start from the detector in this directory (`detector.*`) instead of fresh weights: fine-tuning.
    pub init: Option<PathBuf>,
    /// The command line, recorded in `detector.json`.
    pub command: String,
}

/// Training targets of a batch of scenes: centre maps, centre masks (twice, for the two-channel losses),
/// and the regression targets `[n, 4, gh, gw]`.
fn targets(scenes: &[Scene], gw: usize, gh: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let plane = gw * gh;
    let n = scenes.len();
    let mut heat = vec![0.0f32; n * plane];
    let mut mask = vec![0.0f32; n * plane];
    let mut mask2 = vec![0.0f32; n * 2 * plane];
    let mut reg = vec![0.0f32; n * 4 * plane];
    for (s, scene) in scenes.iter().enumerate() {
        for item in &scene.items {
            let [x0, y0, x1, y1] = item.bbox;
            let (cx, cy) = (
                (x0 + x1) / 2.0 / STRIDE as f32,
                (y0 + y1) / 2.0 / STRIDE as f32,
            );
            let (ix, iy) = (
                (cx.floor() as usize).min(gw - 1),
                (cy.floor() as usize).min(gh - 1),
            );
            let sigma = (((x1 - x0).min(y1 - y0) / STRIDE as f32) / 6.0).max(0.7);
            for y in 0..gh {
                for x in 0..gw {
                    let dx = x as f32 + 0.5 - cx;
                    let dy = y as f32 + 0.5 - cy;
                    let g = (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp();
                    let at = s * plane + y * gw + x;
                    heat[at] = heat[at].max(g);
                }
            }
            let at = iy * gw + ix;
            heat[s * plane + at] = 1.0;
            mask[s * plane + at] = 1.0;
            mask2[s * 2 * plane + at] = 1.0;
            mask2[s * 2 * plane + plane + at] = 1.0;
            let r = s * 4 * plane;
            reg[r + at] = (x1 - x0).max(1.0).ln();
            reg[r + plane + at] = (y1 - y0).max(1.0).ln();
            reg[r + 2 * plane + at] = cx - ix as f32;
            reg[r + 3 * plane + at] = cy - iy as f32;
        }
    }
    (heat, mask, mask2, reg)
}

/// The loss of one batch (mean over items).
fn loss<B: Backend>(model: &Detector<B>, scenes: &[Scene], device: &B::Device) -> Tensor<B, 1> {
    let n = scenes.len();
    let (w, h) = (scenes[0].width, scenes[0].height);
    let mut x = Vec::with_capacity(n * w * h);
    for s in scenes {
        x.extend(input(&s.pixels, w, h).0);
    }
    let (gw, gh) = (w / STRIDE, h / STRIDE);
    let (heat, mask, mask2, reg) = targets(scenes, gw, gh);
    let items: usize = scenes.iter().map(|s| s.items.len()).sum::<usize>().max(1);
    let t = |v: Vec<f32>, c: usize| {
        Tensor::<B, 4>::from_data(TensorData::new(v, [n, c, gh, gw]), device)
    };
    let maps = model.forward(Tensor::from_data(TensorData::new(x, [n, 1, h, w]), device));
    debug_assert_eq!(maps.dims()[1], OUTPUTS);
    let logits = maps.clone().slice([0..n, 0..1, 0..gh, 0..gw]);
    let (heat, pos, pos2, reg) = (t(heat, 1), t(mask, 1), t(mask2, 2), t(reg, 4));
    let p = sigmoid(logits.clone());
    let neg = pos.clone().neg().add_scalar(1.0);
    let pos_loss =
        p.clone().neg().add_scalar(1.0).powf_scalar(2.0) * log_sigmoid(logits.clone()) * pos;
    let neg_weight = heat.neg().add_scalar(1.0).powf_scalar(4.0);
    let neg_loss = neg_weight * p.powf_scalar(2.0) * log_sigmoid(logits.neg()) * neg;
    let focal = (pos_loss + neg_loss).sum().neg();
    let size = maps.clone().slice([0..n, 1..3, 0..gh, 0..gw]);
    let offset = sigmoid(maps.slice([0..n, 3..5, 0..gh, 0..gw]));
    let size_loss =
        ((size - reg.clone().slice([0..n, 0..2, 0..gh, 0..gw])).abs() * pos2.clone()).sum();
    let offset_loss = ((offset - reg.slice([0..n, 2..4, 0..gh, 0..gw])).abs() * pos2).sum();
    (focal + size_loss + offset_loss).div_scalar(items as f32)
}

fn scenes(split: &Split, rules: &SceneRules, count: usize, rng: &mut Rng) -> Vec<Scene> {
    (0..count).map(|_| compose(split, rules, rng)).collect()
}

/// Trains, evaluates, saves, and returns the figures written to `detector.json`.
pub fn train<B: AutodiffBackend>(
    options: &DetectTrainOptions,
    device: &B::Device,
) -> Result<serde_json::Value, VisionError> {
    let data = FashionMnist::locate(options.data.as_deref())?;
    let namer = crate::weights::Weights::for_naming(options.namer.as_deref())?;
    let mut rng = Rng::new(options.seed);
    B::seed(device, options.seed);
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    rng.shuffle(&mut order);
    let validation = options.validation.min(order.len() / 5);
    let (fit_idx, val_idx) = order.split_at(order.len() - validation);
    let fit = data.train.select(fit_idx);
    let val = data.train.select(val_idx);
    let rules = SceneRules::default();
    let val_scenes = scenes(&val, &rules, 200, &mut Rng::new(options.seed ^ 0x5eed));

    let (mut model, init): (Detector<B>, _) = match &options.init {
        Some(dir) => {
            let w = DetectorWeights::from_dir(dir)?;
            (
                w.load(device)?,
                crate::weights::provenance(&w.meta.command, &w.meta.figures),
            )
        }
        None => (options.model.init(device), serde_json::Value::Null),
    };
    let mut optim = AdamWConfig::new().with_weight_decay(1e-4).init();
    let steps_per_epoch = options.scenes_per_epoch.div_ceil(options.batch_size).max(1);
    let total_steps = steps_per_epoch * options.epochs;
    let started = Instant::now();
    let mut history = Vec::new();
    let mut step = 0usize;
    for epoch in 1..=options.epochs {
        let epoch_started = Instant::now();
        let mut loss_sum = 0.0;
        for _ in 0..steps_per_epoch {
            let batch = scenes(&fit, &rules, options.batch_size, &mut rng);
            let l = loss(&model, &batch, device);
            loss_sum += l.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(l.backward(), &model);
            let lr = cosine_lr(options.learning_rate, step, total_steps);
            model = optim.step(lr, model, grads);
            step += 1;
        }
        let val_ap = agnostic_ap(&model.valid(), &val_scenes, &Default::default());
        let loss = loss_sum / steps_per_epoch as f64;
        tracing::info!(
            epoch,
            loss = format!("{loss:.4}"),
            val_ap = format!("{val_ap:.4}"),
            seconds = format!("{:.0}", epoch_started.elapsed().as_secs_f64()),
            "detector training epoch"
        );
        history.push(
            json!({"epoch": epoch, "loss": round4(loss), "val_agnostic_ap50": round4(val_ap)}),
        );
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let trained = model.valid();
    let cpu = Default::default();
    let namer_id = namer.model_id();
    let named = namer.load::<B::InnerBackend>(&cpu)?;
    let test_scenes = scenes(
        &data.test,
        &rules,
        options.eval_scenes,
        &mut Rng::new(options.eval_seed),
    );
    let eval = evaluate(&trained, &named, &test_scenes, &cpu);
    let mut figures = json!({
        "validation_agnostic_ap50": round4(agnostic_ap(&trained, &val_scenes, &cpu)),
        "training_scenes": steps_per_epoch * options.batch_size * options.epochs,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "seed": options.seed,
        "eval_seed": options.eval_seed,
        "namer": namer_id,
        "train_seconds": train_seconds.round(),
        "history": history,
        "init": init,
    });
    if let (Some(f), serde_json::Value::Object(e)) = (figures.as_object_mut(), eval) {
        f.extend(e);
    }
    let meta = DetectorMeta {
        config: options.model.clone(),
        command: options.command.clone(),
        figures: figures.clone(),
    };
    DetectorWeights::save(trained, &meta, &options.out)?;
    Ok(figures)
}

/// Lowest centre probability kept when measuring (AP integrates over every score above it).
pub const EVAL_MIN_OBJECTNESS: f32 = 0.05;

fn truths(scenes: &[Scene]) -> Vec<Scored> {
    scenes
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.items.iter().map(move |it| Scored {
                scene: i,
                bbox: it.bbox,
                class_id: it.class_id,
                score: 1.0,
            })
        })
        .collect()
}

/// Class-agnostic AP@0.5 of the detector alone on `scenes`.
pub fn agnostic_ap<B: Backend>(model: &Detector<B>, scenes: &[Scene], device: &B::Device) -> f64 {
    let model = &model.folded();
    let mut found = Vec::new();
    for (i, s) in scenes.iter().enumerate() {
        for p in detect(
            model,
            &s.pixels,
            s.width,
            s.height,
            EVAL_MIN_OBJECTNESS,
            device,
        ) {
            found.push(Scored {
                scene: i,
                bbox: p.bbox,
                class_id: 0,
                score: p.objectness,
            });
        }
    }
    average_precision(&found, &truths(scenes), 0.5, false)
}

/// Boxes and scores named by the namer: each box's class is the namer's argmax, its class-aware score the
/// box's score times that class's probability. `boxes` come scene by scene.
fn name<B: Backend>(
    namer: &FoldedClassifier<B>,
    boxes: Vec<(usize, [f32; 4], f32)>,
    scenes: &[Scene],
    device: &B::Device,
) -> (Vec<Scored>, Vec<Scored>) {
    let mut agnostic = Vec::with_capacity(boxes.len());
    let mut aware = Vec::with_capacity(boxes.len());
    for group in boxes.chunk_by(|a, b| a.0 == b.0) {
        let s = &scenes[group[0].0];
        let bboxes: Vec<[f32; 4]> = group.iter().map(|(_, b, _)| *b).collect();
        let probs = name_boxes(namer, (&s.pixels, s.width, s.height), &bboxes, 1, device);
        for ((i, b, score), probs) in group.iter().zip(probs.chunks(CLASSES)) {
            let (class_id, prob) = best_class(probs);
            agnostic.push(Scored {
                scene: *i,
                bbox: *b,
                class_id,
                score: *score,
            });
            aware.push(Scored {
                scene: *i,
                bbox: *b,
                class_id,
                score: *score * prob,
            });
        }
    }
    (agnostic, aware)
}

/// The detector and the connected-components baseline on the same `scenes`, each named by `namer`:
/// class-agnostic AP@0.5 and class-aware mAP@0.5 of both.
pub fn evaluate<B: Backend>(
    detector: &Detector<B>,
    namer: &Classifier<B>,
    scenes: &[Scene],
    device: &B::Device,
) -> serde_json::Value {
    let (detector, namer) = (&detector.folded(), &namer.folded());
    let truth = truths(scenes);
    let mut found = Vec::new();
    let mut baseline = Vec::new();
    for (i, s) in scenes.iter().enumerate() {
        for p in detect(
            detector,
            &s.pixels,
            s.width,
            s.height,
            EVAL_MIN_OBJECTNESS,
            device,
        ) {
            found.push((i, p.bbox, p.objectness));
        }
        for (b, fill) in components(&s.pixels, s.width, s.height, 16) {
            baseline.push((i, b, fill));
        }
    }
    let (d_agnostic, d_aware) = name(namer, found, scenes, device);
    let (b_agnostic, b_aware) = name(namer, baseline, scenes, device);
    json!({
        "test_scenes": scenes.len(),
        "test_items": truth.len(),
        "agnostic_ap50": round4(average_precision(&d_agnostic, &truth, 0.5, false)),
        "map50": round4(mean_average_precision(&d_aware, &truth, 0.5)),
        "baseline_agnostic_ap50": round4(average_precision(&b_agnostic, &truth, 0.5, false)),
        "baseline_map50": round4(mean_average_precision(&b_aware, &truth, 0.5)),
    })
}

//! Training the transformer with Burn's autodiff: every customer's training items cut into windows of
//! `max_len` (newest first), next-item targets at every position, a full softmax over the items
//! (cross-entropy, padding ignored), Adam, and early stopping on validation NDCG@10 (the best epoch's weights
//! are kept).

use crate::data::{Case, hr_ndcg_at_10, rank_of};
use crate::model::{SasRec, SasRecConfig, ids_tensor, left_pad};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use celeriac_inference::Rng;
use std::time::Instant;

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Most passes over the data.
    pub epochs: usize,
    /// Epochs without a better validation NDCG@10 before stopping.
    pub patience: usize,
    /// Windows per step (fewer for small data sets: at least ten steps per epoch, of 16 windows or more).
    pub batch_size: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Seed of the initial weights, the shuffles and dropout.
    pub seed: u64,
    /// The network's shape (`items` is set from the data).
    pub model: SasRecConfig,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 200,
            patience: 3,
            batch_size: 128,
            learning_rate: 3e-3,
            seed: 42,
            model: SasRecConfig::new(0),
        }
    }
}

/// A trained network and how it got there.
#[derive(Debug)]
pub struct Trained<B: Backend> {
    /// The best epoch's weights.
    pub model: SasRec<B>,
    /// The shape.
    pub config: SasRecConfig,
    /// Epochs run.
    pub epochs: usize,
    /// The epoch whose weights were kept.
    pub best_epoch: usize,
    /// Validation HR@10 and NDCG@10 of the kept weights (0 without validation cases).
    pub valid_hr10: f64,
    /// See `valid_hr10`.
    pub valid_ndcg10: f64,
    /// Seconds spent.
    pub seconds: f64,
}

/// Input and target windows of `max_len` from every sequence, newest first.
pub fn windows(train: &[Vec<u32>], max_len: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut out = Vec::new();
    for s in train {
        if s.len() < 2 {
            continue;
        }
        let mut end = s.len();
        while end >= 2 {
            let start = end.saturating_sub(max_len + 1);
            let w = &s[start..end];
            out.push((w[..w.len() - 1].to_vec(), w[1..].to_vec()));
            if start == 0 {
                break;
            }
            end = start + 1;
        }
    }
    out
}

/// Trains a network for `items` items on `train`, stopping early on `valid`.
pub fn fit<B: AutodiffBackend>(
    train: &[Vec<u32>],
    valid: &[Case],
    items: usize,
    options: &TrainOptions,
    device: &B::Device,
) -> Trained<B::InnerBackend> {
    B::seed(device, options.seed);
    let started = Instant::now();
    let mut config = options.model.clone();
    config.items = items;
    let max_len = config.max_len;
    let mut model: SasRec<B> = config.init(device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new()
        .with_pad_tokens(Some(vec![0]))
        .init(device);
    let mut rng = Rng::new(options.seed);
    let mut data = windows(train, max_len);
    // Small tenants still get a few steps per epoch: at least ten batches, of 16 windows or more.
    let batch_size = options.batch_size.min((data.len() / 10).max(16));
    let mut best: Option<(f64, f64, usize, SasRec<B::InnerBackend>)> = None;
    let mut epochs = 0;
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    for epoch in 1..=options.epochs {
        epochs = epoch;
        rng.shuffle(&mut data);
        let mut loss_sum = 0.0;
        for chunk in data.chunks(batch_size) {
            ids.clear();
            targets.clear();
            for (x, y) in chunk {
                left_pad(x, max_len, &mut ids);
                left_pad(y, max_len, &mut targets);
            }
            let b = chunk.len();
            let h = model.hidden(ids_tensor::<B>(ids.clone(), b, max_len, device));
            let logits = model.scores(h.reshape([b * max_len, config.dim]));
            let y = Tensor::<B, 1, Int>::from_data(
                TensorData::new(targets.clone(), [b * max_len]),
                device,
            );
            let loss = loss_fn.forward(logits, y);
            loss_sum += loss.clone().into_scalar().elem::<f64>() * b as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(options.learning_rate, model, grads);
        }
        let inference = model.valid();
        let (hr, ndcg) = evaluate(&inference, valid, device);
        tracing::debug!(
            epoch,
            loss = format!("{:.4}", loss_sum / data.len().max(1) as f64),
            valid_hr10 = format!("{hr:.4}"),
            valid_ndcg10 = format!("{ndcg:.4}"),
            "recommend training epoch"
        );
        let better = best.as_ref().is_none_or(|b| ndcg > b.1);
        if better {
            best = Some((hr, ndcg, epoch, inference));
        } else if epoch - best.as_ref().map_or(0, |b| b.2) >= options.patience {
            break;
        }
    }
    let (valid_hr10, valid_ndcg10, best_epoch, model) = match best {
        Some(b) => b,
        None => (0.0, 0.0, 0, model.valid()),
    };
    Trained {
        model,
        config,
        epochs,
        best_epoch,
        valid_hr10,
        valid_ndcg10,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Next-item scores (`items + 1` per history) of `histories`, in batches of 256.
pub fn score<B: Backend>(model: &SasRec<B>, histories: &[&[u32]], device: &B::Device) -> Vec<f32> {
    let len = model.max_len();
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for chunk in histories.chunks(256) {
        ids.clear();
        for h in chunk {
            left_pad(h, len, &mut ids);
        }
        let s = model.next(ids_tensor::<B>(ids.clone(), chunk.len(), len, device));
        out.extend(s.into_data().iter::<f32>());
    }
    out
}

/// HR@10 and NDCG@10 of `cases` (full ranking, history excluded).
pub fn evaluate<B: Backend>(model: &SasRec<B>, cases: &[Case], device: &B::Device) -> (f64, f64) {
    if cases.is_empty() {
        return (0.0, 0.0);
    }
    let histories: Vec<&[u32]> = cases.iter().map(|c| c.history.as_slice()).collect();
    let scores = score(model, &histories, device);
    let width = scores.len() / cases.len();
    let ranks: Vec<usize> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| rank_of(&scores[i * width..(i + 1) * width], c))
        .collect();
    hr_ndcg_at_10(&ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_target_once() {
        let w = windows(&[vec![1, 2, 3, 4, 5, 6], vec![7]], 2);
        assert_eq!(
            w,
            vec![
                (vec![4, 5], vec![5, 6]),
                (vec![2, 3], vec![3, 4]),
                (vec![1], vec![2]),
            ]
        );
    }

    #[test]
    fn a_successor_pattern_is_learned() {
        type B = burn::backend::Autodiff<burn::backend::Flex>;
        // 40 items; every customer walks i → i+1 → ... (mod 40) from a different start, so the next item is
        // always the successor of the newest, never one already seen.
        let seqs: Vec<Vec<u32>> = (0..120)
            .map(|c| (0..10).map(|t| ((c * 7 + t) % 40 + 1) as u32).collect())
            .collect();
        let split = crate::data::Split::leave_one_out(&seqs);
        let options = TrainOptions {
            epochs: 30,
            patience: 30,
            batch_size: 32,
            learning_rate: 1e-2,
            seed: 1,
            model: SasRecConfig::new(0)
                .with_dim(32)
                .with_max_len(8)
                .with_dropout(0.0),
        };
        let device = Default::default();
        let t = fit::<B>(&split.train, &split.valid, 40, &options, &device);
        let histories: Vec<&[u32]> = split.test.iter().map(|c| c.history.as_slice()).collect();
        let scores = score(&t.model, &histories, &device);
        let firsts = split
            .test
            .iter()
            .enumerate()
            .filter(|(i, c)| rank_of(&scores[i * 41..(i + 1) * 41], c) == 0)
            .count();
        assert_eq!(firsts, 120, "valid ndcg {}", t.valid_ndcg10);
        assert!(t.best_epoch >= 1 && t.epochs <= 30);
    }
}

//! The evaluation protocol (`celeriac eval recommend`, `make eval-recommend`): leave-one-out by time (each
//! customer's last item is the test, the second last the validation), full ranking over every item with the
//! customer's earlier items excluded, HR@10 and NDCG@10, each model over several seeds (mean ± standard
//! deviation), all in one run: the transformer and the baselines popularity, BPR-MF and EASE.

use crate::baselines::{Bpr, BprOptions, Ease, evaluate_with, popularity};
use crate::data::{Dataset, Split};
use crate::train::{TrainOptions, evaluate, fit};
use std::time::Instant;

/// One model's figures.
#[derive(Debug, Clone)]
pub struct Row {
    /// The model and its chosen settings.
    pub model: String,
    /// HR@10 per seed.
    pub hr10: Vec<f64>,
    /// NDCG@10 per seed.
    pub ndcg10: Vec<f64>,
    /// Seconds of training (mean over seeds).
    pub seconds: f64,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Seeds of the trained models.
    pub seeds: Vec<u64>,
    /// The transformer.
    pub transformer: TrainOptions,
    /// BPR-MF.
    pub bpr: BprOptions,
    /// EASE's penalties to choose from on validation.
    pub ease_lambdas: Vec<f64>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            seeds: vec![1, 2, 3],
            transformer: TrainOptions::default(),
            bpr: BprOptions::default(),
            ease_lambdas: vec![50.0, 100.0, 250.0, 500.0, 1000.0],
        }
    }
}

/// Runs the protocol on `data`; `progress` hears each model as it finishes.
pub fn run(data: &Dataset, options: &EvalOptions, progress: impl Fn(&Row)) -> Vec<Row> {
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    let items = data.item_count();
    let split = Split::leave_one_out(&data.sequences);
    let mut rows = Vec::new();
    let mut push = |row: Row| {
        progress(&row);
        rows.push(row);
    };
    // Popularity of everything the test histories hold (training and validation items).
    let started = Instant::now();
    let mut seen = split.train.clone();
    for c in &split.valid {
        seen[c.user].push(c.target);
    }
    let pop = popularity(&seen, items);
    let (hr, ndcg) = evaluate_with(&split.test, items, |_, s| s.copy_from_slice(&pop));
    push(Row {
        model: "popularity".into(),
        hr10: vec![hr],
        ndcg10: vec![ndcg],
        seconds: started.elapsed().as_secs_f64(),
    });
    let started = Instant::now();
    let (ease, lambda) = Ease::tuned(&split.train, &split.valid, items, &options.ease_lambdas);
    let (hr, ndcg) = evaluate_with(&split.test, items, |c, s| ease.score(&c.history, s));
    push(Row {
        model: format!("EASE (λ = {lambda})"),
        hr10: vec![hr],
        ndcg10: vec![ndcg],
        seconds: started.elapsed().as_secs_f64(),
    });
    drop(ease);
    let mut bpr = Row {
        model: format!("BPR-MF (d = {})", options.bpr.dim),
        hr10: Vec::new(),
        ndcg10: Vec::new(),
        seconds: 0.0,
    };
    for &seed in &options.seeds {
        let started = Instant::now();
        let m = Bpr::fit(&split.train, &split.valid, items, &options.bpr, seed);
        bpr.seconds += started.elapsed().as_secs_f64() / options.seeds.len() as f64;
        let (hr, ndcg) = evaluate_with(&split.test, items, |c, s| m.score(c.user, s));
        bpr.hr10.push(hr);
        bpr.ndcg10.push(ndcg);
    }
    push(bpr);
    let m = &options.transformer.model;
    let mut sas = Row {
        model: format!(
            "transformer (d = {}, {} blocks, len {})",
            m.dim, m.blocks, m.max_len
        ),
        hr10: Vec::new(),
        ndcg10: Vec::new(),
        seconds: 0.0,
    };
    let device = Default::default();
    for &seed in &options.seeds {
        let o = TrainOptions {
            seed,
            ..options.transformer.clone()
        };
        let t = fit::<B>(&split.train, &split.valid, items, &o, &device);
        tracing::info!(
            seed,
            epochs = t.epochs,
            best_epoch = t.best_epoch,
            seconds = format!("{:.0}", t.seconds),
            "transformer trained"
        );
        sas.seconds += t.seconds / options.seeds.len() as f64;
        let (hr, ndcg) = evaluate(&t.model, &split.test, &device);
        sas.hr10.push(hr);
        sas.ndcg10.push(ndcg);
    }
    push(sas);
    rows
}

/// Mean and (population) standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// The Markdown table the README shows.
pub fn table(data: &Dataset, rows: &[Row]) -> String {
    let mut s = format!(
        "{} customers, {} items, {} interactions; leave-one-out by time, full ranking, seen items excluded\n\n\
         | model | HR@10 | NDCG@10 | seeds | train s |\n|---|---|---|---|---|\n",
        data.users.len(),
        data.item_count(),
        data.interactions()
    );
    for r in rows {
        let (h, hs) = mean_std(&r.hr10);
        let (n, ns) = mean_std(&r.ndcg10);
        s.push_str(&format!(
            "| {} | {h:.4} ± {hs:.4} | {n:.4} ± {ns:.4} | {} | {:.1} |\n",
            r.model,
            r.hr10.len(),
            r.seconds
        ));
    }
    s
}

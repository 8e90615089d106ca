//! `celeriac eval`: `recommend` runs the recommendation evaluation protocol on a RecBole `.inter` file
//! (MovieLens-100k from the PyPI wheel `recbole`, fetched by `make eval-recommend`), the transformer and the
//! baselines in one run, and prints the Markdown table the README shows; `vision` measures the classifier on
//! its own (test accuracy, reference probabilities, model-only images/s) and exports its parameters, for
//! `make bench-vision` to compare with ONNX Runtime.

use clap::{Args, Subcommand};
use std::path::PathBuf;

/// `celeriac eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    model: Model,
}

#[derive(Debug, Subcommand)]
enum Model {
    /// The recommendation transformer against popularity, BPR-MF and EASE.
    #[cfg(feature = "recommend")]
    Recommend(RecommendArgs),
    /// The vision classifier alone: accuracy, reference probabilities, model-only speed, its parameters.
    #[cfg(feature = "vision")]
    Vision(VisionArgs),
    /// The vision detector and the connected-components baseline on test-composed scenes.
    #[cfg(feature = "vision")]
    Detector(DetectorArgs),
}

/// `celeriac eval detector`: prints one JSON object (AP@0.5, mAP@0.5, the baseline's).
#[cfg(feature = "vision")]
#[derive(Debug, Args)]
struct DetectorArgs {
    /// A weights directory with `detector.*` and `namer.*` (else `classifier.*`) to name the boxes; what it
    /// lacks comes from the weights built into the binary.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Fashion-MNIST's directory (default: $FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Scenes composed from the test images.
    #[arg(long, default_value_t = 1000)]
    scenes: usize,
    /// Seed of the scenes.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Write these figures into `--weights`' `detector.json` (after the namer that names the boxes changed).
    #[arg(long, requires = "weights")]
    record: bool,
}

/// `celeriac eval vision`: prints one JSON object.
#[cfg(feature = "vision")]
#[derive(Debug, Args)]
struct VisionArgs {
    /// A weights directory (default: the weights built into the binary).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Fashion-MNIST's directory (default: $FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Write the network's parameters here as JSON.
    #[arg(long)]
    export: Option<PathBuf>,
    /// Softmax probabilities of the first N test images go into the output.
    #[arg(long, default_value_t = 256)]
    reference: usize,
    /// Batch sizes to time (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    batches: Vec<usize>,
    /// Seconds of forward passes per batch size.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// `celeriac eval recommend`.
#[cfg(feature = "recommend")]
#[derive(Debug, Args)]
struct RecommendArgs {
    /// A RecBole atomic `.inter` file (user_id, item_id, timestamp).
    #[arg(long)]
    data: PathBuf,
    /// Seeds of the trained models (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// Only the first N customers (a quick run).
    #[arg(long)]
    users: Option<usize>,
    /// Most epochs of the transformer (early stopping on validation NDCG@10).
    #[arg(long, default_value_t = 200)]
    epochs: usize,
    /// Epochs without improvement before the transformer stops.
    #[arg(long, default_value_t = 3)]
    patience: usize,
    /// Width of the transformer.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Longest history the transformer reads.
    #[arg(long, default_value_t = 50)]
    max_len: usize,
    /// Dropout of the transformer.
    #[arg(long, default_value_t = 0.2)]
    dropout: f64,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f64,
    /// Most epochs of BPR-MF.
    #[arg(long, default_value_t = 200)]
    bpr_epochs: usize,
}

/// Runs `celeriac eval ...`.
pub async fn run(args: EvalArgs) -> anyhow::Result<i32> {
    match args.model {
        #[cfg(feature = "recommend")]
        Model::Recommend(a) => recommend(a).await,
        #[cfg(feature = "vision")]
        Model::Vision(a) => tokio::task::spawn_blocking(move || vision(a)).await?,
        #[cfg(feature = "vision")]
        Model::Detector(a) => tokio::task::spawn_blocking(move || detector(a)).await?,
    }
}

#[cfg(feature = "vision")]
fn detector(a: DetectorArgs) -> anyhow::Result<i32> {
    use burn::backend::Flex;
    use celeriac_tasks_vision::scene::{SceneRules, compose};
    use celeriac_tasks_vision::{detect_train, detector::DetectorWeights, idx::FashionMnist};
    let device = Default::default();
    let weights = DetectorWeights::resolve(a.weights.as_deref())?;
    let detector = weights.load::<Flex>(&device)?;
    let namer = celeriac_tasks_vision::weights::Weights::for_naming(a.weights.as_deref())?;
    let namer_id = namer.model_id();
    let namer = namer.load::<Flex>(&device)?;
    let data = FashionMnist::locate(a.data.as_deref())?;
    let mut rng = celeriac_tasks_vision::train::Rng::new(a.seed);
    let scenes: Vec<_> = (0..a.scenes)
        .map(|_| compose(&data.test, &SceneRules::default(), &mut rng))
        .collect();
    let mut out = detect_train::evaluate(&detector, &namer, &scenes, &device);
    out["namer"] = namer_id.into();
    out["eval_seed"] = a.seed.into();
    println!("{out}");
    if let (true, Some(dir)) = (a.record, &a.weights) {
        let mut meta = DetectorWeights::from_dir(dir)?.meta;
        if let (Some(f), Some(new)) = (meta.figures.as_object_mut(), out.as_object()) {
            f.extend(new.clone());
        }
        let path = dir.join("detector.json");
        std::fs::write(&path, serde_json::to_string_pretty(&meta)? + "\n")?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(0)
}

#[cfg(feature = "vision")]
fn vision(a: VisionArgs) -> anyhow::Result<i32> {
    use celeriac_tasks_vision::{export, idx::FashionMnist, train, weights::Weights};
    let weights = Weights::resolve(a.weights.as_deref())?;
    let model = export::load(&weights)?;
    if let Some(path) = &a.export {
        let json = serde_json::to_vec(&model.parameters())?;
        std::fs::write(path, json).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let data = FashionMnist::locate(a.data.as_deref())?;
    let accuracy = train::accuracy(&model, &data.test, &Default::default());
    let (scenes, seed) = train::SCENE_CROP_EVAL;
    let crops = train::scene_crop_split(&data.test, scenes, seed);
    let crop_accuracy = train::accuracy(&model, &crops, &Default::default());
    let probs = export::probabilities(&model, &data.test, a.reference);
    let mut speed = serde_json::Map::new();
    for &batch in &a.batches {
        let ips = export::images_per_second(&model, &data.test, batch, a.seconds, a.threads)?;
        eprintln!("batch {batch}: {ips:.0} images/s");
        speed.insert(
            batch.to_string(),
            serde_json::json!((ips * 10.0).round() / 10.0),
        );
    }
    let out = serde_json::json!({
        "model": weights.model_id(),
        "test_accuracy": (accuracy * 1e4).round() / 1e4,
        "scene_crop_accuracy": (crop_accuracy * 1e4).round() / 1e4,
        "reference": {"images": probs.len() / 10, "probs": probs},
        "images_per_second": speed,
    });
    println!("{out}");
    Ok(0)
}

#[cfg(feature = "recommend")]
async fn recommend(a: RecommendArgs) -> anyhow::Result<i32> {
    use celeriac_tasks_recommend::{data::Dataset, eval, model::SasRecConfig, train::TrainOptions};
    let text = std::fs::read_to_string(&a.data)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.data.display()))?;
    let mut data =
        Dataset::parse_inter(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.data.display()))?;
    if let Some(n) = a.users {
        data = data.first_users(n);
    }
    let options = eval::EvalOptions {
        seeds: a.seeds,
        transformer: TrainOptions {
            epochs: a.epochs,
            patience: a.patience,
            learning_rate: a.learning_rate,
            model: SasRecConfig::new(0)
                .with_dim(a.dim)
                .with_max_len(a.max_len)
                .with_dropout(a.dropout),
            ..TrainOptions::default()
        },
        bpr: celeriac_tasks_recommend::baselines::BprOptions {
            epochs: a.bpr_epochs,
            ..Default::default()
        },
        ..Default::default()
    };
    let table = tokio::task::spawn_blocking(move || {
        let rows = eval::run(&data, &options, |r| {
            let (h, _) = eval::mean_std(&r.hr10);
            let (n, _) = eval::mean_std(&r.ndcg10);
            eprintln!(
                "{}: HR@10 {h:.4}, NDCG@10 {n:.4} ({:.1} s)",
                r.model, r.seconds
            );
        });
        eval::table(&data, &rows)
    })
    .await?;
    println!("{table}");
    Ok(0)
}

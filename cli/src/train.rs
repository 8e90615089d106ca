//! `celeriac train vision`: trains the vision classifier on Fashion-MNIST with Burn's autodiff on the CPU
//! and writes `classifier.mpk` and `classifier.json` (with `--role namer`, `namer.*`: the copy fine-tuned on
//! scene crops that names the detector's boxes); `celeriac train detector` trains the detector on composed
//! scenes and writes `detector.mpk` and `detector.json` (the weights `tasks/vision/weights/` ships were made
//! by `make train-vision`, `make train-namer` and `make train-detector`, which run these with the recorded
//! arguments).

use clap::{Args, Subcommand};
use std::path::PathBuf;

/// `celeriac train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    model: Model,
}

#[derive(Debug, Subcommand)]
enum Model {
    /// The vision classifier and its embedding.
    Vision(VisionArgs),
    /// The vision detector (centre heatmaps on composed scenes), measured with the namer.
    Detector(DetectorArgs),
}

/// `celeriac train detector`.
#[derive(Debug, Args)]
struct DetectorArgs {
    /// Where the weights go.
    #[arg(long, default_value = "tasks/vision/weights")]
    out: PathBuf,
    /// Fashion-MNIST's directory (default: $FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    data: Option<PathBuf>,
    /// A weights directory whose namer.* (else classifier.*) names the boxes in the evaluation (default:
    /// the namer built into the binary).
    #[arg(long)]
    namer: Option<PathBuf>,
    /// Epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// New training scenes per epoch.
    #[arg(long, default_value_t = 4000)]
    scenes_per_epoch: usize,
    /// Scenes per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (cosine decay to 1% of it).
    #[arg(long, default_value_t = 2e-3)]
    learning_rate: f64,
    /// Seed of the split, the scenes and the initial weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Training images held out for the validation scenes.
    #[arg(long, default_value_t = 5000)]
    validation: usize,
    /// Test scenes of the final evaluation.
    #[arg(long, default_value_t = 1000)]
    eval_scenes: usize,
    /// Seed of the test scenes.
    #[arg(long, default_value_t = 2026)]
    eval_seed: u64,
    /// Channels of the first block.
    #[arg(long, default_value_t = 12)]
    channels: usize,
    /// Fine-tune: start from the detector in this directory (its shape wins over --channels).
    #[arg(long)]
    init: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// `--role`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Classifier,
    Namer,
}

/// `celeriac train vision`.
#[derive(Debug, Args)]
struct VisionArgs {
    /// Where the weights go.
    #[arg(long, default_value = "tasks/vision/weights")]
    out: PathBuf,
    /// Fashion-MNIST's directory (default: $FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Passes over the training images.
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate (cosine decay to 1% of it).
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f64,
    /// Seed of the shuffle, the augmentation and the initial weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Training images held out for validation.
    #[arg(long, default_value_t = 5000)]
    validation: usize,
    /// A smoke run: this many training (and test) images only.
    #[arg(long)]
    limit: Option<usize>,
    /// Channels of the first convolution blocks.
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Fine-tune: start from the weights in this directory (their shape wins over --channels).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Share of each batch taken from items cropped out of composed scenes (what vision.detect classifies).
    #[arg(long, default_value_t = 0.0)]
    scene_crops: f64,
    /// Which weights to write: `classifier` (classify, embed, search) or `namer` (names vision.detect's
    /// boxes).
    #[arg(long, value_enum, default_value_t = RoleArg::Classifier)]
    role: RoleArg,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// Runs `celeriac train ...`.
pub async fn run(args: TrainArgs) -> anyhow::Result<i32> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let command = command
        .rsplit_once("celeriac ")
        .map(|(_, c)| format!("celeriac {c}"))
        .unwrap_or(command);
    let (out, threads, job): (PathBuf, Option<usize>, Job) = match args.model {
        Model::Vision(a) => (
            a.out.clone(),
            a.threads,
            Job::Classifier(celeriac_tasks_vision::train::TrainOptions {
                data: a.data,
                out: a.out,
                epochs: a.epochs,
                batch_size: a.batch_size,
                learning_rate: a.learning_rate,
                seed: a.seed,
                validation: a.validation,
                limit: a.limit,
                model: match &a.init {
                    Some(dir) => {
                        celeriac_tasks_vision::weights::Weights::from_dir(dir)?
                            .meta
                            .config
                    }
                    None => celeriac_tasks_vision::model::ClassifierConfig::new()
                        .with_channels(a.channels),
                },
                init: a.init,
                scene_crops: a.scene_crops,
                role: match a.role {
                    RoleArg::Classifier => celeriac_tasks_vision::weights::Role::Classifier,
                    RoleArg::Namer => celeriac_tasks_vision::weights::Role::Namer,
                },
                command,
            }),
        ),
        Model::Detector(a) => (
            a.out.clone(),
            a.threads,
            Job::Detector(celeriac_tasks_vision::detect_train::DetectTrainOptions {
                data: a.data,
                out: a.out,
                namer: a.namer,
                epochs: a.epochs,
                scenes_per_epoch: a.scenes_per_epoch,
                batch_size: a.batch_size,
                learning_rate: a.learning_rate,
                seed: a.seed,
                validation: a.validation,
                eval_scenes: a.eval_scenes,
                eval_seed: a.eval_seed,
                model: match &a.init {
                    Some(dir) => {
                        celeriac_tasks_vision::detector::DetectorWeights::from_dir(dir)?
                            .meta
                            .config
                    }
                    None => celeriac_tasks_vision::detector::DetectorConfig::new()
                        .with_channels(a.channels),
                },
                init: a.init,
                command,
            }),
        ),
    };
    let figures = tokio::task::spawn_blocking(move || {
        let mut pool = rayon::ThreadPoolBuilder::new();
        if let Some(n) = threads {
            pool = pool.num_threads(n);
        }
        let pool = pool.build()?;
        type B = burn::backend::Autodiff<burn::backend::Flex>;
        let device = Default::default();
        pool.install(|| match &job {
            Job::Classifier(o) => celeriac_tasks_vision::train::train::<B>(o, &device),
            Job::Detector(o) => celeriac_tasks_vision::detect_train::train::<B>(o, &device),
        })
        .map_err(anyhow::Error::from)
    })
    .await??;
    println!("{}", serde_json::to_string_pretty(&figures)?);
    eprintln!("weights written to {}", out.display());
    Ok(0)
}

enum Job {
    Classifier(celeriac_tasks_vision::train::TrainOptions),
    Detector(celeriac_tasks_vision::detect_train::DetectTrainOptions),
}

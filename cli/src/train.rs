//! `celeriac train vision`: trains the vision classifier on Fashion-MNIST with Burn's autodiff on the CPU
//! and writes `classifier.mpk` and `classifier.json` (the weights `tasks/vision/weights/` ships were made
//! by `make train-vision`, which runs this with the recorded arguments).

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
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// Runs `celeriac train ...`.
pub async fn run(args: TrainArgs) -> anyhow::Result<i32> {
    let Model::Vision(a) = args.model;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let options = celeriac_tasks_vision::train::TrainOptions {
        data: a.data,
        out: a.out.clone(),
        epochs: a.epochs,
        batch_size: a.batch_size,
        learning_rate: a.learning_rate,
        seed: a.seed,
        validation: a.validation,
        limit: a.limit,
        model: celeriac_tasks_vision::model::ClassifierConfig::new().with_channels(a.channels),
        command: command
            .rsplit_once("celeriac ")
            .map(|(_, c)| format!("celeriac {c}"))
            .unwrap_or(command),
    };
    let threads = a.threads;
    let figures = tokio::task::spawn_blocking(move || {
        let mut pool = rayon::ThreadPoolBuilder::new();
        if let Some(n) = threads {
            pool = pool.num_threads(n);
        }
        let pool = pool.build()?;
        let device = Default::default();
        pool.install(|| {
            celeriac_tasks_vision::train::train::<burn::backend::Autodiff<burn::backend::Flex>>(
                &options, &device,
            )
        })
        .map_err(anyhow::Error::from)
    })
    .await??;
    println!("{}", serde_json::to_string_pretty(&figures)?);
    eprintln!("weights written to {}", a.out.display());
    Ok(0)
}

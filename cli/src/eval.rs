//! `celeriac eval recommend`: the recommendation evaluation protocol on a RecBole `.inter` file
//! (MovieLens-100k from the PyPI wheel `recbole`, fetched by `make eval-recommend`), the transformer and the
//! baselines in one run; prints the Markdown table the README shows.

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
    Recommend(RecommendArgs),
}

/// `celeriac eval recommend`.
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
    use celeriac_tasks_recommend::{data::Dataset, eval, model::SasRecConfig, train::TrainOptions};
    let Model::Recommend(a) = args.model;
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
